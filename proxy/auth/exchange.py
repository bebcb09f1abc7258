"""One key-for-token exchange with the auth host, and the session token it yields.

Every way an exchange can fail ends in `ExchangeError`, whose text is safe to show a user:
it says what the auth host answered and what to check, never the key or the token.

One exchange has one deadline, `tokens.exchange_timeout`, and no shorter connect or
first-byte one: an auth host that is slow but answers must still give a token. An exchange
that hangs is the token source's to work around, by starting another beside it (hedging,
see `tokens`), which recovers as fast as a short deadline would without cutting slow hosts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from .credentials import Credential, SecretUnavailable

__all__ = [
    "ExchangeError",
    "Exchanger",
    "SessionToken",
    "client_failure",
    "fingerprint",
    "renewal_margin",
]

# Why a token counts as unusable a little before `exp`: it must still be valid when the
# request reaches the API, after transit and any clock difference.
MAX_SKEW: Final = 5.0
MAX_MARGIN: Final = 300.0

FailureKind = Literal[
    "key_rejected",
    "bad_request",
    "auth_unreachable",
    "auth_error",
    "bad_reply",
    "wrong_organization",
    "secret_unavailable",
    "rate_limited",
]
# A Retry-After longer than this is read as this: an auth host's mistake must not silence a
# route for days.
MAX_RETRY_AFTER: Final = 3600.0


class ExchangeError(Exception):
    """A failed exchange. `kind` is a stable code; the text says what happened."""

    def __init__(self, kind: FailureKind, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind: FailureKind = kind
        self.detail = detail
        # The auth host's Retry-After (seconds): no attempt before it has passed.
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SessionToken:
    """A session token and the times that govern it (seconds since the epoch)."""

    value: str = field(repr=False)
    organization_id: str | None
    obtained_at: float
    expires_at: float
    refresh_at: float
    # A digest of the exchange's form (key included): tells, on reload, whether the key
    # behind this token has changed since.
    key_fingerprint: str = field(default="", repr=False)

    @property
    def usable_until(self) -> float:
        return self.expires_at - _skew(self.expires_at - self.obtained_at)


def _skew(lifetime: float) -> float:
    return min(MAX_SKEW, lifetime / 20)


def renewal_margin(lifetime: float, configured: float | None) -> float:
    """How long before expiry renewal is due: as configured, else min(5 min, lifetime / 5)."""
    if configured is not None:
        return min(configured, lifetime / 2)
    return min(MAX_MARGIN, lifetime / 5)


def fingerprint(form: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(form.items())).encode()).hexdigest()


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified: the proxy only reads when its own token expires (the API
    verifies it). ValueError unless it is three base64url parts with a JSON object header
    and payload. (PyJWT does the same, but importing it costs a start-up 30-70 ms.)"""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not three parts")
    try:
        header, payload = (
            json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            for part in parts[:2]
        )
    except (binascii.Error, UnicodeDecodeError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise ValueError("header or payload not a JSON object")
    return payload


def _parse_reply(
    body: bytes, now: float, refresh_margin: float | None, auth_url: str
) -> SessionToken:
    try:
        reply = json.loads(body)
    except ValueError:
        raise ExchangeError(
            "bad_reply", f"the auth host {auth_url} answered with something that is not JSON"
        ) from None
    raw = reply.get("access_token") if isinstance(reply, dict) else None
    if not isinstance(raw, str) or not raw:
        raise ExchangeError(
            "bad_reply", f"the auth host {auth_url} answered without an access_token"
        )
    try:
        claims = unverified_claims(raw)
    except ValueError:
        raise ExchangeError(
            "bad_reply", f"the auth host {auth_url} returned a token that is not a readable JWT"
        ) from None
    expiries: list[float] = []
    if isinstance(claims.get("exp"), int | float):
        expiries.append(float(claims["exp"]))
    expires_in = reply.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expiries.append(now + float(expires_in))
    if not expiries:
        raise ExchangeError(
            "bad_reply", f"the auth host {auth_url} returned a token with no expiry (exp)"
        )
    expires_at = min(expiries)
    lifetime = expires_at - now
    if lifetime <= 0:
        raise ExchangeError(
            "bad_reply",
            f"the auth host {auth_url} returned a token that had already expired; "
            "check that this machine's clock is right",
        )
    org = claims.get("currentOrganizationId")
    return SessionToken(
        value=raw,
        organization_id=str(org) if org is not None else None,
        obtained_at=now,
        expires_at=expires_at,
        # Renewal must be due while the token is still usable, or requests would wait.
        refresh_at=expires_at - max(renewal_margin(lifetime, refresh_margin), _skew(lifetime)),
    )


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from `now`."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _http_failure(
    status: int, credential: Credential, auth_url: str, retry_after: float | None = None
) -> ExchangeError:
    what = f"the auth host {auth_url} answered HTTP {status} to credential '{credential.name}'"
    if status == 429:
        wait = f"{retry_after:g} s (its Retry-After)" if retry_after is not None else "a while"
        return ExchangeError(
            "rate_limited", f"{what}: too many exchanges; waiting {wait}", retry_after
        )
    if status in (401, 403):
        return ExchangeError(
            "key_rejected",
            f"{what}: the key was rejected. Check that the {credential.kind} from "
            f"{credential.secret_origin} is current (not revoked or expired) and belongs to "
            "the organization you use it for",
        )
    if status == 400:
        return ExchangeError(
            "bad_request",
            f"{what}: the request was refused as malformed; check the credential's kind and "
            "the route's sub_organization id",
        )
    return ExchangeError("auth_error", f"{what}; the service may be unwell, retrying", retry_after)


