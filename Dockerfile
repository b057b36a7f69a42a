# Nidaan app image. CPU by default; for a GPU image build with
#   docker build --build-arg BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 --build-arg ORT=onnxruntime-gpu .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG ORT=onnxruntime
ENV PYTHONUNBUFFERED=1 NIDAAN_STORAGE_DATA_DIR=/var/lib/nidaan NIDAAN_MODELS_REPOSITORY=/opt/nidaan/models \
    NUMBA_CACHE_DIR=/var/cache/nidaan/numba
WORKDIR /opt/nidaan
COPY pyproject.toml README.md ./
COPY core core
COPY client client
COPY kernels kernels
COPY server server
COPY pacs_bridge pacs_bridge
COPY models models
RUN pip install --no-cache-dir '.[server]' ${ORT} \
    && useradd --system --home /var/lib/nidaan nidaan \
    && mkdir -p /var/lib/nidaan /var/cache/nidaan/numba \
    && chown -R nidaan /var/lib/nidaan /var/cache/nidaan
USER nidaan
# DICOM, gRPC, HTTP (metrics)
EXPOSE 11112 50051 8080
VOLUME ["/var/lib/nidaan"]
ENTRYPOINT ["nidaan"]
CMD ["serve"]
