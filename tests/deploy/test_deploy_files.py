"""CI checks of the deployment files that need no Docker engine: the compose file against the
Compose Specification's JSON schema and against what the deployment promises, the Dockerfile
through hadolint, the shell scripts through shellcheck, the Caddyfile through Caddy itself, and
requirements.lock against pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is missing: make install-dev installs it (pyproject's dev extra)")
    return found


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# -- compose ----------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification() -> None:
    checked = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_schema_check_catches_a_broken_compose_file(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key under a service is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    shm_size: 1gb\n", "    shm_sise: 1gb\n", 1))
    checked = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert checked.returncode == 1 and "shm_sise" in checked.stdout


def test_app_gets_a_gpu_and_starts_after_the_database_and_the_migrations() -> None:
    services = compose()["services"]
    app = services["app"]
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert app["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "healthcheck" in services["db"] and "pg_isready" in services["db"]["healthcheck"]["test"][1]
    assert "postgres:/var/lib/postgresql/data" in services["db"]["volumes"]
    assert ":latest" not in services["db"]["image"] and ":latest" not in services["proxy"]["image"]
    assert "profiles" not in app and "profiles" not in services["db"]
    # Every setting in .env reaches the app; what the container needs wins over it.
    assert app["env_file"] == [".env"]
    assert (
        app["environment"]["HOST"] == "0.0.0.0" and app["environment"]["DATA_DIR"] == "/var/lib/private-gpt"
    )


def test_training_and_the_app_share_the_model_and_the_adapter_store() -> None:
    services = compose()["services"]
    train, app = services["train"], services["app"]
    assert train["profiles"] == ["train"]
    assert train["entrypoint"] == ["python", "-m", "training"]
    shared = {
        "adapters:/var/lib/private-gpt/adapters",
        "data:/var/lib/private-gpt",
        "hf-cache:/var/cache/huggingface",
    }
    assert shared <= set(train["volumes"]) and shared <= set(app["volumes"])
    assert "${MODEL_DIR:-./models}:/models:ro" in train["volumes"]
    # The same database and settings: training publishes into the registry the app serves from.
    assert train["environment"] == app["environment"]
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_proxy_is_optional_and_serves_the_caddyfile() -> None:
    proxy = compose()["services"]["proxy"]
    assert proxy["profiles"] == ["proxy"]
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    assert proxy["depends_on"] == {"app": {"condition": "service_healthy"}}


def test_every_named_volume_is_declared_and_every_variable_documented() -> None:
    text = COMPOSE.read_text()
    spec = compose()
    declared = set(spec["volumes"])
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared, f"{name} mounts the undeclared volume {source}"
    variables = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert variables - documented == set(), "document these in .env.example"
    assert {"SECRET_KEY", "POSTGRES_PASSWORD", "MODEL_DIR", "SITE_ADDRESS"} <= variables
    # The two secrets have no default: compose stops with a message instead of starting without them.
    assert "${SECRET_KEY:?" in text and "${POSTGRES_PASSWORD:?" in text


# -- Dockerfile, scripts, Caddyfile -----------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    linted = run(tool("hadolint"), "--failure-threshold", "info", "Dockerfile")
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_dockerfile_keeps_its_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert base is not None and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base[1])
    assert re.search(r"^ARG PYTHON_VERSION=3\.11\.\d+$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3  # uv, build, runtime
    # The dependency layer comes before the source, from the lock.
    assert text.index("COPY pyproject.toml requirements.lock") < text.index("COPY app/ app/")
    assert "--constraint requirements.lock" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    # The source is not installed: `python -m app` / `-m training` work from any working directory.
    assert "PYTHONPATH=/app" in text and 'ENTRYPOINT ["/app/scripts/entrypoint.sh"]' in text
    assert re.search(r"^HEALTHCHECK .*\n.*/readyz", text, re.M)
    assert not re.search(r"^COPY .*(models|data|\.safetensors)", text, re.M)  # no weights in the image
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", "data", ".git"} <= set(ignored)


def test_shellcheck_passes_on_the_scripts() -> None:
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    assert scripts
    checked = run(tool("shellcheck"), *scripts)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("mode", ["internal", "files", "acme"])
def test_caddyfile_parses_in_every_tls_mode(mode: str) -> None:
    caddy = shutil.which("caddy") or os.environ.get("CADDY")
    assert caddy, "caddy is not installed: make test installs it (Debian/Ubuntu: apt-get install caddy)"
    adapted = run(caddy, "adapt", "--config", "deploy/Caddyfile", TLS_MODE=mode, SITE_ADDRESS="chat.example")
    assert adapted.returncode == 0, adapted.stderr
    assert "flush_interval" in adapted.stdout and '"cookie"' in adapted.stdout


# -- the lock ---------------------------------------------------------------------------------------


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_dependency_of_pyproject_within_its_specifier() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    problems = []
    for line in wanted:
        requirement = Requirement(line)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not in requirements.lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} does not satisfy {requirement.specifier}")
    assert problems == [], "run make lock: " + "; ".join(problems)
    assert (
        pins["torch"] == re.search(r"^VERSION=(\S+)$", (ROOT / "scripts/install-torch").read_text(), re.M)[1]
    )
