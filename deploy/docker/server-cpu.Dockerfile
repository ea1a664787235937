# syntax=docker/dockerfile:1
# Quiver model server on CPU (native engine; torch CPU wheel). From the repository root:
#   docker build -f deploy/docker/server-cpu.Dockerfile -t quiver/server-cpu:0.1.0 .
# Pin the base by digest for production: docker buildx imagetools inspect python:3.11.13-slim-bookworm
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
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
RUN /opt/quiver/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt ".[serve]"

FROM ${PYTHON_IMAGE}
# g++ + libc headers: the native engine builds its C++ kernels and inductor compiles the
# decoder layers at first start (cached under XDG_CACHE_HOME); without them it runs eagerly,
# without either speed-up. libc6-dev follows the base image's libc6, so it stays unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/quiver /opt/quiver
RUN groupadd --system --gid 10001 quiver \
 && useradd --system --uid 10001 --gid quiver --home-dir /tmp --shell /usr/sbin/nologin quiver
ENV PATH=/opt/quiver/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/cache
WORKDIR /tmp
USER 10001:10001
EXPOSE 8001
ENTRYPOINT ["quiver"]
CMD ["serve", "--model", "/models/model", "--host", "0.0.0.0", "--port", "8001"]
