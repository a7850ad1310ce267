# Two images from one file:
#   --target serve   the serving image: OpenVINO runs the versions' variants; no TensorFlow (under 1 GB)
#   (default) full   TensorFlow too: training, publishing, and versions without variants
# GPU image: --build-arg EXTRAS=train,hed,gpu (TensorFlow with its CUDA libraries),
# or a CUDA-enabled TensorFlow base: --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    IMGSERVE_HOST=0.0.0.0 \
    IMGSERVE_PORT=8000 \
    IMGSERVE_GRPC_PORT=8001 \
    IMGSERVE_MODEL_STORE=/models

WORKDIR /app
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /models \
    && chown app:app /models
COPY docker/entrypoint.sh /usr/local/bin/imgserve-entrypoint
RUN chmod 0755 /usr/local/bin/imgserve-entrypoint
EXPOSE 8000 8001
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
ENTRYPOINT ["imgserve-entrypoint"]


FROM base AS serve
# Dependencies first, at the versions in requirements.lock, installed by uv (its version from the lock too):
# this layer is rebuilt only when pyproject.toml or the lock changes (an empty README stands in for the real one).
# --break-system-packages: the image's own Python is the environment (harmless where none is marked managed);
# --system-certs: the platform's certificate store, as pip uses it (a TLS-intercepting proxy's CA included).
COPY pyproject.toml requirements.lock ./
# hadolint ignore=DL3013
RUN pip install "$(grep '^uv==' requirements.lock)" \
    && mkdir -p service \
    && touch service/__init__.py README.md \
    && uv pip install --system --break-system-packages --system-certs --no-cache -c requirements.lock . \
    && uv pip uninstall --system --break-system-packages imgserve \
    && rm -rf service build ./*.egg-info README.md
COPY README.md ./
COPY service ./service
RUN uv pip install --system --break-system-packages --system-certs --no-cache --no-deps .
USER 10001
CMD ["python", "-m", "service"]


FROM base AS full
ARG EXTRAS=train,hed
COPY pyproject.toml requirements.lock ./
# hadolint ignore=DL3013
RUN pip install "$(grep '^uv==' requirements.lock)" \
    && mkdir -p service train \
    && touch service/__init__.py train/__init__.py README.md \
    && uv pip install --system --break-system-packages --system-certs --no-cache -c requirements.lock ".[${EXTRAS}]" \
    && uv pip uninstall --system --break-system-packages imgserve \
    && rm -rf service train build ./*.egg-info README.md
COPY README.md ./
COPY service ./service
COPY train ./train
RUN uv pip install --system --break-system-packages --system-certs --no-cache --no-deps .
USER 10001
CMD ["python", "-m", "service"]
