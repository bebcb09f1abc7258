"""Fault injection: a few minutes of load on the proxy while Appcircle misbehaves, one table.

    .venv/bin/python bench/faults.py [--seconds 180 | --quick] [--overload 2000]

It starts, on loopback, the stand-in auth host and the stand-in API host as processes of
their own (so either can be killed and restarted on its port; they share a signing key),
and the proxy as a real process (`python -m proxy --config ... --workers 2`, a pool of 8
upstream connections, so that a slow API makes requests wait for one). A load loop
(aiohttp, a steady ~150 requests/s of small GETs) runs throughout, while, one after
another: the auth host answers 500s, hangs, answers garbage, is killed and restarted; the
API host is slowed (with 100 KiB uploads too, too big to replay after a 401) and killed; an
endpoint refuses every token; the key is rotated by SIGHUP (a good key, then a bad one,
then fixed); a worker is killed; the auth host hangs and, when it answers again, never
answers the exchanges it held; and one path is flooded with slow calls (`--overload`
concurrent calls, 2,000 by default, of 10 s each) while the small GETs
go on to other paths (its note: their success rate and p99, and how fast the flood's
refusals came back). Per fault, one row: requests by status, client-visible
401s (must be 0), the longest wait for an answer, the time from the end of the fault to the
last failed request, exchanges with the auth host, tokens the API refused (sent expired,
even if a replay hid it), and the proxy's peak RSS and open file descriptors (all its
processes, from /proc). Not a test: it prints figures and always exits 0 unless something
it needs fails to start.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stand-in lives in tests/
from tests.support.standin import StandIn  # noqa: E402

ORG: Final = "11111111-1111-4111-8111-111111111111"
KEYS: Final = ("bench-key", "bench-key-rotated")  # the processes must agree: fixed
BAD_KEY: Final = "bench-key-wrong"
SIGNING_KEY_ENV: Final = "FAULTS_SIGNING_KEY"
CONCURRENCY: Final = 15
# A small upstream pool, so that a slow API makes requests wait for a connection.
MAX_CONNECTIONS: Final = 8
# Above the default tokens.replay_limit (64 KiB): a 401 to it cannot be hidden by a replay.
UPLOAD: Final = b"u" * 100 * 1024
PAUSE: Final = 0.1  # between one client's requests: ~150 requests/s in all when healthy
WAIT_TIMEOUT: Final = 5.0  # the proxy's default tokens.wait_timeout, checked below
OVERLOAD_CALL: Final = 10.0  # seconds each of the overload row's slow calls lasts
# The hung-auth row watches recovery this long: past the default tokens.exchange_timeout.
HUNG_RECOVERY: Final = 11.0
PROBE_AFTER, PROBES = 1.0, 20  # the overload row's probes of the flooded path


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_for_port(port: int, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# -- the stand-in, as a process of its own ----------------------------------------------


async def serve_standin(
    which: Literal["auth", "api"], port: int, control: int, life: float
) -> None:
    """One stand-in host on `port`, its fault switches on `control` (POST /fault, GET /stats)."""
    appcircle = StandIn(
        token_lifetime=life, signing_key=os.environ[SIGNING_KEY_ENV], record_requests=False
    )
    for key in KEYS:
        appcircle.add_personal_key(key, ORG)
    await appcircle.serve(which, port=port)

    async def fault(request: web.Request) -> web.Response:
        change = await request.json()
        if "always" in change:
            appcircle.always = change["always"]
        if "api_delay" in change:
            appcircle.api_delay = float(change["api_delay"])
        if change.get("hang") is True:
            appcircle.gate = asyncio.Event()
        elif change.get("hang") is False and appcircle.gate is not None:
            appcircle.gate.set()  # the held exchanges answer now
            appcircle.gate = None
        elif change.get("hang") == "abandon":
            # New exchanges answer; the held ones never do (a dead connection, say): only
            # the proxy's own deadlines or hedging get it past them.
            appcircle.gate = None
        return web.json_response({})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"exchanges": appcircle.exchanges_started, "refused": len(appcircle.rejected_tokens)}
        )

    app = web.Application()
    app.router.add_post("/fault", fault)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control).start()
    await asyncio.Event().wait()


@dataclass
class Host:
    """A stand-in host process that the bench kills and restarts on the same ports."""

    which: Literal["auth", "api"]
    life: float
    port: int = field(default_factory=free_port)
    control: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            self.which,
            str(self.port),
            str(self.control),
            str(self.life),
            start_new_session=True,
        )
        await wait_for_port(self.port)
        await wait_for_port(self.control)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def fault(self, http: aiohttp.ClientSession, **change: Any) -> None:
        async with http.post(f"http://127.0.0.1:{self.control}/fault", json=change) as reply:
            reply.raise_for_status()

    async def count(self, http: aiohttp.ClientSession, what: str) -> int:
        """A counter of the host's ("exchanges", "refused" tokens); from zero after a restart."""
        async with http.get(f"http://127.0.0.1:{self.control}/stats") as reply:
            return int((await reply.json())[what])


