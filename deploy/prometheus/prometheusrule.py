#!/usr/bin/env python3
"""Print deploy/prometheus/alerts.yml as a PrometheusRule (Prometheus Operator), the same rules.

    python deploy/prometheus/prometheusrule.py > deploy/kubernetes/monitoring/prometheusrule.yaml
    python deploy/prometheus/prometheusrule.py --runbook-base https://git.example.com/refunds/-/blob/v1.2.0/docs

The committed prometheusrule.yaml keeps the placeholder runbook base; tests/deploy checks that it
is this script's output, so the two rule sets cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ALERTS = Path(__file__).with_name("alerts.yml")
PLACEHOLDER = "https://runbooks.example.com/refunds"
HEADER = "# Generated from deploy/prometheus/alerts.yml by deploy/prometheus/prometheusrule.py: do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, as in alerts.yml."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def prometheus_rule(runbook_base: str = PLACEHOLDER) -> str:
    groups = yaml.safe_load(ALERTS.read_text().replace(PLACEHOLDER, runbook_base))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "refunds", "labels": {"app.kubernetes.io/name": "pagoefectivo-refunds"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runbook-base", default=PLACEHOLDER, help="the URL of docs/ as your on-call reads it")
    sys.stdout.write(prometheus_rule(parser.parse_args().runbook_base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
