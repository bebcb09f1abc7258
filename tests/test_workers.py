"""--workers: N processes on one port, re-forked when one dies, each with its own
token cache; the supervisor's own lines and refusals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.support.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    INLINE_KEY_CONFIG,
    WriteConfig,
)
from .support import eventually, free_port, json_lines, request
from .support.processes import run, serve_then_stop, serving, stderr_of


def children(pid: int) -> set[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in found}


def metric(text: str, name: str) -> float:
    """The sum of one family's samples in a Prometheus text, but for the proxy's own
    endpoints (route "-": the scrapes themselves)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and 'route="-"' not in line
    )


@asynccontextmanager
async def serving_unix(
    config: Path, socket_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        banner = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert f"listening on unix:{socket_path}" in banner, banner
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def get_over(socket_path: Path) -> int:
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket_path))
    ) as http:
        return (await request(http, "GET", "http://localhost/x")).status


async def test_with_workers_every_line_says_which_worker(
    standin: StandIn, write_config: WriteConfig, unused_tcp_port: int, http: aiohttp.ClientSession
) -> None:
    """With --workers 2 and JSON logs every line carries its worker number, each worker logs its own
    listening and stopped events, and their request counts add up to the traffic sent."""
    config = write_config()

    async def traffic(url: str) -> None:
        for _ in range(4):
            assert (await request(http, "GET", f"{url}/x")).status == 200

    out, err = await serve_then_stop(
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        "--workers",
        "2",
        "--log-format",
        "json",
        requests=traffic,
        listeners=2,
    )
    entries = json_lines(out) + json_lines(err)
    assert entries
    assert all(entry.get("worker") in (0, 1) for entry in entries), entries
    for event in ("listening", "stopped"):
        workers = [entry["worker"] for entry in entries if entry.get("event") == event]
        assert sorted(workers) == [0, 1], event  # type: ignore[type-var]
    stopped = [entry for entry in entries if entry.get("event") == "stopped"]
    assert sum(int(entry["requests"]) for entry in stopped) == 4  # type: ignore[call-overload]


