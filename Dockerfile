# The production image: the `entitle` command, its dependencies pinned with
# hashes (deploy/requirements.lock), without the embedded development broker,
# run as an unprivileged user. compose.yaml runs one role per container.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin entitle
WORKDIR /app
COPY deploy/requirements.lock ./deploy/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r deploy/requirements.lock
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY domain ./domain
COPY services ./services
RUN pip install --no-cache-dir --no-deps .
COPY deploy/entitle.yaml ./deploy/entitle.yaml
USER entitle
ENV PYTHONUNBUFFERED=1 ENTITLE_HEALTH_PORT=8080
EXPOSE 8080
# Ready: every part of the process works (its broker, its database, its loops).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['ENTITLE_HEALTH_PORT']}/readyz\", timeout=4)"]
ENTRYPOINT ["entitle"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080", "--config", "/app/deploy/entitle.yaml"]
