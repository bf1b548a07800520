#!/usr/bin/env bash
# Builds the gRPC C++ Run instrument (bench/native_run/server.cc) against the venv's torch.
# Needs gRPC C++ (Debian: apt-get install libgrpc++-dev pkg-config). Usage:
#   bench/native_run/build.sh [OUT]      (default OUT: bench/native_run/build/native_run)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build/native_run}"
py="${PYTHON:-$here/../../.venv/bin/python}"
torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
mkdir -p "$(dirname "$out")"
g++ -std=c++17 -O2 -o "$out" "$here/server.cc" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  $(pkg-config --cflags grpc++) \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 \
  $(pkg-config --libs grpc++)
echo "$out"
