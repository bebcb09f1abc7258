"""Cold start: how long `appcircle-proxy run -- true` takes against the stand-in Appcircle on
loopback (start, one token exchange, run `true`, drain, stop), measured beside
`python -c pass`, the floor any Python command pays.

    .venv/bin/python bench/cold_start.py [--repeat 15]

Wall time is measured around each process; CPU time is the process's own user + system time
(from wait4). The median of `--repeat` runs is printed. bench/run.py prints the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stand-in lives in tests/
from tests.support.standin import StandIn  # noqa: E402

ORG = "11111111-1111-4111-8111-111111111111"
KEY = "bench-key"


@dataclass(frozen=True)
class Figure:
    wall_s: float
    cpu_s: float


@contextmanager
def _standin() -> Iterator[StandIn]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    appcircle = StandIn(token_lifetime=3600)
    appcircle.add_personal_key(KEY, ORG)
    asyncio.run_coroutine_threadsafe(appcircle.start(), loop).result(10)
    try:
        yield appcircle
    finally:
        asyncio.run_coroutine_threadsafe(appcircle.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _once(command: list[str], env: dict[str, str]) -> Figure:
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    err = process.stderr.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}: {err.decode()}")
    return Figure(wall, usage.ru_utime + usage.ru_stime)


def _median(figures: list[Figure]) -> Figure:
    return Figure(
        statistics.median(f.wall_s for f in figures), statistics.median(f.cpu_s for f in figures)
    )


def _command() -> list[str]:
    script = shutil.which("appcircle-proxy", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "proxy"]


def measure(repeat: int) -> tuple[Figure, Figure]:
    """(`appcircle-proxy run -- true`, `python -c pass`), the median of `repeat` runs each."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("APPCIRCLE_")}
    with _standin() as appcircle:
        env |= {
            "APPCIRCLE_PERSONAL_ACCESS_KEY": KEY,
            "APPCIRCLE_PROXY_APPCIRCLE__API_URL": appcircle.api_url,
            "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": appcircle.auth_url,
        }
        proxy, bare = [], []
        for _ in range(repeat):  # interleaved, so a busy moment costs both alike
            proxy.append(_once([*_command(), "run", "--", "true"], env))
            bare.append(_once([sys.executable, "-c", "pass"], env))
    return _median(proxy), _median(bare)


def line(proxy: Figure, bare: Figure, repeat: int) -> str:
    return (
        f"cold start, appcircle-proxy run -- true: {proxy.wall_s * 1000:.0f} ms wall, "
        f"{proxy.cpu_s * 1000:.0f} ms CPU; python -c pass: {bare.wall_s * 1000:.0f} ms wall, "
        f"{bare.cpu_s * 1000:.0f} ms CPU (median of {repeat})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs of each; the median is kept")
    args = parser.parse_args()
    proxy, bare = measure(args.repeat)
    print(line(proxy, bare, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
