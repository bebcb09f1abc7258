"""The README's CI recipes, run as the README shows them: each recipe's shell steps are taken
from README.md at test time (the fenced block after `<!-- recipe: NAME -->`), never copied
here, and run against the stand-in Appcircle on a "bare runner": a fresh venv with pip and
nothing installed, and a PATH holding only a shell, curl and a few core tools (no git).

What stands in for what, and the only substitutions made:
- `${{ secrets.NAME }}` / `${{ vars.NAME }}` (GitHub) and CI/CD variables (GitLab) get the
  values in `CI_VARIABLES`: the stand-in's key, the wheel the build-wheel recipe made, ...
- A `uses:` step (actions/setup-python) is skipped: the fresh venv is that Python.
- The Appcircle hosts are the stand-in's: `APPCIRCLE_PROXY_APPCIRCLE__API_URL` and
  `__AUTH_URL` are added to the environment of the steps and the services.
- A service container is the proxy installed from the wheel, run with the service's
  environment (as the image would: `appcircle-proxy serve`) on a free loopback port; the
  address the recipe uses (127.0.0.1:8787, appcircle-proxy:8787) reaches it through curl's
  `connect-to` in a .curlrc (CURL_HOME), so the commands keep their URLs and Host headers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY
from .test_ci import free_port

ROOT = Path(__file__).parent.parent
RECIPE = re.compile(
    r"<!-- recipe: (?P<name>[\w-]+) -->\n```(?P<language>\w+)\n(?P<body>.*?)\n```", re.DOTALL
)
EXPRESSION = re.compile(r"\$\{\{\s*(?:secrets|vars)\.(\w+)\s*\}\}")
# What a bare image or runner has besides Python: a shell, curl and core tools; not git.
TOOLS = ("sh", "bash", "curl", "env", "cat", "mkdir", "rm", "sleep", "test", "uname", "ls")
PROFILE_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
TESTED = {"build-wheel", "github-run", "gitlab-run", "github-service", "gitlab-service"}


def recipes() -> dict[str, str]:
    """The README's recipes by name: the text of each fenced block after its marker."""
    found = {m["name"]: m["body"] for m in RECIPE.finditer((ROOT / "README.md").read_text())}
    assert found, "no <!-- recipe: NAME --> blocks in README.md"
    return found


@dataclass(frozen=True)
class Runner:
    """A bare runner: its PATH (the fresh venv first) and the wheel built once."""

    path: str
    wheel: Path


@pytest.fixture(scope="module")
def bare_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """The wheel built by the README's build-wheel recipe, in a copy of the sources (as a
    checkout would be), and a fresh venv to install it into."""
    work = tmp_path_factory.mktemp("runner")
    tools = work / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    path = f"{work / 'venv' / 'bin'}:{tools}"
    checkout = work / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout)
    shutil.copytree(
        ROOT / "proxy", checkout / "proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", recipes()["build-wheel"]],
        cwd=checkout,
        env=bare_environment(path, work),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (checkout / "dist").glob("appcircle_proxy-*.whl")
    yield Runner(path, wheel)


def bare_environment(path: str, home: Path) -> dict[str, str]:
    """A runner's environment: PATH, HOME and the machine's pip settings (the package
    index here), nothing else of ours."""
    pip = {name: value for name, value in os.environ.items() if name.startswith("PIP_")}
    return {"PATH": path, "HOME": os.environ.get("HOME", str(home)), "LANG": "C.UTF-8", **pip}


def ci_variables(runner: Runner) -> dict[str, str]:
    """The secrets and variables a user defines in the CI's settings."""
    return {
        "APPCIRCLE_PERSONAL_ACCESS_KEY": PERSONAL_KEY,
        "APPCIRCLE_PROXY_WHEEL": str(runner.wheel),
        "APPCIRCLE_PROFILE_ID": PROFILE_ID,
    }


def expand(text: str, variables: dict[str, str]) -> str:
    """What GitHub does to `${{ secrets.X }}` and `${{ vars.X }}` before a step runs."""
    return EXPRESSION.sub(lambda match: variables[match[1]], text)


def stand_in_hosts(standin: StandIn) -> dict[str, str]:
    return {
        "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url,
        "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url,
    }


