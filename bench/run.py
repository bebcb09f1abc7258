"""The benchmark: one command, every figure measured in the same run, printed as a table.

    .venv/bin/python bench/run.py [--seconds 5] [--repeat 3] [--churn-seconds 30]
                                  [--size-mib 1024] [--quick]

It starts, on loopback: nginx answering a fixed small JSON (the upstream for small GETs and
the big transfers, so the upstream is not the bottleneck); the three proxies compared, each
in front of that same upstream and each injecting an Authorization header: nginx as a
reverse proxy (one worker, keep-alive upstream), a naive aiohttp proxy (bench/naive.py) and
appcircle-proxy as a real process (one worker, and a second one with --workers 2); for
small GETs only, the lean floor (bench/lean.py: the proxy's server and forwarding design
with none of its features, so the gap to it is what the features cost); and the stand-in
Appcircle from the tests as the auth host. wrk is the load generator, curl moves
the big bodies. nginx and wrk come from Debian's packages: the script installs them when it
can, and says what it skips when not.

Others may share the machine, so every figure is measured `--repeat` times, the subjects
interleaved within each round, and the best of the rounds is kept. CPU time per request is
read from /proc (utime + stime of the process and its children, over the wrk run, divided by
the requests wrk counted). The proxy's access log is on (level info), written to a file.
Last, the cold start (bench/cold_start.py): `appcircle-proxy run -- true` against the
stand-in, beside `python -c pass`. `--quick` measures only small GETs through the proxy with
one and two workers, and the cold start. Not a test: it prints figures against the targets
in issues #9 and #19 and always exits 0 unless something it needs is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stand-in lives in tests/
import cold_start  # noqa: E402

from tests.support.standin import StandIn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORG = "11111111-1111-4111-8111-111111111111"
KEY = "bench-key"
SMALL_JSON = '{"id":"3fa85f64-5717-4562-b3fc-2c963f66afa6","name":"bench"}'
TICK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ensure_tools() -> dict[str, str | None]:
    found = {name: shutil.which(name) for name in ("wrk", "nginx", "curl")}
    for name in ("nginx", "wrk"):
        if found[name] is None:
            found[name] = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    missing = [name for name, path in found.items() if path is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = {"wrk": "wrk", "nginx": "nginx-light", "curl": "curl"}
        say(f"installing {', '.join(missing)} from Debian's packages ...")
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *(packages[m] for m in missing)],
            check=False,
            capture_output=True,
            env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
        )
        found = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/sbin") for name in found}
    for name, path in found.items():
        say(f"{name}: {path or 'MISSING (its figures are skipped)'}")
    return found


# Processes ---------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx's workers, the proxy's --workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants."""
    total = 0
    for each in _tree(pid):
        try:
            # The command name (field 2) may hold spaces; the fields after it do not.
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def status_kib(pid: int, field_name: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM), summed over the process tree."""
    total = 0
    for each in _tree(pid):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(field_name + ":"):
                total += int(line.split()[1])
    return total


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{each}/fd")) for each in _tree(pid))


@dataclass
class Subject:
    """Something wrk or curl is pointed at, and the process whose CPU it costs."""

    name: str
    url: str
    pid: int

    def peak_rss_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024


def wait_for_port(port: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def running(command: list[str], port: int, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        wait_for_port(port)
        yield process
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {work}/nginx-{port}.pid;
error_log {work}/nginx-{port}-error.log error;
user root;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body-{port};
  proxy_temp_path {work}/proxy-{port};
  fastcgi_temp_path {work}/fastcgi-{port};
  uwsgi_temp_path {work}/uwsgi-{port};
  scgi_temp_path {work}/scgi-{port};
  keepalive_requests 1000000;
  {body}
}}
"""


def _nginx(binary: str, work: Path, body: str) -> tuple[list[str], int]:
    port = free_port()
    conf = work / f"nginx-{port}.conf"
    conf.write_text(
        NGINX_COMMON.format(work=work, port=port, body=body.replace("{port}", str(port)))
    )
    return [binary, "-c", str(conf)], port


@dataclass
class Upstream(Subject):
    uploads: Path = field(default=Path("/nonexistent"))

    def take_upload(self) -> int:
        """The size of the last body PUT to /upload, which is removed (it may be in RAM)."""
        stored = self.uploads / "upload"
        size = stored.stat().st_size
        stored.unlink()
        return size


