"""The proxy as a real process, for tests of signals, memory and file descriptors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path


@asynccontextmanager
async def serving(
    config: Path, *args: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Start `appcircle-proxy --config CONFIG ARGS`; yield its URL and the process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: workers included in the kill below
    )
    assert process.stdout is not None
    try:
        banner = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        match = re.search(r"listening on (https?://\S+)", banner)
        assert match, banner
        yield match.group(1), process
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> tuple[int, str, str]:
    """Run `appcircle-proxy ARGS` to its end (env: this process's, unless given); return
    its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def serve_then_stop(
    *args: str, requests: Callable[[str], Awaitable[None]], listeners: int = 1
) -> tuple[str, str]:
    """Run `appcircle-proxy ARGS` until `listeners` processes say they listen, call
    `requests(url)`, stop it with SIGTERM; return all it wrote to stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        first = ""
        while first.count("listening on") < listeners:
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, "the proxy exited before it listened"
            first += line
        match = re.search(r"listening on (http://\S+)", first)
        assert match, first
        await requests(match.group(1))
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 0, err
    return first + out.decode(), err.decode()


async def stderr_of(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    return (await process.stderr.read()).decode()
