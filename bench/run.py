"""The benchmark: one command, every figure measured in the same run, printed as a table.

    .venv/bin/python bench/run.py [--seconds 10] [--churn-seconds 30] [--size-mib 1024]

It starts, on loopback: nginx answering a fixed small JSON (the upstream for small GETs and
the big transfers, so the upstream is not the bottleneck), the stand-in Appcircle from the
tests (auth host; and the API host where tokens must be checked), and the proxy as a real
process. wrk is the load generator, curl moves the big bodies. nginx and wrk come from
Debian's packages: the script installs them when it can, and says what it skips when not.
Not a test: it prints figures against the targets in issue #3 and always exits 0 unless
something it needs is missing.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from proxy.standin import StandIn

ROOT = Path(__file__).resolve().parent.parent
ORG = "11111111-1111-4111-8111-111111111111"
KEY = "bench-key"
SMALL_JSON = '{"id":"3fa85f64-5717-4562-b3fc-2c963f66afa6","name":"bench"}'


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


@contextmanager
def nginx(binary: str, work: Path, big_file: Path) -> Iterator[str]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
user root;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location = /small {{ default_type application/json; return 200 '{SMALL_JSON}'; }}
    location = /big.bin {{ alias {big_file}; sendfile on; }}
    location = /upload {{ client_max_body_size 0; return 200 'ok'; }}
  }}
}}
"""
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def wait_for_port(port: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


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
class Proxy:
    url: str
    process: subprocess.Popen[bytes]

    def peak_rss_mib(self) -> float:
        return _status_field(self.process.pid, "VmHWM") / 1024

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/_proxy/metrics") as page:
            text = page.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " "))
        )


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def proxy(work: Path, api_url: str, auth_url: str, workers: int = 1) -> Iterator[Proxy]:
    port = free_port()
    config = work / f"proxy-{port}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[appcircle]\napi_url = "{api_url}"\nauth_url = "{auth_url}"\n'
        f'[log]\nlevel = "warning"\n'
        f'[credentials.main]\nkind = "personal-access-key"\nsecret = "{KEY}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(config), "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # eager start: wait until it holds a token
            try:
                with urllib.request.urlopen(f"{url}/_proxy/ready") as page:
                    if page.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        yield Proxy(url, process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int


UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def wrk(binary: str, url: str, connections: int, seconds: int) -> Load:
    result = subprocess.run(
        [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        return float(match[1]) * UNITS[match[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(float(rps[1]), latency("50"), latency("99"), int(non_2xx[1]) if non_2xx else 0)


def curl_speed(binary: str, args: list[str], what: str) -> float:
    """MB/s (10^6 bytes) as curl measured it."""
    result = subprocess.run(
        [binary, "-sS", "-o", "/dev/null", "-w", f"%{{{what}}}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout) / 1e6


def row(label: str, value: str, target: str = "", verdict: str = "") -> str:
    return f"| {label} | {value} | {target} | {verdict} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--churn-seconds", type=int, default=30)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big transfers")
    args = parser.parse_args()

    tools = ensure_tools()
    if not tools["wrk"] or not tools["nginx"] or not tools["curl"]:
        say("wrk, nginx and curl are all needed: apt-get install wrk nginx-light curl")
        return 1
    wrk_bin, nginx_bin, curl_bin = tools["wrk"], tools["nginx"], tools["curl"]
    assert wrk_bin and nginx_bin and curl_bin
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="appcircle-proxy-bench-") as tmp:
        work = Path(tmp)
        big = work / "big.bin"
        with big.open("wb") as out:
            block = os.urandom(1024 * 1024)
            for _ in range(args.size_mib):
                out.write(block)
        with nginx(nginx_bin, work, big) as upstream, standin(3600) as appcircle:
            say("small GETs, one worker ...")
            figures: dict[tuple[str, int], Load] = {}
            with proxy(work, upstream, appcircle.auth_url) as one:
                for connections in (1, 64):
                    figures[("direct", connections)] = wrk(
                        wrk_bin, f"{upstream}/small", connections, args.seconds
                    )
                    figures[("proxy", connections)] = wrk(
                        wrk_bin, f"{one.url}/small", connections, args.seconds
                    )
                say("big transfers ...")
                down_direct = curl_speed(curl_bin, [f"{upstream}/big.bin"], "speed_download")
                down = curl_speed(curl_bin, [f"{one.url}/big.bin"], "speed_download")
                up_direct = curl_speed(
                    curl_bin, ["-T", str(big), f"{upstream}/upload"], "speed_upload"
                )
                up = curl_speed(curl_bin, ["-T", str(big), f"{one.url}/upload"], "speed_upload")
                transfer_rss = one.peak_rss_mib()
            say("small GETs, two workers ...")
            with proxy(work, upstream, appcircle.auth_url, workers=2) as two:
                for connections in (1, 64):
                    figures[("workers2", connections)] = wrk(
                        wrk_bin, f"{two.url}/small", connections, args.seconds
                    )

        with standin(3.0) as appcircle:
            say(f"token churn: {args.churn_seconds} s with 3-second tokens ...")
            with proxy(work, appcircle.api_url, appcircle.auth_url) as churn:
                first_waits = churn.metric("appcircle_proxy_token_waits_total")
                before = len(appcircle.exchanges)
                load = wrk(wrk_bin, f"{churn.url}/build/v2/profiles", 8, args.churn_seconds)
                exchanges = len(appcircle.exchanges) - before
                waits = churn.metric("appcircle_proxy_token_waits_total") - first_waits
                rejected = len(appcircle.rejected_tokens)

    for connections in (1, 64):
        direct, via = figures[("direct", connections)], figures[("proxy", connections)]
        added = via.p50_us - direct.p50_us
        rows.append(
            row(
                f"small GET, c={connections}, direct to nginx",
                f"{direct.rps:,.0f} req/s, p50 {direct.p50_us:.0f} µs, p99 {direct.p99_us:.0f} µs",
            )
        )
        rows.append(
            row(
                f"small GET, c={connections}, through the proxy (1 worker)",
                f"{via.rps:,.0f} req/s, p50 {via.p50_us:.0f} µs, p99 {via.p99_us:.0f} µs; "
                f"added p50 {added:.0f} µs; {via.rps / direct.rps:.2f}x of direct",
                "added p50 ≤ 100 µs" if connections == 1 else "≥ 12,000 req/s",
                ("met" if added <= 100 else "missed")
                if connections == 1
                else ("met" if via.rps >= 12_000 else "missed"),
            )
        )
    for connections in (1, 64):
        pair = figures[("workers2", connections)]
        rows.append(
            row(
                f"small GET, c={connections}, through the proxy (--workers 2)",
                f"{pair.rps:,.0f} req/s, p50 {pair.p50_us:.0f} µs, p99 {pair.p99_us:.0f} µs",
            )
        )
    rows.append(
        row(
            f"{args.size_mib} MiB download",
            f"{down:,.0f} MB/s through the proxy ({down_direct:,.0f} MB/s direct)",
            "≥ 500 MB/s",
            "met" if down >= 500 else "missed",
        )
    )
    rows.append(
        row(
            f"{args.size_mib} MiB upload",
            f"{up:,.0f} MB/s through the proxy ({up_direct:,.0f} MB/s direct)",
            "≥ 500 MB/s",
            "met" if up >= 500 else "missed",
        )
    )
    rows.append(
        row(
            "proxy peak RSS over all of the above",
            f"{transfer_rss:.1f} MiB",
            "< 80 MB",
            "met" if transfer_rss * 1.048576 < 80 else "missed",
        )
    )
    rows.append(
        row(
            f"token churn, {args.churn_seconds} s, 3 s tokens, c=8",
            f"{load.rps:,.0f} req/s; {exchanges} exchanges; {waits:.0f} requests waited on an "
            f"exchange; {load.non_2xx} non-2xx; {rejected} tokens refused by the API",
            "0 waited, 0 saw 401",
            "met" if waits == 0 and load.non_2xx == 0 and rejected == 0 else "missed",
        )
    )
    print(f"\nappcircle-proxy benchmark, {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")
    print("| measure | figure | target | |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
