#!/usr/bin/env bash
# The GPU recipe (issue 16, item 8): builds aotiserve's extension with CUDA on a GPU machine,
# runs the CUDA tests and `python3 -m bench.gpu`, so anyone can reproduce the GPU figures.
#
# Made for a machine like the device tool's: python3 (3.12) holding a CUDA torch (2.11+cu130),
# nvcc/cmake/ninja present, NO gRPC C++ installed and no internet. What such a machine lacks is
# fetched beforehand, on a Debian bookworm machine with apt and pip (`prepare`), into STORE
# (default .cache/gpu-recipe/, ignored by git), which travels with the checkout:
#   debs/    Debian bookworm's gRPC C++ 1.51 and the closure that the build and the import need
#            (dev packages for headers, .pc files and link-time .so; runtime libraries; pkgconf);
#   wheels/  the Python packages at requirements-dev.txt's pins (grpcio, grpcio-health-checking,
#            grpcio-reflection, protobuf, xxhash, safetensors, tritonclient), nvidia-ml-py and tritonclient's
#            CUDA shared-memory needs (cuda-bindings), cp312 manylinux.
# On the GPU machine (`all`, the default) the debs are unpacked with `dpkg -x` beside the build
# (ROOT, .cache/gpu-work/root: never into /), pkg-config is pointed only at that tree (PKG_CONFIG_LIBDIR,
# PKG_CONFIG_SYSROOT_DIR; LIBRARY_PATH/CPATH because Debian's grpc .pc files name /usr/lib), the
# wheels go into SITE (PYTHONPATH), the extension is built against the installed torch
# (`pip install --no-build-isolation --no-deps -e .`), and tests and bench run with the system
# libstdc++ preloaded (AOTInductor models crash in std::regex under torch's older libstdc++
# otherwise). At run time a library the system already has (libssl, zlib...) is taken from the
# system; only sonames it lacks are served from ROOT (ROOT/runtime-lib on LD_LIBRARY_PATH).
#
# Usage:
#   bench/gpu_recipe.sh prepare          # here, on Debian bookworm: download debs and wheels
#                                        #   (about 23 MiB; carry at most 64 MiB)
#   bench/gpu_recipe.sh check            # here: unpack, and prove that pkg-config finds grpc++
#                                        #   from the unpacked tree alone and that the C++ echo
#                                        #   floor builds and loads against it
#   bench/gpu_recipe.sh [all]            # GPU machine: build, bench, CUDA tests (each logged)
#   bench/gpu_recipe.sh build|bench|test # one step (build is needed once per machine)
#   bench/gpu_recipe.sh shm              # GPU machine, after build: CUDA shared-memory tests and
#                                        #   bench.cuda_shared_memory, into pytest-shm.log, cuda-shm.*
#   bench/gpu_recipe.sh first            # GPU machine, after build: bench.first_request on cuda:0
#                                        #   (first request ÷ steady p50), into first.json / first.log
#   bench/gpu_recipe.sh cost             # GPU machine, after build: bench.hot_path_cost on cuda:0
#                                        #   (tiny Run vs the C++ echo, the port's own time), cost.*
#   bench/gpu_recipe.sh weights          # GPU machine, after build: bench.file_read, then
#                                        #   bench.weights --paths on cuda:0 (4 GiB), into
#                                        #   file_read.*, weights.json / weights.txt
#   eval "$(bench/gpu_recipe.sh env)"    # the environment the steps use, for commands of your own
#
# With the device tool (the store is an ignored path, so it is carried):
#   run(command="bash bench/gpu_recipe.sh all", carry=[".cache/gpu-recipe"], timeout_s=600)
# Results come back in $OUT: build.log, gpu.log, gpu.json, pytest-cuda.log, recipe.txt.
#
# Knobs (environment): OUT (default .cache/gpu-work/out), PYTHON (python3), BENCH_ARGS (extra bench.gpu
# arguments, e.g. "--devices 2"), PYTEST_ARGS, RECIPE_BUDGET_S (seconds for `all`, default 570:
# the tests get what build and bench leave), AOTISERVE_GPU_STORE, AOTISERVE_GRPC_ROOT.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STORE=${AOTISERVE_GPU_STORE:-$REPO/.cache/gpu-recipe}   # debs/, wheels/: what travels
WORK=${AOTISERVE_GPU_WORK:-$REPO/.cache/gpu-work}        # made from it, per machine
ROOT=${AOTISERVE_GRPC_ROOT:-$WORK/root}
SITE=$WORK/site
OUT=${OUT:-$WORK/out}
PY=${PYTHON:-python3}
ARCH=x86_64-linux-gnu
PRELOAD=/usr/lib/$ARCH/libstdc++.so.6