def client_failure(err: Exception) -> str:
    """Why an aiohttp request failed, without the exception's own text (which may quote a
    URL or a request, and so a secret, such as an egress proxy's password): its type, the
    system's error message if it has one, and the egress proxy when it was the one."""
    if isinstance(err, aiohttp.ClientHttpProxyError):
        return (
            f"the egress proxy (HTTPS_PROXY / HTTP_PROXY) refused the tunnel with HTTP "
            f"{err.status}" + ("; check its credentials" if err.status == 407 else "")
        )
    if isinstance(err, aiohttp.ClientProxyConnectionError):
        return (
            f"cannot connect to the egress proxy {err.host}:{err.port} (HTTPS_PROXY / "
            f"HTTP_PROXY): {err.os_error.strerror or type(err.os_error).__name__}"
        )
    cause = err.os_error if isinstance(err, aiohttp.ClientConnectorError) else None
    if cause is not None and cause.strerror:
        return f"{type(err).__name__}: {cause.strerror}"
    return type(err).__name__


@dataclass(frozen=True, slots=True)
class Exchanger:
    """Exchanges one credential, for one organization, for session tokens."""

    session: aiohttp.ClientSession = field(repr=False)
    auth_url: str
    credential: Credential
    sub_organization: str | None
    clock: Callable[[], float]
    refresh_margin: float | None = None

    async def exchange(self) -> SessionToken:
        try:
            form = self.credential.form(self.sub_organization)
        except SecretUnavailable as err:
            raise ExchangeError("secret_unavailable", f"{err}; fix it, the proxy retries") from None
        url = self.auth_url + self.credential.endpoint
        try:
            async with self.session.post(
                url, data=form, headers={"Accept": "application/json"}, allow_redirects=False
            ) as reply:
                body = await reply.read()
                status = reply.status
                retry_after = reply.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as err:
            raise ExchangeError(
                "auth_unreachable",
                f"the auth host {self.auth_url} cannot be reached ({client_failure(err)})",
            ) from None
        if status != 200:
            raise _http_failure(
                status,
                self.credential,
                self.auth_url,
                retry_after_seconds(retry_after, self.clock()),
            )
        token = _parse_reply(body, self.clock(), self.refresh_margin, self.auth_url)
        self._check_organization(token)
        return dataclasses.replace(token, key_fingerprint=fingerprint(form))

    def pinned(self) -> Exchanger:
        """This exchanger with the key as it reads now, held in memory (see
        `Credential.pinned`); itself when the secret cannot be read, so that the exchange
        fails and says why."""
        try:
            return dataclasses.replace(self, credential=self.credential.pinned())
        except SecretUnavailable:
            return self

    def key_fingerprint(self) -> str:
        """The fingerprint an exchange made now would have; raises SecretUnavailable."""
        return fingerprint(self.credential.form(self.sub_organization))

    def _check_organization(self, token: SessionToken) -> None:
        wanted = self.sub_organization
        if wanted is None:
            return
        got = token.organization_id
        if got is None or got.lower() != wanted.lower():
            raise ExchangeError(
                "wrong_organization",
                f"asked for a token for organization {wanted} with credential "
                f"'{self.credential.name}' but got one for {got or 'no organization'}; "
                "refusing to use it. Check that the key may act for that sub-organization "
                "(a key from the root organization, or one made in that sub-organization)",
            )
