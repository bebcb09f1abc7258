# appcircle-proxy as a container, e.g. a sidecar beside a job that must not hold the key.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 proxy
WORKDIR /opt/appcircle-proxy
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir .

USER proxy
# Inside a container the proxy must listen beyond loopback to be reachable from its
# neighbours. Whoever can reach port 8787 acts with the key's rights: publish it only to
# the containers (or pod) that need it, never to the host's network.
ENV APPCIRCLE_PROXY_SERVER__LISTEN=0.0.0.0:8787
EXPOSE 8787
STOPSIGNAL SIGTERM
ENTRYPOINT ["appcircle-proxy"]
CMD ["serve"]
