"""The Prometheus files are valid and every alert fires when it should and only then (promtool).

Also the helpers that find (or install) the prometheus and promtool binaries, shared with
tests/system/test_observability.py.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from tests.helpers import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
_install_attempted: list[str] = []


def prometheus_binaries() -> tuple[str, str]:
    """(prometheus, promtool): found on PATH, else installed once (Debian's package, as root), else skip."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found
    if not _install_attempted:
        _install_attempted.append(_install())
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found
    pytest.skip(f"prometheus/promtool not on PATH and not installable here: {_install_attempted[0]}")


def _install() -> str:
    """apt-get install -y prometheus, serialised across test processes by a lock file; why it failed, or ''."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install the prometheus package"
    if shutil.which("apt-get") is None:
        return "no apt-get on this system"
    with open(Path(tempfile.gettempdir()) / "refunds-tests-prometheus-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("prometheus") and shutil.which("promtool"):
            return ""
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
                             env=env, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            run = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
                                 env=env, capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                return f"apt-get install prometheus failed: {(run.stderr or update.stderr).strip()[-300:]}"
    return ""


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_binaries()[1]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid(promtool):
    run = _promtool(promtool, "check", "rules", "alerts.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_config_is_valid(promtool):
    run = _promtool(promtool, "check", "config", "prometheus.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_fires_when_it_should_and_only_then(promtool):
    run = _promtool(promtool, "test", "rules", "alerts.test.yml")
    assert run.returncode == 0, run.stdout + run.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROMETHEUS_DIR / "alerts.test.yml").read_text()))
    assert {rule["alert"] for rule in alert_rules()} <= tested


def test_the_required_alerts_exist_with_a_runbook_section_each():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    exprs = " ".join(rule["expr"] for rule in rules.values())
    for needed in ('refunds_completed_total{status="succeeded"}', "refund_completion_seconds_bucket",
                   "refund_outbox_oldest_seconds", 'result="invalid_signature"', "refund_gateway_requests_total",
                   "up{", 'refunds_in_state{state="manual_review"}'):
        assert needed in exprs, f"no alert uses {needed}"
    headings = {_slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/OPERATIONS.md#"), name
        assert url.split("#", 1)[1] in headings, f"{name}: no section {url} in docs/OPERATIONS.md"
        assert rule["labels"]["severity"] in ("critical", "warning"), name


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
