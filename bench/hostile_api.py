"""What a hostile API costs the proxy: an endless response head, and a body in 1-byte chunks.

    .venv/bin/python bench/hostile_api.py [--seconds 3]

Starts the stand-in auth host and a scripted raw API in this process, and the proxy as a
process of its own (`python -m proxy`, so its memory and CPU time can be read from /proc).
Then, one after the other:
- endless head: requests whose answer is an endless run of 1 KB header lines, one after
  another for `--seconds`, while small GETs go through the proxy; prints the proxy's RSS
  growth and peak, what the endless requests got, and the small GETs' latency;
- 1-byte chunks: 1 MB sent as 1-byte chunks; prints the proxy's CPU seconds for it, the
  chunks the client received, and the latency of a small GET sent meanwhile.
Not a test: it prints figures. To measure another checkout, put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import aiohttp
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test support lives in tests/
from tests.processes import rss_mib, serving  # noqa: E402

from tests.support import proxy_config  # noqa: E402
from tests.support.rawapi import RawApi, Received  # noqa: E402
from tests.support.standin import StandIn  # noqa: E402

KEY: Final = "bench-key"
ORG: Final = "11111111-1111-4111-8111-111111111111"
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ONE_MB: Final = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if got.path == "/endless":
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        while True:
            writer.write(line * 64)
            await writer.drain()
    elif got.path == "/bytes":
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"1\r\nx\r\n" * 65536
        for _ in range(ONE_MB // 65536):
            writer.write(block)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
    else:
        writer.write(OK)


async def small_gets(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.monotonic()
        async with http.get(f"{url}/small") as response:
            await response.read()
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.05)
    return latencies


def describe(latencies: list[float]) -> str:
    if not latencies:
        return "none answered"
    return (
        f"{len(latencies)} answered, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )


async def main(seconds: float) -> None:
    standin = StandIn()
    standin.add_personal_key(KEY, ORG)
    await standin.start()
    api = RawApi(answer)
    await api.start()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "config.toml"
        document = proxy_config(
            api.url,
            standin.auth_url,
            credentials={"main": {"kind": "personal-access-key", "secret": KEY}},
            appcircle={"read_timeout": 60},
            # Nobody reads the proxy's stderr past its banner: a full pipe would stall it.
            log={"level": "error"},
        )
        config.write_text(tomli_w.dumps(document))
        async with serving(config) as (url, process), aiohttp.ClientSession() as http:
            async with http.get(f"{url}/small") as response:  # token and a warm connection
                await response.read()
            pid = process.pid
            before = rss_mib(pid)
            stop = asyncio.Event()
            gets = asyncio.ensure_future(small_gets(http, url, stop))
            started = time.monotonic()
            answers: list[str] = []
            # Endless requests one after another (a proxy that answers at once gets many).
            while (left := seconds - (time.monotonic() - started)) > 0:
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(left), http.get(f"{url}/endless") as response:
                        await response.read()
                        answers.append(f"{response.status} in {time.monotonic() - sent:.2f} s")
                except TimeoutError:
                    answers.append(f"none in {left:.1f} s")
            got = f"{len(answers)} sent, first {answers[0]}, last {answers[-1]}"
            growth = rss_mib(pid) - before
            stop.set()
            latencies = await gets
            print(
                f"endless head: RSS +{growth:.0f} MiB (peak {peak_rss_mib(pid):.0f} MiB) in "
                f"{time.monotonic() - started:.1f} s; endless requests: {got}; small GETs: "
                f"{describe(latencies)}"
            )
            await asyncio.sleep(0.5)  # let the endless connection go
            stop = asyncio.Event()
            gets = asyncio.ensure_future(small_gets(http, url, stop))
            cpu = cpu_seconds(pid)
            started = time.monotonic()
            chunks = received = 0
            async with http.get(f"{url}/bytes") as response:
                async for data, _ in response.content.iter_chunks():
                    chunks += 1
                    received += len(data)
            elapsed = time.monotonic() - started
            used = cpu_seconds(pid) - cpu
            stop.set()
            latencies = await gets
            print(
                f"1 MB in 1-byte chunks: proxy CPU {used:.2f} s, {elapsed:.2f} s wall, "
                f"{received} bytes in {chunks} chunks to the client; small GETs meanwhile: "
                f"{describe(latencies)}"
            )
    await api.close()
    await standin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    asyncio.run(main(parser.parse_args().seconds))
