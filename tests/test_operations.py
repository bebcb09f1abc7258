"""Operations endpoints (/_proxy/health, ready, metrics), the admin listener, the access
log, and eager token start."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, ROOT_ORG, SUB_ORG, StartProxy, WriteConfig
from .support import eventually, request


async def wait_until_ready(http: aiohttp.ClientSession, proxy: str) -> None:
    async def ready() -> bool:
        return (await request(http, "GET", f"{proxy}/_proxy/ready")).status == 200

    await eventually(ready, within=5)


async def test_health_is_always_ok_and_never_forwarded(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """/_proxy/health answers 200 {"status": "ok"} even while the auth host fails, other /_proxy/
    paths get 404 not_found, and none of them is forwarded to the API."""
    standin.always = 500  # even with the auth host failing, the process is alive
    proxy = await start_proxy()
    health = await request(http, "GET", f"{proxy}/_proxy/health")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    other = await request(http, "GET", f"{proxy}/_proxy/other")
    assert (other.status, other.json()["error"]) == (404, "not_found")
    assert standin.api_requests == []


async def test_ready_names_each_route_without_a_token_then_turns_green(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """/_proxy/ready answers 503 naming each route that has no session token yet, and 200 listing
    the routes once a request has obtained one."""
    proxy = await start_proxy()  # lazy: no token until the first request
    ready = await request(http, "GET", f"{proxy}/_proxy/ready")
    assert ready.status == 503
    assert ready.json()["routes"] == {"default": "no session token yet"}
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    ready = await request(http, "GET", f"{proxy}/_proxy/ready")
    assert (ready.status, ready.json()) == (200, {"status": "ready", "routes": ["default"]})


async def test_eager_start_gets_tokens_before_any_request(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With server.eager the proxy obtains its token at start-up, so /_proxy/ready turns 200
    before any request is forwarded."""
    proxy = await start_proxy(server={"eager": True})
    await wait_until_ready(http, proxy)
    assert len(standin.exchanges) == 1 and standin.api_requests == []


