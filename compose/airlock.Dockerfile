# The image of Airlock's own components (worker, gateway, CLI), built from the repository:
#   docker build -f compose/airlock.Dockerfile -t airlock:latest .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
WORKDIR /opt/airlock
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY policies ./policies
COPY agents ./agents
RUN pip install --no-cache-dir . \
 && useradd --system --no-create-home airlock
ENV AIRLOCK_POLICY_DIR=/opt/airlock/policies AIRLOCK_AGENTS_DIR=/opt/airlock/agents
ENTRYPOINT ["airlock"]
CMD ["--help"]
