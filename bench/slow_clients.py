"""Memory under many slow downloads (issue #8, point 3): what 1,000 slow readers cost.

    .venv/bin/python bench/slow_clients.py [--clients 1000] [--hold 60] [--after 60]
    .venv/bin/python bench/slow_clients.py --full      # the literal target: whole bodies

The upstream (nginx) serves 10 MB bodies; each client asks the proxy for one and reads it
at 20 KB/s through a socket with a 64 KiB receive buffer, as a client on a slow link would,
so the backpressure reaches the proxy. By default the clients read for `--hold` seconds and
then hang up (10 MB at 20 KB/s would take 500 s per client); `--full` lets every client read
its whole body. The proxy runs with appcircle.max_streams, max_connections and
server.max_pending raised to the client count, so every stream is admitted and the memory
per stream is measured; a second run against a proxy with the default limits shows what
happens to the excess (refused at once with 503, or not).

It prints the proxy's RSS at the start, its peak (VmHWM), at the end (once every client has
gone) and `--after` seconds later, with its open file descriptors. Target (issue #8): peak
RSS < 400 MiB, and a minute after, RSS within 100 MiB of the start.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop
from run import Proxy, ensure_tools, nginx, open_fds, proxy, say, standin

BODY_BYTES = 10_000_000
RECEIVE_BUFFER = 64 * 1024
READ_SIZE = 4096


@dataclass
class Outcome:
    status: int = 0
    error: str = ""
    answered_after: float = 0.0  # seconds from sending the request to the status line
    received: int = 0
    failure: str = ""


async def slow_client(
    port: int, rate: float, stop: asyncio.Event, whole: bool, outcome: Outcome
) -> None:
    """GET /big.bin, read at `rate` bytes/s until `stop` (or, with `whole`, to the end)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sent = loop.time()
        await loop.sock_sendall(
            sock, b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, READ_SIZE)
            if not chunk:
                outcome.failure = "closed before a response head"
                return
            head += chunk
        outcome.answered_after = loop.time() - sent
        outcome.status = int(head.split(b" ", 2)[1])
        head, _, body = head.partition(b"\r\n\r\n")
        if outcome.status != 200:
            while chunk := await loop.sock_recv(sock, READ_SIZE):
                body += chunk
            try:
                outcome.error = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                outcome.error = "?"
            return
        outcome.received = len(body)
        started = loop.time()
        while whole or not stop.is_set():
            ahead = started + outcome.received / rate - loop.time()
            if ahead > 0:
                await pause(ahead, None if whole else stop)
                continue
            chunk = await loop.sock_recv(sock, READ_SIZE)
            if not chunk:
                if outcome.received < BODY_BYTES:
                    outcome.failure = "body cut short"
                return
            outcome.received += len(chunk)
    except OSError as err:
        outcome.failure = type(err).__name__
    finally:
        sock.close()