async def test_eager_start_with_auth_down_serves_keeps_retrying_and_reports_why(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With server.eager and the auth host answering 502, the proxy still starts, retries the
    exchange on its own, reports "HTTP 502" per route on /_proxy/ready, and turns ready once auth
    recovers."""
    standin.always = 502
    proxy = await start_proxy(server={"eager": True})
    await asyncio.sleep(0.3)
    ready = await request(http, "GET", f"{proxy}/_proxy/ready")
    assert ready.status == 503
    routes = ready.json()["routes"]
    assert isinstance(routes, dict) and "HTTP 502" in routes["default"]
    assert len(standin.exchanges) >= 2  # retried with backoff, no request needed
    standin.always = None
    await wait_until_ready(http, proxy)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_say_the_version_and_the_process_figures(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The README speaks of RSS and file descriptors: the metrics carry them (process_*,
    as prometheus-client names them), and the version that runs (build_info)."""
    from proxy import __version__

    proxy = await start_proxy()
    text = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    samples = metric_samples(text)
    assert samples[("appcircle_proxy_build_info", (("version", __version__),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 1_000_000
    assert samples[("process_open_fds", ())] > 0
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert "appcircle_proxy_worker_restarts" not in text  # one process: no workers


async def test_metrics_count_requests_bytes_latency_exchanges_and_token_expiry(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """/_proxy/metrics counts requests by method, route and status class (refused ones under
    route "-"), bytes, upstream latency, exchanges, token waits, token expiry and in-flight
    requests."""
    proxy = await start_proxy()
    for _ in range(3):
        await request(http, "GET", f"{proxy}/x")
    await request(http, "POST", f"{proxy}/upload", data=b"y" * 1000)
    refused = await request(http, "GET", f"{proxy}/nowhere", headers={"Host": "evil.example"})
    assert refused.status == 403
    metrics = await request(http, "GET", f"{proxy}/_proxy/metrics")
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(metrics.body.decode())
    route = (("route", "default"),)
    assert (
        samples[
            ("appcircle_proxy_requests_total", (("method", "GET"), *route, ("status_class", "2xx")))
        ]
        == 3
    )
    assert (
        samples[
            (
                "appcircle_proxy_requests_total",
                (("method", "POST"), *route, ("status_class", "2xx")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "appcircle_proxy_requests_total",
                (("method", "GET"), ("route", "-"), ("status_class", "4xx")),
            )
        ]
        == 1
    )
    assert samples[("appcircle_proxy_request_bytes_total", route)] == 1000
    assert samples[("appcircle_proxy_response_bytes_total", route)] > 1000
    assert samples[("appcircle_proxy_upstream_latency_seconds_count", route)] == 4
    assert samples[("appcircle_proxy_token_exchanges_total", (("outcome", "ok"), *route))] == 1
    assert samples[("appcircle_proxy_token_waits_total", route)] == 1  # the first request
    assert 3500 < samples[("appcircle_proxy_token_expiry_seconds", route)] <= 3600
    assert samples[("appcircle_proxy_in_flight_requests", ())] == 1  # the scrape itself


async def test_exchange_outcomes_and_token_waits_are_counted_one_by_one(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """appcircle_proxy_token_exchanges_total counts each exchange by outcome (auth_error, ok) and
    token_waits_total counts each request that had to wait for a token, once each."""
    standin.script = [500, 503]
    proxy = await start_proxy()

    async def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metric_samples((await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode())

    def count(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (name, tuple(sorted({"route": "default", **labels}.items())))

    waits = count("appcircle_proxy_token_waits_total")
    assert (await request(http, "GET", f"{proxy}/x")).status == 503  # waited, then failed
    # The loop retries on its own: a failure, then a token, with no request waiting.
    await eventually(lambda: [e.status for e in standin.exchanges] == [500, 503, 200])
    standin.gate = asyncio.Event()
    standin.revoke_all()  # each request's 401 (or the missing token) makes it wait once
    waiting = [asyncio.create_task(request(http, "GET", f"{proxy}/x/{i}")) for i in range(3)]

    async def all_waiting() -> bool:
        return (await samples())[waits] == 4

    await eventually(all_waiting)
    standin.gate.set()
    assert [reply.status for reply in await asyncio.gather(*waiting)] == [200] * 3
    counted = await samples()
    exchanges = "appcircle_proxy_token_exchanges_total"
    assert counted[count(exchanges, outcome="auth_error")] == 2
    assert counted[count(exchanges, outcome="ok")] == 2
    assert counted[waits] == 4


async def test_each_exchange_logs_one_line_with_its_routes_credential_and_outcome(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each token exchange logs one line with the routes sharing it, the credential, the outcome
    (auth_error, ok, refused) and, where set, the sub-organization."""
    standin.script = [500]
    proxy = await start_proxy(
        routes={
            "a": {"prefix": "/a", "credential": "main"},
            "b": {"prefix": "/b", "credential": "main"},
            "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
        }
    )

    async def served() -> bool:
        return (await request(http, "GET", f"{proxy}/a/x")).status == 200

    await eventually(served)
    assert (await request(http, "GET", f"{proxy}/eu/x")).status == 200
    standin.revoke_all()
    assert (await request(http, "GET", f"{proxy}/b/x")).status == 200
    lines = [r for r in caplog.records if r.name == "appcircle_proxy.tokens"]
    assert [r.fields for r in lines] == [  # type: ignore[attr-defined]
        {"routes": "a,b", "credential": "main", "outcome": "auth_error"},
        {"routes": "a,b", "credential": "main", "outcome": "ok"},
        {"routes": "eu", "credential": "main", "outcome": "ok"},
        {"routes": "a,b", "credential": "main", "outcome": "refused"},
        {"routes": "a,b", "credential": "main", "outcome": "ok"},
    ]
    texts = [r.getMessage() for r in lines]
    assert "route(s) a, b (credential 'main')" in texts[0] and "HTTP 500" in texts[0]
    assert ROOT_ORG in texts[1]
    assert f"route(s) eu (credential 'main', sub-organization {SUB_ORG})" in texts[2]
    assert "route(s) a, b (credential 'main')" in texts[3]


async def test_admin_listener_serves_only_the_proxys_endpoints(
    standin: StandIn, write_config: WriteConfig, http: aiohttp.ClientSession
) -> None:
    """server.admin_listen serves /_proxy/ endpoints without Host check or client token and
    forwards nothing; the API listener then answers /_proxy/health 404 pointing to admin_listen."""
    config = write_config(server={"admin_listen": "127.0.0.1:0", "client_token": CLIENT_TOKEN})
    running = await start(load_settings(config))
    try:
        (proxy,), (admin,) = running.urls, running.admin_urls
        # Probes reach the admin port by pod IP, with no client token: no guard there.
        probe = await request(http, "GET", f"{admin}/_proxy/health", headers={"Host": "10.0.0.7"})
        assert probe.status == 200
        assert (await request(http, "GET", f"{admin}/_proxy/ready")).status == 503
        assert (await request(http, "GET", f"{admin}/_proxy/metrics")).status == 200
        assert (await request(http, "GET", f"{admin}/build/v2/profiles")).status == 404
        authorised = {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}
        reply = await request(http, "GET", f"{proxy}/_proxy/health", headers=authorised)
        assert reply.status == 404 and "admin_listen" in reply.json()["detail"]
        assert standin.api_requests == []
    finally:
        await running.stop()


async def test_health_needs_no_client_token_but_everything_else_does(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """With server.client_token set, /_proxy/health answers without it (for probes) while
    /_proxy/ready and /_proxy/metrics get 407."""
    proxy = await start_proxy(server={"client_token": CLIENT_TOKEN})
    assert (await request(http, "GET", f"{proxy}/_proxy/health")).status == 200
    assert (await request(http, "GET", f"{proxy}/_proxy/ready")).status == 407
    assert (await request(http, "GET", f"{proxy}/_proxy/metrics")).status == 407


async def test_access_log_has_one_line_per_request_without_query_string(
    start_proxy: StartProxy, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each request writes one JSON access line with route, method, path, statuses, byte counts,
    X-Request-Id, client and duration, and the query string (which may hold secrets) is never
    logged."""
    proxy = await start_proxy(log={"format": "json"})
    reply = await request(
        http,
        "POST",
        f"{proxy}/build/v2/profiles?secret-ish=1",
        data=b"12345",
        headers={"X-Request-Id": "r-42"},
    )
    assert reply.status == 200
    assert reply.headers["X-Request-Id"] == "r-42"
    written: list[str] = []

    def access_lines() -> list[dict[str, Any]]:
        written.append(capsys.readouterr().err)
        lines = "".join(written).splitlines()
        return [json.loads(line) for line in lines if '"appcircle_proxy.access"' in line]

    await eventually(lambda: len(access_lines()) > 0)
    (entry,) = access_lines()
    assert entry["route"] == "default"
    assert entry["method"] == "POST"
    assert entry["path"] == "/build/v2/profiles"
    assert (entry["status"], entry["upstream_status"]) == (200, 200)
    assert entry["bytes_in"] == 5 and entry["bytes_out"] == len(reply.body)
    assert entry["request_id"] == "r-42" and entry["client"] == "127.0.0.1"
    assert entry["duration_ms"] >= 0 and entry["error"] is None
    assert "secret-ish" not in "".join(written)
