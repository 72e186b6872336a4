#!/usr/bin/env bash
# The main job: build, write the small built-in model if missing, and answer a long prompt
# (a few thousand tokens, so the sparse attention path runs), streaming, with TTFT at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/build.sh
[ -f models/small/config.json ] || ./build/tools/sala-mkmodel --out=models/small
exec ./build/tools/sala-generate --model=models/small --prompt-file=tools/prompts/long_document.txt \
  --max-new-tokens=64 --seed=1 "$@"
