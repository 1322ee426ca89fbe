# larder: build the package in one stage, run it from a slim image with no build tools.
#   docker build -t larder .
#   docker run -p 8080:8080 -v larder-data:/var/lib/larder larder
# Configuration comes from LARDER_* variables and mounted files only (see docs/operating.md);
# the image's own defaults (docker/defaults.toml) are below both.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY larder ./larder
RUN python -m venv /opt/larder \
 && /opt/larder/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/larder/bin/pip install --no-cache-dir -c constraints.txt . \
 && /opt/larder/bin/python -m compileall -q /opt/larder

FROM python:3.11-slim
RUN groupadd --system --gid 10001 larder \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/larder --no-create-home larder \
 && mkdir -p /var/lib/larder \
 && chown larder:larder /var/lib/larder
COPY --from=build /opt/larder /opt/larder
# Not under /etc/larder, where a config directory is often mounted (hiding it).
COPY docker/defaults.toml /opt/larder/defaults.toml
ENV PATH=/opt/larder/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LARDER_DEFAULTS=/opt/larder/defaults.toml
USER 10001:10001
WORKDIR /var/lib/larder
VOLUME ["/var/lib/larder"]
EXPOSE 8080
# GET /healthz on the port serve listens on (LARDER_LISTEN, the config file's or the defaults');
# the probe loads nothing of the server (it shares the container's CPU limit every 30 s).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD ["python", "-m", "larder.service.healthcheck"]
ENTRYPOINT ["larder", "serve"]
