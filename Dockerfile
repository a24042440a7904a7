FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY domain ./domain
COPY services ./services
RUN pip install --no-cache-dir .
COPY examples ./examples
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["entitle"]
CMD ["dev", "--host", "0.0.0.0", "--config", "/app/examples/entitle.yaml"]
