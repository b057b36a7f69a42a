# Nidaan, CPU image:   docker build -t nidaan .
# GPU image:           docker build -f Dockerfile.gpu -t nidaan-gpu .
# Run:                 docker run -p 11112:11112 -p 50051:50051 -p 8080:8080 \
#                        -v nidaan-data:/var/lib/nidaan nidaan
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NIDAAN_STORAGE_DATA_DIR=/var/lib/nidaan \
    NIDAAN_MODELS_REPOSITORY=/opt/nidaan/models \
    NUMBA_CACHE_DIR=/var/cache/nidaan/numba
WORKDIR /opt/nidaan
COPY pyproject.toml README.md ./
COPY core core
COPY client client
COPY kernels kernels
COPY server server
COPY pacs_bridge pacs_bridge
COPY models models
# The server with the CPU ONNX Runtime (`server` extra), then an unprivileged user that owns only
# the data and cache folders.
# This checkout itself (its dependencies' versions are bounded in pyproject.toml), and a
# Devanagari font, to burn Hindi into Secondary Captures (pacs_bridge/languages/hi.toml).
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-lohit-deva \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir '.[server]' \
    && useradd --system --uid 10001 --home-dir /var/lib/nidaan --shell /usr/sbin/nologin nidaan \
    && mkdir -p /var/lib/nidaan /var/cache/nidaan/numba \
    && chown -R nidaan:nidaan /var/lib/nidaan /var/cache/nidaan
USER 10001:10001
# DICOM, gRPC, HTTP (status page, metrics, /healthz, /readyz)
EXPOSE 11112 50051 8080
VOLUME ["/var/lib/nidaan"]
# /healthz: 200 while serving and every thread it needs runs; over HTTP or, with http.tls,
# HTTPS (no client certificate needed for it); NIDAAN_HTTP_PORT if not 8080. No curl needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "nidaan.server.healthcheck"]
ENTRYPOINT ["nidaan"]
CMD ["serve"]