async def pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, or less when `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


@dataclass
class Sample:
    peak_fds: int = 0


async def watch(pid: int, sample: Sample, stop: asyncio.Event) -> None:
    while not stop.is_set():
        sample.peak_fds = max(sample.peak_fds, open_fds(pid))
        await pause(0.5, stop)


async def crowd(
    the_proxy: Proxy, clients: int, rate: float, hold: float, whole: bool
) -> tuple[list[Outcome], Sample, float]:
    """Start `clients` slow readers (50 every 50 ms), let them read, and see them off.
    Returns their outcomes, the proxy's peaks while they ran, and the seconds it took."""
    port = int(the_proxy.url.rsplit(":", 1)[1])
    stop, watching = asyncio.Event(), asyncio.Event()
    sample = Sample()
    watcher = asyncio.create_task(watch(the_proxy.pid, sample, watching))
    outcomes = [Outcome() for _ in range(clients)]
    started = time.monotonic()
    tasks = []
    for index, outcome in enumerate(outcomes):
        tasks.append(asyncio.create_task(slow_client(port, rate, stop, whole, outcome)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    if whole:
        await asyncio.gather(*tasks)
    else:
        await asyncio.sleep(hold)
        stop.set()
        await asyncio.gather(*tasks)
    took = time.monotonic() - started
    watching.set()
    await watcher
    return outcomes, sample, took


def describe(outcomes: list[Outcome]) -> str:
    def answer(outcome: Outcome) -> str:
        if not outcome.status:
            return f"no answer ({outcome.failure})"
        said = f"{outcome.status} {outcome.error}".strip()
        return f"{said} ({outcome.failure})" if outcome.failure else said

    answers = collections.Counter(answer(outcome) for outcome in outcomes)
    return ", ".join(f"{count} × {answer}" for answer, count in answers.most_common())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate-kb", type=float, default=20, help="KB/s each client reads")
    parser.add_argument("--hold", type=float, default=60, help="seconds the clients read")
    parser.add_argument("--after", type=float, default=60, help="seconds to wait after them")
    parser.add_argument(
        "--full", action="store_true", help="every client reads its whole 10 MB (500 s at 20 KB/s)"
    )
    parser.add_argument(
        "--skip-default-limits", action="store_true", help="skip the run with default limits"
    )
    args = parser.parse_args()
    tools = ensure_tools()
    if not tools["nginx"]:
        say("nginx is needed: apt-get install nginx-light")
        return 1
    rate = args.rate_kb * 1000
    uvloop.install()
    with tempfile.TemporaryDirectory(prefix="appcircle-proxy-slow-") as tmp:
        work = Path(tmp)
        body = work / "big.bin"
        body.write_bytes(bytes(BODY_BYTES))
        with nginx(tools["nginx"], work, body) as upstream, standin(3600) as appcircle:
            limits = {"max_connections": args.clients, "max_streams": args.clients}
            with proxy(
                work,
                upstream.url,
                appcircle.auth_url,
                server={"max_pending": args.clients},
                appcircle=limits,
            ) as raised:
                start_rss, start_fds = raised.rss_mib(), open_fds(raised.pid)
                what = "their whole body" if args.full else f"for {args.hold:g} s"
                say(
                    f"{args.clients} clients reading {BODY_BYTES / 1e6:g} MB bodies at "
                    f"{args.rate_kb:g} KB/s {what} (max_streams = {args.clients}) ..."
                )
                outcomes, sample, took = asyncio.run(
                    crowd(raised, args.clients, rate, args.hold, args.full)
                )
                time.sleep(1)  # the proxy sees the last hang-ups
                peak, end_rss, end_fds = (
                    raised.peak_rss_mib(),
                    raised.rss_mib(),
                    open_fds(raised.pid),
                )
                say(f"waiting {args.after:g} s ...")
                time.sleep(args.after)
                after_rss, after_fds = raised.rss_mib(), open_fds(raised.pid)
            received = sum(o.received for o in outcomes)
            default_run = None
            if not args.skip_default_limits:
                with proxy(work, upstream.url, appcircle.auth_url) as default:
                    say(f"{args.clients} clients against the default limits, held 10 s ...")
                    default_run = asyncio.run(crowd(default, args.clients, rate, 10, False))

    per_stream = (peak - start_rss) * 1024 / args.clients
    print(
        f"\nslow clients: {args.clients} × GET of {BODY_BYTES / 1e6:g} MB read at "
        f"{args.rate_kb:g} KB/s ({RECEIVE_BUFFER // 1024} KiB receive buffers), "
        + ("every body read whole" if args.full else f"held {args.hold:g} s, then hung up")
        + f"; {took:.0f} s; {received / 1e9:.2f} GB relayed\n"
    )
    print("| measure | figure | target | |")
    print("|---|---|---|---|")
    print(f"| answers (max_streams = {args.clients}) | {describe(outcomes)} | all 200 | |")
    print(f"| proxy RSS at the start | {start_rss:.1f} MiB, {start_fds} fds | | |")
    print(
        f"| proxy peak RSS (VmHWM) | {peak:.1f} MiB ({per_stream:.0f} KiB per stream over the "
        f"start), {sample.peak_fds} fds at most | < 400 MiB | "
        f"{'met' if peak < 400 else 'missed'} |"
    )
    print(f"| proxy RSS at the end | {end_rss:.1f} MiB, {end_fds} fds | | |")
    print(
        f"| proxy RSS {args.after:g} s later | {after_rss:.1f} MiB, {after_fds} fds | "
        f"within 100 MiB of the start | {'met' if after_rss - start_rss <= 100 else 'missed'} |"
    )
    if default_run is not None:
        default_outcomes, _, _ = default_run
        refused = [o.answered_after * 1000 for o in default_outcomes if o.status == 503]
        slowest = (
            f"; 503s answered in {statistics.median(refused):.0f} ms median, " if refused else ""
        )
        slowest += f"{max(refused):.0f} ms at most" if refused else ""
        print(
            f"| {args.clients} clients, default limits (max_streams 100, max_connections 100, "
            f"max_pending 256) | {describe(default_outcomes)}{slowest} | excess refused at "
            "once | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
