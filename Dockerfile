# appcircle-proxy as a container: a sidecar beside a job or app that must not hold the key.
# tests/test_packaging.py repeats these install steps without Docker and lints this file.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/appcircle-proxy \
    PATH=/opt/appcircle-proxy/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/appcircle-proxy \
    && pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home appcircle-proxy

USER 10001
WORKDIR /

# Secrets come from the environment or from files (Docker and Kubernetes secrets), e.g.
#   APPCIRCLE_PERSONAL_ACCESS_KEY_FILE=/run/secrets/appcircle_personal_access_key
# (or APPCIRCLE_PERSONAL_API_TOKEN[_FILE], APPCIRCLE_API_KEY_NAME + APPCIRCLE_API_KEY_SECRET[_FILE],
# or a config file: APPCIRCLE_PROXY_CONFIG=/etc/appcircle-proxy/config.toml).
#
# Inside the container the proxy must listen beyond loopback to be reachable by its
# neighbours, and whoever reaches port 8787 acts with the key's rights. So: publish it only
# to the containers that need it (never to the host's network), add the name they use to
# reach it to APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS (e.g. '["appcircle-proxy"]'), and set a
# client token (APPCIRCLE_PROXY_SERVER__CLIENT_TOKEN_FILE). In a Kubernetes pod, where
# containers share loopback, keep the default 127.0.0.1 instead: see examples/.
ENV APPCIRCLE_PROXY_SERVER__LISTEN=0.0.0.0:8787 \
    APPCIRCLE_PROXY_HEALTH_URL=http://127.0.0.1:8787/_proxy/health
EXPOSE 8787
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['APPCIRCLE_PROXY_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["appcircle-proxy"]
CMD ["serve"]