# -- the proxy, as a real process --------------------------------------------------------


@dataclass
class Proxy:
    config: Path
    key_file: Path
    port: int
    process: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [pid, *map(int, children)]

    def workers(self) -> list[int]:
        return self.pids()[1:]

    def footprint(self) -> tuple[float, int]:
        """Resident memory (MiB) and open file descriptors, summed over its processes."""
        rss, fds = 0.0, 0
        for pid in self.pids():
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) / 1024
                fds += len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds


@asynccontextmanager
async def proxy(work: Path, auth: Host, api: Host) -> AsyncIterator[Proxy]:
    port = free_port()
    key_file = work / "key"
    key_file.write_text(KEYS[0])
    config = work / "proxy.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[appcircle]\napi_url = "{api.url}"\nauth_url = "{auth.url}"\n'
        f"max_connections = {MAX_CONNECTIONS}\n"
        f'[tokens]\nwait_timeout = {WAIT_TIMEOUT}\n[log]\nlevel = "error"\n'
        f'[credentials.main]\nkind = "personal-access-key"\nsecret_file = "{key_file}"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        "--workers",
        "2",
        stdout=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await wait_for_port(port)
        yield Proxy(config, key_file, port, process)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 15)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


# -- load and measures -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    started: float
    took: float
    status: int  # 0: no HTTP answer (connection reset, refused, timed out)
    storm: bool  # a request to the endpoint that refuses every token


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)
    storm: bool = False
    uploads: bool = False

    async def client(self, http: aiohttp.ClientSession, number: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            storm = self.storm and number % 3 == 0
            upload = self.uploads and number % 3 == 1
            path = "/_test/status/401" if storm else f"/build/v2/profiles?client={number}"
            started = time.monotonic()
            try:
                async with http.request(
                    "POST" if upload else "GET",
                    "/distribution/v2/profiles/bench/app-versions" if upload else path,
                    data=UPLOAD if upload else None,
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            self.answers.append(Answer(started, time.monotonic() - started, status, storm))
            await asyncio.sleep(PAUSE)


@dataclass(frozen=True, slots=True)
class SlowCall:
    took: float  # from the client's connect to the answer's end
    status: int
    error: str  # the proxy's error code, "" for an answer from the API or none at all


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False))["ListenOverflows"])
    return 0


