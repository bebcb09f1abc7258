"""appcircle-proxy: a local authenticating proxy for the Appcircle API."""

__version__ = "0.1.0"
