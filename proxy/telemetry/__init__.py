"""What the proxy reports: request facts, statistics rendered as metrics, the access log,
log lines and debug traces. Imports only config."""
