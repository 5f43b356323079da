"""Monitoring, checked with the real tools: ``promtool`` checks the config and rules and runs the
alert unit tests; Debian's ``prometheus`` scrapes the running demo stack (the real Locate
service and the real tritonserver) and answers through its HTTP API; every PromQL expression
of the dashboard, the alerts and the prometheus-adapter rule is evaluated by that Prometheus,
and every metric they name is one that the live service or Triton exports.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package (``make test``
installs it when missing).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "visloc.json"
ADAPTER = ROOT / "k8s" / "monitoring" / "prometheus-adapter" / "config.yaml"

# Metrics the dashboard may use although the live check cannot see them: Triton exports them
# only when it runs on a GPU (the CPU-only tritonserver of the tests has no GPU to report).
# Keep this list small and in step with docs/deploy.md ("Metrics").
GPU_ONLY_METRICS = frozenset({"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"})
# Metrics Prometheus itself makes for every target.
SYNTHETIC_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

PROMQL_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
    ]
)


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not on PATH: apt-get install prometheus (make test does it)")
    return exe


# --------------------------------------------------------------------------- PromQL helpers


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, labels, durations or strings)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+\S+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_parser():
    stage = 'sum by (le, stage) (rate(x_seconds_bucket{stage!="total", namespace=~"$namespace"}[$__rate_interval]))'
    assert metric_names(stage) == {"x_seconds_bucket"}
    assert metric_names("a / clamp_min(b, 1e-3) > 0.5 and on (x) c offset 5m or vector(0)") == {"a", "b", "c"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{method="Locate"}[5m]))) > 1') == {
        "x_bucket"
    }


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p["title"], t["expr"]))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            out.append((f"variable {var['name']}", m.group(1) if m else q))
    return out


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")


def adapter_to_promql(query: str) -> str:
    return query.replace("<<.LabelMatchers>>", 'namespace="visloc"').replace("<<.GroupBy>>", "pod")


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER.read_text())["rules"]


# --------------------------------------------------------------------------- promtool


def test_promtool_check_config_and_rules():
    promtool = _tool("promtool")
    cfg = subprocess.run([promtool, "check", "config", str(PROM / "prometheus.yml")], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    rules = subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(alert_rules())} rules found" in rules.stdout


def test_promtool_alert_unit_tests_cover_every_alert():
    promtool = _tool("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    fires, silent = set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert fires == names, f"alerts never tested firing: {names - fires}"
    assert silent == names, f"alerts never tested staying silent: {names - silent}"


# --------------------------------------------------------------------------- live Prometheus


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class PrometheusServer:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> dict:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get(url)
        except urllib.error.HTTPError as exc:  # 400 for a bad expression: the body says why
            return json.loads(exc.read())

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        assert res["status"] == "success", res
        result = res["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, predicate, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} not seen within {timeout:.0f} s")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def prometheus(live_service, local_triton, tmp_path_factory):
    """Debian's prometheus, on loopback, scraping the live service and Triton every second, with
    deploy/prometheus/prometheus.yml's jobs (targets pointed at the live stack) and alerts.yml."""
    exe = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / "alerts.yml")]
    triton_target = urllib.parse.urlparse(local_triton.metrics_url).netloc
    targets = {
        "swc-service": f"127.0.0.1:{live_service.metrics_port}",
        "triton": triton_target,
        "prometheus": f"127.0.0.1:{port}",
    }
    assert {j["job_name"] for j in cfg["scrape_configs"]} == set(targets)
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            url = f"{server.base}/-/ready"
            with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.2)
        # Both targets scraped successfully at least once.
        server.wait("both targets up", lambda: server.value('count(up{job=~"swc-service|triton"} == 1)') == 2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _locate(target: str, seeds) -> None:
    import grpc

    from visloc_client.v1 import locator_pb2 as pb
    from visloc_client.v1 import locator_pb2_grpc
    from visloc_export.samples import photo_bytes

    with grpc.insecure_channel(target) as channel:
        stub = locator_pb2_grpc.LocatorStub(channel)
        for seed in seeds:
            stub.Locate(pb.LocateRequest(image=photo_bytes(seed)), timeout=60)


def test_prometheus_sees_locate_and_triton_counters_increase(prometheus, live_service):
    _locate(live_service.target, [101])  # the labelled series exist from the first call on
    locate = 'sum(visloc_requests_total{job="swc-service", method="Locate", code="OK"})'
    triton = 'sum(nv_inference_count{job="triton", model="visloc"})'
    before_locate = prometheus.wait("visloc_requests_total{method=Locate}", lambda: prometheus.value(locate))
    before_triton = prometheus.wait("nv_inference_count", lambda: prometheus.value(triton))

    calls = 3
    _locate(live_service.target, [102, 103, 104])
    after_locate = prometheus.wait(
        "the Locate counter to increase", lambda: (v := prometheus.value(locate)) >= before_locate + calls and v
    )
    after_triton = prometheus.wait(
        "Triton's inference count to increase", lambda: (v := prometheus.value(triton)) >= before_triton + calls and v
    )
    assert after_locate - before_locate >= calls
    assert after_triton - before_triton >= calls  # one image per call reached the model
    # Per-stage histograms and the bundle info are there too.
    assert prometheus.value('count(visloc_stage_duration_seconds_count{stage="triton"})') == 1
    assert prometheus.value("count(visloc_bundle_info)") == 1


def test_alert_rules_load_and_evaluate(prometheus):
    prometheus.wait(
        "rules evaluated",
        lambda: all(
            r.get("lastEvaluation", "").startswith("2")
            for g in _get(f"{prometheus.base}/api/v1/rules")["data"]["groups"]
            for r in g["rules"]
        ),
    )
    groups = _get(f"{prometheus.base}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # A healthy stack fires nothing but (possibly) the no-traffic alert's pending state.
    firing = [a for a in _get(f"{prometheus.base}/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def test_every_expression_is_valid_promql(prometheus):
    """Dashboard panels and variables, alerts, and the prometheus-adapter rule, evaluated by Prometheus."""
    exprs = [(f"dashboard: {title}", grafana_to_promql(e)) for title, e in dashboard_exprs()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for r in adapter_rules():
        exprs.append((f"adapter {r['name']['as']}", adapter_to_promql(r["metricsQuery"])))
        exprs.append((f"adapter series {r['name']['as']}", r["seriesQuery"]))
    for where, expr in exprs:
        res = prometheus.query(expr)
        assert res["status"] == "success", f"{where}: {res.get('error')}\n{expr}"


def exported_names(text: str) -> set[str]:
    """Sample names a /metrics page can produce: those present, and for every declared family
    (labelled families without samples yet included) the names its type implies."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind in ("histogram", "summary"):
                names.update(name + s for s in ("_sum", "_count"))
                if kind == "histogram":
                    names.add(name + "_bucket")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_dashboard_and_alerts_name_only_exported_metrics(live_service, local_triton):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]

    with urllib.request.urlopen(f"http://127.0.0.1:{live_service.metrics_port}/metrics", timeout=5) as r:
        service = exported_names(r.read().decode())
    with urllib.request.urlopen(local_triton.metrics_url, timeout=5) as r:
        triton = exported_names(r.read().decode())
    exported = service | triton

    used_by = {}
    for title, expr in dashboard_exprs():
        for name in metric_names(grafana_to_promql(expr)):
            used_by.setdefault(name, []).append(f"dashboard: {title}")
    for r in alert_rules():
        for name in metric_names(r["expr"]):
            used_by.setdefault(name, []).append(f"alert {r['alert']}")
    for r in adapter_rules():
        for name in metric_names(adapter_to_promql(r["metricsQuery"])) | metric_names(r["seriesQuery"]):
            used_by.setdefault(name, []).append(f"adapter {r['name']['as']}")
    missing = {n: w for n, w in used_by.items() if n not in exported | GPU_ONLY_METRICS | SYNTHETIC_METRICS}
    assert not missing, f"named but exported by neither the service nor Triton: {missing}"

    # The allow-list stays honest: GPU-only names are really absent here, and really used.
    assert not GPU_ONLY_METRICS & exported
    assert set(used_by) >= GPU_ONLY_METRICS
    # What the issue asks the dashboard to show.
    dash_names = {n for title, e in dashboard_exprs() for n in metric_names(grafana_to_promql(e))}
    for name in (
        "visloc_requests_total",
        "visloc_stage_duration_seconds_bucket",
        "visloc_images_total",
        "visloc_predictions_total",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_gpu_utilization",
    ):
        assert name in dash_names, name
    # Every metric the service documents is exported (docs/service.md's table).
    for name in ("visloc_triton_errors_total", "visloc_triton_batch_size_bucket", "visloc_in_flight_images"):
        assert name in service
