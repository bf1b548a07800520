#!/usr/bin/env bash
# What the extension needs to build besides Python packages: gRPC C++ (the daemon's port is
# served by it), found with pkg-config. `make setup` runs this first.
#
# Found: nothing to do. Missing, as root with apt-get (Debian/Ubuntu): installs libgrpc++-dev
# and pkg-config. Otherwise: one line naming the packages on stderr, and exit 1 (make stops).
set -u
PACKAGES="libgrpc++-dev pkg-config"
HOW="apt-get install libgrpc++-dev pkg-config (Debian/Ubuntu), brew install grpc pkg-config (macOS) or conda install -c conda-forge grpc-cpp pkg-config"

found() { command -v pkg-config >/dev/null && pkg-config --exists grpc++ 2>/dev/null; }

found && exit 0
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "aotiserve: gRPC C++ (grpc++ with pkg-config) is required to build the extension and was not found; install it: $HOW" >&2
    exit 1
fi
echo "aotiserve: installing $PACKAGES (gRPC C++, required by the extension) with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
# shellcheck disable=SC2086 # PACKAGES is a list of words
if ! { timeout 600 apt-get install -y -q --no-install-recommends $PACKAGES >"$log" 2>&1 ||
       { timeout 300 apt-get update -q >>"$log" 2>&1 &&
         timeout 600 apt-get install -y -q --no-install-recommends $PACKAGES >>"$log" 2>&1; }; } ||
   ! found; then
    echo "aotiserve: gRPC C++ is required to build the extension and apt-get could not install $PACKAGES (its output: $log); install it: $HOW" >&2
    exit 1
fi
rm -f "$log"
