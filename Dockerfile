# The duet signaling server image: aiohttp + pydantic only (no numpy, no torch, no aiortc).
#
#   docker build -t duet-signaling .
#   docker run --rm -p 127.0.0.1:8765:8765 duet-signaling
#
# BASE is any Debian bookworm image. The default (python:3.11-slim-bookworm) already has
# Python; a bare Debian base (e.g. one made with debootstrap, as scripts/container-test.sh
# does where no registry is reachable) gets python3 from apt. Both stages use the same BASE,
# so the venv's interpreter path is valid in the final stage.
#
# Behind a TLS-intercepting proxy, pass its CA as a build secret; it is used only while the
# build runs and never stored in the image:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
# (RUN --mount needs BuildKit, Docker's default builder since 23.0; podman supports it too.
# With podman, build with --format docker, or the HEALTHCHECK is dropped.)
ARG BASE=python:3.11-slim-bookworm

# --- build stage: a venv with the server package and its three dependencies ----------------
FROM ${BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=secret,id=ca \
    set -eu; \
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt_ca=""; \
        if [ -s /run/secrets/ca ]; then apt_ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi; \
        apt-get $apt_ca update; \
        apt-get $apt_ca install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi; \
    python3 -m venv /opt/venv

WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md and signaling_server/: the image holds
# the server alone (which imports nothing from duet/), not the library or the notebook bits.
COPY . .
RUN --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(d["project"]["optional-dependencies"]["server"]))' > /tmp/server-requirements.txt; \
    /opt/venv/bin/pip install -r /tmp/server-requirements.txt; \
    /opt/venv/bin/pip install --no-deps .; \
    /opt/venv/bin/python -c 'import signaling_server, aiohttp, pydantic, pydantic_settings, redis'; \
    /opt/venv/bin/python -c 'import importlib.util as u, sys; bad = [m for m in ("numpy", "torch", "aiortc", "duet") if u.find_spec(m)]; sys.exit(f"unexpected packages in the image: {bad}" if bad else 0)'; \
    rm -f /opt/venv/bin/duet; \
    /opt/venv/bin/pip uninstall -y setuptools; \
    /opt/venv/bin/pip uninstall -y pip; \
    /opt/venv/bin/python -m compileall -q /opt/venv/lib

# --- final stage: Python runtime + the venv, running as an unprivileged user ---------------
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN --mount=type=secret,id=ca \
    set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        apt_ca=""; \
        if [ -s /run/secrets/ca ]; then apt_ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi; \
        apt-get $apt_ca update; \
        apt-get $apt_ca install -y --no-install-recommends python3; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    fi; \
    useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin duet
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Any DUET_SIGNALING_* variable configures the server (limits, timeouts, logging), e.g.
#   docker run -e DUET_SIGNALING_MAX_ROOMS=500 ...
# The command below fixes host and port; publish the port with -p to choose the outside one.
USER duet:duet
WORKDIR /tmp
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=4).status == 200 else 1)"]
LABEL org.opencontainers.image.title="duet-signaling" \
      org.opencontainers.image.description="duet signaling server: pairs an owner's and a researcher's notebook kernels" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["duet-signaling", "--host", "0.0.0.0", "--port", "8765"]
