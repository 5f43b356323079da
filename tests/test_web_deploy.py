"""The web page as a deployable component: the wheel carries the page, the container image says
what it must, the compose add-on and the Kubernetes component render and hold the same policy
as the rest of k8s/ (rendered with the real ``kubectl kustomize``, validated against the
Kubernetes schemas)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import dockerfile, final_stage, free_port

from visloc_client.cli import build_parser
from visloc_client.web import WebApp, WebConfig, start
from visloc_client.web.serve import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPONENT = ROOT / "k8s" / "components" / "web"
AUTH_COMPONENT = ROOT / "k8s" / "components" / "web-auth"
VENDOR = ROOT / "client" / "src" / "visloc_client" / "web" / "static" / "vendor"


# --------------------------------------------------------------------------- the wheel


def test_the_client_wheel_carries_the_page(tmp_path):
    """Built from a copy of client/ (the tree is left alone): every static file is inside."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment (needed to build the wheel offline)")
    src = tmp_path / "client"
    shutil.copytree(ROOT / "client", src, ignore=shutil.ignore_patterns("node_modules", "build", "*.egg-info"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("visloc_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "client" / "src" / "visloc_client" / "web" / "static"
    expected = {
        "visloc_client/web/static/" + p.relative_to(static).as_posix() for p in static.rglob("*") if p.is_file()
    }
    assert expected and expected <= names, sorted(expected - names)
    assert "visloc_client/web/static/vendor/MANIFEST.json" in names


# --------------------------------------------------------------------------- the image


def test_web_dockerfile():
    ins = dockerfile("web/Dockerfile")
    final = final_stage(ins)
    ops = [op for op, _ in final]
    (user,) = [a for op, a in final if op == "USER"]
    assert user.split(":")[0] == "10001"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op in ("RUN", "COPY"))
    (entry,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    assert entry == ["visloc", "web"]
    (expose,) = [a.split() for op, a in final if op == "EXPOSE"]
    assert expose == ["8080"]
    env = " ".join(a for op, a in final if op == "ENV")
    assert "VISLOC_WEB_HOST=0.0.0.0" in env and "VISLOC_WEB_PORT=8080" in env and "VISLOC_TARGET=" in env
    installs = " ".join(a for op, a in ins if op == "RUN")
    assert '"./client[web]"' in installs and "swc_service" not in installs and "torch" not in installs
    ignore = (DEPLOY / "web" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:3] == ["*", "!client/pyproject.toml", "!client/src/**"]
    # The image's settings parse as `visloc web` would parse them.
    env_vars = dict(kv.split("=", 1) for op, a in final if op == "ENV" for kv in a.split() if "=" in kv)
    _parse_web(env_vars, [])


def test_web_healthcheck_command():
    """The image's HEALTHCHECK, run as is (with this Python): 0 while the page serves, else not."""
    (hc,) = [a for op, a in final_stage(dockerfile("web/Dockerfile")) if op == "HEALTHCHECK"]
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    cmd[0] = sys.executable

    class NoService:
        def info(self):
            raise AssertionError("the health check must not call the service")

    server = start(WebApp(NoService(), WebConfig()), "127.0.0.1", free_port())
    try:
        port = str(server.server_address[1])
        ok = subprocess.run(cmd, env=dict(os.environ, VISLOC_WEB_PORT=port), capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run(cmd, env=dict(os.environ, VISLOC_WEB_PORT=str(free_port())), capture_output=True, timeout=30)
    assert down.returncode != 0


def _parse_web(env: dict[str, str], args: list[str]):
    """``visloc web ARGS`` with the environment ``env``, as the container would start it."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        parsed = build_parser().parse_args(["web", *args])
        config_from_args(parsed)  # validates (tiles URL, limits)
        return parsed
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- compose


def test_compose_add_on():
    main = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    add_on = yaml.safe_load((DEPLOY / "web" / "compose.yaml").read_text())
    (name,) = add_on["services"]
    web = add_on["services"][name]
    assert name not in main["services"]
    # Paths resolve from deploy/ (the first file's directory).
    assert (DEPLOY / web["build"]["context"] / web["build"]["dockerfile"]).is_file()
    assert web["read_only"] is True and web["user"].split(":")[0] == "10001" and web["cap_drop"] == ["ALL"]
    assert web["networks"] == ["frontend"] and "frontend" in main["services"]["swc-service"]["networks"]
    assert not main["networks"]["frontend"].get("internal")
    assert "swc-service" in web["depends_on"]
    (port,) = web["ports"]
    assert port.startswith("${VISLOC_WEB_BIND:-127.0.0.1}:")
    host, grpc_port = web["environment"]["VISLOC_TARGET"].split(":")
    assert host == "swc-service" and int(grpc_port) == 50051
    _parse_web({k: str(v) for k, v in web["environment"].items()}, [])


# --------------------------------------------------------------------------- Kubernetes


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not on PATH: the manifests are rendered with `kubectl kustomize`")
    return exe


def _render(tmp_path: Path, overlay: str, components: list[Path]) -> list[dict]:
    """An overlay plus the components, as when they are listed under the overlay's
    ``components:`` (which also puts them in the overlay's namespace)."""
    here = tmp_path / overlay
    here.mkdir()
    rel = lambda p: os.path.relpath(p, here)  # noqa: E731 - kustomize wants relative paths
    base = ROOT / "k8s" / "overlays" / overlay
    overlay_doc = yaml.safe_load((base / "kustomization.yaml").read_text())
    namespace = overlay_doc["namespace"]
    wired = {(base / c).resolve() for c in overlay_doc.get("components", [])}
    components = [c for c in components if Path(c).resolve() not in wired]  # already in the overlay
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": namespace,
                "resources": [rel(base)],
                **({"components": [rel(c) for c in components]} if components else {}),
            }
        )
    )
    out = subprocess.run([_kubectl(), "kustomize", str(here)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize(
    ("overlay", "components"), [("dev", [COMPONENT]), ("prod", [COMPONENT, AUTH_COMPONENT])], ids=["dev", "prod"]
)
def test_k8s_component(tmp_path, overlay, components):
    docs = _render(tmp_path, overlay, components)
    mine = [d for d in docs if d["metadata"]["name"].startswith("visloc-web")]
    assert {d["kind"] for d in mine} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    by = {d["kind"]: d for d in mine}
    dep, svc = by["Deployment"], by["Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]

    # Schemas (the same validator and versions as tests/test_deploy.py).
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import latest_version
    except ImportError:
        kubernetes_validate = None
    if kubernetes_validate is not None:
        for doc in mine:
            for version in ("1.31.0", latest_version()):
                kubernetes_validate.validate(doc, version, strict=True)

    # Restricted pod security, bounded, pinned, probed.
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key])
    assert c["image"] == "visloc/web:0.1.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    for vol in spec.get("volumes", []):
        assert set(vol) - {"name"} <= {"emptyDir", "secret", "configMap"}

    # The Service selects exactly the web pods, ClusterIP, on the container's port.
    assert svc["spec"]["type"] == "ClusterIP"
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    selected = [
        w
        for w in workloads
        if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    ]
    assert selected == [dep]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    assert all(
        by["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"][k] == labels[k]
        for k in ("app.kubernetes.io/name",)
    )

    # Same namespace as everything else in the overlay.
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert all(d["metadata"]["namespace"] == ns["metadata"]["name"] for d in mine)

    # The settings point at the Locate service's gRPC port and parse as `visloc web` would.
    (envfrom,) = c["envFrom"]
    assert envfrom["configMapRef"]["name"] == by["ConfigMap"]["metadata"]["name"]
    settings = by["ConfigMap"]["data"]
    host, port = settings["VISLOC_TARGET"].split(":")
    swc_svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert int(port) in {p["port"] for p in swc_svc["spec"]["ports"] if p["name"] == "grpc"}
    parsed = _parse_web(settings, c.get("args", []))
    assert parsed.host == "0.0.0.0" and parsed.port == next(p["containerPort"] for p in c["ports"])
    # The Locate Service is headless: per-call round_robin over its pods, not pick_first to one.
    assert parsed.load_balancing == "round_robin"

    if overlay == "prod":
        # The token the service requires, from the same out-of-band Secret, as a file.
        assert parsed.token_file == "/etc/visloc/auth/token"
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in c["volumeMounts"] if parsed.token_file.startswith(m["mountPath"] + "/"))
        assert mount.get("readOnly") is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "swc-service-auth"
