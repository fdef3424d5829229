# syntax=docker/dockerfile:1
# Private GPT's server image (also runs the training module): NVIDIA's CUDA runtime, a pinned Python,
# the locked dependencies, no model weights. Build and run it with docker compose (docker-compose.yml;
# README "Deploy on a GPU server"):
#
#     docker compose build && docker compose up -d
#
# torch 2.13.0 from PyPI is the CUDA 13.0 build and brings its CUDA libraries as wheels; the base
# image matches it (the host needs NVIDIA driver 580 or newer). The model is never baked in: mount
# the weights and point MODEL_ID at them, or mount a Hugging Face cache as HF_HOME.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG PYTHON_VERSION=3.11.14
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

# -- build: Python and the virtual environment ------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_PREFERENCE=only-managed
# python-build-standalone's CPython, at the same path in the final stage so the venv's link holds.
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the lock or pyproject changes.
# The project's runtime dependencies (not the dev tools) at the lock's exact versions; torch's
# CUDA wheels follow from torch's own exact pins.
COPY pyproject.toml requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.in \
 && uv pip install --python /opt/venv/bin/python --constraint requirements.lock --requirement requirements.in

# -- runtime -----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="Private GPT" \
      org.opencontainers.image.description="Self-hosted chat on a 4-bit LLM with LoRA adapters"
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# A fixed uid/gid, so volumes and mounted model directories can be prepared for it on the host. The
# writable directories exist in the image with this owner: an empty named volume mounted on one
# starts with that owner (compose: the data, adapter store, model cache and training runs volumes).
RUN groupadd --system --gid 10001 privategpt \
 && useradd --system --uid 10001 --gid privategpt --home-dir /var/lib/private-gpt --shell /usr/sbin/nologin privategpt \
 && mkdir -p /var/lib/private-gpt/adapters /var/cache/huggingface /models /srv/training /srv/runs \
 && chown privategpt:privategpt /var/lib/private-gpt /var/lib/private-gpt/adapters /var/cache/huggingface /srv/runs
# The project runs from its source in /app (not installed): PYTHONPATH finds `app` and `training`
# from any working directory (the train service works in /srv/training).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/var/lib/private-gpt \
    HF_HOME=/var/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    LOG_FORMAT=json
WORKDIR /app
COPY alembic.ini pyproject.toml ./
COPY migrations/ migrations/
COPY static/ static/
COPY templates/ templates/
COPY training/ training/
COPY app/ app/
COPY scripts/entrypoint.sh scripts/
USER 10001:10001
EXPOSE 8000
VOLUME ["/var/lib/private-gpt"]
# Ready = the model is loaded, the engine runs and the database answers. Loading a 7B model takes
# a minute or two from a local disk, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/readyz\", timeout=8)"]
ENTRYPOINT ["/app/scripts/entrypoint.sh"]
CMD ["serve"]
