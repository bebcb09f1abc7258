"""Local tokens: what the proxy hands a client that performs Appcircle's key exchange at
the proxy, in place of the real session token, which never leaves the proxy.

A local token is a JWT signed (HS256) with a secret made when this module is first
imported: one running proxy knows it (workers are forked after the import, so they share
it), a restart forgets it. It carries the claims clients read from a real token
(`currentOrganizationId`, `sub`, `email`), the route it was issued for, and an `exp` no
later than the real token's.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["EXCHANGE_ENDPOINTS", "LocalClaims", "LocalTokens", "bearer_value"]

# Appcircle's four exchange endpoints (below the auth host's root, or below a route's
# prefix at the proxy) and the form field that holds the key on each.
EXCHANGE_ENDPOINTS: Final[Mapping[str, str]] = {
    "/auth/v1/token": "pat",
    "/auth/v2/token": "pat",
    "/auth/v3/token": "personalAccessKey",
    "/auth/v1/api-key/token": "secret",
}
# The claims copied from the real token: what official clients read from it.
COPIED_CLAIMS: Final = ("currentOrganizationId", "sub", "email")
ISSUER: Final = "appcircle-proxy"
ROUTE_CLAIM: Final = "appcircle_proxy_route"
# The named client (server.client_token's is "default") whose token the exchange was given.
CLIENT_CLAIM: Final = "appcircle_proxy_client"
ALGORITHM: Final = "HS256"
# One random key per running proxy; never configured, never written anywhere.
PROCESS_SECRET: Final = secrets.token_bytes(32)


def bearer_value(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@dataclass(frozen=True, slots=True)
class LocalClaims:
    """A local token whose signature checked out: the route it is for, and when it ends."""

    route: str
    expires_at: float
    # The client it stands for; None when the proxy asks for no client token.
    client: str | None = None


@dataclass(frozen=True, slots=True)
class LocalTokens:
    """Mints and reads local tokens with one secret and one clock."""

    clock: Callable[[], float]
    secret: bytes = field(default=PROCESS_SECRET, repr=False)

    def mint(
        self,
        route: str,
        real_claims: Mapping[str, Any],
        expires_at: float,
        client: str | None = None,
    ) -> str:
        """A local token for `route` (and `client`), ending at `expires_at` (whole seconds,
        rounded down)."""
        claims: dict[str, Any] = {
            name: real_claims[name] for name in COPIED_CLAIMS if name in real_claims
        }
        claims.update(
            iss=ISSUER,
            iat=int(self.clock()),
            exp=int(expires_at),
            jti=secrets.token_hex(8),
            **{ROUTE_CLAIM: route},
        )
        if client is not None:
            claims[CLIENT_CLAIM] = client
        import jwt  # here, not at import: a cold start (`run`) never mints one

        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def read(self, authorization: str | None) -> LocalClaims | None:
        """The local token in an Authorization header value, expired or not; None when
        the value holds none (no Bearer, another JWT, a forged or foreign signature)."""
        if authorization is None:
            return None
        token = bearer_value(authorization)
        # Cheap test first: most Authorization values are not JWTs at all.
        if token is None or not token.startswith("eyJ") or token.count(".") != 2:
            return None
        return _verified(token, self.secret)


# A client sends the same token many times: its signature is checked once (bounded, so a
# client sending ever new ones only churns the cache). Expiry is checked by the caller.
@functools.lru_cache(maxsize=256)
def _verified(token: str, secret: bytes) -> LocalClaims | None:
    import jwt  # here, not at import: a cold start (`run`) never reads one

    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"verify_exp": False, "require": ["exp", "iss", ROUTE_CLAIM]},
        )
    except jwt.PyJWTError:
        return None
    route, expires_at, client = claims[ROUTE_CLAIM], claims["exp"], claims.get(CLIENT_CLAIM)
    if not isinstance(route, str) or not isinstance(expires_at, int | float):
        return None
    return LocalClaims(route, float(expires_at), client if isinstance(client, str) else None)
