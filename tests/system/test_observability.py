"""Dashboards and alerts proven against a live Prometheus scraping a live demo.

A short `refundctl demo --keep-running` runs every service as in the Procfile; a real
Prometheus (its own config, generated with the demo's ports, and deploy/prometheus/alerts.yml)
scrapes them every second. Then every query of every Grafana panel and the signal of every
alert must return a series: a typo in a metric or label name fails here, not on a wall screen.
Then every service is stopped in turn, and its target-down and absent-job alerts go pending.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from refundctl.processes import free_port
from tests.deploy.test_alerts import alert_rules, prometheus_binaries
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
JOBS = {"intake": "refunds-intake", "receiver": "refunds-receiver", "worker": "refunds-worker",
        "scheduler": "refunds-scheduler"}
RATE_INTERVAL = "30s"
THRESHOLD = re.compile(r"^(?P<signal>.*\S)\s+(?P<op>==|!=|>=|<=|>|<)\s+(?P<value>-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$", re.S)


class Demo:
    """`refundctl demo --keep-running` in its own process group; its output read line by line."""

    def __init__(self, env: dict, *args: str):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "refundctl", "demo", *args, "--keep-running"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader drain
                if match := next((m for m in (re.search(pattern, ln) for ln in self.lines) if m), None):
                    return match
                pytest.fail(f"demo exited with {self.process.returncode}:\n" + self.output())
            time.sleep(0.2)
        pytest.fail(f"demo printed no {pattern!r} within {timeout:.0f}s:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # the demo stops its services and cleans up
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Prometheus:
    """A throwaway Prometheus on a free port, scraping the given targets every second.

    The targets come from files (file-based service discovery), so a test can make a job vanish
    as Kubernetes discovery does when its pods are gone (``forget``)."""

    def __init__(self, binary: str, work: Path, targets: dict[str, str]):
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", work / "alerts.yml")
        for name, address in targets.items():
            (work / f"{name}.json").write_text(json.dumps([{"targets": [address]}]))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": JOBS[name],
                                "file_sd_configs": [{"files": [str(work / f"{name}.json")], "refresh_interval": "1s"}]}
                               for name in targets],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(work / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.work = work
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail("prometheus exited:\n" + (work / "prometheus.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail("prometheus not ready in 30s")

    def forget(self, name: str) -> None:
        """Service discovery no longer finds any target of this service."""
        (self.work / f"{name}.json").write_text("[]")

    def alert_states(self, alert: str) -> dict[str, str]:
        """job -> state (pending, firing) of an alert's active instances."""
        alerts = self.api("alerts")["data"]["alerts"]
        return {a["labels"].get("job", ""): a["state"] for a in alerts if a["labels"]["alertname"] == alert}

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def fires_throughout(self, expr: str, seconds: float) -> bool:
        """Whether ``expr`` has a result at every evaluation for ``seconds``: an alert's ``for:`` in
        small, so that one slow scrape on a loaded machine (``up`` 0 once) is not taken for a firing."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.query(expr).get("data", {}).get("result"):
                return False
            time.sleep(0.5)
        return True

    def value(self, expr: str) -> float | None:
        result = self.query(expr).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float, demo: Demo, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (value := self.value(expr)) != expected:
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus: {expr} = {value}, not {expected}, after {timeout:.0f}s\n{demo.output()}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel, variables substituted as Grafana would."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = {var["name"]: var.get("allValue") or ".*" for var in dashboard["templating"]["list"]
                     if var["type"] in ("query", "custom")}
        panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name in ("__rate_interval", "__interval", "__range"):
                    expr = expr.replace(f"${{{name}}}", RATE_INTERVAL).replace(f"${name}", RATE_INTERVAL)
                for name, value in variables.items():
                    expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
                assert "$" not in expr, f"{path.name} / {panel['title']}: unsubstituted variable in {expr}"
                found.append((path.name, panel["title"], expr))
    return found


def alert_signal(expr: str) -> str:
    """The measured quantity of an alert: its expression without the final comparison (or absent())."""
    if absent := re.fullmatch(r"absent\((.*)\)", expr.strip(), re.S):
        return absent[1]
    match = THRESHOLD.match(expr.strip())
    assert match, f"alert expression is not '<signal> <op> <threshold>': {expr}"
    return match["signal"]


def _empty_database(database_url: str) -> None:
    import asyncio

    from refunds import db as dbmod
    from tests.conftest import TABLES

    async def truncate():
        conn = await dbmod.connect(database_url)
        try:
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    asyncio.run(truncate())


@pytest.fixture(scope="module")
def live(database_url, redis_url, tmp_path_factory):
    """A finished demo whose services keep running, and a Prometheus that has scraped all of it."""
    prometheus_binary = prometheus_binaries()[0]
    _empty_database(database_url)  # the scheduler's gauges count every refund in the database
    tmp_path = tmp_path_factory.mktemp("observability")
    go = tmp_path / "go"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
           "REFUNDS_DEMO_LOG_DIR": str(tmp_path / "logs"), "REFUNDS_DEMO_HOLD_FILE": str(go)}
    demo = Demo(env, "--refunds", "60", "--merchants", "2")
    prometheus = None
    try:
        targets = json.loads(demo.wait_for(r"^METRICS (\{.*\})$", 90)[1])["targets"]
        prometheus = Prometheus(prometheus_binary, tmp_path / "prometheus", targets)
        # as in production, Prometheus knows every series before the traffic: increase() needs a first sample
        prometheus.wait_for('sum(up{job=~"refunds-.*"})', len(JOBS), demo)
        go.touch()
        demo.wait_for(r"services keep running", 120)
        accepted = int(demo.wait_for(r"accepted\s*│\s*(\d+)", 5)[1])
        prometheus.wait_for('sum(refunds_completed_total{status="succeeded"})', accepted, demo)
        time.sleep(3)  # a few more scrapes so that every rate() window holds the run's last samples
        prometheus.demo, prometheus.targets = demo, targets  # for the test that stops the services
        yield prometheus, accepted
    finally:
        if prometheus is not None:
            prometheus.stop()
        demo.stop()


async def test_every_dashboard_query_and_alert_signal_returns_data(live):
    prometheus, accepted = live
    failures = []
    queries = dashboard_queries()
    assert len(queries) >= 20
    for dashboard, title, expr in queries:
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{dashboard} / {title}: {expr}\n    error: {answer.get('error')}")
        elif not answer["data"]["result"]:
            failures.append(f"{dashboard} / {title}: {expr}\n    no series")
    for rule in alert_rules():
        signal_expr = alert_signal(rule["expr"])
        answer = prometheus.query(signal_expr)
        if answer.get("status") != "success" or not answer["data"]["result"]:
            failures.append(f"alert {rule['alert']}: {signal_expr}\n    {answer.get('error') or 'no series'}")
        firing = prometheus.query(rule["expr"])
        if firing.get("status") != "success":
            failures.append(f"alert {rule['alert']}: {firing.get('error')}")
        elif firing["data"]["result"] and prometheus.fires_throughout(rule["expr"], seconds=5):
            failures.append(f"alert {rule['alert']} would fire in a healthy run: {firing['data']['result']}")
    assert not failures, "\n".join(failures)

    # Prometheus itself evaluated every rule without an error
    groups = prometheus.api("rules")["data"]["groups"]
    evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(evaluated) == {rule["alert"] for rule in alert_rules()}
    assert all(rule["health"] == "ok" for rule in evaluated.values()), evaluated


async def test_each_process_exports_its_own_metrics(live):
    prometheus, accepted = live
    by_job = {
        "refunds-intake": 'sum(refunds_accepted_total{job="refunds-intake"})',
        "refunds-receiver": 'sum(refund_notifications_total{job="refunds-receiver", result="applied"})',
        # our counters summed over every worker process (multiprocess mode), and dramatiq's own
        "refunds-worker": 'sum(refund_gateway_requests_total{job="refunds-worker", outcome=~"success|pending"})',
        "refunds-scheduler": 'sum(refunds_in_state{job="refunds-scheduler", state="succeeded"})',
    }
    for job, expr in by_job.items():
        assert (prometheus.value(expr) or 0) >= accepted, f"{job}: {expr} = {prometheus.value(expr)}"
    # dramatiq's own counters too (refunds handed over together share a send_refunds message, so
    # their number is not the refunds'; the worker counter above counts refunds)
    assert (prometheus.value('sum(dramatiq_messages_total{job="refunds-worker", actor_name=~"send_refunds?"})')
            or 0) >= 1
    assert prometheus.value('sum(rate(refund_completion_seconds_count[1m])) >= 0') is not None
    assert prometheus.value('max(refund_outbox_oldest_seconds{job="refunds-scheduler"})') == 0
    merchants = prometheus.query("count by (merchant) (refunds_accepted_total)")["data"]["result"]
    assert {m["metric"]["merchant"] for m in merchants} == {"demo-seller-1", "demo-seller-2"}


async def test_every_scrape_passes_promtool_check_metrics(live):
    """Metric names and units that Prometheus' own linter accepts, on each service's real scrape."""
    prometheus, _ = live
    promtool = prometheus_binaries()[1]
    targets = prometheus.api("targets")["data"]["activeTargets"]
    assert {target["labels"]["job"] for target in targets} == set(JOBS.values())
    for target in targets:
        with urllib.request.urlopen(target["scrapeUrl"], timeout=10) as response:
            scrape = response.read()
        run = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=60)
        assert run.returncode == 0, f"{target['labels']['job']}: {(run.stdout + run.stderr).decode()}"


def test_the_merchant_label_can_be_switched_off():
    code = "from refunds import metrics; print(metrics.merchant_label('seller-1'))"
    for setting, expected in (("0", "all"), ("1", "seller-1")):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "REFUNDS_METRICS_MERCHANT_LABEL": setting}, cwd=ROOT)
        assert run.stdout.strip() == expected, run.stderr


def test_the_worker_metrics_folder_is_emptied_once_per_run(tmp_path):
    from workers.metrics import RUN_MARK, _empty_once_per_run

    stale = tmp_path / "counter_12345.db"
    stale.write_bytes(b"from an earlier run")
    (tmp_path / RUN_MARK).write_text("1:earlier")
    _empty_once_per_run(tmp_path)
    assert not stale.exists()
    fresh = tmp_path / "counter_777.db"
    fresh.write_bytes(b"this run's first process")
    _empty_once_per_run(tmp_path)  # a second process of the same run keeps it
    assert fresh.exists()


def test_dashboard_provisioning_points_at_the_dashboards():
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/refunds.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        datasource = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
        assert datasource["current"]["value"] == uid
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


async def test_refund_show_prints_the_whole_event_history(live, database_url):
    """The audit trail: every state change of a refund, with who made it, from `refundctl refund show`."""
    from refunds import db as dbmod

    conn = await dbmod.connect(database_url)
    try:
        refund_id, external_ref = await conn.fetchrow(
            """SELECT r.refund_id, r.external_ref FROM refunds r
               WHERE r.state = 'succeeded' AND EXISTS (
                   SELECT 1 FROM refund_events e WHERE e.refund_id = r.refund_id AND e.to_state = 'pending')
               LIMIT 1""")
        stored = await conn.fetch(
            "SELECT from_state, to_state, actor FROM refund_events WHERE refund_id = $1 ORDER BY event_id", refund_id)
    finally:
        await conn.close()
    assert [row["to_state"] for row in stored][-2:] == ["pending", "succeeded"]
    env = {**os.environ, "DATABASE_URL": database_url, "COLUMNS": "200"}

    shown = subprocess.run([sys.executable, "-m", "refundctl", "refund", "show", str(refund_id), "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["refund_id"] == str(refund_id) and document["state"] == "succeeded"
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in document["events"]] == \
        [(row["from_state"], row["to_state"], row["actor"]) for row in stored]
    assert all(event["occurred_at"] for event in document["events"])

    human = subprocess.run([sys.executable, "-m", "refundctl", "refund", "show", external_ref],
                           env=env, capture_output=True, text=True, timeout=60)
    assert human.returncode == 0, human.stderr
    history = human.stdout.split("history", 1)[1]
    rows = [line for line in history.splitlines() if re.match(r"^│\s*\d{4}-\d\d-\d\d", line)]
    assert len(rows) == len(stored), human.stdout
    for row, event in zip(rows, stored):
        assert event["to_state"] in row and event["actor"] in row


SERVICE_COMMANDS = {"intake": "producers.http", "receiver": "receiver", "worker": "dramatiq",
                    "scheduler": "workers.scheduler"}


def _service_pid(demo: Demo, name: str) -> int:
    """The pid of one of the demo's services (its child, leading its own process group)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == demo.process.pid and SERVICE_COMMANDS[name].encode() in argv:
            return int(entry.name)
    pytest.fail(f"no {name} process under the demo\n{demo.output()}")


