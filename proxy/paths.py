"""The proxy's own paths under /_proxy/: never forwarded, served by `admin`."""

from typing import Final

ADMIN_PREFIX: Final = "/_proxy/"
HEALTH_PATH: Final = "/_proxy/health"
READY_PATH: Final = "/_proxy/ready"
METRICS_PATH: Final = "/_proxy/metrics"
