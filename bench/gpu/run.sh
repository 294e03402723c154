#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the project root, after bench/gpu/prepare.sh
# here, with carry [".whl", ".bin"]. Each call stays within the device's 10-minute limit:
#   bash bench/gpu/run.sh a   # GPU tests, index builder (nvJPEG per batch), 4 server processes
#   bash bench/gpu/run.sh b   # the full suite: text, image, search over 1M, against naive
#   W=8 bash bench/gpu/run.sh e    # W processes on one GPU: time-sliced CUDA contexts, then under MPS
#   W=6 bash bench/gpu/run.sh all  # one call: GPU tests, decode stages, builder, W processes, full suite
# Logs and JSON land under $OUT.
# A rehearsal on a machine without a GPU (every command with the tiny model on the CPU, no
# wheels installed): BENCH_REHEARSAL=1 PY=.venv/bin/python bash bench/gpu/run.sh a
set -uo pipefail
PY=${PY:-python3}
if [ -z "${BENCH_REHEARSAL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/client PATH=$PWD/.bin:$PATH LD_LIBRARY_PATH=$PWD/.bin:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/clipsearch-gpu-out}
W=${W:-6}  # server processes for the multi-process runs
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ -n "${BENCH_REHEARSAL:-}" ]; then model=(--model clipsearch-tiny --device cpu); else
  model=(--model ViT-B-32 --device cuda); fi
case "${1:-}" in
  a)
    echo "== GPU tests"
    timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log"
    echo "== index builder, nvJPEG per batch"
    timeout 180 $PY bench/build_bench.py "${model[@]}" --n 20000 --workers 14 --image-decode torch 2>&1 \
      | tee "$OUT/build.log"
    echo "== text and search, 4 server processes"
    timeout 200 $PY bench/suite.py "${model[@]}" --paths text,search --clients 16,256 --max-batch-size 256 \
      --workers 4 --duration 4 --threads 4 --skip-naive --json "$OUT/suite-4.json" 2>&1 | tee "$OUT/suite-4.log"
    ;;
  b)
    echo "== suite: text, image (nvJPEG per batch), search over 1M; one process; naive wrapper"
    timeout 560 $PY bench/suite.py "${model[@]}" --image-decode torch --max-batch-size 256 --duration 4 \
      --threads 4 --json "$OUT/suite-1.json" 2>&1 | tee "$OUT/suite-1.log"
    ;;
  e)
    # W processes each hold a CUDA context; without MPS the GPU time-slices between them,
    # which can stall a process's small batches behind another's (a candidate for the
    # search tail). Same suite, then again with NVIDIA's Multi-Process Service running.
    echo "== search and text, $W server processes, no MPS"
    timeout 200 $PY bench/suite.py "${model[@]}" --paths search,text --clients 16,256 --max-batch-size 256 \
      --workers "$W" --duration 4 --threads 4 --skip-naive --json "$OUT/suite-nomps.json" 2>&1 | tee "$OUT/suite-nomps.log"
    if command -v nvidia-cuda-mps-control > /dev/null; then
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d && echo "== the same under MPS" && \
        timeout 200 $PY bench/suite.py "${model[@]}" --paths search,text --clients 16,256 --max-batch-size 256 \
          --workers "$W" --duration 4 --threads 4 --skip-naive --json "$OUT/suite-mps.json" 2>&1 \
          | tee "$OUT/suite-mps.log"
      echo quit | nvidia-cuda-mps-control
    else
      echo "nvidia-cuda-mps-control not found: no MPS run"
    fi
    ;;
  all)
    # One call (a fresh machine takes a minute to start): tests, decode stages, the index
    # builder, the suite with several server processes, then the full suite in one process.
    echo "== GPU tests"
    timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log"
    echo "== decode stages"
    timeout 30 $PY bench/decode_probe.py --device "${model[-1]}" --batches 64,256 2>&1 | tee "$OUT/decode-probe.log"
    echo "== index builder, nvJPEG per batch, 8 encoder processes"
    timeout 75 $PY bench/build_bench.py "${model[@]}" --n 20000 --processes 8 --shard-size 1024 --image-decode torch 2>&1 \
      | tee "$OUT/build.log"
    echo "== text, image and search (also 16 items a request), $W server processes"
    timeout 180 $PY bench/suite.py "${model[@]}" --image-decode torch --clients 16,256 --max-batch-size 256 \
      --paths text,image,search,text-multi,image-multi --per-request 16 \
      --workers "$W" --duration 4 --threads 4 --skip-naive --json "$OUT/suite-$W.json" 2>&1 | tee "$OUT/suite-$W.log"
    echo "== the full suite, one process, naive wrapper"
    timeout 230 $PY bench/suite.py "${model[@]}" --image-decode torch --max-batch-size 256 --duration 4 \
      --threads 4 --json "$OUT/suite-1.json" 2>&1 | tee "$OUT/suite-1.log"
    ;;
  *) echo "usage: bash bench/gpu/run.sh a|b|e|all" >&2; exit 2 ;;
esac
