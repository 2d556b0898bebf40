FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY relay ./relay
COPY migrations ./migrations
COPY sql ./sql
RUN pip install --no-cache-dir '.[redis]'
EXPOSE 8099
CMD ["relay", "serve", "--host", "0.0.0.0"]
