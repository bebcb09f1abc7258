"""Every read of an aiohttp private attribute, in one place, checked when this is imported.

The inbound head bound (`inbound`) must know, per connection, when a request has been
parsed and whether the connection now carries a body or WebSocket frames; aiohttp has no
public view of either, so its `RequestHandler` is read here. pyproject caps aiohttp at the
minor these reads were checked against (`CHECKED_MINOR`); `check()` runs at import and turns
an aiohttp whose handler no longer has this shape into one clear start-up error, instead of
a head bound that silently stops working.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp import StreamReader, web

__all__ = ["AiohttpChanged", "carries_frames", "check", "watch_requests"]

CHECKED_MINOR: Final = "3.14"
# RequestHandler attributes read or replaced below.
USED: Final = ("_messages", "_upgraded", "_payload_parser")

OnRequest = Callable[[StreamReader], None]


class AiohttpChanged(ImportError):
    """The installed aiohttp is not the shape this proxy was checked against: as if the
    aiohttp this proxy needs could not be imported."""


class _WatchedQueue(deque[Any]):
    """aiohttp's queue of parsed requests, telling us of each one as it is queued.

    aiohttp queues requests from `data_received` and also from its own code paths (a
    request pipelined behind a declined upgrade, parsing resumed after a full queue), so
    the queue itself is the one place that sees every request."""

    __slots__ = ("_on_request",)

    def __init__(self, on_request: OnRequest) -> None:
        super().__init__()
        self._on_request = on_request

    def append(self, item: Any) -> None:
        super().append(item)
        self._on_request(item[1])


def watch_requests(handler: web.RequestHandler, on_request: OnRequest) -> None:
    """Call `on_request(body)` for every request `handler` parses, whichever path parsed it.
    Call before the handler has seen any data."""
    handler._messages = _WatchedQueue(on_request)


def carries_frames(handler: web.RequestHandler) -> bool:
    """Whether the connection now carries WebSocket frames, or an upgrade not yet accepted
    or declined: bytes that are not request heads."""
    return bool(handler._upgraded) or handler._payload_parser is not None


def check() -> None:
    """Raise AiohttpChanged unless aiohttp's RequestHandler has the attributes used here,
    with the types relied on."""
    found = aiohttp.__version__
    missing = [name for name in USED if not hasattr(web.RequestHandler, name)]
    if not missing:
        loop = asyncio.new_event_loop()
        try:
            handler = web.RequestHandler(web.Server(_unused, loop=loop), loop=loop)
            if not isinstance(handler._messages, deque):
                missing.append("_messages (a deque)")
            if not isinstance(handler._upgraded, bool):
                missing.append("_upgraded (a bool)")
        except (AttributeError, TypeError) as err:
            missing.append(f"the constructor it had ({err})")
        finally:
            loop.close()
    if missing:
        raise AiohttpChanged(
            f"aiohttp {found} is not supported: its RequestHandler has no "
            f"{', '.join(missing)}, which appcircle-proxy reads (checked against aiohttp "
            f"{CHECKED_MINOR}.x); install 'aiohttp>={CHECKED_MINOR},<3.15'"
        )


async def _unused(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("never called")


check()