async def test_in_json_mode_the_supervisors_own_refusal_is_json(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """In JSON log mode the supervisor's own refusal (--workers without a fixed TCP port) is logged
    as JSON too, with exit 2."""
    config = write_config(credentials=INLINE_KEY_CONFIG, log={"format": "json"})
    code, _, err = await run("--config", str(config), "--workers", "2")
    assert code == 2
    lines = [json.loads(line) for line in err.splitlines()]
    assert any("--workers needs a fixed TCP port" in entry["message"] for entry in lines)


async def test_a_killed_worker_is_re_forked_and_the_port_keeps_all_of_them(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """With --workers 2 a worker killed by SIGKILL is re-forked, every request on the port keeps
    getting 200, the new worker reports appcircle_proxy_worker_restarts 1, and the kill is
    logged."""
    config = write_config(
        credentials=INLINE_KEY_CONFIG, server={"listen": f"127.0.0.1:{free_port()}"}
    )
    async with (
        serving(config, "--workers", "2") as (proxy, process),
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: len(children(process.pid)) == 2, within=10)
        first = children(process.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: len(children(process.pid)) == 2 and victim not in children(process.pid),
            within=5,
        )
        for _ in range(20):  # whichever worker the kernel picks, it answers
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                assert (await request(fresh, "GET", f"{proxy}/x")).status == 200
        assert (await request(http, "GET", f"{proxy}/x")).status == 200

        async def the_new_worker_counts_its_restart() -> bool:
            async with aiohttp.ClientSession() as fresh:
                metrics = (await request(fresh, "GET", f"{proxy}/_proxy/metrics")).body
            return b"appcircle_proxy_worker_restarts_total 1.0" in metrics

        await eventually(the_new_worker_counts_its_restart, within=5)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        logs = await stderr_of(process)
    assert f"(pid {victim}) was killed by SIGKILL; re-forking it" in logs
    assert "restart 1 of this worker" in logs
    assert "Traceback" not in logs


async def test_one_scrape_shows_the_sum_over_workers_and_counters_never_go_backwards(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """With --workers 2, a scrape lands on either worker and must show the whole proxy:
    after N requests one scrape counts N, ten scrapes never go backwards (not even across a
    killed worker), and the process, build and restart metrics are there."""
    config = write_config(
        credentials=INLINE_KEY_CONFIG, server={"listen": f"127.0.0.1:{free_port()}"}
    )
    requests = 30
    async with serving(config, "--workers", "2") as (proxy, process):
        await eventually(lambda: len(children(process.pid)) == 2, within=10)

        async def scrape() -> str:
            async with aiohttp.ClientSession() as fresh:  # a new connection: any worker
                return (await request(fresh, "GET", f"{proxy}/_proxy/metrics")).body.decode()

        # (A worker answers its siblings before it takes requests: no need to wait for both.)
        for _ in range(requests):
            async with aiohttp.ClientSession() as fresh:
                assert (await request(fresh, "GET", f"{proxy}/x")).status == 200
        totals = []
        for _ in range(10):
            text = await scrape()
            totals.append(metric(text, "appcircle_proxy_requests_total"))
        assert totals == [requests] * 10, totals
        assert metric(text, "appcircle_proxy_upstream_latency_seconds_count") == requests
        assert "appcircle_proxy_workers 2.0" in text
        assert 'appcircle_proxy_build_info{version="' in text
        assert metric(text, "process_resident_memory_bytes") > 0
        assert "# TYPE process_cpu_seconds_total counter" in text
        assert "# TYPE appcircle_proxy_worker_restarts_total counter" in text
        assert "summed over the workers" in text
        # A worker dies, with its counts: they stay counted.
        os.kill(min(children(process.pid)), signal.SIGKILL)
        after = []
        for _ in range(10):
            text = await scrape()
            after.append(metric(text, "appcircle_proxy_requests_total"))
        assert after == [requests] * 10, after
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_a_local_token_from_one_worker_is_accepted_by_every_worker_re_forked_too(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """Guards the local tokens' secret under --workers (issue 18): it is made before the
    fork, so a token from a key exchange answered by one worker is accepted, in place of the
    client token, by the others and by a worker re-forked later."""
    config = write_config(
        credentials=INLINE_KEY_CONFIG,
        server={"listen": f"127.0.0.1:{free_port()}", "client_token": CLIENT_TOKEN},
    )
    async with serving(config, "--workers", "2") as (proxy, process):
        await eventually(lambda: len(children(process.pid)) == 2, within=10)
        async with aiohttp.ClientSession() as http:
            reply = await request(
                http, "POST", f"{proxy}/auth/v3/token", data={"personalAccessKey": CLIENT_TOKEN}
            )
        assert reply.status == 200
        bearer = {"Authorization": f"Bearer {reply.json()['access_token']}"}
        victim = min(children(process.pid))
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: len(children(process.pid)) == 2 and victim not in children(process.pid),
            within=5,
        )
        for _ in range(20):  # whichever worker the kernel picks, it accepts the token
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                answer = await request(fresh, "GET", f"{proxy}/x", headers=bearer)
                assert answer.status == 200, answer.body
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_workers_on_a_port_in_use_exit_2_naming_it_before_forking(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """A port already taken stops --workers before any worker is forked: exit 2, naming
    the address, instead of re-forking workers forever."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(credentials=INLINE_KEY_CONFIG, server={"listen": f"127.0.0.1:{port}"})
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(config),
            "--workers",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert await asyncio.wait_for(process.wait(), 20) == 2
    logs = await stderr_of(process)
    assert f"cannot listen on 127.0.0.1:{port}" in logs and "Traceback" not in logs
    assert "worker" not in logs


async def test_a_second_workers_instance_on_the_same_address_exits_2_and_the_first_keeps_it(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """Workers used to bind with SO_REUSEPORT each: a second instance (with another API
    URL, say) shared the port silently and took half the requests. Bound once, in the
    supervisor, the address is one instance's, as in single-process mode."""
    address = f"127.0.0.1:{free_port()}"
    first = write_config(credentials=INLINE_KEY_CONFIG, server={"listen": address})
    async with serving(first, "--workers", "2") as (proxy, process):
        await eventually(lambda: len(children(process.pid)) == 2, within=10)
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(first),
            "--workers",
            "2",
            "--api-url",
            "http://127.0.0.1:9",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert await asyncio.wait_for(second.wait(), 10) == 2
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
        logs = await stderr_of(second)
        assert f"cannot listen on {address}" in logs and "Traceback" not in logs
        statuses = []
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                statuses.append((await request(fresh, "GET", f"{proxy}/x")).status)
        assert statuses == [200] * 20
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_drain_cuts_what_is_still_running_at_shutdown_timeout_and_says_so(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """On SIGTERM a request still running at server.shutdown_timeout is cut at that moment (not
    later), the process exits 0, and the log says how many requests were cut."""
    config = write_config(credentials=INLINE_KEY_CONFIG, server={"shutdown_timeout": 1})
    async with serving(config) as (proxy, process), aiohttp.ClientSession() as http:
        slow = asyncio.create_task(
            request(http, "GET", f"{proxy}/_test/slow", params={"seconds": "10"})
        )
        await eventually(lambda: standin.in_flight == 1)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientError):
            await slow
        # Cut at shutdown_timeout; aiohttp alone would wait 1 s, cancel, then up to 1 s more.
        assert 0.8 < time.monotonic() - signalled < 1.5
        assert await asyncio.wait_for(process.wait(), 10) == 0
        logs = await stderr_of(process)
    assert "cut 1 request(s) still in flight" in logs


async def test_answers_during_the_drain_close_their_connection(
    standin: StandIn, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer sent while draining carries Connection: close, so keep-alive clients reconnect
    elsewhere; a request finishing in time is not counted as cut."""
    running = await start(load_settings(write_config(server={"shutdown_timeout": 5})))
    proxy = running.urls[0]
    async with aiohttp.ClientSession() as http:
        before = await request(http, "GET", f"{proxy}/x")
        assert "close" not in before.headers.get("Connection", "").lower()
        slow = asyncio.create_task(
            request(http, "GET", f"{proxy}/_test/slow", params={"seconds": "0.5"})
        )
        await eventually(lambda: standin.in_flight == 1)
        cut = await running.stop()
        reply = await slow
    assert reply.status == 200 and reply.headers["Connection"] == "close"
    assert cut == 0


async def test_a_second_proxy_on_a_live_socket_exits_1_and_the_first_keeps_it(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """A second proxy on a Unix socket another process is listening on exits 1 with one line, the
    first keeps serving on it, and the socket file is removed when the first exits."""
    socket_path = tmp_path / "proxy.sock"
    config = write_config(credentials=INLINE_KEY_CONFIG, server={"listen": f"unix:{socket_path}"})
    async with serving_unix(config, socket_path) as first:
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 1
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "another process is listening" in lines[0], lines
        assert await get_over(socket_path) == 200
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 20) == 0
    assert not socket_path.exists()  # removed on exit


async def test_a_stale_socket_file_is_replaced(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """A stale Unix socket file nobody listens on is replaced at start-up and removed on stop."""
    socket_path = tmp_path / "proxy.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, then gone: the file stays
        dead.bind(str(socket_path))
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    config = write_config(server={"listen": f"unix:{socket_path}"})
    running = await start(load_settings(config))
    try:
        assert await get_over(socket_path) == 200
    finally:
        await running.stop()
    assert not socket_path.exists()


async def test_a_path_that_is_not_a_socket_is_never_removed(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """A listen path that exists and is not a socket stops start-up and is left untouched, so a
    mistyped path never deletes a user's file."""
    socket_path = tmp_path / "proxy.sock"
    socket_path.write_text("precious")
    config = write_config(server={"listen": f"unix:{socket_path}"})
    with pytest.raises(SystemExit, match="exists and is not a socket"):
        await start(load_settings(config))
    assert socket_path.read_text() == "precious"


async def test_a_world_writable_socket_mode_is_logged_loudly(
    standin: StandIn,
    write_config: WriteConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """server.socket_mode 0666 logs a WORLD-WRITABLE warning, while 0660 logs none."""
    socket_path = tmp_path / "proxy.sock"
    for mode, loud in (("0666", True), ("0660", False)):
        caplog.clear()
        config = write_config(server={"listen": f"unix:{socket_path}", "socket_mode": mode})
        running = await start(load_settings(config))
        await running.stop()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("WORLD-WRITABLE" in message for message in warnings) is loud, mode


async def test_workers_share_the_port_each_with_its_own_token_cache(
    standin: StandIn, write_config: WriteConfig, unused_tcp_port: int
) -> None:
    """With --workers 2 both workers serve the same port, each exchanges its token once (eagerly)
    and reuses it, and the supervisor exits 0 on SIGTERM."""
    config = write_config(
        credentials=INLINE_KEY_CONFIG,
        server={"eager": True, "listen": f"127.0.0.1:{unused_tcp_port}"},
    )
    async with serving(config, "--workers", "2") as (proxy, process):
        await eventually(lambda: len(standin.exchanges) == 2, within=10)  # eager, per worker
        for _ in range(40):  # fresh connections, spread over both workers by the kernel
            async with aiohttp.ClientSession() as http:
                assert (await request(http, "GET", f"{proxy}/x")).status == 200
        assert len(standin.exchanges) == 2
        assert len({request.token_id for request in standin.api_requests}) == 2
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
