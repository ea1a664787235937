# syntax=docker/dockerfile:1
# Quiver model server on NVIDIA GPUs with vLLM (the CUDA runtime comes inside the torch/vLLM
# wheels; the driver from the node through the NVIDIA container toolkit). From the repo root:
#   docker build -f deploy/docker/server-cuda.Dockerfile -t quiver/server-cuda:0.1.0 .
# Pin the base by digest for production: docker buildx imagetools inspect python:3.11.13-slim-bookworm
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG VLLM_VERSION=0.33.0

FROM ${PYTHON_IMAGE} AS build
ARG VLLM_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/quiver
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY common ./common
COPY quiver ./quiver
COPY serving ./serving
COPY gateway ./gateway
COPY optimize ./optimize
COPY loadtests ./loadtests
# vLLM brings its own CUDA torch (2.14), which the serve extra's range admits.
RUN /opt/quiver/bin/pip install "vllm==${VLLM_VERSION}" ".[serve]"

FROM ${PYTHON_IMAGE}
# gcc + libc headers: Triton compiles its kernel launchers at run time; libnuma1 for vLLM.
# libc6-dev follows the base image's libc6 (security updates bump it), so it stays unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev libnuma1=2.0.16-1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/quiver /opt/quiver
RUN groupadd --system --gid 10001 quiver \
 && useradd --system --uid 10001 --gid quiver --home-dir /tmp --shell /usr/sbin/nologin quiver
ENV PATH=/opt/quiver/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/cache VLLM_CACHE_ROOT=/tmp/cache/vllm \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001:10001
EXPOSE 8001
ENTRYPOINT ["quiver"]
CMD ["serve", "--model", "/models/model", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8001"]
