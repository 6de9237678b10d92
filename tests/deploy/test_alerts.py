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
RUNBOOK_PLACEHOLDER = "https://runbooks.example.com/refunds"  # replaced at deploy time (docs/OPERATIONS.md)
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


@pytest.mark.slow
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
                   "up{", 'refunds_in_state{state="manual_review"}', 'kind="dead_letter"',
                   "refund_pending_oldest_seconds", "refund_notifications_refused_total",
                   "refund_scheduler_last_pass_timestamp_seconds", "refund_journal_bytes"):
        assert needed in exprs, f"no alert uses {needed}"
    absent = {rule["labels"].get("job") for rule in alert_rules() if rule["expr"].startswith("absent(")}
    assert absent == {"refunds-intake", "refunds-receiver", "refunds-worker", "refunds-scheduler"}
    headings = {_slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    for rule in alert_rules():
        name = rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(f"{RUNBOOK_PLACEHOLDER}/OPERATIONS.md#"), f"{name}: {url} is not absolute on the base"
        assert url.split("#", 1)[1] in headings, f"{name}: no section {url} in docs/OPERATIONS.md"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule.get("for") and rule["annotations"].get("summary"), f"{name}: no for: or no summary"


def test_the_documented_runbook_base_substitution_makes_every_link_absolute(promtool, tmp_path):
    """The one sed line of docs/OPERATIONS.md gives a valid rule file whose links all start with the base."""
    line = next(ln.strip() for ln in OPERATIONS.read_text().splitlines() if ln.strip().startswith("sed ") and
                RUNBOOK_PLACEHOLDER in ln)
    base = "https://git.example.org/payments/refunds/-/blob/v1.2.0/docs"
    script = line.replace("deploy/prometheus/alerts.yml", str(PROMETHEUS_DIR / "alerts.yml")).replace(
        "/etc/prometheus/rules/refunds.yml", str(tmp_path / "refunds.yml"))
    run = subprocess.run(["sh", "-c", script], env={**os.environ, "RUNBOOK_BASE": base},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    rendered = tmp_path / "refunds.yml"
    assert RUNBOOK_PLACEHOLDER not in rendered.read_text()
    groups = yaml.safe_load(rendered.read_text())["groups"]
    urls = [rule["annotations"]["runbook_url"] for group in groups for rule in group["rules"]]
    assert urls and all(url.startswith(f"{base}/OPERATIONS.md#") for url in urls)
    check = _promtool(promtool, "check", "rules", str(rendered))
    assert check.returncode == 0, check.stdout + check.stderr


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- several deployments in one Prometheus: no aggregation merges them ----------------------------

DEPLOYMENT_LABELS = {"cluster", "namespace"}
AGGREGATIONS = ("sum", "min", "max", "avg", "group", "count", "count_values", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "limitk", "limit_ratio")


def _closing(text: str, opening: int) -> int:
    """The index of the parenthesis closing the one at ``opening``."""
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses in {text!r}")


def merged_deployments(expr: str) -> list[str]:
    """Where ``expr`` merges the series of several deployments: an aggregation whose by (...)
    lacks cluster or namespace (or whose without (...) names them, or that has neither), a
    vector matching on (...) that lacks them or ignoring (...) that names them, vector() (a
    value of no deployment). absent(), which keeps no label, is the one exception: the whole
    expression only (docs/OPERATIONS.md "Alert rules")."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values cannot look like operators
    if re.fullmatch(r"\s*absent\([^()]*\)\s*", text):
        return []
    found = []
    for match in re.finditer(rf"\b({'|'.join(AGGREGATIONS)})\s*(?:(by|without)\s*\(([^)]*)\)\s*)?\(", text):
        name, modifier, labels = match.groups()
        if modifier is None:  # the grouping may follow the arguments: sum(x) by (namespace)
            after = re.match(r"\s*(by|without)\s*\(([^)]*)\)", text[_closing(text, match.end() - 1) + 1:])
            modifier, labels = after.groups() if after else (None, "")
        grouped = {label.strip() for label in (labels or "").split(",") if label.strip()}
        if modifier == "without" and grouped & DEPLOYMENT_LABELS or \
                modifier != "without" and not DEPLOYMENT_LABELS <= grouped:
            found.append(f"{name} {modifier} ({labels})" if modifier else name)
    for match in re.finditer(r"\b(on|ignoring)\s*\(([^)]*)\)", text):
        keyword, labels = match.groups()
        matched = {label.strip() for label in labels.split(",") if label.strip()}
        if keyword == "on" and not DEPLOYMENT_LABELS <= matched or keyword == "ignoring" and matched & DEPLOYMENT_LABELS:
            found.append(f"{keyword} ({labels})")
    found += [f"{call}(...)" for call in re.findall(r"\b(vector|absent|absent_over_time|scalar)\s*\(", text)]
    return found


def test_no_alert_merges_the_deployments_of_one_prometheus():
    """Every aggregation keeps cluster and namespace, so two deployments are alerted on their own
    numbers (alerts.test.yml: "several deployments in one Prometheus")."""
    aggregations = 0
    for rule in alert_rules():
        assert merged_deployments(rule["expr"]) == [], f"{rule['alert']}: {rule['expr']}"
        aggregations += len(re.findall(rf"\b({'|'.join(AGGREGATIONS)})\s*(?:by|without|\()",
                                       re.sub(r'"[^"]*"', '""', rule["expr"])))
    assert aggregations >= 20  # the check above did look at them


@pytest.mark.parametrize("expr, merged", [
    ("sum(rate(x[5m])) > 1", ["sum"]),
    ("sum by (le) (rate(x[5m]))", ["sum by (le)"]),
    ("sum by (namespace) (x) > 1", ["sum by (namespace)"]),  # two clusters' "refunds" namespaces merged
    ("sum(x) by (instance) / sum(y) by (cluster, namespace)", ["sum by (instance)"]),
    ("max without (namespace, instance) (x) > 1", ["max without (namespace, instance)"]),
    ('(sum by (cluster, namespace) (x{s="max"}) or on() vector(0)) > 0', ["on ()", "vector(...)"]),
    ("a / ignoring (namespace) b", ["ignoring (namespace)"]),
    ('time() - max(x or y{job="z"}) > 120', ["max"]),
    ("absent(up{job=\"x\"}) or absent(up{job=\"y\"})", ["absent(...)", "absent(...)"]),
    # kept: grouped by both, or without others; absent() alone; a plain selector
    ("histogram_quantile(0.95, sum by (cluster, namespace, le) (rate(x_bucket[10m]))) > 300", []),
    ("sum(x) by (namespace, cluster) > 1", []),
    ("max without (instance, pod) (x) > 1", []),
    ('absent(up{job="refunds-intake"})', []),
    ('up{job=~"refunds-.*"} == 0', []),
])
def test_the_deployment_check_tells_a_merging_aggregation(expr, merged):
    assert merged_deployments(expr) == merged
