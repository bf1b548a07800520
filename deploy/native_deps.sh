#!/usr/bin/env bash
# Best effort: gRPC C++ for the extension's native data port (Debian/Ubuntu: libgrpc++-dev).
# Without it the extension builds without the port (the daemon refuses --native-run-port,
# its tests skip). Never fails the set-up.
if pkg-config --exists grpc++ 2>/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "aotiserve: gRPC C++ not found and no root apt-get: building without the native data port" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get install -y -q libgrpc++-dev pkg-config >/dev/null 2>&1 ||
  { timeout 300 apt-get update -q >/dev/null 2>&1 &&
    timeout 300 apt-get install -y -q libgrpc++-dev pkg-config >/dev/null 2>&1; } ||
  echo "aotiserve: could not install libgrpc++-dev: building without the native data port" >&2
exit 0
