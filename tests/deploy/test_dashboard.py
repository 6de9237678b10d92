"""The Grafana dashboard answers "which merchant, which job, which namespace?" on every panel.

(Its queries are run against a live Prometheus by tests/system/test_observability.py.)
"""

from __future__ import annotations

import json
import re

from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "refunds.json"
# the metrics that carry a merchant label (docs/OPERATIONS.md)
MERCHANT_METRICS = {"refunds_accepted_total", "refunds_completed_total", "refund_completion_seconds_bucket",
                    "refund_rate_limit_waits_total"}
SELECTOR = re.compile(r"\b(up|refunds?_[a-z_]+|dramatiq_[a-z_]+)\b(?:\{([^}]*)\})?(?!\()")


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_has_cluster_namespace_job_and_merchant_variables():
    variables = {var["name"]: var for var in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {"cluster", "namespace", "job", "merchant"} <= set(variables)
    for name in ("cluster", "namespace", "job", "merchant"):
        assert variables[name]["includeAll"] and variables[name]["allValue"], name


def test_every_selector_of_every_panel_honours_the_variables():
    for title, expr in _targets():
        for name, matchers in SELECTOR.findall(expr):
            for needed in ('cluster=~"$cluster"', 'namespace=~"$namespace"', 'job=~"$job"'):
                assert needed in matchers, f"{title}: {name} without {needed}"
            if name in MERCHANT_METRICS:
                assert 'merchant=~"$merchant"' in matchers, f"{title}: {name} without the merchant filter"


def test_per_merchant_and_requeue_panels_exist():
    exprs = [expr for _, expr in _targets()]
    assert any("sum by (merchant)" in e and "refunds_completed_total" in e for e in exprs)
    assert any("by (merchant, le)" in e and "refund_completion_seconds_bucket" in e for e in exprs)
    assert any("sum by (cause)" in e and "refund_requeues_total" in e for e in exprs)