# Build: headers, .pc files, link-time .so symlinks. Run: the libraries the extension and its
# grpc libraries load (see `ldd runner_ext/_C*.so`). Tool: pkg-config (pkgconf), where none is.
DEBS=(
  libgrpc++-dev libgrpc-dev libabsl-dev libre2-dev libc-ares-dev libssl-dev zlib1g-dev
  libgrpc++1.51 libgrpc29 libabsl20220623 libre2-9 libc-ares2 libssl3 zlib1g
  pkgconf pkgconf-bin libpkgconf3 pkg-config
)
PINNED=(grpcio grpcio-health-checking grpcio-reflection protobuf xxhash safetensors tritonclient)
# Only on the GPU machine: NVML for the GPU metrics (an optional extra, `aotiserve[nvml]`);
# what tritonclient.grpc imports beyond those (ml_dtypes, rapidjson) and what its
# utils.cuda_shared_memory needs (cuda-bindings, for the CUDA shared-memory test and bench).
GPU_ONLY=(nvidia-ml-py==13.615.71 ml_dtypes==0.5.4 python-rapidjson==1.25
  cuda-bindings==13.5.0 cuda-pathfinder==1.9.1)

log() { echo "gpu_recipe: $*" >&2; }
die() { log "$*"; exit 1; }

wheel_specs() {
  local name spec
  for name in "${PINNED[@]}"; do
    spec=$(grep -E "^${name}==" "$REPO/requirements-dev.txt" | head -n1 || true)
    [ -n "$spec" ] || die "requirements-dev.txt pins no ${name}=="
    echo "$spec"
  done
  printf '%s\n' "${GPU_ONLY[@]}"
}