async def shell(
    shell: str, script: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        shell,
        "-e",
        "-c",
        script,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode()


@asynccontextmanager
async def service(
    runner: Runner, env: dict[str, str], address: str, work: Path
) -> AsyncIterator[dict[str, str]]:
    """The service container: the proxy from the wheel, as the image runs it, reached at
    `address` (host:port as the recipe writes it) through curl's connect-to. Yields the
    environment a step needs for that (CURL_HOME)."""
    install = await asyncio.create_subprocess_exec(
        "pip", "install", "-q", str(runner.wheel), env=env, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(install.wait(), 300) == 0
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "appcircle-proxy",
        "serve",
        env={**env, "APPCIRCLE_PROXY_SERVER__LISTEN": f"127.0.0.1:{port}"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    curl_home = work / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(f'connect-to = "{address}:127.0.0.1:{port}"\n')
    try:
        yield {"CURL_HOME": str(curl_home)}
    finally:
        process.terminate()
        assert process.stderr is not None
        logged = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        await process.wait()
        assert PERSONAL_KEY not in logged and CLIENT_TOKEN not in logged


def test_every_ci_recipe_in_the_readme_is_run_by_these_tests() -> None:
    """A recipe added to the README's CI section without a marker, or with one these tests
    do not run, would go untested."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## CI jobs") :]
    section = section[: section.index("\n## ")]
    assert section.count("```yaml") == len([n for n in TESTED if n != "build-wheel"])
    assert set(recipes()) == TESTED
    assert "git+" not in section and "git clone" not in section


@pytest.mark.timeout(300)
async def test_github_run_recipe_installs_the_wheel_and_runs_the_step(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitHub Actions with `appcircle-proxy run`: variables come in through each step's
    `env:` (never `${{ }}` inside `run:`), the install needs no git, and the upload goes
    through the proxy with the key in the proxy's step only."""
    steps: list[dict[str, Any]] = yaml.safe_load(recipes()["github-run"])
    variables = ci_variables(bare_runner)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "app.ipa").write_bytes(b"an app")
    outputs = []
    for step in steps:
        if "uses" in step:
            assert step["uses"].startswith("actions/setup-python@")
            continue
        assert "${{" not in step["run"], "GitHub variables go through env:, not into the script"
        env = {name: expand(str(value), variables) for name, value in step.get("env", {}).items()}
        environment = {
            **bare_environment(bare_runner.path, tmp_path),
            **stand_in_hosts(standin),
            **env,
        }
        status, output = await shell("bash", step["run"], environment, tmp_path, timeout=300)
        assert status == 0, output
        outputs.append(output)
    (uploaded,) = [r for r in standin.api_requests if r.method == "POST"]
    assert uploaded.raw_path == f"/distribution/v2/profiles/{PROFILE_ID}/app-versions"
    assert all(PERSONAL_KEY not in output for output in outputs)


@pytest.mark.timeout(300)
async def test_github_run_recipe_names_the_missing_variable(
    bare_runner: Runner, tmp_path: Path
) -> None:
    """An unset wheel variable stops the install step with its name, not pip's riddle."""
    (install,) = [s for s in yaml.safe_load(recipes()["github-run"]) if "pip install" in str(s)]
    environment = bare_environment(bare_runner.path, tmp_path)
    status, output = await shell("bash", install["run"], environment, tmp_path)
    assert status != 0
    assert "APPCIRCLE_PROXY_WHEEL" in output


@pytest.mark.timeout(300)
async def test_gitlab_run_recipe_runs_on_a_bare_python_image(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitLab CI with `appcircle-proxy run` on python:3.11-slim (no git, no curl): the
    script lines in one shell, the job's script gets the proxy and never the key."""
    (job,) = yaml.safe_load(recipes()["gitlab-run"]).values()
    assert job["image"] == "python:3.11-slim"
    script = tmp_path / "ci" / "upload.sh"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\nset -e\n"
        'test -z "$APPCIRCLE_PERSONAL_ACCESS_KEY"\n'
        "python3 -c 'import os, urllib.request; print(urllib.request.urlopen("
        'os.environ["APPCIRCLE_PROXY_URL"] + "/build/v2/profiles").status)\'\n'
    )
    script.chmod(0o755)
    environment = {
        **bare_environment(bare_runner.path, tmp_path),
        **stand_in_hosts(standin),
        **ci_variables(bare_runner),
        **job.get("variables", {}),
    }
    status, output = await shell("sh", "\n".join(job["script"]), environment, tmp_path, 300)
    assert status == 0, output
    assert "\n200\n" in output  # what upload.sh printed
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]


@pytest.mark.timeout(300)
async def test_github_service_recipe_publishes_on_loopback_only_and_its_steps_run(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitHub Actions with the proxy as a service: its port is published on the runner's
    loopback alone; the steps, curl only, wait for readiness and call the API."""
    (job,) = yaml.safe_load(recipes()["github-service"])["jobs"].values()
    (container,) = job["services"].values()
    (mapping,) = container["ports"]
    assert mapping.startswith("127.0.0.1:"), "a service port published on every interface"
    host_port = mapping.rsplit(":", 1)[0]
    variables = ci_variables(bare_runner)
    base = {**bare_environment(bare_runner.path, tmp_path), **stand_in_hosts(standin)}
    service_env = {k: expand(str(v), variables) for k, v in container["env"].items()}
    async with service(bare_runner, {**base, **service_env}, host_port, tmp_path) as reach:
        for step in job["steps"]:
            status, output = await shell("bash", step["run"], {**base, **reach}, tmp_path)
            assert status == 0, output
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]


@pytest.mark.timeout(300)
async def test_gitlab_service_recipe_is_guarded_by_a_client_token_and_its_script_runs(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitLab CI with the proxy as a service, reached by its alias (not loopback): the
    service gets the job's variables, client token included, and refuses a request
    without it; the job's curl lines, with it, wait for readiness and call the API."""
    (job,) = yaml.safe_load(recipes()["gitlab-service"]).values()
    (service_entry,) = job["services"]
    # The client token: a masked CI/CD variable, as the recipe says.
    variables = {
        **ci_variables(bare_runner),
        "APPCIRCLE_PROXY_SERVER__CLIENT_TOKEN": CLIENT_TOKEN,
        **job["variables"],
    }
    base = {**bare_environment(bare_runner.path, tmp_path), **stand_in_hosts(standin)}
    address = f"{service_entry['alias']}:8787"
    async with service(bare_runner, {**base, **variables}, address, tmp_path) as reach:
        status, output = await shell(
            "sh", "\n".join(job["script"]), {**base, **variables, **reach}, tmp_path
        )
        assert status == 0, output
        status, output = await shell(
            "sh",
            f"curl -sS -o /dev/null -w '%{{http_code}}' http://{address}/build/v2/profiles",
            {**base, **reach},
            tmp_path,
        )
        assert output == "407", "the service answered a request without the client token"
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]
