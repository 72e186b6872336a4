#!/usr/bin/env bash
# Builds and runs every test. GPU tests skip themselves where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/build.sh -DSALA_BUILD_TESTS=ON
cd build
ctest -j"$(nproc)" --output-on-failure "$@"
