# syntax=docker/dockerfile:1
# Quiver gateway (slim: no torch). From the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t quiver/gateway:0.1.0 .
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
RUN /opt/quiver/bin/pip install -c constraints.txt ".[gateway]"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/quiver /opt/quiver
RUN groupadd --system --gid 10001 quiver \
 && useradd --system --uid 10001 --gid quiver --home-dir /tmp --shell /usr/sbin/nologin quiver
ENV PATH=/opt/quiver/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["quiver"]
CMD ["gateway", "--config", "/etc/quiver/gateway.yaml", "--host", "0.0.0.0"]
