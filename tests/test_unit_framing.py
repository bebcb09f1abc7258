"""The response framing decision and the head limits, case by case (proxy/upstream/framing.py)."""

from __future__ import annotations

import pytest

from proxy.upstream.framing import (
    HeadCount,
    HeadLimits,
    HeadTooLarge,
    body_framing,
    writable_reason,
)


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        ([(b"Content-Length", b"5")], (5, False)),
        ([(b"Transfer-Encoding", b"chunked")], (None, True)),
        ([(b"transfer-encoding", b"CHUNKED ")], (None, True)),
        ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], (None, True)),
        ([(b"Transfer-Encoding", b"identity, chunked")], (None, True)),
        ([(b"Transfer-Encoding", b"chunked, identity")], (None, False)),
        ([(b"Transfer-Encoding", b"xchunked")], (None, False)),
        ([(b"Transfer-Encoding", b"chunkedx")], (None, False)),
        ([], (None, False)),
    ],
)
def test_chunked_only_when_it_is_the_last_coding(
    headers: list[tuple[bytes, bytes]], framing: tuple[int | None, bool]
) -> None:
    """Guards issue 17.5: the parser's rule (RFC 9112, 6.3), never a substring check."""
    assert body_framing(headers) == framing


def test_a_reason_phrase_with_a_control_byte_is_replaced() -> None:
    assert writable_reason(200, b"O\x01K") == b"OK"
    assert writable_reason(599, b"\x7f") == b""
    assert writable_reason(200, b"Fine\tthanks \xe9") == b"Fine\tthanks \xe9"


def test_head_lines_and_totals_are_bounded_across_reads() -> None:
    limits = HeadLimits(line=100, head=300)
    buffer = bytearray(b"HTTP/1.1 200 OK\r\nA: " + b"a" * 60)
    count = HeadCount()
    assert count.end(buffer, 0, len(buffer), limits) == len(buffer)
    more = bytearray(b"a" * 30 + b"\r\n\r\nbody" + b"b" * 200)
    assert count.end(more, 0, len(more), limits) == 34  # the head ends there; body is not counted
    longer = bytearray(b"a" * 103)  # over 100 and its CRLF
    with pytest.raises(HeadTooLarge, match="max_response_line"):
        HeadCount().end(longer, 0, len(longer), limits)
    many = bytearray(b"B: b\r\n" * 60)
    with pytest.raises(HeadTooLarge, match="max_response_head"):
        HeadCount().end(many, 0, len(many), limits)