async def test_each_service_stopped_then_gone_raises_its_alerts(live):
    """Last in this module: it stops the demo's services (once one has exited, the demo stops the
    rest). Each service in turn: stopped, its target is down (RefundTargetDown pending); gone from
    service discovery, its job is absent (RefundJobAbsent pending), which no up == 0 series tells."""
    from refunds import heartbeat

    prometheus, _ = live
    demo, targets = prometheus.demo, prometheus.targets
    # the worker processes' event loops beat (the liveness probe's signal) while /metrics answers
    port = targets["worker"].rsplit(":", 1)[1]
    assert heartbeat.stale(Path(tempfile.gettempdir()) / f"refunds-heartbeat-worker-{port}", max_age=30) == []

    def wait_pending(alert: str, job: str) -> None:
        deadline = time.monotonic() + 30
        while prometheus.alert_states(alert).get(job) != "pending":
            if time.monotonic() > deadline:
                pytest.fail(f"{alert} for {job}: {prometheus.alert_states(alert)}")
            time.sleep(0.3)

    pids = {name: _service_pid(demo, name) for name in SERVICE_COMMANDS}
    for name in ("scheduler", "worker", "receiver", "intake"):
        job = JOBS[name]
        try:
            os.killpg(pids[name], signal.SIGTERM)
        except ProcessLookupError:
            pass  # the demo stops the others once one of its services has exited
        wait_pending("RefundTargetDown", job)
        assert job not in prometheus.alert_states("RefundJobAbsent")  # still discovered: only down
        prometheus.forget(name)
        wait_pending("RefundJobAbsent", job)

