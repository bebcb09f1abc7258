"""The auth host's reply read case by case, the failure each HTTP status means, and the
organization check, with no auth host: tokens are made here."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from pydantic import SecretStr

from proxy.auth.credentials import Credential, _InlineSecret
from proxy.auth.exchange import (
    ExchangeError,
    Exchanger,
    SessionToken,
    _http_failure,
    _parse_reply,
    fingerprint,
)

AUTH = "https://auth.example"
NOW = 1_000_000.0
ORG = "22222222-2222-4222-8222-222222222222"


def jwt_of(**claims: Any) -> str:
    return jwt.encode(claims, "signing-key-of-at-least-32-bytes!", algorithm="HS256")


def reply(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def parse(body: bytes, margin: float | None = None) -> SessionToken:
    return _parse_reply(body, NOW, margin, AUTH)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>Bad gateway</html>", "not JSON"),
        (b"", "not JSON"),
        (b"[]", "without an access_token"),
        (b'"a string"', "without an access_token"),
        (reply(token_type="Bearer"), "without an access_token"),
        (reply(access_token=""), "without an access_token"),
        (reply(access_token=42), "without an access_token"),
        (reply(access_token="not-a-jwt"), "not a readable JWT"),
        (reply(access_token=jwt_of(sub="u")), "no expiry"),
        (reply(access_token=jwt_of(exp="soon")), "no expiry"),
        (reply(access_token=jwt_of(sub="u"), expires_in=True), "no expiry"),
        (reply(access_token=jwt_of(sub="u"), expires_in="3600"), "no expiry"),
        (reply(access_token=jwt_of(exp=NOW)), "already expired"),
        (reply(access_token=jwt_of(exp=NOW - 10)), "already expired"),
        (reply(access_token=jwt_of(exp=NOW + 3600), expires_in=0), "already expired"),
    ],
)
def test_an_unusable_reply_is_a_bad_reply_naming_the_auth_host(body: bytes, says: str) -> None:
    """An auth reply that is not JSON, lacks a string access_token, holds no readable JWT, has no
    usable expiry or is already expired raises ExchangeError bad_reply naming the auth host."""
    with pytest.raises(ExchangeError) as failure:
        parse(body)
    assert failure.value.kind == "bad_reply"
    assert says in failure.value.detail and AUTH in failure.value.detail


def test_a_token_with_exp_lives_until_then_and_renews_a_fifth_before() -> None:
    """A token with exp expires then, renews a fifth of its lifetime before, stops being usable 5
    s before expiry, carries its organization claim, and keeps its value out of its repr."""
    raw = jwt_of(exp=NOW + 1000, currentOrganizationId=ORG)
    token = parse(reply(access_token=raw, token_type="Bearer"))
    assert token.value == raw
    assert token.organization_id == ORG
    assert (token.obtained_at, token.expires_at) == (NOW, NOW + 1000)
    assert token.refresh_at == NOW + 1000 - 200
    assert token.usable_until == NOW + 1000 - 5  # the skew: 5 s at most
    assert raw not in repr(token)


def test_expires_in_alone_is_enough_and_the_earlier_expiry_wins() -> None:
    """expires_in alone gives the expiry, and with both exp and expires_in the earlier one wins."""
    assert parse(reply(access_token=jwt_of(sub="u"), expires_in=600)).expires_at == NOW + 600
    both = reply(access_token=jwt_of(exp=NOW + 1000), expires_in=400.5)
    assert parse(both).expires_at == NOW + 400.5
    later = reply(access_token=jwt_of(exp=NOW + 1000), expires_in=5000)
    assert parse(later).expires_at == NOW + 1000


def test_a_configured_margin_is_used_but_never_inside_the_skew() -> None:
    """A configured refresh margin is used, but a margin shorter than the clock skew is raised to
    it, so renewal never falls after the token stops being usable; short lifetimes use a 1/20
    skew."""
    assert parse(reply(access_token=jwt_of(exp=NOW + 1000)), margin=42).refresh_at == (
        NOW + 1000 - 42
    )
    # A margin shorter than the skew would renew after the token stopped being usable.
    short = parse(reply(access_token=jwt_of(exp=NOW + 1000)), margin=1)
    assert short.refresh_at == short.usable_until == NOW + 1000 - 5
    # On a short lifetime the skew is a twentieth of it.
    assert parse(reply(access_token=jwt_of(exp=NOW + 20)), margin=0).refresh_at == NOW + 19


def test_an_organization_claim_is_read_as_text_and_its_absence_as_none() -> None:
    """A numeric currentOrganizationId claim is read as text, and a token without the claim has
    organization_id None."""
    numbered = parse(reply(access_token=jwt_of(exp=NOW + 60, currentOrganizationId=7)))
    assert numbered.organization_id == "7"
    assert parse(reply(access_token=jwt_of(exp=NOW + 60))).organization_id is None


CREDENTIAL = Credential(
    "main",
    "personal-access-key",
    _InlineSecret(SecretStr("pak_never_shown"), "$APPCIRCLE_KEY"),
)


@pytest.mark.parametrize(
    ("status", "kind", "says"),
    [
        (401, "key_rejected", "the key was rejected"),
        (403, "key_rejected", "the key was rejected"),
        (400, "bad_request", "refused as malformed"),
        (404, "auth_error", "may be unwell"),
        (500, "auth_error", "may be unwell"),
        (503, "auth_error", "may be unwell"),
    ],
)
def test_each_failing_status_says_what_it_means_and_what_to_check(
    status: int, kind: str, says: str
) -> None:
    """Each failing auth status maps to its kind (401 and 403 key_rejected, 400 bad_request,
    others auth_error) with a detail naming the status, credential and key source, never the key."""
    failure = _http_failure(status, CREDENTIAL, AUTH)
    assert failure.kind == kind
    assert says in failure.detail
    assert f"HTTP {status}" in failure.detail and "credential 'main'" in failure.detail
    if kind == "key_rejected":
        assert "personal-access-key from $APPCIRCLE_KEY" in failure.detail
    assert "pak_never_shown" not in failure.detail


def exchanger(sub_organization: str | None) -> Exchanger:
    return Exchanger(
        session=None,  # type: ignore[arg-type]  # the check never talks to the auth host
        auth_url=AUTH,
        credential=CREDENTIAL,
        sub_organization=sub_organization,
        clock=lambda: NOW,
    )


def token_for(organization: str | None) -> SessionToken:
    return SessionToken("t", organization, NOW, NOW + 60, NOW + 30)


def test_a_sub_organization_route_takes_only_a_token_naming_that_organization() -> None:
    """A route with a sub_organization accepts only a token naming that organization (GUID in any
    case); no claim or another id raises wrong_organization naming both."""
    exchanger(ORG)._check_organization(token_for(ORG))
    exchanger(ORG)._check_organization(token_for(ORG.upper()))  # GUIDs in any case
    for wrong in (None, "11111111-1111-4111-8111-111111111111"):
        with pytest.raises(ExchangeError) as failure:
            exchanger(ORG)._check_organization(token_for(wrong))
        assert failure.value.kind == "wrong_organization"
        assert ORG in failure.value.detail
        assert (wrong or "no organization") in failure.value.detail


def test_the_keys_own_organization_takes_any_token() -> None:
    """A route without a sub_organization accepts a token with any organization claim or none."""
    for organization in (None, ORG):
        exchanger(None)._check_organization(token_for(organization))


def test_the_fingerprint_changes_with_any_field_and_not_with_their_order() -> None:
    """An exchange form's fingerprint ignores field order but changes with any field's value or
    an added field, so a reload notices a changed key or sub-organization."""
    form = {"personalAccessKey": "a", "scope": "openid"}
    assert fingerprint(form) == fingerprint(dict(reversed(form.items())))
    assert fingerprint(form) != fingerprint({**form, "personalAccessKey": "b"})
    assert fingerprint(form) != fingerprint({**form, "subOrganization": ORG})
