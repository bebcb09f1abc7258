"""The one error configuration raises."""

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration the proxy cannot start with; the text is for the user, secret-free."""
