#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the project root, after bench/gpu/prepare.sh
# here, with carry [".whl", ".bin"]. Two calls, each within the device's 10-minute limit:
#   bash bench/gpu/run.sh a   # GPU tests, index builder (nvJPEG per batch), 4 server processes
#   bash bench/gpu/run.sh b   # the full suite: text, image, search over 1M, against naive
#   bash bench/gpu/run.sh c   # A/B: text search in one step on the GPU vs encode-then-search
#   W=8 bash bench/gpu/run.sh d    # A/B: W processes on one shared socket vs a socket each (--reuse-port)
#   W=8 bash bench/gpu/run.sh e    # W processes on one GPU: time-sliced CUDA contexts, then under MPS
#   W=8 bash bench/gpu/run.sh f    # A/B: W processes whose model threads spin on the GPU (A) or sleep (B)
#   W=8 bash bench/gpu/run.sh g    # A/B: W processes left to the OS (A) or each on a core of its own (B)
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
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.bin:$PATH LD_LIBRARY_PATH=$PWD/.bin:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/clipsearch-gpu-out}
W=${W:-6}  # server processes for the multi-process runs
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ -n "${BENCH_REHEARSAL:-}" ]; then model=(--model clipsearch-tiny --device cpu); else
  model=(--model ViT-B-32 --device cuda); fi
case "${1:-}" in
  a)
    echo "== GPU tests"
    timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/service tests/index_builder 2>&1 | tee "$OUT/gpu-tests.log"
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
  c)
    echo "== A/B: /search/text over 1M in one step on the GPU (B) vs encode, then search (A); torch index"
    timeout 560 $PY bench/ab.py "${model[@]}" --path search --index-size 1000000 --clients 1,256 --rounds 2 \
      --duration 4 --threads 4 --set CLIPSEARCH_SEARCH_BACKEND=torch --a CLIPSEARCH_TEXT_SEARCH_ON_DEVICE=false \
      --b CLIPSEARCH_TEXT_SEARCH_ON_DEVICE=true 2>&1 | tee "$OUT/ab-search.log"
    ;;
  d)
    echo "== A/B: $W server processes, one shared listening socket (A) vs one each, SO_REUSEPORT (B); search over 1M"
    timeout 560 $PY bench/ab.py "${model[@]}" --path search --index-size 1000000 --clients 16,256 --rounds 2 \
      --duration 4 --threads 4 --set CLIPSEARCH_WORKERS="$W" CLIPSEARCH_SEARCH_BACKEND=torch \
      --a CLIPSEARCH_REUSE_PORT=false --b CLIPSEARCH_REUSE_PORT=true 2>&1 | tee "$OUT/ab-reuse-port.log"
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
  f)
    # Each process's model thread waits on nearly every batch under load: spinning, W of the
    # 16 cores are busy doing nothing that the event loops and wrk could use.
    echo "== A/B: $W server processes, CUDA waits spinning (A) vs asleep on a blocking event (B); text"
    timeout 560 $PY bench/ab.py "${model[@]}" --path text --clients 16,256 --rounds 2 --duration 4 --threads 4 \
      --set CLIPSEARCH_WORKERS="$W" CLIPSEARCH_MAX_BATCH_SIZE=256 --a CLIPSEARCH_CUDA_WAIT=spin \
      --b CLIPSEARCH_CUDA_WAIT=sleep 2>&1 | tee "$OUT/ab-cuda-wait.log"
    ;;
  g)
    # One process is bound by its own Python; its threads hand work to each other under one GIL,
    # and across cores each hand-off pays a wake-up (~1.3x in-process on the CPU when kept on
    # one core). W workers take W of the 16 cores; wrk and the OS keep the rest.
    echo "== A/B: $W server processes left to the OS (A) vs each on a core of its own (B); text, image, search"
    for path in text image search; do
      timeout 180 $PY bench/ab.py "${model[@]}" --path $path --clients 16,256 --rounds 1 --duration 4 --threads 4 \
        --set CLIPSEARCH_WORKERS="$W" CLIPSEARCH_MAX_BATCH_SIZE=256 CLIPSEARCH_IMAGE_DECODE=torch \
        CLIPSEARCH_SEARCH_BACKEND=torch --a CLIPSEARCH_WORKER_CPUS=0 --b CLIPSEARCH_WORKER_CPUS=1 2>&1 \
        | tee "$OUT/ab-worker-cpus-$path.log"
    done
    ;;
  all)
    # One call (a fresh machine takes a minute to start): tests, decode stages, the index
    # builder, the suite with several server processes, then the full suite in one process.
    echo "== GPU tests"
    timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/service tests/index_builder 2>&1 | tee "$OUT/gpu-tests.log"
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
  *) echo "usage: bash bench/gpu/run.sh a|b|c|d|e|f|g|all" >&2; exit 2 ;;
esac
