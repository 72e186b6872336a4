#!/usr/bin/env bash
# The main job: build, write the small built-in model if missing, start a local cluster on
# loopback (redis-server, router, prefill and decode workers), answer a ~3,500-token prompt
# through the OpenAI-compatible HTTP API, streaming, print the TTFT, and stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/build.sh
[ -f models/small/config.json ] || ./build/tools/sala-mkmodel --out=models/small
exec python3 tools/cluster/sala_cluster.py --model=models/small --prompt-file=tools/prompts/long_document.txt \
  --max-tokens=64 "$@"
