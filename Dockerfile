# syntax=docker/dockerfile:1
# aotiserve container image: a builder stage that compiles the runner
# extension against the pinned torch (and the demo model), and a slim runtime
# stage with only what serving needs. See docs/deploy.md.
#
# CPU (default):
#   docker build -t aotiserve:cpu .
# CUDA (Ubuntu 24.04 CUDA images ship python3.12; torch's cu130 index has it):
#   docker build -t aotiserve:cuda \
#     --build-arg VARIANT=cuda \
#     --build-arg BUILDER_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# Air-gapped: put every wheel in wheelhouse/ (deploy/wheelhouse.py) and add
#   --build-arg WHEELHOUSE_ONLY=1

ARG BUILDER_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- builder --
FROM ${BUILDER_IMAGE} AS builder
ARG VARIANT=cpu
ARG TORCH_SPEC=torch==2.13.0
# Where torch comes from when wheelhouse/ has no matching wheel. PyPI's Linux
# torch is the CUDA build (GBs), so the CPU variant points at the CPU index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1: install from wheelhouse/ only, never from the network.
ARG WHEELHOUSE_ONLY=0
# A CA bundle for TLS to the package index (e.g. behind an intercepting
# proxy): mount it into the build (podman build -v FILE:/run/host-ca.crt:ro)
# and pass --build-arg PIP_CERT=/run/host-ca.crt. Builder stage only.
ARG PIP_CERT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gRPC C++ (libgrpc++-dev, found with pkg-config): the extension serves the
# daemon's port with it and does not build without it.
# DL3008: apt versions follow the base image's point release (pinning them
# breaks the build at every Debian security update); the base tag pins the suite.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ libgrpc++-dev pkg-config \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/aotiserve \
    PATH=/opt/aotiserve/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/deploy/constraints.txt
RUN python3 -m venv "$VIRTUAL_ENV"

