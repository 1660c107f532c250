"""The Kubernetes manifests: committed as generated, valid against the Kubernetes API
schema (the `kubernetes` package's models, strictly: no unknown field, required fields
present, types right), and wired together (selectors, probes, ports, token, metrics).
No cluster is reachable here: this is all the checking they get."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynemb.ensembles import MODELS
from dynemb.k8s import HPA_METRIC, K8sOptions, manifests, render

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MODELS_OF = {  # the kubernetes package's models: pydantic, extra fields forbidden
    ("apps/v1", "Deployment"): k8s.V1Deployment,
    ("v1", "Service"): k8s.V1Service,
    ("policy/v1", "PodDisruptionBudget"): k8s.V1PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.V2HorizontalPodAutoscaler,
    ("v1", "ConfigMap"): k8s.V1ConfigMap,
}


def schema_errors(doc: dict) -> list[str]:
    """What the Kubernetes API schema does not allow in `doc`: unknown fields, missing
    required ones, wrong types (strict: "3" is not an int)."""
    from pydantic import ValidationError

    model = MODELS_OF[doc["apiVersion"], doc["kind"]]
    try:
        model.model_validate(doc, strict=True)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


def documents() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(DEPLOY.glob("*.yaml"))}


def test_the_committed_manifests_are_the_generated_ones() -> None:
    expected = {name: render(m) for name, m in manifests().items()}
    committed = {p.name: p.read_text() for p in DEPLOY.glob("*.yaml")}
    assert committed == expected, "deploy/k8s is stale: run `dynemb k8s`"


@pytest.mark.parametrize("name", sorted(manifests()))
def test_each_manifest_fits_the_kubernetes_schema(name) -> None:
    assert schema_errors(documents()[name]) == []


def test_the_schema_check_can_fail() -> None:
    doc = manifests()["deployment.yaml"]
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    doc["spec"]["replicas"] = "3"
    del doc["spec"]["selector"]
    errors = schema_errors(doc)
    assert any("readinesProbe: Extra inputs are not permitted" in e for e in errors), errors
    assert any(e.startswith("spec.replicas:") for e in errors), errors
    assert any("spec.selector: Field required" in e for e in errors), errors


def test_the_pieces_fit_together() -> None:
    docs = documents()
    deployment, service = docs["deployment.yaml"], docs["service.yaml"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert docs["pdb.yaml"]["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["clusterIP"] == "None"  # headless: clients see every pod

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    args = container["args"]
    assert f"--http-port={ports['http']}" in args and f"--grpc-port={ports['grpc']}" in args
    assert [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")] == list(MODELS)
    assert "--strict-readiness=true" in args
    token = next(e for e in container["env"] if e["name"] == "DYNEMB_CONTROL_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == K8sOptions().control_secret
    assert any("$(DYNEMB_CONTROL_TOKEN)" in a for a in args if "restricted" in a)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    shm = next(v for v in container["volumeMounts"] if v["mountPath"] == "/dev/shm")
    assert any(v["name"] == shm["name"] and "emptyDir" in v for v in pod["volumes"])

    hpa = docs["hpa.yaml"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == HPA_METRIC
    rules = yaml.safe_load(docs["prometheus-adapter.yaml"]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == HPA_METRIC


def test_options_are_checked() -> None:
    with pytest.raises(ValueError):
        K8sOptions(replicas=1, min_replicas=2)
    # What `kubectl apply` would refuse (it wrote them: namespace "Bad NS", image "").
    bad_ones = ({"namespace": "Bad NS"}, {"name": "-x"}, {"name": "9dynemb"}, {"image": ""})
    for bad in (*bad_ones, {"image": "a b"}):
        with pytest.raises(ValueError, match=r"DNS label|image reference"):
            K8sOptions(**bad)
    with pytest.raises(ValueError, match="--replicas, --max-replicas"):
        K8sOptions(replicas=20, max_replicas=12)


def test_the_autoscaling_metric_counts_every_request_that_enters_a_pod() -> None:
    """Queue time of the models that queue over the requests clients send (user_interest,
    recommend, session): with user_interest alone below, recommend or session traffic
    divided by the 0.001 floor read as a thousandfold queue and pinned the HPA at its
    maximum on an idle pod."""
    rule = yaml.safe_load(manifests()["prometheus-adapter.yaml"]["data"]["config.yaml"])
    query = rule["rules"][0]["metricsQuery"]
    queued, entered = query.split(" / ")
    assert 'model!~"user_interest|recommend"' in queued
    assert 'model=~"user_interest|recommend|session"' in entered
