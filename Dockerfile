# syntax=docker/dockerfile:1
# clipsearch images. Three targets:
#   docker build -t clipsearch:gpu .                  (default: CUDA 12 runtime, CUDA torch, faiss-gpu)
#   docker build -t clipsearch:cpu --target cpu .     (CPU torch, faiss-cpu)
#   docker build -t clipsearch:slim --target slim .   (no torch: serves an export, onnx:DIR)
# All run `clipsearch serve` as a non-root user, configured by CLIPSEARCH_* variables.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TORCH_VERSION=2.6.0
ARG TORCHVISION_VERSION=0.21.0
# where the CPU build takes torch from: PyTorch's CPU wheels (~200 MB, not PyPI's CUDA build)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# more extras, comma first: --build-arg EXTRAS=,ray,hf (the Ray builder, transformers models)
ARG EXTRAS=

# ---------------------------------------------------------------- package sources (shared by both builds)
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY clipsearch /src/clipsearch
COPY client /src/client

# ---------------------------------------------------------------- CPU build
FROM python:${PYTHON_VERSION}-slim AS cpu-build
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU wheel of torch is ~200 MB instead of the ~2.5 GB CUDA build from PyPI.
RUN pip install --index-url ${TORCH_INDEX} \
    torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}
COPY --from=src /src /src
WORKDIR /src
ARG EXTRAS
# hadolint ignore=DL3013
RUN pip install ./client ".[cpu${EXTRAS}]"

# ---------------------------------------------------------------- CPU runtime
FROM python:${PYTHON_VERSION}-slim AS cpu
RUN useradd --create-home --uid 10001 clipsearch \
    && mkdir -p /models /data/index /checkpoints \
    && chown -R clipsearch /models /data /checkpoints
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf-cache \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000 \
    CLIPSEARCH_DEVICE=cpu
USER 10001
WORKDIR /home/clipsearch
VOLUME ["/models", "/data/index", "/checkpoints"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["clipsearch"]
CMD ["serve"]

# ---------------------------------------------------------------- torch-free build (exports only)
FROM python:${PYTHON_VERSION}-slim AS slim-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=src /src /src
WORKDIR /src
# hadolint ignore=DL3013
RUN pip install ./client ".[onnx]"

# ---------------------------------------------------------------- torch-free runtime
# Serves an export made elsewhere (clipsearch export, in the cpu or gpu image):
#   docker run -v /models:/models clipsearch:slim serve --model onnx:/models/vitb32-onnx
FROM python:${PYTHON_VERSION}-slim AS slim
RUN useradd --create-home --uid 10001 clipsearch \
    && mkdir -p /models /data/index \
    && chown -R clipsearch /models /data
COPY --from=slim-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000 \
    CLIPSEARCH_DEVICE=cpu
USER 10001
WORKDIR /home/clipsearch
VOLUME ["/models", "/data/index"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["clipsearch"]
CMD ["serve"]

# ---------------------------------------------------------------- GPU build
FROM ${CUDA_IMAGE} AS gpu-build
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cu124 \
    torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}
COPY --from=src /src /src
WORKDIR /src
ARG EXTRAS
# hadolint ignore=DL3013
RUN pip install ./client ".[gpu${EXTRAS}]"

# ---------------------------------------------------------------- GPU runtime (default target)
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 clipsearch \
    && mkdir -p /models /data/index /checkpoints \
    && chown -R clipsearch /models /data /checkpoints
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf-cache \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000 \
    CLIPSEARCH_DEVICE=cuda
USER 10001
WORKDIR /home/clipsearch
VOLUME ["/models", "/data/index", "/checkpoints"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["clipsearch"]
CMD ["serve"]