cmd_prepare() {
  command -v apt-get >/dev/null || die "prepare needs apt-get (a Debian bookworm machine)"
  mkdir -p "$STORE/debs" "$STORE/wheels"
  rm -f "$STORE"/debs/*.deb "$STORE"/wheels/*.whl
  if ! (cd "$STORE/debs" && apt-get download "${DEBS[@]}" >/dev/null); then
    log "apt-get download failed: apt-get update, then again"
    apt-get update -q >/dev/null
    (cd "$STORE/debs" && apt-get download "${DEBS[@]}" >/dev/null)
  fi
  local specs
  mapfile -t specs < <(wheel_specs)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$STORE/wheels" "${specs[@]}"
  log "$(find "$STORE/debs" -name '*.deb' | wc -l) debs, $(find "$STORE/wheels" -name '*.whl' | wc -l) wheels," \
    "$(du -sh "$STORE" | cut -f1) in $STORE"
  log "carry it to the GPU machine: run(command=\"bash bench/gpu_recipe.sh all\", carry=[\"${STORE#"$REPO"/}\"])"
}

# dpkg -x every deb into ROOT; absolute symlinks (e.g. a -dev package's libfoo.so ->
# /lib/...) are pointed into ROOT; runtime-lib gets the sonames the system lacks.
cmd_unpack() {
  local debs=("$STORE"/debs/*.deb)
  [ -e "${debs[0]}" ] || die "no debs in $STORE/debs: run \`bench/gpu_recipe.sh prepare\` on a Debian bookworm machine"
  if [ ! -e "$ROOT/.unpacked" ] || [ -n "$(find "$STORE/debs" -newer "$ROOT/.unpacked" -name '*.deb')" ]; then
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    local f
    for f in "${debs[@]}"; do dpkg -x "$f" "$ROOT"; done
    # usr-merge: bookworm ships some libraries under /lib; keep everything under usr/lib too.
    if [ -d "$ROOT/lib/$ARCH" ]; then
      mkdir -p "$ROOT/usr/lib/$ARCH"
      cp -an "$ROOT/lib/$ARCH/." "$ROOT/usr/lib/$ARCH/"
    fi
    local link target
    while IFS= read -r -d '' link; do
      target=$(readlink "$link")
      case "$target" in
        /lib/* | /usr/lib/*)
          if [ -e "$ROOT$target" ]; then ln -sfn "$ROOT$target" "$link"
          else ln -sfn "$ROOT/usr/lib/$ARCH/$(basename "$target")" "$link"; fi ;;
      esac
    done < <(find "$ROOT" -type l -print0)
    touch "$ROOT/.unpacked"
  fi
  # Only what the system cannot resolve itself goes on LD_LIBRARY_PATH.
  rm -rf "$ROOT/runtime-lib"
  mkdir -p "$ROOT/runtime-lib"
  local known lib so
  known=$(ldconfig -p 2>/dev/null | awk '{print $1}' | sort -u)
  for lib in "$ROOT/usr/lib/$ARCH"/*.so.*; do
    [ -e "$lib" ] || continue
    so=$(basename "$lib")
    if ! grep -qxF "$so" <<<"$known"; then
      ln -sfn "$lib" "$ROOT/runtime-lib/$so"
    fi
  done
}

# The environment of every later step (also printed by `env`).
recipe_env() {
  cat <<EOF
export PKG_CONFIG_SYSROOT_DIR="$ROOT"
export PKG_CONFIG_LIBDIR="$ROOT/usr/lib/$ARCH/pkgconfig:$ROOT/usr/share/pkgconfig:$ROOT/usr/lib/pkgconfig"
export PKG_CONFIG_ALLOW_SYSTEM_CFLAGS=1
export PKG_CONFIG_ALLOW_SYSTEM_LIBS=1
export LIBRARY_PATH="$ROOT/usr/lib/$ARCH\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CPATH="$ROOT/usr/include\${CPATH:+:\$CPATH}"
export LD_LIBRARY_PATH="$ROOT/runtime-lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="\$PATH:$ROOT/usr/bin"
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
EOF
}

enter_env() {
  cmd_unpack
  eval "$(recipe_env)"
  command -v pkg-config >/dev/null || die "no pkg-config, not even the unpacked one"
  local v
  v=$(pkg-config --modversion grpc++) || die "pkg-config does not find grpc++ in $ROOT"
  log "grpc++ $v from $(pkg-config --variable=pcfiledir grpc++)"
}

cmd_env() {
  cmd_unpack >&2
  recipe_env
}

cmd_check() {
  enter_env
  pkg-config --cflags --libs grpc++
  # Only the unpacked tree: the build would fail here if it relied on this machine's gRPC.
  case "$(pkg-config --variable=pcfiledir grpc++)" in
    "$ROOT"/*) ;;
    *) die "grpc++.pc was not found in $ROOT" ;;
  esac
  local bin
  bin=$(cd "$REPO" && "$PY" -m bench.cpp_echo) || die "the C++ echo floor did not build against $ROOT"
  log "C++ echo floor built: $bin"
  ldd "$bin" | grep -E "grpc|absl|ssl|cares|re2|libz|not found" || true
  ! ldd "$bin" | grep -q "not found" || die "unresolved libraries (above)"
  log "check passed"
}

cmd_build() {
  enter_env
  mkdir -p "$SITE" "$OUT"
  local wheels=("$STORE"/wheels/*.whl)
  if [ -e "${wheels[0]}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"
  else
    log "no wheels in $STORE/wheels: using the machine's Python packages as they are"
  fi
  # CUDA_HOME from nvcc where torch cannot tell; build for the card that is here.
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}.{c[1]}" if c else "")' 2>/dev/null || true)
    if [ -n "$TORCH_CUDA_ARCH_LIST" ]; then export TORCH_CUDA_ARCH_LIST; else unset TORCH_CUDA_ARCH_LIST; fi
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  (cd "$REPO" && "$PY" -m pip install --no-build-isolation --no-deps -e .) >"$OUT/build.log" 2>&1 ||
    { tail -n 40 "$OUT/build.log" >&2; die "the build failed (log: $OUT/build.log)"; }
  (cd /tmp && LD_PRELOAD=$PRELOAD "$PY" -c '
import sys
from aotiserve import runner_ext
from aotiserve.runner_ext import _build_info
print("aotiserve.runner_ext built for torch", _build_info.TORCH_VERSION, "backends", _build_info.BACKENDS)
sys.exit(0 if "cuda" in _build_info.BACKENDS else 3)') | tee -a "$OUT/build.log" ||
    die "the extension imports, but was built without CUDA (log: $OUT/build.log)"
}

cmd_test() {
  enter_env
  mkdir -p "$OUT"
  local files
  mapfile -t files < <(cd "$REPO" && grep -l "pytest.mark.cuda" tests/test_*.py)
  log "CUDA tests: ${files[*]}"
  # shellcheck disable=SC2086
  (cd "$REPO" && LD_PRELOAD=$PRELOAD PYTHONUNBUFFERED=1 ${TEST_TIMEOUT:+timeout "$TEST_TIMEOUT"} \
    "$PY" -m pytest -q -m cuda -p no:cacheprovider ${PYTEST_ARGS:-} "${files[@]}") 2>&1 | tee "$OUT/pytest-cuda.log"
}

# bench_step LOG MODULE [ARG...]: `python3 -m MODULE ARG...` from the checkout, in the recipe's
# environment with the libstdc++ preload, within BENCH_TIMEOUT if set; its output into OUT/LOG.
bench_step() {
  local log=$1
  shift
  enter_env
  mkdir -p "$OUT"
  (cd "$REPO" && LD_PRELOAD=$PRELOAD PYTHONUNBUFFERED=1 ${BENCH_TIMEOUT:+timeout "$BENCH_TIMEOUT"} \
    "$PY" -m "$@") 2>&1 | tee "$OUT/$log"
}

cmd_bench() {
  # shellcheck disable=SC2086
  bench_step gpu.log bench.gpu --json "$OUT/gpu.json" ${BENCH_ARGS:-}
}

# Weights at device speed (issue 19): upload, file pull and GPU-direct side by side, with
# pinned H2D and D2D copies of the same bytes (WEIGHTS_ARGS: e.g. "--gib 1 --rounds 1"); first
# the host side of a pull alone (bench.file_read: ways of reading a page-cached file on every
# thread), into file_read.json / file_read.txt.
cmd_weights() {
  BENCH_TIMEOUT=150 bench_step file_read.txt bench.file_read --gib 4 --rounds 2 --json "$OUT/file_read.json" ||
    log "bench.file_read failed (see $OUT/file_read.txt); the weights bench runs anyway"
  # shellcheck disable=SC2086
  (cd "$REPO" && LD_PRELOAD=$PRELOAD PYTHONUNBUFFERED=1 ${BENCH_TIMEOUT:+timeout "$BENCH_TIMEOUT"} \
    "$PY" -m bench.weights --paths --device cuda:0 --json ${WEIGHTS_ARGS:---gib 4 --rounds 2 --clients 4}) \
    > "$OUT/weights.json" 2> "$OUT/weights.log"
  (cd "$REPO" && "$PY" -c 'import json, sys; from bench import weights_paths; weights_paths.report(json.load(open(sys.argv[1])))' "$OUT/weights.json") | tee "$OUT/weights.txt"
}

# OIP CUDA shared memory (issue 20): its tests (tritonclient's utils.cuda_shared_memory flow,
# and the system shared-memory suite on this machine too), then bench.cuda_shared_memory.
cmd_shm() {
  enter_env
  mkdir -p "$OUT"
  (cd "$REPO" && LD_PRELOAD=$PRELOAD PYTHONUNBUFFERED=1 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cuda_shared_memory.py tests/test_oip_shared_memory.py tests/test_shared_memory_units.py) \
    2>&1 | tee "$OUT/pytest-shm.log"
  # shellcheck disable=SC2086
  bench_step cuda-shm.log bench.cuda_shared_memory --json "$OUT/cuda-shm.json" ${SHM_ARGS:-}
}

# Where a tiny CUDA Run's time goes against the C++ echo floor (issue 16): bench.hot_path_cost
# on cuda:0, into cost.json / cost.log.
cmd_cost() {
  # shellcheck disable=SC2086
  bench_step cost.log bench.hot_path_cost --device cuda:0 --json "$OUT/cost.json" ${COST_ARGS:-}
}

# First-request latency with and without warm-up against the steady p50 (issue 18).
cmd_first() {
  # shellcheck disable=SC2086
  bench_step first.log bench.first_request --device cuda:0 --json "$OUT/first.json" ${FIRST_ARGS:-}
}

cmd_all() {
  local start=$SECONDS budget=${RECIPE_BUDGET_S:-570} rc_build=0 rc_bench=0 rc_test=0 left
  mkdir -p "$OUT"
  {
    echo "gpu_recipe all: $(date -u +%FT%TZ) on $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' || true
  } | tee "$OUT/recipe.txt"
  # Each step in a bash of its own, so that `set -e` holds inside it.
  local self=("$BASH" "${BASH_SOURCE[0]}")
  "${self[@]}" build || rc_build=$?
  echo "build: rc=$rc_build after $((SECONDS - start)) s" | tee -a "$OUT/recipe.txt"
  if [ "$rc_build" = 0 ]; then
    left=$((budget - (SECONDS - start) - 60))
    BENCH_TIMEOUT=$((left > 60 ? left : 60)) "${self[@]}" bench || rc_bench=$?
    echo "bench: rc=$rc_bench after $((SECONDS - start)) s" | tee -a "$OUT/recipe.txt"
    left=$((budget - (SECONDS - start)))
    if [ "$left" -gt 30 ]; then
      TEST_TIMEOUT=$left "${self[@]}" test || rc_test=$?
      local why=""
      [ "$rc_test" != 124 ] || why=" (out of time: run \`bench/gpu_recipe.sh build test\` in a call of its own)"
      echo "test: rc=$rc_test after $((SECONDS - start)) s$why" | tee -a "$OUT/recipe.txt"
    else
      rc_test=124
      echo "test: not run, ${left} s left of ${budget} (run \`bench/gpu_recipe.sh build test\` in a call of its own)" |
        tee -a "$OUT/recipe.txt"
    fi
  fi
  [ "$rc_build" = 0 ] && [ "$rc_bench" = 0 ] && [ "$rc_test" = 0 ]
}

main() {
  [ $# -gt 0 ] || set -- all
  local step
  for step in "$@"; do
    case "$step" in
      prepare | unpack | env | check | build | test | bench | weights | shm | first | cost | all) "cmd_$step" ;;
      -h | --help | help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
      *) die "unknown step '$step' (prepare, check, env, build, bench, weights, shm, first, cost, test, all)" ;;
    esac
  done
}

main "$@"
