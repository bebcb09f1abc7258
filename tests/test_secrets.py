"""Keys and tokens never show: not in logs (even at debug), error bodies, or reprs; nor to
other processes of the same user (non-dumpable)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import hardening
from proxy.config.load import load_settings
from proxy.serve.app import connect
from tests.support.standin import StandIn

from .conftest import (
    API_KEY_SECRET,
    EVERY_KIND_CREDENTIALS,
    PERSONAL_KEY,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .support import request

EVERY_KIND = {
    "credentials": EVERY_KIND_CREDENTIALS,
    "routes": {
        "a": {"prefix": "/", "credential": "access"},
        "l": {"prefix": "/legacy", "credential": "legacy", "sub_organization": SUB_ORG},
        "s": {"prefix": "/service", "credential": "service"},
    },
}


def assert_no_secret(text: str, standin: StandIn) -> None:
    for secret in (PERSONAL_KEY, API_KEY_SECRET, *standin.issued_tokens):
        assert secret not in text
    # Token fragments too: the JWT signature is the part that grants access.
    for token in standin.issued_tokens:
        assert token.rsplit(".", 1)[-1] not in text


async def test_no_secret_in_debug_logs_or_error_bodies(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No key, API key secret, session token or token signature appears in debug-level logs or in
    the proxy's own error bodies, across every credential kind, replays, cut answers and rejected
    keys."""
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    # Every 401 renews here (the /_test/status/401 below would otherwise hold off the
    # renewal after the revocation for tokens.min_renew_interval).
    proxy = await start_proxy(**EVERY_KIND, tokens={"min_renew_interval": 0})
    # The stand-in API echoes what it received, Authorization included: that is the
    # upstream's business. What is checked here is what the proxy itself says.
    for path in ("/x", "/legacy/x", "/service/x", "/_test/status/401", "/_test/cut"):
        with contextlib.suppress(aiohttp.ClientPayloadError):  # /_test/cut ends mid-body
            await request(http, "GET", proxy + path)
    standin.revoke_all()
    assert (await request(http, "POST", f"{proxy}/x", data=b"replayed")).status == 200
    standin.personal_keys.clear()  # every personal key is now rejected
    standin.revoke_all()
    for path in ("/x", "/legacy/x"):
        reply = await request(http, "GET", proxy + path)
        assert reply.status == 503
        bodies.append(reply.body.decode())
    assert any("key_rejected" in body for body in bodies)
    assert len(standin.issued_tokens) >= 4
    assert_no_secret(caplog.text, standin)
    assert_no_secret("\n".join(bodies), standin)


async def test_reprs_hold_no_secret(standin: StandIn, write_config: WriteConfig) -> None:
    """The repr of settings, routes, credentials, token caches and tokens (and str of a
    credential) holds no key, secret or token, so printing or logging them leaks nothing."""
    settings = load_settings(write_config(**EVERY_KIND))
    async with connect(settings) as upstream:
        texts = [repr(settings)]
        for route in upstream.routes:
            token = await route.tokens.get()
            texts += [repr(route), repr(route.credential), repr(route.tokens), repr(token)]
            texts.append(str(route.credential))
    assert_no_secret("\n".join(texts), standin)


# -- the key out of reach of other processes of the same user ------------------------------

# Run as the unprivileged user, with the key's bytes in hex as argv[1]: what a hostile
# command of the same user finds of it in its target's /proc/PID/environ and /proc/PID/mem
# (argv[2], default: its parent). Prints {"environ": ..., "mem": ...}: True (found), False
# (readable, not found) or the error that refused it.
SCAN = r"""
import json, os, re, sys
needle = bytes.fromhex(sys.argv[1])
pid = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
found = {}
try:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        found["environ"] = needle in environ.read()
except OSError as err:
    found["environ"] = err.strerror
try:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        found["mem"] = False
        for line in maps:
            start, end, perms = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line).groups()
            if perms[0] != "r" or "[vvar" in line or "[vsyscall]" in line:
                continue
            start, end = int(start, 16), int(end, 16)
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    found["mem"] = True
                    break
            except (OSError, OverflowError, MemoryError):
                continue
except OSError as err:
    found["mem"] = err.strerror
print(json.dumps(found))
"""

UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True, slots=True)
class Unprivileged:
    uid: int
    gid: int
    python: str  # an interpreter the user may run, with the proxy and its dependencies

    def options(self, **variables: str) -> dict[str, Any]:
        """Options for asyncio.create_subprocess_exec: the user, and an environment that
        finds this checkout and the dependencies installed for these tests."""
        site = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
        path = os.pathsep.join([str(Path(__file__).parent.parent), *sorted(site)])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": path}
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": [],
            "cwd": "/",
            "env": {**env, **variables},
        }


def unprivileged() -> Unprivileged:
    """A user without privileges and an interpreter of this version it can run; skip,
    saying why, where there is none (switching users needs root)."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_DUMPABLE and /proc/PID/mem are Linux's")
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        pytest.skip(f"no user '{UNPRIVILEGED_USER}' to run the proxy as")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # This interpreter may live where the user cannot go (a root-only pyenv): the system's
    # of the same version reads the same installed packages.
    candidates = [sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")]
    problems = []
    for python in dict.fromkeys(candidate for candidate in candidates if candidate):
        found = Unprivileged(user.pw_uid, user.pw_gid, python)
        options = found.options()
        try:
            probe = subprocess.run(
                [python, "-c", "import proxy.cli.main, uvloop"],
                capture_output=True,
                text=True,
                timeout=60,
                **options,
            )
        except OSError as err:
            problems.append(f"{python}: {err.strerror}")
            continue
        if probe.returncode == 0:
            return found
        problems.append(f"{python}: {(probe.stderr.strip().splitlines() or ['fails'])[-1]}")
    pytest.skip(f"user '{UNPRIVILEGED_USER}' can run no interpreter with the proxy: {problems}")


async def test_a_command_run_by_run_finds_the_key_neither_in_the_proxys_environ_nor_memory(
    standin: StandIn,
) -> None:
    """`run -- CMD` as an unprivileged user: CMD runs as the same user as its parent, the
    proxy, and could read the key from the proxy's /proc/PID/environ (the environment it
    started with, which removing a variable does not erase) or scan /proc/PID/mem. The
    proxy made itself non-dumpable before reading the key, so both are closed to it."""
    user = unprivileged()
    process = await asyncio.create_subprocess_exec(
        user.python, "-m", "proxy", "run",
        "--api-url", standin.api_url, "--auth-url", standin.auth_url,
        "--", user.python, "-c", SCAN, PERSONAL_KEY.encode().hex(),
        **user.options(APPCIRCLE_PERSONAL_ACCESS_KEY=PERSONAL_KEY),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    found = json.loads(out)
    # Both refused outright, not merely searched without luck.
    assert found == {"environ": "Permission denied", "mem": "Permission denied"}, found


async def test_serve_and_its_workers_are_closed_to_processes_of_the_same_user(
    standin: StandIn,
) -> None:
    """The same for `serve --workers 2`: the supervisor and each forked worker (which
    inherit non-dumpable through fork) hold the key."""
    user = unprivileged()
    process = await asyncio.create_subprocess_exec(
        user.python, "-m", "proxy", "serve", "--workers", "2",
        "--listen", f"127.0.0.1:{free_port()}",
        "--api-url", standin.api_url, "--auth-url", standin.auth_url,
        **user.options(APPCIRCLE_PERSONAL_ACCESS_KEY=PERSONAL_KEY),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert b"listening on" in await asyncio.wait_for(process.stdout.readline(), 20)
        workers = set(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split())
        assert len(workers) == 2
        for pid in (str(process.pid), *workers):
            scan = await asyncio.create_subprocess_exec(
                user.python, "-c", SCAN, PERSONAL_KEY.encode().hex(), pid, **user.options(),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(scan.communicate(), 60)
            found = json.loads(out)
            assert found == {"environ": "Permission denied", "mem": "Permission denied"}, pid
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_key_variables_leave_the_environment_once_read_and_come_back_for_a_reload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the process itself starts or prints (a child, a crash report) inherits the live
    environment: once read, the key is not in it (os.environ, nor the C library's)."""
    monkeypatch.setattr(hardening, "_withheld", {})
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", PERSONAL_KEY)
    monkeypatch.setenv("APPCIRCLE_PROXY_LOG__LEVEL", "debug")
    settings = load_settings()
    hardening.withhold(settings)
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY" not in os.environ
    assert libc.getenv(b"APPCIRCLE_PERSONAL_ACCESS_KEY") is None
    assert os.environ["APPCIRCLE_PROXY_LOG__LEVEL"] == "debug"  # not a secret: stays
    with hardening.secrets_in_environment():
        reloaded = load_settings()
    assert reloaded.credentials == settings.credentials
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY" not in os.environ
