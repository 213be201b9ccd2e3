"""Static checks of the container deployment: ``compose.yaml`` and the one ``Dockerfile``.

No Docker engine is needed: the Compose file is parsed with ``yaml.safe_load`` (anchors and
merge keys resolve), ``${VAR}`` references are interpolated here with dummy values, and each
worker's environment is loaded through :class:`WorkerSettings` exactly as the worker would.
``docker compose config`` runs only where the compose plugin is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import coordinator.fleet.registry
from coordinator.core.keys import Keys
from coordinator.core.settings import CoordinatorSettings, WorkerSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"

# Images that are not the project's: they carry no build and none of its settings.
THIRD_PARTY_IMAGES = ("redis:", "rabbitmq:", "ollama/ollama")

SECRETS = ("REDIS_PASSWORD", "COORDINATOR_API_TOKEN", "FLOWER_BASIC_AUTH")
DUMMY_ENV = {
    "REDIS_PASSWORD": "dummy-redis-password",
    "COORDINATOR_API_TOKEN": "dummy-api-token",
    "FLOWER_BASIC_AUTH": "admin:dummy-flower-password",
}

# Variables the configuration table (docs/configuration.md) does not list but a service may set:
# third-party ones, and COORDINATOR_API_TOKEN (the admin API's bearer token, a
# CoordinatorSettings field listed under Security).
EXTRA_KNOWN_VARIABLES = frozenset(
    {
        "FLOWER_BASIC_AUTH",
        "PYTHONUNBUFFERED",
        "COORDINATOR_API_TOKEN",
        "RABBITMQ_DEFAULT_USER",
        "RABBITMQ_DEFAULT_PASS",
    }
)

WORKER_COMMAND = ["celery", "-A", "worker_tasks", "worker", "-l", "INFO"]
WORKERS = ("gpu-ocr", "gpu-vllm", "cpu", "storage")

_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_SECRET_REFERENCE = re.compile(r"^\$\{(?P<name>[A-Z_]+):\?[^}]*\}$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- helpers -------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _is_project(service: dict[str, Any]) -> bool:
    image = str(service.get("image", ""))
    return not image.startswith(THIRD_PARTY_IMAGES)


def _project_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if _is_project(s)}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two spellings it uses."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation, for the forms this file may use."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise LookupError(f"{name} is required: {arg}")
            return value
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and not value) else value
        if op in (":+", "+"):
            return arg if value else ""
        return value or ""

    return _REFERENCE.sub(replace, text)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _seconds(duration: str) -> float:
    parts = _DURATION.findall(duration)
    assert parts, f"not a Compose duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a Compose duration: {duration!r}"
    return sum(float(number) * _DURATION_S[unit] for number, unit in parts)


def _readme_variables() -> set[str]:
    """The names in the configuration table (docs/configuration.md) (its ``| `NAME` |`` rows)."""
    text = CONFIGURATION_DOC.read_text(encoding="utf-8")
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", text, flags=re.MULTILINE))


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _healthcheck_code(service: dict[str, Any]) -> str:
    """The Python source of a ``[CMD, python, -c, CODE]`` healthcheck."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    assert len(test) == 4, test
    return str(test[3])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any of the project's variables (the host's cannot leak in)."""
    known = {
        name.lower()
        for name in _readme_variables() | set(WorkerSettings.model_fields.keys()) | set(SECRETS)
    }
    for name in list(os.environ):
        if name.lower() in known:
            monkeypatch.delenv(name)
    return monkeypatch


# --- the Compose file ----------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    compose = _compose()
    assert "version" not in compose, "the Compose Specification has no version key"
    expected = {"redis", "api", "flower", *WORKERS}
    assert expected <= set(compose["services"])


@pytest.mark.parametrize("name", sorted(_project_services()))
def test_project_services_build_the_one_dockerfile(name: str) -> None:
    service = _services()[name]
    build = service.get("build")
    if isinstance(build, dict):
        assert build.get("context", ".") == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert "dockerfile_inline" not in build
    else:
        assert build == ".", f"{name}: build {build!r}"
    images = {s.get("image") for s in _project_services().values()}
    assert len(images) == 1, f"one image for every role, not {images}"


def test_third_party_services_are_only_redis_rabbitmq_and_ollama() -> None:
    others = {name: s["image"] for name, s in _services().items() if not _is_project(s)}
    assert others["redis"] == "redis:7-alpine"
    assert others["rabbitmq"].startswith("rabbitmq:3")
    assert all(image.startswith(THIRD_PARTY_IMAGES) for image in others.values())
    assert all("build" not in _services()[name] for name in others)


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("api", ["coordinator", "serve", "--host", "0.0.0.0", "--port", "8080"]),
        ("flower", ["celery", "-A", "worker_tasks", "flower", "--port=5555"]),
        *((worker, WORKER_COMMAND) for worker in WORKERS),
    ],
)
def test_each_service_runs_its_command(name: str, command: list[str]) -> None:
    got = _command(_services()[name])
    if not got:  # no command: the image's CMD, which starts a worker
        got = _dockerfile_cmd()
    assert got == command


def test_the_api_command_is_a_console_script_of_the_package() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert _command(_services()["api"])[0] in scripts.get("scripts", {})


def test_the_published_ports_are_the_ones_served() -> None:
    services = _services()
    assert "8080:8080" in [str(p) for p in services["api"]["ports"]]
    assert "5555:5555" in [str(p) for p in services["flower"]["ports"]]
    assert "ports" not in services["redis"], "Redis stays on the Compose network"


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, list)
    return devices


@pytest.mark.parametrize(("name", "specialization"), [("gpu-ocr", "ocr"), ("gpu-vllm", "vllm")])
def test_gpu_workers(name: str, specialization: str) -> None:
    service = _services()[name]
    env = _environment(service)
    assert env["WORKER_ID"] == name
    assert env["WORKER_TIER"] == "gpu"
    assert env["WORKER_SPECIALIZATION"] == specialization
    (device,) = _gpu_devices(service)
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device.get("count", 1) == 1 or device.get("device_ids")
    # Its model services answer on a host of their own, which the worker waits for.
    urls = {env[v] for v in ("OLLAMA_URL", "OCR_URL", "EMBEDDINGS_URL")}
    assert len(urls) == 1
    host = re.match(r"^http://([a-z0-9-]+):\d+$", urls.pop())
    assert host is not None
    model_host = _services().get(host.group(1))
    if model_host is not None:
        assert model_host["image"].startswith("ollama/ollama")
        assert service["depends_on"][host.group(1)]["condition"] == "service_healthy"
        assert _gpu_devices(model_host), "the model server needs the GPU"


def test_cpu_workers_are_replicas_named_after_their_hosts() -> None:
    service = _services()["cpu"]
    env = _environment(service)
    assert env["WORKER_TIER"] == "cpu"
    assert int(service["deploy"]["replicas"]) >= 2
    # Each replica's WORKER_ID defaults to its container's hostname, which is unique.
    assert "WORKER_ID" not in env
    assert "hostname" not in service
    assert "container_name" not in service
    assert "resources" not in (service.get("deploy") or {})


def test_storage_worker_serves_chromadb_on_a_volume() -> None:
    compose = _compose()
    service = compose["services"]["storage"]
    env = _environment(service)
    assert env["WORKER_TIER"] == "storage"
    assert env["ENABLE_CHROMADB"] == "true"
    port = env.get("CHROMADB_PORT", "8000")
    assert port in [str(p) for p in service["expose"]]
    mounts = dict(str(v).split(":", 1) for v in service["volumes"])
    volume = next(name for name, target in mounts.items() if target.split(":")[0] == "/data")
    assert volume in compose["volumes"], "a named volume"
    assert env["CHROMADB_PATH"].startswith("/data/")
    # Every other worker finds it there.
    for name in WORKERS:
        assert _environment(compose["services"][name])["CHROMADB_URL"] == (f"http://storage:{port}")


@pytest.mark.parametrize("name", sorted(_services()))
def test_every_service_has_a_healthcheck(name: str) -> None:
    service = _services()[name]
    check = service.get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable")
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    for key in ("interval", "timeout", "start_period"):
        if key in check:
            _seconds(check[key])
    test = check["test"]
    if test[:3] == ["CMD", "python", "-c"]:
        compile(test[3], f"<healthcheck of {name}>", "exec")


def test_redis_requires_the_password_and_its_healthcheck_authenticates() -> None:
    redis_service = _services()["redis"]
    command = _command(redis_service)
    password = command[command.index("--requirepass") + 1]
    assert _SECRET_REFERENCE.match(password)
    assert "REDIS_PASSWORD" in password
    check = " ".join(redis_service["healthcheck"]["test"][1:])
    assert "redis-cli" in check
    assert "ping" in check
    authenticated = "-a " in check or "REDISCLI_AUTH" in _environment(redis_service)
    assert authenticated, "an unauthenticated PING only answers NOAUTH"


@pytest.mark.parametrize(("name", "path"), [("api", "/healthz"), ("flower", "/healthcheck")])
def test_http_healthchecks_ask_the_served_port(name: str, path: str) -> None:
    service = _services()[name]
    code = _healthcheck_code(service)
    ports = {str(p).split(":")[-1] for p in service["ports"]}
    assert re.search(rf"http://127\.0\.0\.1:({'|'.join(ports)}){re.escape(path)}'", code)
    assert "timeout=" in code


def test_flower_serves_its_healthcheck_path_without_authentication() -> None:
    from flower.urls import handlers  # type: ignore[import-untyped]
    from flower.views.monitor import Healthcheck  # type: ignore[import-untyped]

    # Flower checks basic auth in handlers decorated with tornado's @authenticated (which
    # wraps them); the healthcheck is not, so the healthcheck needs no credentials.
    assert not hasattr(Healthcheck.get, "__wrapped__")
    routes = {h[0]: h[1] for h in handlers if isinstance(h, tuple)}
    assert routes.get("/healthcheck") is Healthcheck


@pytest.mark.parametrize("name", WORKERS)
@pytest.mark.parametrize("present", [True, False])
@pytest.mark.parametrize(
    "operator_env",
    [{}, {"NAMESPACE": "fleet2", "REGISTRY_URL": "redis://:pw@registry:6379/1"}],
    ids=["defaults", "own-namespace-and-registry"],
)
def test_worker_healthcheck_asks_for_its_own_heartbeat_key(
    name: str, present: bool, operator_env: dict[str, str], clean_env: pytest.MonkeyPatch
) -> None:
    """The healthcheck runs here against the real settings and key names, with a fake
    ``coordinator.fleet.registry.redis_client`` standing in for Redis."""
    service = _services()[name]
    env = {key: _interpolate(value, DUMMY_ENV) for key, value in _environment(service).items()}
    env |= operator_env
    for key, value in env.items():
        clean_env.setenv(key, value)
    asked: list[tuple[str, tuple[str, ...]]] = []

    class FakeRedis:
        def __init__(self, url: str) -> None:
            self.url = url

        def exists(self, *keys: str) -> int:
            asked.append((self.url, keys))
            return len(keys) if present else 0

    def fake_client(url: str, timeout_s: float) -> FakeRedis:
        assert 0 < timeout_s < _seconds(service["healthcheck"]["timeout"])
        return FakeRedis(url)

    clean_env.setattr(coordinator.fleet.registry, "redis_client", fake_client)
    with pytest.raises(SystemExit) as exited:
        exec(_healthcheck_code(service), {})  # noqa: S102 - the healthcheck's own code
    assert exited.value.code == (0 if present else 1)
    worker_id = env.get("WORKER_ID") or socket.gethostname()
    namespace = env.get("NAMESPACE", "aiq")
    registry_url = env.get("REGISTRY_URL") or env["REDIS_URL"]
    assert asked == [(registry_url, (Keys(namespace).worker(worker_id),))]


@pytest.mark.parametrize("name", WORKERS)
def test_worker_environment_is_valid_worker_settings(
    name: str, clean_env: pytest.MonkeyPatch
) -> None:
    env = {k: _interpolate(v, DUMMY_ENV) for k, v in _environment(_services()[name]).items()}
    for key, value in env.items():
        clean_env.setenv(key, value)
    settings = load_settings(WorkerSettings)
    assert settings.worker_tier == env["WORKER_TIER"]
    assert settings.enable_chromadb == (name == "storage")
    assert settings.redis_url == "redis://:dummy-redis-password@redis:6379/0"


@pytest.mark.parametrize("name", ["api", "flower"])
def test_api_and_flower_environment_is_valid_settings(
    name: str, clean_env: pytest.MonkeyPatch
) -> None:
    env = {k: _interpolate(v, DUMMY_ENV) for k, v in _environment(_services()[name]).items()}
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert load_settings(CoordinatorSettings).redis_url.endswith("@redis:6379/0")


@pytest.mark.parametrize("name", WORKERS)
def test_workers_shut_down_warm_and_restart(name: str) -> None:
    service = _services()[name]
    assert service["restart"] == "unless-stopped"
    # Celery's warm shutdown lets running tasks finish; a model call may take up to
    # MODEL_TIMEOUT_S. Anything shorter than a minute cuts ordinary generations short.
    assert _seconds(service["stop_grace_period"]) >= 60


@pytest.mark.parametrize("name", sorted(_project_services()))
def test_project_services_wait_for_a_healthy_redis(name: str) -> None:
    depends_on = _services()[name]["depends_on"]
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_dependencies_exist_and_are_checked() -> None:
    services = _services()
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if spec.get("condition") == "service_healthy":
                assert services[dependency].get("healthcheck"), dependency


@pytest.mark.parametrize("name", sorted(_project_services()))
def test_redis_url_points_at_the_redis_service_with_the_password(name: str) -> None:
    url = _environment(_services()[name])["REDIS_URL"]
    match = re.fullmatch(r"redis://:(?P<password>\$\{[^}]+\})@redis:6379/\d+", url)
    assert match, url
    password = _SECRET_REFERENCE.match(match.group("password"))
    assert password
    assert password.group("name") == "REDIS_PASSWORD"


def test_flower_requires_basic_auth() -> None:
    value = _environment(_services()["flower"])["FLOWER_BASIC_AUTH"]
    match = _SECRET_REFERENCE.match(value)
    assert match
    assert match.group("name") == "FLOWER_BASIC_AUTH"


def test_the_api_requires_its_token() -> None:
    value = _environment(_services()["api"])["COORDINATOR_API_TOKEN"]
    match = _SECRET_REFERENCE.match(value)
    assert match
    assert match.group("name") == "COORDINATOR_API_TOKEN"


def test_no_literal_secret() -> None:
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|_AUTH$")
    for name, service in _services().items():
        for key, value in _environment(service).items():
            if key in SECRETS or secretish.search(key):
                match = _SECRET_REFERENCE.match(value)
                assert match, f"{name}: {key} must come from the environment"
                assert match.group("name") in SECRETS
            for userinfo in re.findall(r"://[^/@\s]*:([^/@\s]+)@", value):
                assert _SECRET_REFERENCE.match(userinfo), f"{name}: {key} holds a password"
    # Nothing but the secrets is required, and every secret is required (no empty default).
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in _REFERENCE.finditer(text):
        variable = match.group("braced") or match.group("bare")
        if variable is None:  # $$
            continue
        if variable in SECRETS:
            assert match.group("op") == ":?", match.group(0)
        else:
            assert match.group("op") == ":-", f"{match.group(0)} has no default"
    for value in DUMMY_ENV.values():
        assert value not in text


def test_the_file_interpolates_with_the_secrets_and_fails_without_them() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    yaml.safe_load(_interpolate(text, DUMMY_ENV))
    for secret in SECRETS:
        partial = {k: v for k, v in DUMMY_ENV.items() if k != secret}
        with pytest.raises(LookupError, match=secret):
            _interpolate(text, partial)


@pytest.mark.parametrize("name", sorted(_project_services()))
def test_every_variable_is_one_the_project_knows(name: str) -> None:
    known = _readme_variables() | EXTRA_KNOWN_VARIABLES
    assert {"REDIS_URL", "WORKER_TIER", "ENABLE_CHROMADB"} <= known, "table not parsed"
    unknown = set(_environment(_services()[name])) - known
    assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"
    if name in WORKERS:  # pydantic-settings ignores unknown names silently: check the fields
        fields = {f.upper() for f in WorkerSettings.model_fields}
        assert set(_environment(_services()[name])) <= fields


def test_the_worker_anchor_is_shared() -> None:
    # The anchors resolve into identical worker settings where the roles do not differ.
    services = _services()
    shared = ("build", "image", "restart", "healthcheck", "stop_grace_period", "init")
    first = services[WORKERS[0]]
    for name in WORKERS[1:]:
        for key in shared:
            assert services[name].get(key) == first.get(key), f"{name}.{key}"


# --- the Dockerfile ------------------------------------------------------------------------


def _dockerfile_cmd() -> list[str]:
    cmds = [args for keyword, args in _dockerfile() if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    command = json.loads(cmds[-1])
    assert isinstance(command, list)
    return [str(part) for part in command]


def test_dockerfile_base_and_default_command() -> None:
    instructions = _dockerfile()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["python:3.11-slim"]
    assert _dockerfile_cmd() == WORKER_COMMAND
    envs = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", envs)


def test_dockerfile_installs_the_package_with_the_rag_extra() -> None:
    instructions = _dockerfile()
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    for source in ("pyproject.toml", "README.md", "coordinator", "worker_tasks"):
        assert re.search(rf"(^|\s){re.escape(source)}(\s|$)", copied), source
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    installs = [r for r in runs if re.search(r"pip install --no-cache-dir ['\"]\.\[rag\]['\"]", r)]
    assert installs, "pip install --no-cache-dir '.[rag]'"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "nothing runs as root after USER"


def test_dockerfile_bakes_in_no_secret() -> None:
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|AUTH|REDIS_URL")
    for keyword, arguments in _dockerfile():
        if keyword in ("ENV", "ARG"):
            assert not secretish.search(arguments), f"{keyword} {arguments}"
    assert not re.search(r"://[^/@\s]*:[^/@\s]+@", DOCKERFILE.read_text(encoding="utf-8"))


# --- docker compose, where installed -------------------------------------------------------


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(
    not _compose_plugin(), reason="`docker compose version` fails: no compose plugin here"
)
def test_docker_compose_accepts_the_file() -> None:
    env = {**os.environ, **DUMMY_ENV}
    command = ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    missing = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    done = subprocess.run(
        command, env=missing, capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr
