# One image for every streamagent service; compose picks the role with the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY streamagent ./streamagent
COPY processors ./processors
COPY tools ./tools
COPY schemas ./schemas
COPY workflows ./workflows
# The policy in force (streamagent/policy.py): without the folder a process runs with no policy at all.
COPY ops/policies ./ops/policies

# The tracing extra: spans are off until STREAMAGENT_OTLP_ENDPOINT is set, but the image can send them.
RUN pip install -e '.[tracing]' \
    && useradd --system --uid 10001 --home-dir /app streamagent

# Installed in place (editable): the codec finds schemas/ and the settings find workflows/ and
# ops/policies/ beside the package, and processors/ and tools/ import as streamagent.processors and streamagent.tools.
ENV STREAMAGENT_DATA_DIR=/tmp/streamagent

USER streamagent
EXPOSE 9100 8765 8470

ENTRYPOINT ["streamagent"]
CMD ["--help"]