# torch and the dependencies first: this layer survives source edits.
# wheelhouse/ is always a find-links source; WHEELHOUSE_ONLY=1 makes it the only one.
ENV PIP_FIND_LINKS=/wheelhouse
COPY wheelhouse/ /wheelhouse/
COPY deploy/constraints.txt deploy/requirements-image.txt /src/deploy/
# DL3013: the pin is in TORCH_SPEC (torch==2.13.0), which hadolint cannot read.
# hadolint ignore=DL3013
RUN if [ "$WHEELHOUSE_ONLY" = 1 ]; then export PIP_NO_INDEX=1; \
    elif [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install "$TORCH_SPEC" \
 && unset PIP_EXTRA_INDEX_URL \
 && pip install -r /src/deploy/requirements-image.txt \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The extension is compiled against the torch installed above, first on its
# own (setup.py build_ext into /src/build), so that edits to the Python
# packages reuse this layer; `pip wheel` below builds in-tree and finds the
# compiled objects up to date.
COPY pyproject.toml setup.py /src/
COPY runner_ext/ /src/runner_ext/
WORKDIR /src
RUN python setup.py -q build_ext

# The runtime stage installs the packages that own the system libraries the
# extension links (gRPC C++ and what it needs: libgrpc++1.51 on Debian bookworm,
# libgrpc++1.51t64 on Ubuntu 24.04), and no -dev package. torch's libraries are
# in the virtualenv, which the runtime stage copies.
RUN so="$(find /src/build -name '_C*.so')" \
 && [ -f "$so" ] \
 && ldd "$so" | awk -v venv="$VIRTUAL_ENV/" '$2 == "=>" && $3 ~ /^\// && index($3, venv) != 1 {print $1}' \
    | while read -r lib; do dpkg -S "*/$lib" || { echo "no package owns $lib" >&2; exit 1; }; done \
    | sed -E 's/: \/.*$//; s/, /\n/g' | sed -E 's/:.*$//' | sort -u >/src/runtime-packages.txt \
 && grep -q '^libgrpc++' /src/runtime-packages.txt \
 && echo "runtime packages: $(tr '\n' ' ' </src/runtime-packages.txt)"

COPY README.md /src/
COPY server/ /src/server/
COPY client/ /src/client/
RUN pip wheel --no-build-isolation --no-deps -w /dist . \
 && pip install --no-index --no-deps /dist/aotiserve-*.whl \
 && python -c "from aotiserve import runner_ext; print('runner_ext backends', runner_ext.compiled_backends())" \
 && if [ "$VARIANT" = cuda ]; then python -c "from aotiserve import runner_ext; \
        assert 'cuda' in runner_ext.compiled_backends(), 'VARIANT=cuda but the extension has no CUDA backend'"; fi

# Compile the built-in demo model now, so the runtime image needs no compiler.
COPY deploy/prepare_demo.py /src/deploy/prepare_demo.py
RUN python /src/deploy/prepare_demo.py /opt/aotiserve-demo

# Build-only packages stay behind; the runtime stage copies this venv. Without
# a compiler there, torch's C++ headers and its test binaries are dead weight
# (about 200 MB); torch_shm_manager stays (shared-memory tensors). The
# extension loses its debug info.
RUN pip uninstall -y pybind11 ninja wheel pip \
 && torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
 && rm -rf "$torch_dir/include" "$torch_dir/test" \
 && find "$torch_dir/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
 && find "$VIRTUAL_ENV" -name __pycache__ -prune -exec rm -rf {} + \
 && find "$VIRTUAL_ENV" -path '*/site-packages/aotiserve/*' -name '*.so' -exec strip --strip-debug {} + \
 && python -c "from aotiserve import runner_ext; print('runner_ext', runner_ext.compiled_backends())"

# ---------------------------------------------------------------- runtime --
FROM ${RUNTIME_IMAGE} AS runtime
ARG VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="aotiserve" \
      org.opencontainers.image.description="gRPC daemon serving PyTorch AOTInductor models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.aotiserve.variant="${VARIANT}"

# python3 (no -dev, no compiler: prebuilt .pt2 packages load without one),
# tini as PID 1 so SIGTERM reaches the server and drains it, and the runtime
# libraries of gRPC C++ that the extension links (listed by the builder).
COPY --from=builder /src/runtime-packages.txt /usr/share/aotiserve/runtime-packages.txt
# DL3008: as in the builder stage.
# hadolint ignore=DL3008
RUN mapfile -t libs </usr/share/aotiserve/runtime-packages.txt \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini "${libs[@]}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 aotiserve \
 && useradd --uid 10001 --gid 10001 --home-dir /home/aotiserve --create-home \
        --shell /usr/sbin/nologin aotiserve \
 && mkdir -p /models /weights \
 && chown 10001:10001 /models /weights

COPY --from=builder /opt/aotiserve /opt/aotiserve
# The extension loads here, without a compiler or any -dev package.
RUN ["/opt/aotiserve/bin/python", "-B", "-c", "from aotiserve import runner_ext; print('runner_ext', runner_ext.compiled_backends())"]
COPY --from=builder /opt/aotiserve-demo /opt/aotiserve-demo
COPY deploy/healthcheck.py /opt/aotiserve/bin/aotiserve-healthcheck

# The daemon reads AOTISERVE_* (each flag's env twin, e.g. AOTISERVE_PORT,
# AOTISERVE_MODEL_REPOSITORY; or a TOML/JSON file via AOTISERVE_CONFIG or
# --config). These defaults make it reachable from outside the container and
# serve the prebuilt demo when no model repository is set. Packages unpack and
# caches go to /tmp, so the root filesystem can be read-only (give /tmp a
# tmpfs/emptyDir). No admin token is set here: until one is mounted and named by
# AOTISERVE_ADMIN_TOKEN_FILE (the manifests do), the daemon takes mutating RPCs
# (weight pushes, load/unload) only from loopback, i.e. from inside the container.
ENV PATH=/opt/aotiserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/aotiserve \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    AOTISERVE_DEMO_CACHE_DIR=/opt/aotiserve-demo \
    AOTISERVE_HOST=0.0.0.0 \
    AOTISERVE_PORT=8500 \
    AOTISERVE_METRICS_PORT=8502 \
    AOTISERVE_WEIGHTS_DIR=/weights

USER 10001:10001
WORKDIR /home/aotiserve
VOLUME ["/models", "/weights"]
EXPOSE 8500 8502
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["aotiserve-healthcheck"]
ENTRYPOINT ["tini", "-s", "--", "aotiserve", "serve"]
CMD []
