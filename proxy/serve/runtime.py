"""The running proxy's state that outlives a request: settings, routes, token sources, the
upstream pool and the auth-host session; and how a SIGHUP reload changes it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import aiohttp

from ..auth.credentials import Credential, credential_from_settings
from ..auth.exchange import Exchanger
from ..auth.tokens import TokenKey, TokenSources
from ..config.settings import Settings
from ..policy.routes import RouteTable
from ..upstream.pool import Pool

__all__ = ["Runtime"]

log = logging.getLogger("appcircle_proxy.app")


class Runtime:
    """Everything that talks to Appcircle, open for the lifetime of one process."""

    def __init__(
        self,
        settings: Settings,
        routes: RouteTable,
        tokens: TokenSources,
        pool: Pool,
        session: aiohttp.ClientSession,
        make_exchanger: Callable[[Mapping[str, Credential], TokenKey], Exchanger],
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.tokens = tokens
        self.pool = pool
        # aiohttp's client, for what the pool does not carry: WebSockets.
        self.session = session
        self._make_exchanger = make_exchanger

    def reload(self, new: Settings) -> None:
        """Take up changed credentials (and rotated secret files) without a restart: a
        changed key is exchanged at once; its route's token serves until that succeeds."""
        credentials = {
            name: credential_from_settings(name, credential)
            for name, credential in new.credentials.items()
        }
        for source in self.tokens:
            name = source.key[0]
            if name not in credentials:
                log.warning("reload: credential '%s' is gone; restart to remove its routes", name)
                continue
            # Reload semantics (keep the running token until the new key works) live in tokens.
            source.stage(self._make_exchanger(credentials, source.key))
        untouched = ("server", "appcircle", "tokens", "log", "routes")
        if any(getattr(new, part) != getattr(self.settings, part) for part in untouched):
            log.warning(
                "reload: only credentials and secret files are reloaded; restart the proxy "
                "to apply changes to %s",
                ", ".join(p for p in untouched if getattr(new, p) != getattr(self.settings, p)),
            )
        self.settings = self.settings.model_copy(update={"credentials": new.credentials})
