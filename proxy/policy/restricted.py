"""What a restricted route (allow rules or read_only) refuses beyond its rules: a request
that asks the API to treat it as another method or path, and a read-only request with a
body. Either would let the rules pass one request while the API acts on another."""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_plus

from aiohttp import web

__all__ = ["OVERRIDE_HEADERS", "OVERRIDE_PARAMETER", "override"]

# Headers frameworks and gateways honour to change the method (Rails, Laravel, Spring's
# HiddenHttpMethodFilter, ASP.NET) or the path (IIS URL Rewrite, Symfony).
OVERRIDE_HEADERS: Final = {
    name.lower(): name
    for name in (
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-URL",
        "X-Rewrite-URL",
    )
}
# Rails, Laravel and Symfony read the method from this query parameter too.
OVERRIDE_PARAMETER: Final = "_method"


def override(request: web.BaseRequest, query: str) -> str | None:
    """The header (as the client spelled it) or query parameter by which `request` asks to
    be read as another method or path, or None. Names are compared as CGI and WSGI servers
    see them: case-insensitively, with '_' and '-' alike."""
    for raw_name, _value in request.raw_headers:
        name = raw_name.decode("latin-1")
        if name.lower().replace("_", "-") in OVERRIDE_HEADERS:
            return f"the {name} header"
    if query:
        for pair in query.replace(";", "&").split("&"):
            name = unquote_plus(pair.partition("=")[0])
            if name.strip().lower() == OVERRIDE_PARAMETER:
                return f"the {OVERRIDE_PARAMETER} query parameter"
    return None