@dataclass
class Flood:
    """Many concurrent slow calls on one path, each on a connection of its own."""

    calls: int
    seconds: float
    answers: list[SlowCall] = field(default_factory=list)
    # Once the burst has been met: one call at a time to the flooded path, each on a new
    # connection, timed as a client arriving then would see it.
    probes: list[SlowCall] = field(default_factory=list)
    task: asyncio.Future[list[None]] | None = None
    overflows: int = 0

    async def call(self, http: aiohttp.ClientSession, into: list[SlowCall] | None = None) -> None:
        # Timed from the connect: this client's own scheduling of 2,000 calls is not the
        # proxy's delay, but a connection the kernel's listen queue dropped is.
        started = [time.monotonic()]
        error, status = "", 0
        try:
            async with http.get(
                f"/_test/slow?seconds={self.seconds:g}", trace_request_ctx=started
            ) as response:
                status = response.status
                body = await response.read()
                if status != 200:
                    with suppress(ValueError):
                        error = str(json.loads(body).get("error", ""))
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        answers = self.answers if into is None else into
        answers.append(SlowCall(time.monotonic() - started[-1], status, error))

    async def probe(self, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(PROBE_AFTER)
        for _ in range(PROBES):
            await self.call(http, self.probes)
            await asyncio.sleep(0.1)

    def start(self, url: str) -> None:
        async def connecting(_: object, context: Any, __: object) -> None:
            context.trace_request_ctx.append(time.monotonic())

        tracing = aiohttp.TraceConfig()
        tracing.on_connection_create_start.append(connecting)

        async def run() -> list[None]:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            timeout = aiohttp.ClientTimeout(total=self.seconds + 30)
            async with aiohttp.ClientSession(
                url, connector=connector, timeout=timeout, trace_configs=[tracing]
            ) as http:
                return await asyncio.gather(
                    self.probe(http), *(self.call(http) for _ in range(self.calls))
                )

        self.answers.clear()
        self.probes.clear()
        self.overflows = listen_overflows()
        self.task = asyncio.ensure_future(run())

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    def summary(self, small: list[Answer]) -> str:
        small = [a for a in small if not a.storm]
        ok = sum(1 for a in small if 200 <= a.status < 300)
        took = sorted(a.took for a in small)
        p99 = took[max(0, int(len(took) * 0.99) - 1)] if took else 0.0
        # Refused at once (by a limit, not after waiting pool_timeout for a connection).
        refused = sorted(
            c.took for c in self.answers if c.status == 503 and c.error != "pool_timeout"
        )
        kinds = collections.Counter(c.error or str(c.status) for c in self.answers)
        probe_kinds = collections.Counter(c.error or str(c.status) for c in self.probes)
        probe_took = sorted(c.took for c in self.probes) or [0.0]
        median = refused[len(refused) // 2] if refused else 0.0
        p99_refused = refused[max(0, int(len(refused) * 0.99) - 1)] if refused else 0.0
        return (
            f"small GETs: {100 * ok / max(1, len(small)):.1f}% 2xx, p99 {p99:.2f} s; "
            f"{self.calls} slow calls: "
            + " ".join(f"{kind}:{count}" for kind, count in sorted(kinds.items()))
            + f"; refused at once in {median:.2f} s median, {p99_refused:.2f} s p99 (from "
            f"connect, the burst included); then {PROBES} probes: "
            + " ".join(f"{kind}:{count}" for kind, count in sorted(probe_kinds.items()))
            + f" in {probe_took[len(probe_took) // 2]:.3f} s median, {probe_took[-1]:.3f} s max; "
            f"listen-queue overflows: {listen_overflows() - self.overflows}"
        )


@dataclass
class Row:
    name: str
    answers: list[Answer]
    ended: float
    window_end: float
    exchanges: int
    refused: int
    rss: float
    fds: int
    note: str = ""

    def statuses(self) -> str:
        counts = collections.Counter(
            ("err" if a.status == 0 else str(a.status)) for a in self.answers if not a.storm
        )
        return " ".join(f"{status}:{count}" for status, count in sorted(counts.items()))

    def requests(self) -> int:
        return sum(1 for a in self.answers if not a.storm)

    def client_401s(self) -> int:
        return sum(1 for a in self.answers if a.status == 401 and not a.storm)

    def longest(self) -> float:
        return max((a.took for a in self.answers), default=0.0)

    def recovery(self) -> float | None:
        """Seconds from the fault's end to the start of the last failed request after it;
        None when requests still failed at the end of the window."""
        failed = [
            a.started
            for a in self.answers
            if not a.storm and a.started >= self.ended and not 200 <= a.status < 300
        ]
        if not failed:
            return 0.0
        last = max(failed)
        return None if last > self.window_end - 1.0 else last - self.ended

    def line(self) -> str:
        recovery = self.recovery()
        recovered = "not yet" if recovery is None else f"{recovery:.1f}"
        return (
            f"| {self.name} | {self.requests()} | {self.statuses()} | {self.client_401s()} | "
            f"{self.longest():.1f} | {recovered} | {self.exchanges} | {self.refused} | "
            f"{self.rss:.0f} | "
            f"{self.fds} | {self.note} |"
        )


async def run(seconds: float, overload: int) -> int:
    phases = 13
    recover = max(2.5, seconds / phases / 2)
    fault_for = max(1.5, seconds / phases - recover)
    life = max(1.0, round(fault_for * 0.6, 1))  # auth faults outlast a token
    say(
        f"{phases} phases of {fault_for:.1f} s fault + {recover:.1f} s recovery; "
        f"{life} s tokens; --workers 2; ~{CONCURRENCY / PAUSE:.0f} requests/s"
    )
    os.environ[SIGNING_KEY_ENV] = secrets.token_hex(32)
    auth, api = Host("auth", life), Host("api", life)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="appcircle-proxy-faults-") as tmp:
        await auth.start()
        await api.start()
        try:
            async with (
                proxy(Path(tmp), auth, api) as running,
                aiohttp.ClientSession() as control,
            ):
                await wait_ready(control, running.url)
                rows = await inject(running, auth, api, control, fault_for, recover, overload)
        finally:
            await auth.kill()
            await api.kill()
    print(
        f"\nappcircle-proxy under faults: {fault_for:.1f} s faults, {recover:.1f} s to recover, "
        f"{life} s tokens, 2 workers, {CONCURRENCY} clients, tokens.wait_timeout "
        f"{WAIT_TIMEOUT:g} s; {os.cpu_count()} cores, Python {sys.version.split()[0]}\n"
    )
    print(
        "| fault | requests | by status | client 401s | longest wait (s) | recovered in (s) "
        "| exchanges | tokens refused by API | peak RSS (MiB) | fds | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    auth_rows = [row for row in rows if row.name.startswith("auth")]
    slow = [
        f"{row.name} ({'not yet' if recovery is None else f'{recovery:.1f} s'})"
        for row in rows
        if (recovery := row.recovery()) is None or recovery > 2.0
    ]
    print(
        f"\nclient-visible 401s: {sum(row.client_401s() for row in rows)} (target 0); "
        f"longest wait during auth faults: {max(row.longest() for row in auth_rows):.1f} s "
        f"(target ≤ {WAIT_TIMEOUT:g}); recoveries over 2 s: {', '.join(slow) or 'none'}"
    )
    return 0


async def wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 20
    said = "no answer"
    while time.monotonic() < deadline:
        with suppress(aiohttp.ClientError):
            async with http.get(f"{url}/_proxy/ready") as reply:
                if reply.status == 200:
                    return
                said = await reply.text()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the proxy did not become ready: {said}")


Action = Callable[[], Awaitable[None]]


async def inject(
    running: Proxy,
    auth: Host,
    api: Host,
    control: aiohttp.ClientSession,
    fault_for: float,
    recover: float,
    overload: int,
) -> list[Row]:
    load = Load()
    flood = Flood(overload, OVERLOAD_CALL)
    stop = asyncio.Event()
    peak_rss, peak_fds = [0.0], [0]

    async def sample() -> None:
        while not stop.is_set():
            rss, fds = running.footprint()
            peak_rss[0], peak_fds[0] = max(peak_rss[0], rss), max(peak_fds[0], fds)
            await asyncio.sleep(0.2)

    async def nothing() -> None:
        return None

    async def sighup() -> None:
        running.process.send_signal(signal.SIGHUP)

    async def rotate(key: str) -> None:
        running.key_file.write_text(key)
        await sighup()

    async def restart(host: Host) -> None:
        await host.start()

    async def start_storm() -> None:
        load.storm = True

    async def stop_storm() -> None:
        load.storm = False

    async def slow_api(delay: float) -> None:
        load.uploads = delay > 0
        await api.fault(control, api_delay=delay)

    async def kill_worker() -> None:
        workers = running.workers()
        if workers:
            os.kill(workers[0], signal.SIGKILL)

    async def start_flood() -> None:
        flood.start(running.url)

    api_delay = round(min(2.0, fault_for / 2), 1)
    plan: list[tuple[str, Action, Action]] = [
        ("none (baseline)", nothing, nothing),
        (
            "auth: 500s",
            lambda: auth.fault(control, always=500),
            lambda: auth.fault(control, always=None),
        ),
        (
            "auth: hangs",
            lambda: auth.fault(control, hang=True),
            lambda: auth.fault(control, hang=False),
        ),
        (
            "auth: garbage",
            lambda: auth.fault(control, always="not-json"),
            lambda: auth.fault(control, always=None),
        ),
        ("auth: killed, restarted", auth.kill, lambda: restart(auth)),
        (
            f"API: slow ({api_delay:g} s), uploads",
            lambda: slow_api(api_delay),
            lambda: slow_api(0),
        ),
        ("API: killed, restarted", api.kill, lambda: restart(api)),
        ("API: always-401 endpoint", start_storm, stop_storm),
        ("SIGHUP: good new key", lambda: rotate(KEYS[1]), nothing),
        ("SIGHUP: bad key, then fixed", lambda: rotate(BAD_KEY), lambda: rotate(KEYS[0])),
        ("worker killed (SIGKILL)", kill_worker, nothing),
        (
            "auth: hangs, held ones never answer",
            lambda: auth.fault(control, hang=True),
            lambda: auth.fault(control, hang="abandon"),
        ),
        (f"overload: {overload} slow calls on one path", start_flood, flood.wait),
    ]
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    rows: list[Row] = []
    async with aiohttp.ClientSession(running.url, timeout=timeout, connector=connector) as http:
        clients = [asyncio.create_task(load.client(http, n, stop)) for n in range(CONCURRENCY)]
        sampler = asyncio.create_task(sample())
        for name, begin, end in plan:
            say(f"fault: {name} ...")
            peak_rss[0], peak_fds[0] = 0.0, 0
            first = len(load.answers)
            exchanges_before = await auth.count(control, "exchanges")
            refused_before = await api.count(control, "refused")
            await begin()
            await asyncio.sleep(fault_for)
            await end()
            ended = time.monotonic()
            await asyncio.sleep(HUNG_RECOVERY if name.endswith("never answer") else recover)
            exchanges = since(exchanges_before, await auth.count(control, "exchanges"))
            refused = since(refused_before, await api.count(control, "refused"))
            note = ""
            if name.startswith("worker"):
                note = f"workers alive after: {len(running.workers())}/2"
            if storm := sum(1 for a in load.answers[first:] if a.storm):
                note = f"and {storm} requests to the always-401 endpoint (their 401s not counted)"
            if name.startswith(("auth: killed", "API: killed")):
                note = "counted by the restarted host only"
            if name.startswith("overload"):
                note = flood.summary(load.answers[first:])
            rows.append(
                Row(
                    name,
                    load.answers[first:],
                    ended,
                    time.monotonic(),
                    exchanges,
                    refused,
                    peak_rss[0],
                    peak_fds[0],
                    note,
                )
            )
        stop.set()
        await asyncio.gather(*clients, sampler)
    return rows


def since(before: int, now: int) -> int:
    """What a counter added; a restarted host counts from zero."""
    return now - before if now >= before else now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=180, help="total length of the run (default 180)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run, about 45 s")
    parser.add_argument(
        "--overload", type=int, default=2000, help="concurrent slow calls in the overload row"
    )
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # a stand-in process
    args = parser.parse_args()
    if args.serve:
        which, port, control, life = args.serve
        with suppress(KeyboardInterrupt):
            asyncio.run(serve_standin(which, int(port), int(control), float(life)))
        return 0
    return asyncio.run(run(45 if args.quick else args.seconds, args.overload))


if __name__ == "__main__":
    sys.exit(main())
