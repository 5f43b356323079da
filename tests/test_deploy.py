"""Deployment artefacts, checked with the real tools: ``kubectl kustomize`` renders every
kustomization, every object validates against the Kubernetes schemas (kubernetes-validate),
policy holds over the rendered objects, the Triton flags are accepted by a real tritonserver,
the init container's script works, the Dockerfiles and the compose file say what they must.

Prometheus, alerts and the dashboard: tests/test_prometheus.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ServiceProcess, dependency_closure, dockerfile, final_stage, free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DEPLOY = ROOT / "deploy"
LIVENESS = K8S / "base" / "swc-service" / "liveness.py"

# Every kustomization in k8s/ (overlays are the deployable ones; base is rendered through them).
KUSTOMIZATIONS = {
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "import-upstream": K8S / "jobs" / "import-upstream",
    "prometheus-adapter": K8S / "monitoring" / "prometheus-adapter",
}
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes release the manifests target (native gRPC probes are GA since 1.27)
# and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", "latest")
# CRDs kubernetes-validate has no schema for: checked by hand below.
CRD_GROUPS = {"monitoring.coreos.com"}
# Secrets the manifests reference but that are created out of band (never committed).
EXTERNAL_SECRETS = {"swc-service-auth"}
# Volumes that are not stateful and never reach the node's filesystem.
ALLOWED_VOLUME_TYPES = {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected", "downwardAPI"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# Workloads that talk to the Kubernetes API (and so mount a token), each with its own account.
API_CLIENTS = {"custom-metrics-adapter": "custom-metrics-adapter"}
# What kube-prometheus' own adapter owns (resource metrics behind metrics.k8s.io): never replaced.
KUBE_PROMETHEUS_ADAPTER = {("ConfigMap", "adapter-config"), ("Deployment", "prometheus-adapter"),
                           ("APIService", "v1beta1.metrics.k8s.io")}  # fmt: skip


# --------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not on PATH: the manifests are rendered with `kubectl kustomize`")
    return exe


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {KUSTOMIZATIONS[name]} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"{name} rendered nothing"
    return docs


def objects(name: str, kind: str) -> list[dict]:
    return [d for d in render(name) if d["kind"] == kind]


def one(name: str, kind: str, obj_name: str) -> dict:
    found = [d for d in objects(name, kind) if d["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{name}: expected one {kind} {obj_name}, found {len(found)}"
    return found[0]


def configmap(name: str, prefix: str) -> dict:
    """A generated ConfigMap (kustomize appends a content hash to its name)."""
    found = [
        d
        for d in objects(name, "ConfigMap")
        if re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"{name}: expected one ConfigMap {prefix}-<hash>, found {len(found)}"
    return found[0]


def pod_specs(name: str) -> list[tuple[dict, dict]]:
    """(workload, pod spec) for every object that has a pod template."""
    out = []
    for d in render(name):
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((d, d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def all_containers(spec: dict) -> list[tuple[str, dict]]:
    return [("init", c) for c in spec.get("initContainers", [])] + [("main", c) for c in spec["containers"]]


def labels_match(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _render_module():
    spec = importlib.util.spec_from_file_location("visloc_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- generated files


def test_rendered_files_are_fresh():
    """k8s/ copies of the Triton config, alerts and dashboard match their one source each."""
    render_py = _render_module()
    stale = render_py.stale()
    assert not stale, f"stale: {[str(p.relative_to(ROOT)) for p in stale]}; run: python deploy/render.py"


def test_dev_triton_config_is_the_production_config_on_cpu():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from swc_service import bundle as B

    prod = text_format.Parse(configmap("prod", "triton-model-config")["data"]["config.pbtxt"], mc.ModelConfig())
    dev = text_format.Parse(configmap("dev", "triton-model-config")["data"]["config.pbtxt"], mc.ModelConfig())
    assert prod.backend == dev.backend == "onnxruntime"
    assert [g.kind for g in prod.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert [g.kind for g in dev.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert not dev.HasField("optimization") and not dev.parameters  # GPU-only knobs gone
    # Same tensors, batching and warmup; only cell_probs' M differs (dev: the demo bundle's).
    assert [i.name for i in dev.input] == [i.name for i in prod.input] == [B.INPUT_NAME]
    assert [o.name for o in dev.output] == [o.name for o in prod.output]
    assert dev.max_batch_size == prod.max_batch_size
    assert dev.dynamic_batching == prod.dynamic_batching
    assert list(dev.model_warmup) == list(prod.model_warmup)
    probs = {o.name: list(o.dims) for o in dev.output}[B.OUTPUT_PROBS]
    assert probs == [_render_module().DEV_CELLS]
    # ... and the dev Job builds a demo bundle of exactly that many cells.
    job = one("dev", "Job", "visloc-bundle-demo")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"--cells {probs[0]}" in script


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_object_validates_against_the_kubernetes_schemas(name):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = [latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    checked = 0
    for doc in render(name):
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group in CRD_GROUPS:
            continue  # test_prometheus_operator_objects
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")
        checked += 1
    assert checked


def test_prometheus_operator_objects():
    """ServiceMonitor/PodMonitor/PrometheusRule have what the CRDs require, and point at real ports."""
    for name in OVERLAYS:
        docs = render(name)
        crds = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
        assert {d["kind"] for d in crds} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
        for d in crds:
            assert d["metadata"].get("name") and d["metadata"].get("namespace"), d["metadata"]
            assert isinstance(d.get("spec"), dict)
        for sm in objects(name, "ServiceMonitor"):
            spec = sm["spec"]
            assert spec["selector"].get("matchLabels"), "ServiceMonitor.spec.selector is required"
            assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
            services = [s for s in objects(name, "Service") if labels_match(spec["selector"], s["metadata"]["labels"])]
            assert services, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
            for ep in spec["endpoints"]:
                assert any(ep["port"] == p.get("name") for s in services for p in s["spec"]["ports"]), ep
                assert re.fullmatch(r"\d+[smh]", ep["interval"])
        for pm in objects(name, "PodMonitor"):
            spec = pm["spec"]
            assert spec["selector"].get("matchLabels"), "PodMonitor.spec.selector is required"
            assert spec["podMetricsEndpoints"]
            pods = [
                s
                for w, s in pod_specs(name)
                if labels_match(spec["selector"], w["spec"]["template"]["metadata"]["labels"])
            ]
            assert pods, f"PodMonitor {pm['metadata']['name']} selects no pods"
            for ep in spec["podMetricsEndpoints"]:
                assert any(
                    ep["port"] == p.get("name") for s in pods for c in s["containers"] for p in c.get("ports", [])
                )
        rule = one(name, "PrometheusRule", "visloc")
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for r in group["rules"]:
                assert ("alert" in r) != ("record" in r) and r["expr"], r
        alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        assert rule["spec"]["groups"] == alerts["groups"]
    # Job names match deploy/prometheus/prometheus.yml, which the alerts and dashboard assume.
    scrape_jobs = {
        j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    }
    for kind in ("ServiceMonitor", "PodMonitor"):
        for m in objects("prod", kind):
            label = m["spec"]["jobLabel"]
            targets = [
                w["spec"]["template"]["metadata"]["labels"].get(label) for w, _ in pod_specs("prod")
                if labels_match(m["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            ]  # fmt: skip
            assert targets and set(targets) <= scrape_jobs, (kind, targets)


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_container_is_bounded_and_unprivileged(name):
    """Requests and limits, non-root, read-only root, no privilege escalation, no capabilities,
    RuntimeDefault seccomp, no host namespaces or host paths, pinned images (restricted PSS)."""
    for workload, spec in pod_specs(name):
        where = f"{name}: {workload['kind']}/{workload['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        account = API_CLIENTS.get(workload["metadata"]["name"])
        if account is None:
            assert spec.get("automountServiceAccountToken") is False, f"{where}: no API access needed"
        else:
            assert spec.get("serviceAccountName") == account, f"{where}: API access under its own account"
        for vol in spec.get("volumes", []):
            assert set(vol) - {"name"} <= ALLOWED_VOLUME_TYPES, f"{where}: volume {vol}"
        for role, c in all_containers(spec):
            here = f"{where} {role} container {c['name']}"
            res = c.get("resources", {})
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(key, {})), f"{here}: resources.{key} cpu and memory"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{here}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, here
            assert sc.get("allowPrivilegeEscalation") is False, f"{here}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{here}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{here}: drop ALL capabilities"
            assert not sc.get("privileged"), here
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{here}: pin {image}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_long_running_containers_have_probes(name):
    for workload, spec in pod_specs(name):
        if workload["kind"] == "Job":
            continue
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{name}: {workload['metadata']['name']}/{c['name']} has no {probe}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_triton_probes_ports_and_gpu(name):
    triton = one(name, "Deployment", "triton")
    spec = triton["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == TRITON_IMAGE
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    gpu = {k: c["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")}
    if name == "prod":
        assert gpu == {"requests": "1", "limits": "1"}
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert gpu == {"requests": None, "limits": None} and "tolerations" not in spec
    # The model repository: an emptyDir filled by the init container, read-only for Triton.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/models"]["name"]]
    assert volumes["bundle"]["persistentVolumeClaim"]["readOnly"] is True


def _trt_cache_path() -> str:
    """trt_engine_cache_path of config.pbtxt's TensorRT opt-in block, uncommented and parsed."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    text = (ROOT / "model_repository" / "visloc" / "config.pbtxt").read_text()
    block = text.split("# BEGIN tensorrt\n", 1)[1].split("# END tensorrt", 1)[0]
    cfg = text_format.Parse("\n".join(line.removeprefix("# ") for line in block.splitlines()), mc.ModelConfig())
    (accelerator,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["trt_engine_cache_enable"] == "true"
    return accelerator.parameters["trt_engine_cache_path"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_tensorrt_cache_is_on_a_writable_volume(name):
    """The TensorRT opt-in's engine cache lies on a writable volume of the Triton container, not
    under the read-only model repository (k8s and compose)."""
    cache = Path(_trt_cache_path())
    spec = one(name, "Deployment", "triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    covering = [m for m in c["volumeMounts"] if cache.is_relative_to(m["mountPath"])]
    assert covering, f"{cache} is on no volume of the Triton container (the root filesystem is read-only)"
    deepest = max(covering, key=lambda m: len(m["mountPath"]))
    assert not deepest.get("readOnly"), f"{cache} is under the read-only mount {deepest['mountPath']}"
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[deepest["name"]])
    assert not cache.is_relative_to("/models")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["triton"]["volumes"]
    writable = [v.split(":")[1] for v in compose if not v.endswith(":ro")]
    assert any(cache.is_relative_to(m) for m in writable), compose


@pytest.mark.parametrize("name", OVERLAYS)
def test_triton_drains_before_it_stops(name):
    """preStop keeps Triton serving while its endpoint leaves DNS and the service pools; then
    SIGTERM drains for --exit-timeout-secs; the grace period covers both."""
    spec = one(name, "Deployment", "triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    assert pre_stop_s >= 10  # DNS TTL of a headless answer (~5 s) and the pool's re-resolution
    (exit_timeout,) = [int(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--exit-timeout-secs=")]
    assert pre_stop_s + exit_timeout < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_swc_service_probes_settings_and_bundle(name):
    from swc_service.config import Settings, load_settings

    swc = one(name, "Deployment", "swc-service")
    spec = swc["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    settings_cm = configmap(name, "visloc-settings")
    bundle_cm = configmap(name, "visloc-bundle-settings")
    assert c["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}} for cm in (bundle_cm, settings_cm)]
    assert set(bundle_cm["data"]) == {"VISLOC_BUNDLE"} and not set(bundle_cm["data"]) & set(settings_cm["data"])
    data = {**bundle_cm["data"], **settings_cm["data"]}
    fields = {"VISLOC_" + f.upper() for f in Settings.__dataclass_fields__}
    otel = {k: v for k, v in data.items() if k.startswith("OTEL_")}  # tracing: the standard variables
    assert set(data) - set(otel) <= fields, f"not service settings: {set(data) - fields - set(otel)}"
    from visloc_client.tracing import check

    assert check(otel) == ("otlp" if otel else None)  # the service would start with them
    s = load_settings([], env=data)  # the settings parse and validate as the service would
    assert s.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": s.port, "metrics": s.metrics_port, "grpc-health": s.health_port}
    # Native gRPC health (Triton-aware) on the plaintext health-only port: works with in-pod TLS.
    assert s.health_port and c["readinessProbe"]["grpc"] == {"port": s.health_port}
    # Liveness: the exec probe that asks every worker's loop (test_liveness_probe_*), from the
    # ConfigMap rendered from k8s/base/swc-service/liveness.py, mounted where the command says.
    assert c["livenessProbe"]["exec"]["command"] == ["python", "/probes/liveness.py"]
    assert c["livenessProbe"]["timeoutSeconds"] > 2  # liveness.py's own per-answer timeout
    probes_cm = configmap(name, "swc-service-probes")
    assert probes_cm["data"]["liveness.py"] == LIVENESS.read_text()
    probe_mount = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/probes"]
    assert {v["name"]: v for v in spec["volumes"]}[probe_mount]["configMap"]["name"] == probes_cm["metadata"]["name"]
    # Resources fit the workers; the bundle is read-only; /tmp is writable (root fs is not).
    cpu = c["resources"]["requests"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert s.workers <= max(1, cores)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/bundle"].get("readOnly") is True and "/tmp" in mounts
    assert s.bundle.startswith("/bundle/")
    if s.auth_token_file:
        assert any(s.auth_token_file.startswith(m.rstrip("/") + "/") for m in mounts)
    # Triton's init container copies the model of the SAME bundle: same ConfigMap, same key.
    init = one(name, "Deployment", "triton")["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e for e in init["env"]}
    assert env["VISLOC_BUNDLE"]["valueFrom"]["configMapKeyRef"] == {
        "name": bundle_cm["metadata"]["name"],
        "key": "VISLOC_BUNDLE",
    }


@pytest.mark.parametrize("name", OVERLAYS)
def test_triton_does_not_read_the_service_settings(name):
    """A change of a service setting rolls the Locate pods only: the Triton pod template refers to
    no ConfigMap the service's settings live in (the one it shares holds only the bundle)."""
    settings = configmap(name, "visloc-settings")["metadata"]["name"]
    spec = one(name, "Deployment", "triton")["spec"]["template"]["spec"]
    text = json.dumps(spec)
    assert settings not in text
    shared = {cm["metadata"]["name"] for cm in objects(name, "ConfigMap") if cm["metadata"]["name"] in text}
    for cm in objects(name, "ConfigMap"):
        if cm["metadata"]["name"] in shared and cm["metadata"]["name"].startswith("visloc-"):
            assert set(cm["data"]) == {"VISLOC_BUNDLE"}, cm["metadata"]["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_and_network_policy(name):
    """Nothing is exposed outside the cluster; only swc-service (and Prometheus, for metrics)
    reaches Triton; Locate clients get a headless Service for client-side round_robin."""
    workloads = {w["metadata"]["name"]: w for w, _ in pod_specs(name)}
    for svc in objects(name, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{svc['metadata']['name']} exposed"
        selected = [
            w
            for w in workloads.values()
            if labels_match(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        port_names = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, (svc["metadata"]["name"], p)
    assert one(name, "Service", "swc-service")["spec"]["clusterIP"] == "None"
    # Triton: only the headless Service (the service balances batches over its pods itself; a
    # ClusterIP would pin each worker's connection to one pod).
    triton_services = [
        s for s in objects(name, "Service")
        if labels_match(s["spec"]["selector"], workloads["triton"]["spec"]["template"]["metadata"]["labels"])
    ]  # fmt: skip
    assert [s["metadata"]["name"] for s in triton_services] == ["triton-headless"]
    (triton_svc,) = triton_services
    assert triton_svc["spec"]["clusterIP"] == "None" and not triton_svc["spec"].get("publishNotReadyAddresses")
    assert {p["name"]: p["port"] for p in triton_svc["spec"]["ports"]} == {"grpc": 8001}

    triton_labels = workloads["triton"]["spec"]["template"]["metadata"]["labels"]
    swc_labels = workloads["swc-service"]["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in objects(name, "NetworkPolicy") if labels_match(p["spec"]["podSelector"], triton_labels)]
    assert len(policies) == 1, "exactly one NetworkPolicy selects the Triton pods"
    (policy,) = policies
    assert "Ingress" in policy["spec"]["policyTypes"]
    reachable = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` opens Triton to everyone"
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                who = "prometheus"
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
            else:
                who = "swc-service"
                assert labels_match(peer["podSelector"], swc_labels), peer
            assert "ipBlock" not in peer
            reachable.setdefault(who, set()).update(p["port"] for p in rule["ports"])
    assert reachable == {"swc-service": {"grpc"}, "prometheus": {"metrics"}}
    # swc-service's probed health port is admitted exactly like its grpc port (probes come from
    # the node, which the grpc port's rule admits).
    admitted: dict[str, list] = {}
    for policy in objects(name, "NetworkPolicy"):
        if labels_match(policy["spec"]["podSelector"], swc_labels):
            for rule in policy["spec"]["ingress"]:
                for p in rule.get("ports", []):
                    admitted.setdefault(p["port"], []).append(rule.get("from"))
    assert admitted["grpc-health"] == admitted["grpc"] == [None]
    # The service talks to every Triton pod: the headless Service's name in this namespace, on
    # its grpc port.
    settings = configmap(name, "visloc-settings")["data"]
    namespace = triton_svc["metadata"]["namespace"]
    assert settings["VISLOC_TRITON_URL"] == f"dns:///triton-headless.{namespace}.svc.cluster.local:8001"


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaling_disruption_and_references(name):
    docs = render(name)
    by_kind_name = {(d["kind"], d["metadata"]["name"]) for d in docs}
    hpas = objects(name, "HorizontalPodAutoscaler")
    assert {h["metadata"]["name"] for h in hpas} >= {"swc-service"}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in by_kind_name, f"HPA {hpa['metadata']['name']} targets nothing"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        target = one(name, ref["kind"], ref["name"])
        for c in target["spec"]["template"]["spec"]["containers"]:
            for m in hpa["spec"]["metrics"]:
                if m["type"] == "Resource":  # utilisation needs requests
                    assert m["resource"]["name"] in c["resources"]["requests"]
    if name == "prod":
        triton_hpa = one(name, "HorizontalPodAutoscaler", "triton")
        (metric,) = triton_hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter" / "config.yaml").read_text())["rules"]
        assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in rules}
    for pdb in objects(name, "PodDisruptionBudget"):
        assert any(
            labels_match(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            for w, _ in pod_specs(name)
        )
    for w, spec in pod_specs(name):
        refs = []
        for _, c in all_containers(spec):
            refs += [("ConfigMap", e["configMapRef"]["name"]) for e in c.get("envFrom", []) if "configMapRef" in e]
            refs += [
                ("ConfigMap", e["valueFrom"]["configMapKeyRef"]["name"])
                for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})
            ]  # fmt: skip
        for v in spec.get("volumes", []):
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "persistentVolumeClaim" in v:
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
            if "secret" in v:
                assert v["secret"]["secretName"] in EXTERNAL_SECRETS
        for ref in refs:
            assert ref in by_kind_name, f"{w['metadata']['name']} refers to a missing {ref}"
    (ns,) = objects(name, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") == ns["metadata"]["name"] for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("name", OVERLAYS)
def test_hpa_owned_deployments_set_no_replicas(name):
    """`kubectl apply -k` would reset a scaled Deployment to its `replicas` (8 GPU pods back to 2):
    where an HPA owns the count, the rendered Deployment must not carry one."""
    owned = set()
    for hpa in objects(name, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = one(name, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], f"{name}: {ref['kind']}/{ref['name']} is scaled by an HPA"
        owned.add(ref["name"])
    assert {"swc-service", "triton"} & owned == ({"swc-service", "triton"} if name == "prod" else {"swc-service"})


@pytest.mark.parametrize("name", OVERLAYS)
def test_disruption_budgets_let_unhealthy_pods_go(name):
    """NotReady pods (every Locate pod while Triton is down) must not stall drains and scale-downs."""
    pdbs = objects(name, "PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} >= {"swc-service", "triton"}
    for pdb in pdbs:
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", pdb["metadata"]["name"]


def test_prometheus_adapter_serves_custom_metrics_beside_kube_prometheus():
    """The adapter manifests touch nothing of kube-prometheus' adapter (adapter-config, its
    Deployment, v1beta1.metrics.k8s.io) and register their own custom.metrics.k8s.io APIService,
    served by their own Deployment with the rule the Triton HPA reads."""
    docs = render("prometheus-adapter")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not names & KUBE_PROMETHEUS_ADAPTER, names & KUBE_PROMETHEUS_ADAPTER
    (api,) = objects("prometheus-adapter", "APIService")
    assert (api["spec"]["group"], api["spec"]["version"]) == ("custom.metrics.k8s.io", "v1beta1")
    assert api["metadata"]["name"] == "v1beta1.custom.metrics.k8s.io"
    ref = api["spec"]["service"]
    svc = one("prometheus-adapter", "Service", ref["name"])
    assert svc["metadata"]["namespace"] == ref["namespace"]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
    (deployment,) = objects("prometheus-adapter", "Deployment")
    pod = deployment["spec"]["template"]
    assert labels_match(svc["spec"]["selector"], pod["metadata"]["labels"])
    (c,) = pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    args = dict(a.lstrip("-").split("=", 1) for a in c["args"])
    assert int(args["secure-port"]) == next(p["containerPort"] for p in c["ports"] if p["name"] == port["targetPort"])
    # --config names a file of the generated ConfigMap, mounted where the flag says.
    config_dir, config_file = args["config"].rsplit("/", 1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == config_dir)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    (cm,) = objects("prometheus-adapter", "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and cm["metadata"]["namespace"] == "monitoring"
    adapter_config = yaml.safe_load(cm["data"][config_file])
    assert set(adapter_config) == {"rules"}, "custom rules only: resource metrics stay where they are"
    hpa_metric = one("prod", "HorizontalPodAutoscaler", "triton")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric in {r["name"]["as"] for r in adapter_config["rules"]}
    # Its own account, bound to what an aggregated API server needs, plus the HPA controller's read.
    account = pod["spec"]["serviceAccountName"]
    assert ("ServiceAccount", account) in names
    bound = {
        (b["roleRef"]["name"], b["metadata"].get("namespace"))
        for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["name"] == account and s["namespace"] == "monitoring" for s in b["subjects"])
    }  # fmt: skip
    assert ("system:auth-delegator", None) in bound
    assert ("extension-apiserver-authentication-reader", "kube-system") in bound
    hpa_reads = [
        b for b in objects("prometheus-adapter", "ClusterRoleBinding")
        if {"name": "horizontal-pod-autoscaler", "namespace": "kube-system", "kind": "ServiceAccount"} in b["subjects"]
    ]  # fmt: skip
    (role,) = [one("prometheus-adapter", "ClusterRole", b["roleRef"]["name"]) for b in hpa_reads]
    assert role["rules"][0]["apiGroups"] == ["custom.metrics.k8s.io"]
    for d in docs:  # namespaced objects in monitoring, except the one binding kube-system requires
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "APIService"):
            assert "namespace" not in d["metadata"]
        elif d["kind"] == "RoleBinding":
            assert d["metadata"]["namespace"] == "kube-system"
        else:
            assert d["metadata"]["namespace"] == "monitoring", d["metadata"]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_images_can_be_pinned_by_digest(name, tmp_path):
    """Every image reaches the rendered pods through kustomize's `images:` names, so the digests
    documented in docs/deploy.md (`kustomize edit set image NAME@sha256:...`) replace every tag:
    layer a kustomization with a digest for each image name on top and render it."""
    images = sorted({c["image"].split("@")[0].rsplit(":", 1)[0] for _, s in pod_specs(name)
                     for _, c in all_containers(s)})  # fmt: skip
    digests = {image: "sha256:" + hashlib.sha256(image.encode()).hexdigest() for image in images}
    layer = tmp_path / "pinned"
    layer.mkdir()
    (layer / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZATIONS[name], layer)],
        "images": [{"name": image, "digest": digest} for image, digest in digests.items()],
    }))  # fmt: skip
    out = subprocess.run([_kubectl(), "kustomize", str(layer)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pinned = [c["image"] for d in yaml.safe_load_all(out.stdout) if d and "template" in d.get("spec", {})
              for _, c in all_containers(d["spec"]["template"]["spec"])]  # fmt: skip
    assert pinned and all(image == f"{image.split('@')[0]}@{digests[image.split('@')[0]]}" for image in pinned), pinned
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "kustomize edit set image" in doc and "@sha256:" in doc


def test_bundle_volume_is_written_by_jobs_only():
    for name in ("dev", "prod", "import-upstream"):
        for w, spec in pod_specs(name):
            for v in spec.get("volumes", []):
                if v.get("persistentVolumeClaim", {}).get("claimName") != "visloc-bundle":
                    continue
                if w["kind"] == "Job":
                    continue
                assert v["persistentVolumeClaim"].get("readOnly") is True, w["metadata"]["name"]
    assert one("prod", "PersistentVolumeClaim", "visloc-bundle")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one("dev", "PersistentVolumeClaim", "visloc-bundle")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_prometheus_adapter_config_and_helm_values_agree():
    config = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter" / "config.yaml").read_text())
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter" / "values.yaml").read_text())
    assert config["rules"] == values["rules"]["custom"]
    (cm,) = objects("prometheus-adapter", "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert yaml.safe_load(cm["data"]["config.yaml"]) == config
    (rule,) = config["rules"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]


# --------------------------------------------------------------------------- liveness


def _liveness(env: dict[str, str]) -> subprocess.CompletedProcess:
    """liveness.py as the kubelet runs it (with this Python), in the pod's VISLOC_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VISLOC_")}
    return subprocess.run([sys.executable, str(LIVENESS)], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_liveness_probe_fails_for_a_hung_worker_only(demo_bundle):
    """Two workers sharing the health port, Triton down (NOT_SERVING: alive, no restart); one
    worker stopped (SIGSTOP: its loop runs no more, the kernel still accepts its connections, as
    for a hung event loop): the probe fails; resumed: it passes again. No listener: it fails."""
    svc = ServiceProcess(demo_bundle, f"127.0.0.1:{free_port()}", "--workers", "2", "--health-port",
                         str(health := free_port()))  # fmt: skip
    env = {"VISLOC_HEALTH_PORT": str(health), "VISLOC_WORKERS": "2"}
    stopped = None
    try:
        deadline = time.monotonic() + 60
        while "health: NOT_SERVING" not in svc.log_text() or len(_children(svc.proc.pid)) != 2:
            assert svc.proc.poll() is None and time.monotonic() < deadline, svc.log_text()
            time.sleep(0.1)
        while (alive := _liveness(env)).returncode != 0:  # both workers bound the port
            assert time.monotonic() < deadline, alive.stderr
            time.sleep(0.2)
        stopped = _children(svc.proc.pid)[0]
        os.kill(stopped, signal.SIGSTOP)
        hung = _liveness(env)
        assert hung.returncode == 1 and "DEADLINE_EXCEEDED" in hung.stderr, hung.stderr
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        assert _liveness(env).returncode == 0
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        svc.stop()
    gone = _liveness(env)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


# --------------------------------------------------------------------------- Triton flags


def _tritonserver():
    from devtools import triton_local

    try:
        exe = triton_local._wheel_dir() / "tritonserver" / "bin" / "tritonserver"
    except triton_local.TritonError as exc:
        pytest.skip(str(exc))
    return exe, triton_local._server_env()


def test_triton_flags_are_accepted_by_tritonserver(tmp_path):
    """The args of the k8s Deployment (= compose's command) start a real tritonserver 2.51
    (the PyPI build of the NGC image's release): no typo'd or removed flag."""
    (c,) = one("prod", "Deployment", "triton")["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["triton"]
    assert compose["command"] == c["command"] + c["args"], "compose and k8s run Triton with the same flags"
    assert compose["image"] == c["image"]

    exe, env = _tritonserver()
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    override = {
        "--model-repository": str(tmp_path / "models"),  # empty: the flags are what is tested
        "--http-port": str(ports["http"]),
        "--grpc-port": str(ports["grpc"]),
        "--metrics-port": str(ports["metrics"]),
    }
    args = []
    for arg in c["args"]:
        key = arg.split("=", 1)[0]
        args.append(f"{key}={override[key]}" if key in override else arg)
    args += ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]
    args += [f"--backend-directory={tmp_path / 'backends'}"]
    (tmp_path / "models").mkdir()
    (tmp_path / "backends").mkdir()
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(exe), *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"tritonserver rejected the flags:\n{log.read_text()[-3000:]}"
            url = f"http://127.0.0.1:{ports['http']}/v2/health/live"
            with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# --------------------------------------------------------------------------- the init container


@pytest.mark.parametrize("name", OVERLAYS)
def test_prepare_model_repository(name, tmp_path):
    """The init container's script (as rendered into its ConfigMap) builds the repository from the
    rendered config and a bundle (version directory: the bundle's Triton version, the one the
    service asks for; extra bundles as more versions), and refuses a bundle whose M differs, whose
    manifest has no model sha256, or that never arrives."""
    import hashlib

    from swc_service.bundle import triton_version

    script = tmp_path / "prepare.sh"
    script.write_text(configmap(name, "triton-model-init")["data"]["prepare-model-repository.sh"])
    config = tmp_path / "config.pbtxt"
    config.write_text(configmap(name, "triton-model-config")["data"]["config.pbtxt"])
    cells = 2000 if name == "dev" else 31145

    def bundle(path: Path, m: int, model: bytes = b"onnx" * 10, sha: bool = True) -> Path:
        path.mkdir()
        files = {"model.onnx": {"sha256": hashlib.sha256(model).hexdigest(), "bytes": len(model)}} if sha else {}
        manifest = {"format": "visloc-bundle", "num_cells": m, "num_background": 10, "files": files}
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (path / "model.onnx").write_bytes(model)
        return path

    def run(bundle_dir: Path, repo: Path, wait_s: int = 0, extra: str = ""):
        env = dict(os.environ, VISLOC_BUNDLE=str(bundle_dir), MODEL_CONFIG=str(config), MODEL_REPOSITORY=str(repo))
        env["BUNDLE_WAIT_S"] = str(wait_s)
        env["VISLOC_EXTRA_BUNDLES"] = extra
        return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)

    def version(model: bytes) -> str:
        return triton_version(hashlib.sha256(model).hexdigest())

    good = run(bundle(tmp_path / "good", cells), tmp_path / "repo")
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "repo" / "visloc" / "config.pbtxt").read_text() == config.read_text()
    assert (tmp_path / "repo" / "visloc" / version(b"onnx" * 10) / "model.onnx").read_bytes() == b"onnx" * 10
    assert not list((tmp_path / "repo").rglob("*.tmp"))

    nxt = bundle(tmp_path / "next", cells, model=b"next" * 10)
    both = run(tmp_path / "good", tmp_path / "repo4", extra=str(nxt))
    assert both.returncode == 0, both.stderr
    dirs = sorted(p.name for p in (tmp_path / "repo4" / "visloc").iterdir() if p.is_dir())
    assert dirs == sorted([version(b"onnx" * 10), version(b"next" * 10)])

    unhashed = run(bundle(tmp_path / "unhashed", cells, sha=False), tmp_path / "repo5")
    assert unhashed.returncode == 1 and "no sha256 of model.onnx" in unhashed.stderr

    wrong = run(bundle(tmp_path / "wrong", cells + 1), tmp_path / "repo2")
    assert wrong.returncode == 1 and f"M={cells + 1}" in wrong.stderr
    assert not (tmp_path / "repo2" / "visloc").exists()

    missing = run(tmp_path / "absent", tmp_path / "repo3")
    assert missing.returncode == 1 and "no bundle" in missing.stderr


# --------------------------------------------------------------------------- containers


def test_service_dockerfile():
    ins = dockerfile("service.Dockerfile")
    final = final_stage(ins)
    ops = [op for op, _ in final]
    (user,) = [a for op, a in final if op == "USER"]
    assert user.split(":")[0] == "10001"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op in ("RUN", "COPY"))  # nothing runs as root after
    assert any(op == "HEALTHCHECK" and "grpc_health" in a for op, a in final)
    (expose,) = [a.split() for op, a in final if op == "EXPOSE"]
    assert expose == ["50051", "9090"]
    (entry,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    assert entry == ["swc-service"]
    env = " ".join(a for op, a in final if op == "ENV")
    assert "VISLOC_HOST=0.0.0.0" in env and "VISLOC_BUNDLE=/bundle" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    froms = [a.split()[0] for op, a in ins if op == "FROM"]
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert {f.replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"]) for f in froms} == {"python:3.11-slim-bookworm"}
    text = (DEPLOY / "service.Dockerfile").read_text()
    installs = " ".join(a for op, a in ins if op == "RUN")
    for banned in ("torch", "[triton]", "pytriton", "onnxruntime ", "tritonserver"):
        assert banned not in installs.replace("('torch', 'pytriton', 'onnxruntime')", ""), banned
    assert "http://" not in text and "https://" not in text
    ignore = (DEPLOY / "service.Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"] and "!export/src/**" not in ignore  # no exporter, no torch
    _check_extension_build(ins, ignore)


def _check_extension_build(ins: list[tuple[str, str]], ignore: list[str]) -> None:
    """swc_service compiles its kernels: setup.py in the context, a compiler in the build stage
    only, and no shared object from a developer's checkout copied in."""
    assert "!swc_service/setup.py" in ignore and "**/*.so" in ignore
    build_runs = " ".join(a for op, a in ins[: len(ins) - len(final_stage(ins))] if op == "RUN")
    assert "gcc" in build_runs
    assert not any("gcc" in a for op, a in final_stage(ins) if op == "RUN")


def test_service_image_dependencies_have_no_torch():
    """What `pip install ./client ./swc_service` pulls in (the image's install, no extras),
    walked through the installed distributions' metadata: no torch, no Triton server, no onnxruntime."""

    seen = dependency_closure("visloc-swc-service", "visloc-client")
    assert {"grpcio", "numpy", "pillow", "tritonclient", "prometheus-client"} <= seen
    banned = {d for d in seen if d in {"torch", "nvidia-pytriton", "onnxruntime", "onnx"} or d.startswith("nvidia-")}
    assert not banned, f"the service image would install {banned}"


def test_service_healthcheck_command(live_service):
    """The image's HEALTHCHECK command, run as is (with this Python): 0 when SERVING, 1 when not."""
    (hc,) = [a for op, a in final_stage(dockerfile("service.Dockerfile")) if op == "HEALTHCHECK"]
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    cmd[0] = sys.executable
    port, dead = live_service.target.rsplit(":", 1)[1], str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISLOC_")}

    def check(**ports: str) -> int:
        return subprocess.run(cmd, env=dict(env, **ports), capture_output=True, timeout=30).returncode

    assert check(VISLOC_PORT=port) == 0
    assert check(VISLOC_PORT=dead) != 0
    # With a health port set, that port is the one asked (plaintext, whatever the main port speaks).
    assert check(VISLOC_PORT=dead, VISLOC_HEALTH_PORT=port) == 0
    assert check(VISLOC_PORT=port, VISLOC_HEALTH_PORT=dead) != 0
    assert check(VISLOC_PORT=port, VISLOC_HEALTH_PORT="0") == 0


def test_exporter_dockerfile():
    ins = dockerfile("exporter.Dockerfile")
    final = final_stage(ins)
    (user,) = [a for op, a in final if op == "USER"]
    assert user.split(":")[0] == "10001"
    installs = " ".join(a for op, a in ins if op == "RUN")
    assert '"torch==2.13.0"' in installs  # the version the parity tests run
    assert "[triton]" not in installs
    (entry,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    assert entry == ["visloc-export"]
    text = (DEPLOY / "exporter.Dockerfile").read_text()
    assert "http://" not in text and "https://" not in text
    _check_extension_build(ins, (DEPLOY / "exporter.Dockerfile.dockerignore").read_text().split())


# --------------------------------------------------------------------------- compose


def test_compose_file():
    from swc_service.config import Settings

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"triton", "swc-service", "prometheus", "grafana", "jaeger"}
    triton, swc = services["triton"], services["swc-service"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "ports" not in triton, "Triton is reached over the internal network only"
    assert triton["volumes"][0].endswith(":/models:ro")
    assert compose["networks"][triton["networks"][0]]["internal"] is True
    assert set(triton["networks"]) == {"inference"}
    for name, svc in services.items():
        if "inference" in svc.get("networks", []):
            assert name in {"triton", "swc-service", "prometheus", "jaeger"}
    assert swc["read_only"] is True and swc["user"].split(":")[0] == "10001"
    assert swc["build"] == {"context": "..", "dockerfile": "deploy/service.Dockerfile"}
    assert swc["depends_on"]["triton"]["condition"] == "service_healthy"
    fields = {"VISLOC_" + f.upper() for f in Settings.__dataclass_fields__}
    assert {k for k in swc["environment"] if not k.startswith("OTEL_")} <= fields
    # Traces: the service to Jaeger over OTLP/gRPC, Triton over OTLP/HTTP (its only exporter).
    assert swc["environment"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://jaeger:4317"
    assert triton["environment"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://jaeger:4318/v1/traces"
    assert "--trace-config=mode=opentelemetry" in triton["command"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    assert swc["environment"]["VISLOC_TRITON_URL"] == "triton:8001"
    assert any(v.endswith(":/bundle:ro") for v in swc["volumes"])
    for name in ("prometheus", "grafana", "jaeger"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), f"{name} on loopback only"
    # Mounted host paths exist in the repository.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), vol
            elif src.startswith("${"):
                default = re.search(r":-([^}]+)}", src)
                assert default is None or (DEPLOY / default.group(1)).exists(), vol
    prom_cmd = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "visloc.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana" / "dashboards" / "visloc.json").is_file()
    # Exemplars link the latency panels to the trace backend's data source.
    (jaeger,) = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "jaeger.yml").read_text())[
        "datasources"
    ]
    assert jaeger["type"] == "jaeger" and jaeger["url"] == "http://jaeger:16686"
    assert source["jsonData"]["exemplarTraceIdDestinations"] == [{"name": "trace_id", "datasourceUid": jaeger["uid"]}]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "visloc.json").read_text())
    exemplars = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("exemplar")]
    assert any("visloc_request_duration_seconds_bucket" in e for e in exemplars)


def test_docs_name_every_alert():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        assert f"### {rule['alert']}" in doc, f"docs/deploy.md has no section for {rule['alert']}"
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
    for cmd in re.findall(r"kubectl apply -k ([\w./-]+)", doc):
        assert (ROOT / cmd).is_dir(), cmd
    assert "python deploy/render.py" in doc
