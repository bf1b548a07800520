#!/usr/bin/env bash
# Builds the CPU image with podman and smoke-tests it: start, gRPC health
# SERVING, one inference on the demo model answered by the C++ hot path (its
# metric), SIGTERM, exit code 0.
#
# Works on a machine with no Docker engine and no access to image registries
# (only to package registries): the base image is made locally with
# debootstrap and tagged as the Dockerfile's base. Everything podman keeps
# (configuration, image storage, the base rootfs) lives in $WORK, never in the
# host's default podman storage. Re-runs reuse the base image and the build
# cache, so a second run with no source change takes seconds.
#
# Environment (all optional):
#   AOTISERVE_IMAGE_WORK   work folder (default /var/tmp/aotiserve-image-test)
#   AOTISERVE_IMAGE        tag to build (default localhost/aotiserve:cpu-test)
#   AOTISERVE_IMAGE_PYTHON python with grpcio and aotiserve.client for the
#                          smoke test (default: the repo's .venv, else python3)
#   AOTISERVE_IMAGE_OFFLINE=1  fill wheelhouse/ with every wheel first and
#                          build with no package index (the air-gapped path)
#   AOTISERVE_IMAGE_KEEP=1 leave the container running after the test
#   AOTISERVE_HEALTH_TIMEOUT seconds to wait for SERVING (default 300)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${AOTISERVE_IMAGE_WORK:-/var/tmp/aotiserve-image-test}"
IMAGE="${AOTISERVE_IMAGE:-localhost/aotiserve:cpu-test}"
# The Dockerfile's default base; podman resolves the short name to this.
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
SUITE="bookworm"
MIRROR="${AOTISERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HEALTH_TIMEOUT="${AOTISERVE_HEALTH_TIMEOUT:-300}"
STOP_TIMEOUT=30

log() { printf '[image-test %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

ensure_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v runc >/dev/null || missing+=(runc)
    command -v newuidmap >/dev/null || missing+=(uidmap)
    [ -x /usr/lib/cni/bridge ] || [ -x /usr/libexec/cni/bridge ] || missing+=(containernetworking-plugins)
    command -v slirp4netns >/dev/null || missing+=(slirp4netns)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} from apt"
        [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" fuse-overlayfs >/dev/null
    fi
}

# Private podman configuration: runc (crun refuses this host's hybrid cgroup
# layout), overlay storage under $WORK, and ulimits the host can grant
# (podman's defaults fail with EPERM here).
write_config() {
    mkdir -p "$WORK/storage" "$WORK/runroot"
    local nofile nproc
    nofile="$(ulimit -Hn)"
    [ "$nofile" = unlimited ] && nofile=1048576
    nproc="$(ulimit -Hu)"
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/runroot"
EOF
    export CONTAINERS_CONF="$WORK/containers.conf"
    export CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
}

# Unmounts whatever is mounted under $1 (debootstrap can leave /proc mounted
# in the rootfs), deepest first, so that tar and rm never walk into it.
unmount_under() {
    local root mnt
    root="$(realpath -m "$1")"
    awk -v r="$root/" '{ if (index($2 "/", r) == 1) print $2 }' /proc/mounts | sort -r \
        | while read -r mnt; do umount -l "$mnt"; done
}

