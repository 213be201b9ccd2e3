# One image for every role of the fleet (worker, admin API, Flower); compose.yaml picks the
# role with `command:` and configures it with environment variables (docs/configuration.md).
# No secret is baked in: REDIS_URL, COORDINATOR_API_TOKEN and FLOWER_BASIC_AUTH come at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# /data belongs to the app user so a named volume mounted there (the storage worker's
# ChromaDB) starts out writable by it.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app \
    && install -d -o app -g app /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY worker_tasks ./worker_tasks
# The rag extra (chromadb): storage workers run `chroma run`, ingesting workers use its client.
RUN pip install --no-cache-dir '.[rag]'

USER app
CMD ["celery", "-A", "worker_tasks", "worker", "-l", "INFO"]
