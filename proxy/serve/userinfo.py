"""The one auth-host endpoint clients may reach through the proxy: OpenID Connect userinfo.

The official CLI asks `{AUTH_HOSTNAME}/auth/realms/appcircle/protocol/openid-connect/userinfo`
who its token belongs to (`organization view --organizationId current` and others). With
AUTH_HOSTNAME at the proxy, that request is relayed to `appcircle.auth_url` with the route's
session token, so the answer names the route's organization. Nothing else under `/auth/` is
relayed, above all not the key exchanges: the proxy holds the key, clients never log in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from ..auth.exchange import SessionToken, client_failure
from ..auth.tokens import TokenUnavailable
from ..policy import errors
from ..policy.headers import response_headers
from ..policy.routes import Route

__all__ = ["USERINFO_PATH", "Relay", "on_auth_host"]

USERINFO_PATH: Final = "/auth/realms/appcircle/protocol/openid-connect/userinfo"
# A userinfo answer is a few hundred bytes of claims; anything far larger is not one.
MAX_REPLY_BYTES: Final = 64 * 1024
# Only what content negotiation needs: the auth host has no business with the client's
# cookies or other headers.
PASSED_HEADERS: Final = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT_LANGUAGE, hdrs.USER_AGENT)
DROPPED_REPLY_HEADERS: Final = (hdrs.CONTENT_LENGTH, hdrs.SET_COOKIE)


def on_auth_host(path: str) -> bool:
    """Whether `path` (below the route's prefix) is the auth host's, which the API never
    serves: the userinfo relay or a 404, never the API."""
    return path == "/auth" or path.startswith("/auth/")


@dataclass(frozen=True, slots=True)
class Relay:
    """Relays userinfo to the auth host at `auth_url` over `session`, each call within
    `timeout` seconds in all."""

    session: aiohttp.ClientSession = field(repr=False)
    auth_url: str
    timeout: float

    async def answer(self, request: web.BaseRequest, route: Route, path: str) -> web.Response:
        """Answer a request for `path` on the auth host: userinfo relayed, the rest 404."""
        if path != USERINFO_PATH or request.method != hdrs.METH_GET:
            return errors.auth_path_not_forwarded(path)
        headers = CIMultiDict(
            (name, request.headers[name]) for name in PASSED_HEADERS if name in request.headers
        )
        try:
            token = await route.tokens.get()
            status, reply_headers, body = await self._fetch(headers, token)
            # As for the API: a refused token is renewed and the request replayed once, unless
            # a 401 renewed this route moments ago (then the 401 is the auth host's answer).
            if status == 401 and route.tokens.invalidate(token):
                token = await route.tokens.get()
                status, reply_headers, body = await self._fetch(headers, token)
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        except _TooLarge:
            return errors.auth_unreachable(
                self.auth_url, f"its userinfo answer is larger than {MAX_REPLY_BYTES} bytes"
            )
        except (TimeoutError, aiohttp.ClientError) as err:
            reason = type(err).__name__ if isinstance(err, TimeoutError) else client_failure(err)
            return errors.auth_unreachable(self.auth_url, reason)
        response = web.Response(status=status, body=body)
        response.headers.extend(reply_headers)
        return response

    async def _fetch(
        self, headers: CIMultiDict[str], token: SessionToken
    ) -> tuple[int, CIMultiDict[str], bytes]:
        headers = CIMultiDict(headers)
        headers[hdrs.AUTHORIZATION] = f"Bearer {token.value}"
        async with self.session.get(
            self.auth_url + USERINFO_PATH,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=PASSED_HEADERS,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        ) as reply:
            body = bytearray()
            while chunk := await reply.content.readany():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise _TooLarge
            passed = response_headers(reply.headers)
            for name in DROPPED_REPLY_HEADERS:
                passed.popall(name, None)
            return reply.status, passed, bytes(body)


class _TooLarge(Exception):
    pass
