"""Deployment files and issue 16: /metrics is scraped on its own ports, never the public ones, and
the HTTP services get an explicit descriptor limit well above their connection cap."""

from __future__ import annotations

import yaml

from refunds.serving import METRICS_CONNECTIONS
from refunds.settings import Settings
from tests.deploy.test_deploy import (COMPOSE_FILE, DEFAULT_PORTS, DEPLOY, DEPLOYMENT_DOC, METRICS_PORTS,
                                      _kind_of_deployment, k8s_objects, k8s_workloads, unit)

HTTP_SERVICES = {"intake": "refunds-intake.service", "receiver": "refunds-receiver.service"}


def test_metrics_ports_are_the_settings_defaults():
    defaults = Settings(_env_file=None)
    assert (METRICS_PORTS["intake"], METRICS_PORTS["receiver"]) == (defaults.intake_metrics_port,
                                                                    defaults.receiver_metrics_port)
    assert not set(METRICS_PORTS.values()) & {DEFAULT_PORTS["intake"], DEFAULT_PORTS["receiver"]}


def test_prometheus_scrapes_the_metrics_ports():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        kind = job["job_name"].removeprefix("refunds-")
        ports = {int(t.rsplit(":", 1)[1]) for sc in job["static_configs"] for t in sc["targets"]}
        assert ports == {METRICS_PORTS[kind]}, job["job_name"]


def test_k8s_services_do_not_publish_metrics():
    pods = {d["metadata"]["name"]: _kind_of_deployment(d) for d in k8s_workloads()}
    for service in k8s_objects("Service"):
        kind = pods.get(service["metadata"]["name"])
        if kind in HTTP_SERVICES:
            assert {p["port"] for p in service["spec"]["ports"]} == {DEFAULT_PORTS[kind]}, kind
            assert {p.get("targetPort") for p in service["spec"]["ports"]} == {"http"}, kind


def test_http_services_have_a_descriptor_limit_well_above_the_connection_cap():
    cap = Settings(_env_file=None).http_max_connections
    for kind, name in HTTP_SERVICES.items():
        assert int(unit(name)["Service"]["LimitNOFILE"]) >= 2 * (cap + METRICS_CONNECTIONS), name
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for kind in HTTP_SERVICES:
        assert compose[kind]["ulimits"]["nofile"]["soft"] >= 2 * (cap + METRICS_CONNECTIONS), kind
    doc = DEPLOYMENT_DOC.read_text()
    assert "LimitNOFILE" in doc and "HTTP_MAX_CONNECTIONS" in doc and "nofile" in doc
