# syntax=docker/dockerfile:1
# receiver: the VLM Run callback receiver.
#
#   docker build -t receiver .
#   docker run --rm -p 8000:8000 receiver                  # embedded mode: SQLite + simulator
#   docker run --rm receiver worker                        # scale-out worker (PostgreSQL)
#
# Two stages: the builder installs the package and every optional backend driver into a
# virtualenv; the final image gets only that virtualenv on a clean python:*-slim, so no
# compiler, headers or pip cache reach production.

# Both stages must use the same Python image: the venv's interpreter is a symlink to
# /usr/local/bin/python3.11, which has to exist at the same path in the final image.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# Only needed when a dependency has no wheel for the target platform (asyncpg, orjson, uvloop
# ... ship wheels for amd64 and arm64); this stage is thrown away, so it costs nothing at runtime.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md* : the glob makes the readme optional (pyproject names it, the build only warns).
COPY pyproject.toml README.md* ./
COPY receiver ./receiver

# A regular (non-editable) install: the venv is self-contained and /src is not needed later.
# pip compiles the bytecode now, which matters because the final root filesystem may be read-only.
# Versions: the ranges in pyproject.toml (the project has no lock file yet).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
    && pip install '.[postgres,redis,nats,amqp]' \
    && receiver --help > /dev/null


FROM ${PYTHON_IMAGE} AS final

LABEL org.opencontainers.image.title="receiver" \
      org.opencontainers.image.description="Receive, verify, record and forward VLM Run callbacks."

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 receiver \
    && useradd --system --uid 10001 --gid receiver --no-create-home \
       --home-dir /var/lib/receiver --shell /usr/sbin/nologin receiver \
    && install -d -o receiver -g receiver -m 0750 /var/lib/receiver

COPY --from=builder /opt/venv /opt/venv

# RECEIVER_HOST: inside a container the service must listen on every interface; the port is
# only published where the operator says so (compose, a Kubernetes Service).
# The working directory holds the default SQLite file (sqlite:///./receiver.db): mount a volume
# at /var/lib/receiver to keep it (create it once with `docker run ... receiver migrate`: serve
# never creates a database), or set RECEIVER_DATABASE_URL=postgresql://...
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECEIVER_HOST=0.0.0.0 \
    RECEIVER_PORT=8000

WORKDIR /var/lib/receiver
USER 10001:10001
EXPOSE 8000

# slim has no curl: ask /healthz with the standard library (urlopen raises on refusal or >= 400).
# Only `serve` answers HTTP: `receiver worker` and `receiver migrate` containers should disable
# this check (deploy/compose.yaml does). If RECEIVER_ALLOWED_HOSTS is set, include `localhost`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://localhost:' + os.environ.get('RECEIVER_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: `receiver` is PID 1 and receives SIGTERM itself (uvicorn drains, the worker stops).
ENTRYPOINT ["receiver"]
CMD ["serve"]
