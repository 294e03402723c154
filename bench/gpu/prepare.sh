#!/usr/bin/env bash
# Run HERE (the development machine), from the project root, before a device run: puts in
# .whl the wheels the GPU image lacks and in .bin the wrk load generator with its LuaJIT,
# both ignored by git. Then: device run with carry [".whl", ".bin"] and the command
#   bash bench/gpu/run.sh
set -euo pipefail
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in .whl .bin; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"; done
# What the shared fetch script takes, plus what the service and tests need beyond it.
../shared/device/fetch-wheels.sh httptools websockets watchfiles pytest-asyncio pybase64
mkdir -p .bin
cp "$(command -v wrk)" .bin/wrk
cp "$(ldd "$(command -v wrk)" | awk '/libluajit/ {print $3}')" .bin/
du -sh .whl .bin
