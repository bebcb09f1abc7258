"""The token cache on its own, with a clock the test turns: entries vanish when their token
stops being usable, and only the token a caller holds can be discarded."""

from __future__ import annotations

from proxy.auth.exchange import SessionToken
from proxy.auth.tokens import TokenCache

KEY = ("main", None)
OTHER_KEY = ("main", "22222222-2222-4222-8222-222222222222")


def token(expires_at: float, value: str = "t") -> SessionToken:
    return SessionToken(value, None, 0.0, expires_at, expires_at / 2)


def test_a_token_is_served_until_it_is_no_longer_usable_then_gone() -> None:
    """TokenCache serves a token under its own key until usable_until (5 s before expiry) and not
    from that moment on."""
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    held = token(100.0)  # usable until 95: five seconds of skew before expiry
    cache.put(KEY, held)
    assert cache.get(KEY) is held and cache.get(OTHER_KEY) is None
    now[0] = 94.9
    assert cache.get(KEY) is held
    now[0] = 95.0
    assert cache.get(KEY) is None


def test_only_the_cached_token_itself_is_discarded() -> None:
    """TokenCache.discard() removes only the very token object cached, so a late 401 for a token
    already replaced (or an equal copy) does not discard the new one."""
    cache = TokenCache(clock=lambda: 0.0)
    older, newer = token(100.0, "older"), token(100.0, "newer")
    cache.put(KEY, newer)
    assert cache.discard(KEY, older) is False  # a late 401 for a token already replaced
    assert cache.get(KEY) is newer
    assert cache.discard(KEY, token(100.0, "newer")) is False  # equal, but not the same
    assert cache.discard(KEY, newer) is True
    assert cache.get(KEY) is None
    assert cache.discard(KEY, newer) is False
