# syntax=docker/dockerfile:1
# Two targets: `api` (FastAPI, no torch) and `worker` (Celery + CUDA PyTorch + diffusers).
#   docker build --target api -t difffit-api .
#   docker build --target worker -t difffit-worker .

FROM python:3.11-slim AS common
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin difffit \
 && mkdir -p /data/hf && chown -R difffit:difffit /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY difffit ./difffit
COPY adapters_store ./adapters_store
COPY launch ./launch

# --- api: no torch, no GPU -----------------------------------------------------
FROM common AS api
COPY service ./service
# The `difffit` CLI (launch/cli.py: tenant, db upgrade; compose's migrate service
# runs this image) lists DiT shapes from the torch-free core/shapes.py; the API
# never imports the rest of core/ (the torch core), and torch is not installed here.
COPY core ./core
RUN pip install .
USER difffit
ENV DIFFFIT_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["uvicorn", "service.main:app_factory", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: CUDA PyTorch and diffusers -------------------------------------------
FROM common AS worker
# The CUDA build of the pinned torch (the wheel bundles its CUDA runtime; the host
# needs only the NVIDIA driver and the container toolkit).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY core ./core
COPY worker ./worker
COPY base_models ./base_models
COPY service ./service
RUN pip install '.[worker]'
# Claims one GPU of the host per replica (flock in the shared /gpu-locks
# volume), then execs the Celery worker on the queues in DIFFFIT_QUEUES.
COPY --chmod=0755 deploy/worker-entrypoint.sh /usr/local/bin/difffit-worker
RUN mkdir -p /gpu-locks && chown difffit:difffit /gpu-locks
USER difffit
ENV DIFFFIT_DATA_DIR=/data HF_HOME=/data/hf
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD celery -A worker.celery_app inspect ping -d "celery@$HOSTNAME" --timeout 5 || exit 1
CMD ["difffit-worker"]