@contextmanager
def nginx(binary: str, work: Path, big_file: Path) -> Iterator[Upstream]:
    """The upstream: a small JSON, a big file, and a sink for uploads. An upload is stored
    (WebDAV PUT, in /dev/shm when there is one) and only then answered, so it measures the
    whole body arriving upstream: a `return 200` would answer at once and leave the rest of
    the body to be discarded wherever it is."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="appcircle-proxy-bench-", dir=shm if shm.is_dir() else work
    ) as uploads:
        (Path(uploads) / "tmp").mkdir()
        command, port = _nginx(
            binary,
            work,
            f"""
  server {{
    listen 127.0.0.1:{{port}};
    location = /small {{ default_type application/json; return 200 '{SMALL_JSON}'; }}
    location = /big.bin {{ alias {big_file}; sendfile on; }}
    location = /upload {{
      client_max_body_size 0;
      client_body_temp_path {uploads}/tmp;
      dav_methods PUT;
      alias {uploads}/upload;
    }}
  }}""",
        )
        with running(command, port, stderr=subprocess.DEVNULL) as process:
            yield Upstream("direct", f"http://127.0.0.1:{port}", process.pid, Path(uploads))


@contextmanager
def nginx_proxy(binary: str, work: Path, upstream: str) -> Iterator[Subject]:
    """nginx as a reverse proxy for the same upstream: one worker (as the proxy has one),
    keep-alive upstream connections, a fixed Authorization header, bodies not spooled to
    disk."""
    command, port = _nginx(
        binary,
        work,
        f"""
  upstream api {{ server {upstream.removeprefix("http://")}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{{port}};
    client_max_body_size 0;
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer nginx-fixed-token";
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
    }}
  }}""",
    )
    with running(command, port, stderr=subprocess.DEVNULL) as process:
        yield Subject("nginx", f"http://127.0.0.1:{port}", process.pid)


@contextmanager
def yardstick(name: str, upstream: str) -> Iterator[Subject]:
    """bench/NAME.py (naive, lean) as a process in front of `upstream`."""
    port = free_port()
    command = [sys.executable, str(ROOT / "bench" / f"{name}.py"), str(port), upstream]
    # stderr too: aiohttp logs a traceback for every connection wrk cuts at the end of a run.
    with running(command, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        yield Subject(name, f"http://127.0.0.1:{port}", process.pid)


@contextmanager
def standin(token_lifetime: float) -> Iterator[StandIn]:
    """The stand-in Appcircle on a loop of its own, in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    appcircle = StandIn(token_lifetime=token_lifetime)
    appcircle.add_personal_key(KEY, ORG)
    asyncio.run_coroutine_threadsafe(appcircle.start(), loop).result(10)
    try:
        yield appcircle
    finally:
        asyncio.run_coroutine_threadsafe(appcircle.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@dataclass
class Proxy(Subject):
    log_file: Path = field(default=Path("/dev/null"))

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/_proxy/metrics") as page:
            text = page.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " "))
        )

    def access_log_lines(self) -> int:
        with self.log_file.open("rb") as log:
            return sum(1 for line in log if b"appcircle_proxy.access" in line)


def _toml(sections: dict[str, dict[str, object]]) -> str:
    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return f'"{item}"'
        return str(item)

    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {value(item)}\n" for key, item in body.items())
        for name, body in sections.items()
    )


@contextmanager
def proxy(
    work: Path,
    api_url: str,
    auth_url: str,
    workers: int = 1,
    *,
    server: dict[str, object] | None = None,
    appcircle: dict[str, object] | None = None,
) -> Iterator[Proxy]:
    """appcircle-proxy as a real process, with its access log on (level info) and its
    stderr, where the log goes, written to a file in `work`."""
    port = free_port()
    config = work / f"proxy-{port}.toml"
    config.write_text(
        _toml(
            {
                "server": {"listen": f"127.0.0.1:{port}", **(server or {})},
                "appcircle": {"api_url": api_url, "auth_url": auth_url, **(appcircle or {})},
                "log": {"level": "info"},
                "credentials.main": {"kind": "personal-access-key", "secret": KEY},
            }
        )
    )
    log_file = work / f"proxy-{port}.log"
    command = [sys.executable, "-m", "proxy", "--config", str(config), "--workers", str(workers)]
    with (
        log_file.open("wb") as log,
        running(command, port, stdout=subprocess.DEVNULL, stderr=log) as process,
    ):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # eager start: wait until it holds a token
            try:
                with urllib.request.urlopen(f"{url}/_proxy/ready") as page:
                    if page.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        yield Proxy(
            "proxy" if workers == 1 else f"proxy --workers {workers}", url, process.pid, log_file
        )


# Load ----------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int
    cpu_us: float  # of the subject's processes, per request
    cores: float  # their CPU seconds per second of the run: below 1, something else limited


UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def wrk(binary: str, subject: Subject, path: str, connections: int, seconds: int) -> Load:
    cpu_before = cpu_seconds(subject.pid)
    result = subprocess.run(
        [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", subject.url + path],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu = cpu_seconds(subject.pid) - cpu_before
    out = result.stdout

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        return float(match[1]) * UNITS[match[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    assert rps and requests, out
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(
        float(rps[1]),
        latency("50"),
        latency("99"),
        int(non_2xx[1]) if non_2xx else 0,
        cpu * 1e6 / max(int(requests[1]), 1),
        cpu / seconds,
    )


@dataclass
class Transfer:
    mb_s: float  # 10^6 bytes a second, as curl measured it
    cpu_s_per_gb: float  # of the subject's processes, per 10^9 bytes


def transfer(binary: str, subject: Subject, args: list[str], what: str, size: int) -> Transfer:
    cpu_before = cpu_seconds(subject.pid)
    result = subprocess.run(
        [binary, "-sS", "-o", "/dev/null", "-w", f"%{{{what}}} %{{http_code}}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu = cpu_seconds(subject.pid) - cpu_before
    speed, status = result.stdout.split()
    if status not in ("200", "201", "204"):
        raise RuntimeError(f"curl {' '.join(args)} got HTTP {status}")
    return Transfer(float(speed) / 1e6, cpu * 1e9 / size)


class Best:
    """The best figure of several rounds, per (measure, subject): the highest score."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str], Load | Transfer] = {}

    def keep(self, measure: str, subject: str, new: Load | Transfer) -> None:
        old = self.figures.get((measure, subject))
        if old is None or _score(measure, new) > _score(measure, old):
            self.figures[(measure, subject)] = new

    def load(self, measure: str, subject: str) -> Load:
        figure = self.figures[(measure, subject)]
        assert isinstance(figure, Load)
        return figure

    def transfer(self, measure: str, subject: str) -> Transfer:
        figure = self.figures[(measure, subject)]
        assert isinstance(figure, Transfer)
        return figure


def _score(measure: str, figure: Load | Transfer) -> float:
    if isinstance(figure, Transfer):
        return figure.mb_s
    return -figure.p50_us if measure == "c1" else figure.rps


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def quick(seconds: int, repeat: int) -> int:
    """--quick: the figures a change to the request path or start-up moves, in a minute."""
    wrk_bin = ensure_tools()["wrk"]
    best = Best()
    with tempfile.TemporaryDirectory(prefix="appcircle-proxy-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        nginx_bin = ensure_tools()["nginx"]
        if not wrk_bin or not nginx_bin:
            say("wrk and nginx are needed: apt-get install wrk nginx-light")
            return 1
        big = work / "big.bin"
        big.write_bytes(b"")
        direct = stack.enter_context(nginx(nginx_bin, work, big))
        appcircle = stack.enter_context(standin(3600))
        one = stack.enter_context(proxy(work, direct.url, appcircle.auth_url))
        two = stack.enter_context(proxy(work, direct.url, appcircle.auth_url, workers=2))
        for round_ in range(1, repeat + 1):
            say(f"round {round_}/{repeat}: small GETs ...")
            for subject in (one, two):
                best.keep("c64", subject.name, wrk(wrk_bin, subject, "/small", 64, seconds))
    cold, bare = cold_start.measure(15)
    print(f"\nappcircle-proxy quick benchmark, best of {repeat} rounds of {seconds} s")
    for subject in (one, two):
        load = best.load("c64", subject.name)
        print(
            f"small GET, c=64, {subject.name}: {load.rps:,.0f} req/s, {load.cpu_us:.0f} µs CPU "
            f"per request ({load.cores:.2f} cores busy)"
        )
    print(cold_start.line(cold, bare, 15))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every figure; the best is kept"
    )
    parser.add_argument("--churn-seconds", type=int, default=30)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big transfers")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only small GETs at c=64 through the proxy with one and two workers, and the "
        "cold start (about 40 s)",
    )
    args = parser.parse_args()
    if args.quick:
        return quick(args.seconds, args.repeat)

    tools = ensure_tools()
    if not tools["wrk"] or not tools["nginx"] or not tools["curl"]:
        say("wrk, nginx and curl are all needed: apt-get install wrk nginx-light curl")
        return 1
    wrk_bin, nginx_bin, curl_bin = tools["wrk"], tools["nginx"], tools["curl"]
    assert wrk_bin and nginx_bin and curl_bin
    best = Best()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="appcircle-proxy-bench-") as tmp:
        work = Path(tmp)
        big = work / "big.bin"
        with big.open("wb") as out:
            block = os.urandom(1024 * 1024)
            for _ in range(args.size_mib):
                out.write(block)
        with ExitStack() as stack:
            direct = stack.enter_context(nginx(nginx_bin, work, big))
            appcircle = stack.enter_context(standin(3600))
            by_nginx = stack.enter_context(nginx_proxy(nginx_bin, work, direct.url))
            by_naive = stack.enter_context(yardstick("naive", direct.url))
            floor = stack.enter_context(yardstick("lean", direct.url))
            one = stack.enter_context(proxy(work, direct.url, appcircle.auth_url))
            two = stack.enter_context(proxy(work, direct.url, appcircle.auth_url, workers=2))
            proxies: list[Subject] = [by_nginx, by_naive, one]
            for round_ in range(1, args.repeat + 1):
                say(f"round {round_}/{args.repeat}: small GETs ...")
                for subject in [direct, *proxies, floor, two]:
                    load = wrk(wrk_bin, subject, "/small", 64, args.seconds)
                    best.keep("c64", subject.name, load)
                for subject in [direct, *proxies, floor]:
                    load = wrk(wrk_bin, subject, "/small", 1, args.seconds)
                    best.keep("c1", subject.name, load)
                say(f"round {round_}/{args.repeat}: {args.size_mib} MiB down and up ...")
                for subject in [direct, *proxies]:
                    size = big.stat().st_size
                    down = [f"{subject.url}/big.bin"]
                    best.keep(
                        "down",
                        subject.name,
                        transfer(curl_bin, subject, down, "speed_download", size),
                    )
                    up = ["-T", str(big), f"{subject.url}/upload"]
                    moved = transfer(curl_bin, subject, up, "speed_upload", size)
                    if direct.take_upload() != size:
                        raise RuntimeError(f"an upload through {subject.name} arrived incomplete")
                    best.keep("up", subject.name, moved)
            peak_rss = {subject.name: subject.peak_rss_mib() for subject in proxies}
            log_lines = one.access_log_lines()

        with standin(3.0) as appcircle, proxy(work, appcircle.api_url, appcircle.auth_url) as churn:
            say(f"token churn: {args.churn_seconds} s with 3-second tokens ...")
            first_waits = churn.metric("appcircle_proxy_token_waits_total")
            before = len(appcircle.exchanges)
            churn_load = wrk(wrk_bin, churn, "/build/v2/profiles", 8, args.churn_seconds)
            exchanges = len(appcircle.exchanges) - before
            waits = churn.metric("appcircle_proxy_token_waits_total") - first_waits
            rejected = len(appcircle.rejected_tokens)
        say("cold start: run -- true, 15 times ...")
        cold, bare = cold_start.measure(15)

    print(
        f"\nappcircle-proxy benchmark, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"best of {args.repeat} rounds, {args.seconds} s per wrk run, "
        f"{time.monotonic() - started:.0f} s in all\n"
    )
    print(
        row(
            "measure",
            "direct",
            "nginx",
            "naive aiohttp",
            "proxy",
            "proxy/nginx",
            "proxy/naive",
            "target",
            "",
        )
    )
    print(row(*["---"] * 9))
    c64 = {name: best.load("c64", name) for name in ("direct", "nginx", "naive", "proxy")}
    workers2 = best.load("c64", two.name)

    def rps(load: Load) -> str:
        return f"{load.rps:,.0f}"

    print(
        row(
            "small GET, c=64, req/s",
            rps(c64["direct"]),
            rps(c64["nginx"]),
            rps(c64["naive"]),
            rps(c64["proxy"]),
            f"{c64['proxy'].rps / c64['nginx'].rps:.2f}x",
            f"{c64['proxy'].rps / c64['naive'].rps:.2f}x",
            "≥ 0.35x nginx, ≥ 2x naive",
            verdict(
                c64["proxy"].rps >= 0.35 * c64["nginx"].rps
                and c64["proxy"].rps >= 2 * c64["naive"].rps
            ),
        )
    )
    # Requests per CPU second: what req/s would be with a core each, whatever else ran.
    print(
        row(
            "small GET, c=64, CPU µs per request (cores busy)",
            "",
            *(
                f"{c64[name].cpu_us:.0f} ({c64[name].cores:.2f})"
                for name in ("nginx", "naive", "proxy")
            ),
            f"{c64['nginx'].cpu_us / c64['proxy'].cpu_us:.2f}x by CPU",
            f"{c64['naive'].cpu_us / c64['proxy'].cpu_us:.2f}x by CPU",
            "",
            "",
        )
    )
    c1 = {name: best.load("c1", name) for name in ("direct", "nginx", "naive", "proxy")}
    added = {name: c1[name].p50_us - c1["direct"].p50_us for name in ("nginx", "naive", "proxy")}
    print(
        row(
            "small GET, c=1, p50 µs (added over direct)",
            f"{c1['direct'].p50_us:.0f}",
            *(
                f"{c1[name].p50_us:.0f} (+{added[name]:.0f})"
                for name in ("nginx", "naive", "proxy")
            ),
            f"{added['proxy'] / added['nginx']:.1f}x added",
            f"{added['proxy'] / added['naive']:.2f}x added",
            "added ≤ 4x nginx's",
            verdict(added["proxy"] <= 4 * added["nginx"]),
        )
    )
    # The floor: the same server and forwarding client with none of the proxy's features.
    floor_c64, floor_c1 = best.load("c64", "lean"), best.load("c1", "lean")
    floor_added = floor_c1.p50_us - c1["direct"].p50_us
    print(
        row(
            "lean floor (bench/lean.py, no features): c=64 req/s, CPU µs; c=1 p50 µs",
            "",
            "",
            "",
            f"{rps(floor_c64)}, {floor_c64.cpu_us:.0f} µs; "
            f"{floor_c1.p50_us:.0f} (+{floor_added:.0f})",
            f"{floor_c64.rps / c64['nginx'].rps:.2f}x; {floor_added / added['nginx']:.1f}x added",
            f"{floor_c64.rps / c64['naive'].rps:.2f}x",
            "(not a target)",
            "",
        )
    )
    for measure, label, target in (
        ("down", "download", 1000.0),
        ("up", "upload", 600.0),
    ):
        moved = {
            name: best.transfer(measure, name) for name in ("direct", "nginx", "naive", "proxy")
        }
        speeds = {name: figure.mb_s for name, figure in moved.items()}
        print(
            row(
                f"{args.size_mib} MiB {label}, MB/s (CPU s per GB)",
                f"{speeds['direct']:,.0f}",
                *(
                    f"{speeds[name]:,.0f} ({moved[name].cpu_s_per_gb:.2f} s)"
                    for name in ("nginx", "naive", "proxy")
                ),
                f"{speeds['proxy'] / speeds['nginx']:.2f}x",
                f"{speeds['proxy'] / speeds['naive']:.2f}x",
                f"≥ {target / 1000:g} GB/s",
                verdict(speeds["proxy"] >= target),
            )
        )
    print(
        row(
            "peak RSS over all of the above, MiB",
            "",
            *(f"{peak_rss[name]:.1f}" for name in ("nginx", "naive", "proxy")),
            "",
            "",
            "≤ 80 MB",
            verdict(peak_rss["proxy"] * 1.048576 <= 80),
        )
    )
    print(
        row(
            "small GET, c=64, --workers 2, req/s",
            "",
            "",
            "",
            f"{rps(workers2)} ({workers2.cpu_us:.0f} µs CPU, {workers2.cores:.2f} cores busy)",
            f"{workers2.rps / c64['proxy'].rps:.2f}x one worker",
            "",
            "≥ 1.4x one worker",
            verdict(workers2.rps >= 1.4 * c64["proxy"].rps),
        )
    )
    print(
        row(
            f"token churn, {args.churn_seconds} s, 3 s tokens, c=8",
            "",
            "",
            "",
            f"{churn_load.rps:,.0f} req/s; {exchanges} exchanges; {waits:.0f} waited on an "
            f"exchange; {churn_load.non_2xx} non-2xx; {rejected} tokens refused by the API",
            "",
            "",
            "0 waited, 0 saw 401",
            verdict(waits == 0 and churn_load.non_2xx == 0 and rejected == 0),
        )
    )
    print(
        row(
            "cold start, `run -- true` against the stand-in, ms wall (CPU), median of 15",
            "",
            "",
            "",
            f"{cold.wall_s * 1000:.0f} ({cold.cpu_s * 1000:.0f}); python -c pass: "
            f"{bare.wall_s * 1000:.0f} ({bare.cpu_s * 1000:.0f})",
            "",
            "",
            "≤ 250 ms wall",
            verdict(cold.wall_s <= 0.25),
        )
    )
    errors = {name: load.non_2xx for name, load in c64.items() if load.non_2xx}
    print(
        f"\nThe proxy's access log was on (text, level info), written to a file: {log_lines:,} "
        "lines from the one-worker proxy."
        + (f" Non-2xx answers in the c=64 runs: {errors}." if errors else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
