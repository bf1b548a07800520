"""Autoscaling on load: deploy/components/autoscale-hpa (an HPA on custom metrics served by
prometheus-adapter) and deploy/components/autoscale-keda (a KEDA ScaledObject).

Each component renders with each overlay (the real kustomize); the HPA validates against
the Kubernetes schemas (kubernetes-validate), the ScaledObject against KEDA's pinned CRD
(deploy/schemas/keda-*); the metric names the HPA asks for are the ones the adapter rules
make, and every daemon metric the rules and queries read is one a real daemon exposes.
"""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from deploy_helpers import OVERLAYS, by_kind, one, render, validate_crd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
HPA_COMPONENT = DEPLOY / "components" / "autoscale-hpa"
KEDA_COMPONENT = DEPLOY / "components" / "autoscale-keda"
KEDA_SCHEMA = ("keda-v2.20.2", "scaledobjects.json")


def with_component(tmp_path: Path, overlay: str, component: Path) -> list[dict]:
    work = tmp_path / f"{overlay}-{component.name}"
    work.mkdir()
    rel = os.path.relpath(DEPLOY, work)
    (work / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/overlays/{overlay}\n"
        f"components:\n  - {os.path.relpath(component, work)}\n"
    )
    return render(work)


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((HPA_COMPONENT / "prometheus-adapter-values.yaml").read_text())
    assert values["rules"]["default"] is False  # only our rules: no surprise metrics
    return values["rules"]["custom"]


def series_names(promql: str) -> set[str]:
    """The aotiserve_* series a PromQL expression or adapter query reads."""
    return set(re.findall(r"\b(aotiserve_[a-z_]+)\b", promql))


# ---------------------------------------------------------------------- HPA


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_component_scales_on_load_metrics(tmp_path, overlay):
    kv = pytest.importorskip("kubernetes_validate")
    docs = with_component(tmp_path, overlay, HPA_COMPONENT)
    hpa = one(docs, "HorizontalPodAutoscaler", "aotiserve")
    for version in ("1.29.0", kv.latest_version()):
        kv.validate(hpa, version, strict=True)
    deployment = one(docs, "Deployment", "aotiserve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB keeps one serving
    metrics = hpa["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}  # CPU no longer drives it
    made = {r["name"]["as"] for r in adapter_rules()}
    assert {m["pods"]["metric"]["name"] for m in metrics} == made
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_adapter_rules_are_per_pod_and_read_daemon_series():
    for rule in adapter_rules():
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        (series,) = series_names(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series)
        query = rule["metricsQuery"]
        assert "<<.LabelMatchers>>" in query and "by (<<.GroupBy>>)" in query
        assert series_names(query) <= DAEMON_SERIES


# ---------------------------------------------------------------------- KEDA


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_component_replaces_the_hpa(tmp_path, overlay):
    docs = with_component(tmp_path, overlay, KEDA_COMPONENT)
    assert by_kind(docs, "HorizontalPodAutoscaler") == []  # KEDA makes its own
    scaled = one(docs, "ScaledObject", "aotiserve")
    validate_crd(scaled, *KEDA_SCHEMA)
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == one(docs, "Deployment", "aotiserve")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 2
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"prometheus"}
    # A mean (queue time) scales by value/threshold; a total (in flight) per pod.
    kinds = {t["metricType"] for t in triggers}
    assert kinds == {"Value", "AverageValue"}
    for trigger in triggers:
        meta = trigger["metadata"]
        assert float(meta["threshold"]) > 0
        assert series_names(meta["query"]) <= DAEMON_SERIES
        assert meta["serverAddress"].startswith("http")


def test_keda_schema_refuses_a_bad_trigger(tmp_path):
    docs = with_component(tmp_path, "cpu", KEDA_COMPONENT)
    scaled = one(docs, "ScaledObject", "aotiserve")
    del scaled["spec"]["triggers"][0]["type"]  # required
    with pytest.raises(pytest.fail.Exception):
        validate_crd(scaled, *KEDA_SCHEMA)


# ------------------------------------------------- the series a daemon exposes

# What the rules and queries may read; test_the_daemon_exposes_every_series_the_scalers_read
# proves a real daemon exposes each of them.
DAEMON_SERIES = {
    "aotiserve_queue_seconds_sum",
    "aotiserve_queue_seconds_count",
    "aotiserve_model_in_flight_requests",
}


def test_the_daemon_exposes_every_series_the_scalers_read(server_factory, model_package):
    import numpy as np

    from aotiserve.client import Client

    srv = server_factory(["mlp"], metrics_port=0)
    client = Client(srv.target)
    client.model("mlp").run([np.zeros((2, 64), np.float32)])
    client.close()
    url = f"http://127.0.0.1:{srv.app.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    exposed = {
        line.split("{")[0].split()[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert exposed >= DAEMON_SERIES, DAEMON_SERIES - exposed
    assert re.search(r'^aotiserve_model_in_flight_requests\{model="mlp"\} 0', text, re.M)
    assert re.search(r'^aotiserve_queue_seconds_count\{[^}]*model="mlp"[^}]*\} [1-9]', text, re.M)
