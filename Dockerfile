# One image for every switchyard service: the workers of each tier, the dispatcher and the one-shot
# migration differ only in their command (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The package and its migrations; tests, benchmarks and scripts stay out of the image.
COPY pyproject.toml README.md alembic.ini ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . && rm -rf /src/build
# The sample cascade policy, where SWITCHYARD_CONFIG can name it (docker-compose.yml).
COPY pipeline/samples/cascade.toml /etc/switchyard/cascade.toml

# Nothing here needs root.
RUN useradd --create-home --uid 10001 switchyard
USER switchyard
WORKDIR /home/switchyard

ENTRYPOINT ["switchyard"]
CMD ["--help"]
