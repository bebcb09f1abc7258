"""The three kinds of long-lived Appcircle key, and what each sends to the auth host.

A credential knows its endpoint and form fields; it does not know when to exchange or what
to do with the answer (that is `exchange` and `tokens`). Only `form()` reads the secret.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from ..config.secrets import read_secret_file
from ..config.settings import CredentialSettings

__all__ = ["Credential", "SecretUnavailable", "credential_from_settings"]

# The docs send this scope on v2/v3; tokens without it lack the profile claims.
SCOPE: Final = "openid,profile,email"


class SecretUnavailable(Exception):
    """The secret could not be read now (a rotated file gone missing, say). Secret-free text."""


@dataclass(frozen=True, slots=True)
class _InlineSecret:
    value: SecretStr
    origin: str

    def read(self) -> str:
        return self.value.get_secret_value().strip()


@dataclass(frozen=True, slots=True)
class _FileSecret:
    """Re-read at every exchange, so a rotated Docker or Kubernetes secret needs no restart."""

    path: Path

    @property
    def origin(self) -> str:
        return f"file {self.path}"

    def read(self) -> str:
        try:
            return read_secret_file(self.path)
        except ValueError as err:
            raise SecretUnavailable(str(err)) from None


@dataclass(frozen=True, slots=True)
class Credential:
    """One configured key: its name in the config, its kind, and where its secret lives."""

    name: str
    kind: str
    secret: _InlineSecret | _FileSecret = field(repr=False)
    api_key_name: str | None = None

    @property
    def endpoint(self) -> str:
        return _ENDPOINTS[self.kind]

    @property
    def secret_origin(self) -> str:
        return self.secret.origin

    def pinned(self) -> Credential:
        """This credential with its secret as it reads now, kept in memory: the key that
        stays in service when a rewritten secret file holds one the auth host refuses.
        Raises SecretUnavailable."""
        if isinstance(self.secret, _InlineSecret):
            return self
        value = SecretStr(self.secret.read())
        return dataclasses.replace(self, secret=_InlineSecret(value, self.secret.origin))

    def form(self, sub_organization: str | None) -> dict[str, str]:
        """The exchange's form fields; raises SecretUnavailable."""
        secret = self.secret.read()
        if self.kind == "api-key":
            assert self.api_key_name is not None  # settings guarantee it
            form = {"name": self.api_key_name, "secret": secret}
            if sub_organization:
                form["organizationId"] = sub_organization
            return form
        form = {_SECRET_FIELDS[self.kind]: secret, "scope": SCOPE}
        if sub_organization:
            # Official clients disagree on the field's name and servers do not say which
            # they honour; send both. The token's org claim is checked afterwards anyway.
            form["subOrganization"] = sub_organization
            form["subOrganizationId"] = sub_organization
        return form


_ENDPOINTS: Final = {
    "personal-access-key": "/auth/v3/token",
    "personal-api-token": "/auth/v2/token",
    "api-key": "/auth/v1/api-key/token",
}
_SECRET_FIELDS: Final = {"personal-access-key": "personalAccessKey", "personal-api-token": "pat"}


def credential_from_settings(name: str, settings: CredentialSettings) -> Credential:
    secret: _InlineSecret | _FileSecret
    if settings.secret is not None:
        secret = _InlineSecret(settings.secret, f"credentials.{name}.secret")
    elif settings.secret_env is not None:
        # The environment cannot change under a running process: read it once.
        secret = _InlineSecret(
            SecretStr(os.environ.get(settings.secret_env, "")), f"${settings.secret_env}"
        )
    else:
        assert settings.secret_file is not None  # settings guarantee exactly one source
        secret = _FileSecret(settings.secret_file)
    return Credential(name, settings.kind, secret, settings.name)
