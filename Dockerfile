# appcircle-proxy as a container: a sidecar beside a job or app that must not hold the key.
# tests/test_image.py builds and runs it where a Docker engine is available;
# tests/test_packaging.py lints it and repeats its install steps without one.

# Build stage: pip, setuptools and the source stay here; only the venv moves on.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN python -m venv /opt/appcircle-proxy \
    && /opt/appcircle-proxy/bin/pip install --no-cache-dir . \
    && /opt/appcircle-proxy/bin/pip uninstall --yes --quiet pip setuptools

FROM python:3.11-slim
# Nothing installs anything at run time: the base image's own pip and setuptools go too.
RUN rm -rf /usr/local/lib/python3.11/site-packages/pip* \
        /usr/local/lib/python3.11/site-packages/setuptools* \
        /usr/local/lib/python3.11/site-packages/wheel* /usr/local/bin/pip* \
    && useradd --system --uid 10001 --no-create-home appcircle-proxy
COPY --from=build /opt/appcircle-proxy /opt/appcircle-proxy
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/appcircle-proxy/bin:$PATH

USER 10001
WORKDIR /

# Secrets come from the environment or from files (Docker and Kubernetes secrets), e.g.
#   APPCIRCLE_PERSONAL_ACCESS_KEY_FILE=/run/secrets/appcircle_personal_access_key
# (or APPCIRCLE_PERSONAL_API_TOKEN[_FILE], APPCIRCLE_API_KEY_NAME + APPCIRCLE_API_KEY_SECRET[_FILE],
# or a config file: APPCIRCLE_PROXY_CONFIG=/etc/appcircle-proxy/config.toml). The files must
# be readable by uid 10001. A private CA (self-hosted Appcircle): mount its PEM file and set
# APPCIRCLE_PROXY_APPCIRCLE__CA_FILE to its path.
#
# Inside the container the proxy must listen beyond loopback to be reachable by its
# neighbours, and whoever reaches port 8787 acts with the key's rights. So: publish it only
# to the containers that need it (never to the host's network), add the name they use to
# reach it to APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS (e.g. appcircle-proxy), and set a
# client token (APPCIRCLE_PROXY_SERVER__CLIENT_TOKEN_FILE). In a Kubernetes pod, where
# containers share loopback, set listen = "127.0.0.1:8787" instead: see examples/.
# This is the image's built-in default, not a setting: --listen, APPCIRCLE_PROXY_SERVER__LISTEN
# and a mounted config file's listen each beat it.
ENV APPCIRCLE_PROXY_DEFAULT_LISTEN=0.0.0.0:8787
EXPOSE 8787
# On SIGTERM the proxy drains in-flight requests for up to server.shutdown_timeout (30 s).
# Docker sends SIGKILL after its own grace, 10 s unless told otherwise: give it 35 s with
# `docker run --stop-timeout 35`, `docker stop -t 35` or compose's stop_grace_period.
STOPSIGNAL SIGTERM
# Finds the proxy from the same configuration: server.admin_listen when set, else listen.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["appcircle-proxy", "health"]
ENTRYPOINT ["appcircle-proxy"]
CMD ["serve"]
