#!/usr/bin/env bash
# Installs every build and test dependency of the project on a Debian 12 machine.
# Idempotent; needs root (or sudo). CUDA/NCCL are optional and are not installed here.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
packages=(
  build-essential cmake ninja-build pkg-config ccache git file
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libcpp-httplib-dev
  libabsl-dev libhiredis-dev prometheus-cpp-dev libxxhash-dev
  sentencepiece nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  redis-server curl python3 python3-numpy
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Python used by the reference implementation may not be Debian's; give it numpy too.
if ! python3 -c 'import numpy' 2>/dev/null; then
  python3 -m pip install --quiet numpy
fi
echo "dependencies: ok"
