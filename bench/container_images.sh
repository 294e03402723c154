#!/usr/bin/env bash
# Build the slim (torch-free) and cpu images of the Dockerfile where no image registry is
# reachable, print their sizes, and serve an export from the slim one (/readyz, one /embed).
#
# The Dockerfile's base, python:3.11-slim, is stood in for by a Debian bookworm made with
# debootstrap (its python3 is 3.11), imported under that name. Builds use podman with chroot
# isolation; pip inside them uses this machine's CA bundle and package mirrors when it has them
# (the torch wheels of the cpu target come from PyPI, the CUDA build, where PyTorch's CPU
# index is out of reach). Where the sandbox forbids running containers, the slim image's
# file system is served in a chroot instead, which checks the same files.
#
# Needs root and: apt-get install podman buildah debootstrap. Not part of .ci/run (minutes of
# downloads and several GB of disk). Usage: bash bench/container_images.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/clipsearch-images}
PORT=${PORT:-18766}
BASE=docker.io/library/python:3.11-slim
mkdir -p "$WORK"

if ! podman image exists "$BASE"; then
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian
  ln -sf python3 "$WORK/rootfs/usr/bin/python"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE"
fi

# pip inside the build: this machine's CA bundle (a TLS-inspecting proxy) and local mirrors
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/host-ca.crt"
  [ -d /opt/pypi/simple ] && echo "extra-index-url = file:///opt/pypi/simple file:///opt/pypi-more/simple"
  [ -d /opt/wheels ] && echo "find-links = /opt/wheels"
} > "$WORK/pip.conf"
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro -v "$WORK/pip.conf:/etc/pip.conf:ro")
for d in /opt/pypi /opt/pypi-more /opt/wheels; do [ -d "$d" ] && mounts+=(-v "$d:$d:ro"); done
build=(podman build --isolation=chroot --pull=never --network host "${mounts[@]}")

"${build[@]}" --target slim -t clipsearch:slim .
"${build[@]}" --target cpu -t clipsearch:cpu --build-arg TORCH_INDEX=https://pypi.org/simple \
  --build-arg TORCH_VERSION=2.14.1 --build-arg TORCHVISION_VERSION=0.29.1 .
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'clipsearch|python'

# an export of a tiny random model, made with this checkout's torch venv
.venv/bin/python - "$WORK" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, ".")
from clipsearch.model.export import export
from tests.tiny import write_tiny_model

work = Path(sys.argv[1])
export(write_tiny_model(work / "model"), work / "export")
EOF

root="$WORK/slimroot"
rm -rf "$root"
cp -a "$(podman image mount localhost/clipsearch:slim)" "$root"
mkdir -p "$root/models" && cp -r "$WORK/export" "$root/models/export"
mount --bind /proc "$root/proc" && mount --bind /dev "$root/dev"
trap 'kill $server 2>/dev/null || true; umount "$root/proc" "$root/dev" 2>/dev/null || true' EXIT
chroot "$root" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/tmp \
  clipsearch serve --model onnx:/models/export --port "$PORT" &
server=$!
for _ in $(seq 120); do curl -sf "localhost:$PORT/readyz" && break; sleep 1; done
echo
curl -sf -XPOST "localhost:$PORT/embed" -H 'content-type: application/json' -d '{"texts": ["a red circle"]}' |
  head -c 120
echo
echo "slim image: no torch in it: $(chroot "$root" /opt/venv/bin/python -c 'import importlib.util as u; print(u.find_spec("torch") is None)')"
