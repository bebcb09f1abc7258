"""A small Appcircle for `demo`: an auth host that issues signed JWTs for the three kinds of
key, and an API host that checks them and echoes what it received. No fault switches: the
tests have their own, fuller stand-in (tests/standin.py)."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Final

import jwt
from aiohttp import web

__all__ = ["DemoAppcircle"]

ALGORITHM: Final = "HS256"
PERSONAL_FIELDS: Final = {
    "/auth/v3/token": "personalAccessKey",
    "/auth/v2/token": "pat",
    "/auth/v1/token": "pat",
}


class DemoAppcircle:
    """Both hosts on free loopback ports; `auth_url` and `api_url` are set by `start`."""

    def __init__(self, token_lifetime: float = 300.0) -> None:
        self.token_lifetime = token_lifetime
        self.auth_url = ""
        self.api_url = ""
        self._key = secrets.token_hex(32)
        self._personal: dict[str, str] = {}
        self._api_keys: dict[tuple[str, str], str] = {}
        self._subs: dict[str, set[str]] = {}
        self._runners: list[web.AppRunner] = []

    def add_personal_key(self, key: str, organization: str, *subs: str) -> None:
        self._personal[key] = organization
        self._subs.setdefault(organization, set()).update(subs)

    def add_api_key(self, name: str, secret: str, organization: str, *subs: str) -> None:
        self._api_keys[(name, secret)] = organization
        self._subs.setdefault(organization, set()).update(subs)

    async def start(self) -> None:
        auth = web.Application()
        for endpoint in PERSONAL_FIELDS:
            auth.router.add_post(endpoint, self._personal_exchange)
        auth.router.add_post("/auth/v1/api-key/token", self._api_key_exchange)
        api = web.Application()
        api.router.add_route("*", "/{path:.*}", self._echo)
        self.auth_url = await self._serve(auth)
        self.api_url = await self._serve(api)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _personal_exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        root = self._personal.get(str(form.get(PERSONAL_FIELDS[request.path], "")))
        return self._issue(root, form.get("subOrganization"))

    async def _api_key_exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        root = self._api_keys.get((str(form.get("name", "")), str(form.get("secret", ""))))
        return self._issue(root, form.get("organizationId"))

    def _issue(self, root: str | None, wanted: object) -> web.Response:
        if root is None:
            return web.json_response({"error": "invalid_grant"}, status=401)
        organization = str(wanted) if wanted else root
        if organization != root and organization not in self._subs.get(root, set()):
            return web.json_response({"error": "forbidden"}, status=403)
        now = time.time()
        claims = {
            "sub": f"demo-user-of-{root}",
            "email": "demo@example.com",
            "currentOrganizationId": organization,
            "iat": int(now),
            "exp": int(now + self.token_lifetime),
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        return web.json_response({"access_token": token, "token_type": "Bearer"})

    async def _echo(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme != "Bearer":
                raise jwt.InvalidTokenError("no bearer token")
            claims: dict[str, Any] = jwt.decode(token, self._key, algorithms=[ALGORITHM])
        except jwt.PyJWTError:
            return web.json_response({"message": "Unauthorized"}, status=401)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[name, value] for name, value in request.headers.items()],
                "body_length": len(body),
                "organization": claims["currentOrganizationId"],
            }
        )