# Registries are unreachable: make debian:bookworm-slim with debootstrap.
ensure_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE present (reused)"
        return
    fi
    local rootfs="$WORK/rootfs"
    log "building base image $BASE_IMAGE with debootstrap --variant=minbase $SUITE"
    unmount_under "$rootfs"
    rm -rf --one-file-system "$rootfs"
    if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        unmount_under "$rootfs"
        tail -20 "$WORK/debootstrap.log" >&2
        die "debootstrap failed (log: $WORK/debootstrap.log)"
    fi
    unmount_under "$rootfs"
    # What debian:bookworm-slim trims: apt lists and caches, docs; /dev, /proc
    # and /sys stay empty (the runtime mounts them).
    rm -rf --one-file-system "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/cache/apt/*.bin \
        "${rootfs:?}"/usr/share/doc/* "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* \
        "${rootfs:?}"/dev/* "${rootfs:?}"/proc/* "${rootfs:?}"/sys/*
    tar --one-file-system --numeric-owner -C "$rootfs" -c . | podman import --quiet \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf --one-file-system "$rootfs"
}

# The CPU torch wheel (from pip's find-links folder) goes into the build
# context's wheelhouse/, so the build never fetches a CUDA build of torch.
fill_wheelhouse() {
    mkdir -p "$REPO/wheelhouse"
    local links wheel
    links="$(pip config get global.find-links 2>/dev/null || true)"
    for dir in $links ${PIP_FIND_LINKS:-}; do
        for wheel in "$dir"/torch-*+cpu-*.whl; do
            [ -f "$wheel" ] || continue
            [ -f "$REPO/wheelhouse/$(basename "$wheel")" ] && continue
            log "wheelhouse: $(basename "$wheel")"
            ln "$wheel" "$REPO/wheelhouse/" 2>/dev/null || cp "$wheel" "$REPO/wheelhouse/"
        done
    done
    if [ "${AOTISERVE_IMAGE_OFFLINE:-0}" = 1 ]; then
        log "wheelhouse: downloading every dependency for an offline build"
        "$PY" "$REPO/deploy/wheelhouse.py" "$REPO/wheelhouse" >"$WORK/wheelhouse.log" 2>&1 \
            || { tail -20 "$WORK/wheelhouse.log" >&2; die "filling the wheelhouse failed"; }
        log "wheelhouse: $(find "$REPO/wheelhouse" -name '*.whl' | wc -l) wheels"
    fi
}

build_image() {
    local offline=0 ca_args=() torch_args=()
    [ "${AOTISERVE_IMAGE_OFFLINE:-0}" = 1 ] && offline=1
    # With the CPU torch wheel in the wheelhouse, no torch index at all
    # (download.pytorch.org may be unreachable); without it, the Dockerfile's
    # default, the CPU index (PyPI's torch is the CUDA build, GBs).
    if compgen -G "$REPO/wheelhouse/torch-*+cpu-*.whl" >/dev/null; then
        torch_args=(--build-arg TORCH_INDEX_URL=)
    fi
    # TLS to the package index inside the build needs this host's CA bundle
    # (it includes the egress proxy's CA); mounted for the build, never baked.
    local ca=/etc/ssl/certs/ca-certificates.crt
    if [ -f "$ca" ]; then
        ca_args=(-v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    fi
    # The private store holds only this script's work: drop build containers
    # that an interrupted earlier run left behind.
    buildah rm --all >/dev/null 2>&1 || true
    log "building $IMAGE (offline=$offline)"
    local t0=$SECONDS
    # --format docker: OCI images drop SHELL and HEALTHCHECK.
    podman build --pull=never --network=host --format docker -f "$REPO/Dockerfile" -t "$IMAGE" \
        --build-arg WHEELHOUSE_ONLY="$offline" "${torch_args[@]}" "${ca_args[@]}" \
        "$REPO" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; die "podman build failed (log: $WORK/build.log)"; }
    BUILD_SECONDS=$((SECONDS - t0))
    # Bound the store's growth: layers no image uses and no build reused for a
    # day go (today's build cache stays, so re-runs stay fast).
    podman image prune -f --filter until=24h >/dev/null 2>&1 || true
    IMAGE_SIZE="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

CID=""
VOLUME=""
cleanup() {
    if [ -n "$CID" ] && [ "${AOTISERVE_IMAGE_KEEP:-0}" != 1 ]; then
        podman rm -f -t 0 "$CID" >/dev/null 2>&1 || true
    fi
    if [ -n "$VOLUME" ] && [ "${AOTISERVE_IMAGE_KEEP:-0}" != 1 ]; then
        podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# SIGTERM (podman stop) must drain and exit 0.
stop_and_check() {
    local t0=$SECONDS code
    log "sending SIGTERM (podman stop -t $STOP_TIMEOUT)"
    podman stop -t "$STOP_TIMEOUT" "$CID" >/dev/null
    code="$(podman inspect --format '{{.State.ExitCode}}' "$CID")"
    log "container exited with code $code after $((SECONDS - t0)) s; its last lines:"
    podman logs --tail 3 "$CID" >&2 || true
    [ "$code" = 0 ] || die "exit code $code after SIGTERM (want 0)"
    podman rm "$CID" >/dev/null
    CID=""
}

# Like the Kubernetes manifests: read-only root with a writable /tmp, no
# capabilities, no privilege escalation (the image's user is 10001), and no
# --init: the image's own tini is PID 1 and forwards SIGTERM (podman's --init
# would also need the catatonit package).
RUN_ARGS=(--read-only --tmpfs "/tmp:rw,size=1g" --cap-drop ALL --security-opt no-new-privileges)

start_container() {
    local port mport
    port="$(free_port)"
    mport="$(free_port)"
    CID="$(podman run -d "${RUN_ARGS[@]}" \
        -p "127.0.0.1:$port:8500" -p "127.0.0.1:$mport:8502" "$@" "$IMAGE")"
    TARGET="127.0.0.1:$port"
    METRICS="127.0.0.1:$mport"
    log "started ${CID:0:12} on $TARGET (metrics $METRICS)"
}

# Runs deploy/smoke.py against the container; its report goes to stderr and
# to $WORK/smoke.out.
smoke() {
    local rc=0
    "$PY" "$REPO/deploy/smoke.py" --target "$TARGET" --metrics "$METRICS" \
        --timeout "$HEALTH_TIMEOUT" "$@" >"$WORK/smoke.out" || rc=$?
    cat "$WORK/smoke.out" >&2
    if [ "$rc" != 0 ]; then
        podman logs --tail 50 "$CID" >&2 || true
        die "smoke test failed"
    fi
}

# The Runs that smoke() made were answered by the C++ hot path: its counter
# aotiserve_hot_path_requests_total{method="Run"} (only requests answered in C++
# count) is above 0. A failure is reported at once and fails the test at the end,
# after the other checks have run.
HOT_PATH_METRIC='aotiserve_hot_path_requests_total{method="Run"}'
HOT_PATH_FAILED=""
HOT_PATH_RUNS=""
hot_path_check() {
    local out rc=0
    out="$("$PY" - "$METRICS" <<'PYTHON'
import sys
import urllib.request

with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10) as reply:
    text = reply.read().decode()
name = "aotiserve_hot_path_requests_total"
samples = [line for line in text.splitlines()
           if line.startswith(name + "{") and 'method="Run"' in line]
if not samples:
    print(f"/metrics has no {name} sample with method=\"Run\"")
    sys.exit(1)
total = sum(float(line.rsplit(None, 1)[1]) for line in samples)
print("; ".join(samples))
sys.exit(0 if total > 0 else 1)
PYTHON
)" || rc=$?
    if [ "$rc" = 0 ]; then
        log "hot path: $out"
        [ -n "$HOT_PATH_RUNS" ] || HOT_PATH_RUNS="${out##* }"
    else
        local failure="$1: want $HOT_PATH_METRIC > 0 (the C++ hot path answered the Runs), got: $out"
        log "FAIL: hot path, $failure"
        [ -n "$HOT_PATH_FAILED" ] || HOT_PATH_FAILED="$failure"
    fi
}

# 1. The image as shipped: the prebuilt demo, no compiler, HEALTHCHECK, drain.
demo_test() {
    # Podman runs HEALTHCHECKs from systemd timers; without systemd it only
    # logs errors, so the check is run by hand below instead.
    [ -S /run/systemd/private ] || RUN_ARGS+=(--no-healthcheck)
    if podman run --rm --no-healthcheck --entrypoint sh "$IMAGE" -c \
        'command -v g++ || command -v gcc || command -v cc' >/dev/null; then
        die "the runtime image has a C/C++ compiler"
    fi
    local dev
    dev="$(podman run --rm --no-healthcheck --entrypoint sh "$IMAGE" -c \
        "dpkg-query -W -f '\${Package}\n' | grep -e '-dev\$' -e '^pkg-config\$' || true")"
    [ -z "$dev" ] || die "the runtime image has build-only packages: $(echo "$dev" | tr '\n' ' ')"
    log "phase 1: the demo (no C/C++ compiler in the image: it is served prebuilt)"
    start_container
    smoke
    hot_path_check "phase 1"
    podman exec "$CID" aotiserve-healthcheck || die "the image's HEALTHCHECK command failed"
    stop_and_check
}

# 2. As Kubernetes runs it: a model repository mounted read-only, the admin
# token as a file, a weights volume; roll new weights out with the operator
# command, restart, and check the committed version survived.
repository_test() {
    local dir="$WORK/repository" version
    rm -rf "$dir" && mkdir -p "$dir/models"
    podman run --rm --no-healthcheck --entrypoint sh "$IMAGE" -c 'cat /opt/aotiserve-demo/*/demo.pt2' \
        >"$dir/models/demo.pt2"
    # Test token: readable by the container's uid 10001 (a Secret gets fsGroup).
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$dir/admin-token"
    chmod 0644 "$dir/admin-token"
    VOLUME="aotiserve-image-test-weights-$$"
    podman volume create "$VOLUME" >/dev/null
    local args=(-v "$dir/models:/models:ro" -v "$VOLUME:/weights"
                -v "$dir/admin-token:/etc/aotiserve/admin/token:ro"
                -e AOTISERVE_MODEL_REPOSITORY=/models -e "AOTISERVE_ALLOWED_ROOTS=/models"
                -e AOTISERVE_ADMIN_TOKEN_FILE=/etc/aotiserve/admin/token -e AOTISERVE_LOG_JSON=1)
    log "phase 2: model repository, admin token, weights volume; weights rollout; restart"
    start_container "${args[@]}"
    smoke --rollout demo --admin-token-file "$dir/admin-token"
    version="$(sed -n 's/^VERSION=//p' "$WORK/smoke.out")"
    [ -n "$version" ] || die "no version from the rollout"
    stop_and_check
    start_container "${args[@]}"
    smoke --expect-version "demo=$version"
    hot_path_check "phase 2"
    stop_and_check
}

main() {
    ensure_tools
    mkdir -p "$WORK"
    write_config
    if [ -n "${AOTISERVE_IMAGE_PYTHON:-}" ]; then PY="$AOTISERVE_IMAGE_PYTHON"
    elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
    else PY=python3; fi
    local t_all=$SECONDS
    ensure_base_image
    fill_wheelhouse
    build_image
    demo_test
    repository_test
    if [ -n "$HOT_PATH_FAILED" ]; then
        printf 'image-test: FAIL  hot path, %s\n' "$HOT_PATH_FAILED"
        exit 1
    fi
    printf 'image-test: OK  image=%s  build=%ss  size=%s MB  hot-path Runs=%s  total=%ss\n' \
        "$IMAGE" "$BUILD_SECONDS" "$((IMAGE_SIZE / 1000000))" "$HOT_PATH_RUNS" "$((SECONDS - t_all))"
}

main "$@"
