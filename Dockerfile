# The registry as a container. git is needed for git plugin sources; nothing else is. The
# embedded PostgreSQL (`registry[embedded]`) is not installed: the image always gets a
# REGISTRY_DSN.
#
# Build arguments:
#   PYTHON_IMAGE     the Python 3.11 base (default python:3.11-slim); where no image registry can
#                    be reached, scripts/test-containers builds docker/python from a local Debian.
#   EXTRA_CA_CERTS   PEM certificates pip must also trust, for HTTPS egress through an
#                    intercepting proxy; used for the pip steps only, not kept in the image.
#   GIT_SHA          shown by /buildinfo.
ARG PYTHON_IMAGE=python:3.11-slim

# The wheel is built in a stage of its own and installed like any user installs it: the image
# runs exactly what the wheel ships (migrations included), with no source tree beside it.
FROM ${PYTHON_IMAGE} AS build
ARG EXTRA_CA_CERTS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY migrations ./migrations
RUN ca=/tmp/ca.pem \
    && cat /etc/ssl/certs/ca-certificates.crt > "$ca" \
    && printf '%s\n' "$EXTRA_CA_CERTS" >> "$ca" \
    && PIP_CERT="$ca" pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && rm "$ca"

FROM ${PYTHON_IMAGE}
ARG EXTRA_CA_CERTS=""

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 registry

COPY --from=build /dist /dist
RUN ca=/tmp/ca.pem \
    && cat /etc/ssl/certs/ca-certificates.crt > "$ca" \
    && printf '%s\n' "$EXTRA_CA_CERTS" >> "$ca" \
    && PIP_CERT="$ca" pip install --no-cache-dir /dist/*.whl \
    && rm -rf /dist "$ca"

ARG GIT_SHA=""
ENV REGISTRY_GIT_SHA=${GIT_SHA} \
    REGISTRY_HOST=0.0.0.0 \
    REGISTRY_PORT=8080 \
    REGISTRY_DATA_DIR=/var/lib/registry \
    REGISTRY_PLUGINS_DIR=/var/lib/registry/plugins \
    REGISTRY_LOG_FORMAT=json

# The data dir (installed plugins) is a volume, made and owned before it is declared so a new
# volume starts with the right owner.
RUN mkdir -p /var/lib/registry/plugins && chown -R registry /var/lib/registry
VOLUME /var/lib/registry
USER registry
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
# serve listens at once, answering 503 `starting` (/healthz 200, /readyz 503) while it applies
# pending migrations (serialised by an advisory lock); load balancers should probe /readyz.
CMD ["registry", "serve"]
