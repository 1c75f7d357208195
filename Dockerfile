# The registry as a container. git is needed for git plugin sources; nothing else is.

# The wheel is built in a stage of its own and installed like any user installs it: the image
# runs exactly what the wheel ships (migrations included), with no source tree beside it.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 registry

COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist

ARG GIT_SHA=""
ENV REGISTRY_GIT_SHA=${GIT_SHA} \
    REGISTRY_HOST=0.0.0.0 \
    REGISTRY_PORT=8080 \
    REGISTRY_PLUGINS_DIR=/var/lib/registry/plugins \
    REGISTRY_LOG_FORMAT=json

RUN mkdir -p /var/lib/registry/plugins && chown -R registry /var/lib/registry
USER registry
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
# serve listens at once, answering 503 `starting` (/healthz 200, /readyz 503) while it applies
# pending migrations (serialised by an advisory lock); load balancers should probe /readyz.
CMD ["registry", "serve"]
