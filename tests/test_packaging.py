"""Packaging: dependencies point one way and stay light; the generated stubs match the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import dependency_closure

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "numpy", "onnxruntime", "nvidia-pytriton", "tritonclient", "pillow"}


def test_client_pulls_neither_numpy_nor_torch():
    closure = dependency_closure("visloc-client")
    assert {"grpcio", "protobuf"} <= closure
    assert not closure & HEAVY, closure & HEAVY


def test_service_does_not_pull_torch_and_export_does():
    service = dependency_closure("visloc-swc-service")
    assert {"visloc-client", "numpy", "tritonclient"} <= service
    assert "torch" not in service and "onnxruntime" not in service  # onnxruntime: only the [triton] extra
    assert {"torch", "visloc-swc-service", "visloc-client"} <= dependency_closure("visloc-export")


def test_generated_stubs_match_the_proto(tmp_path):
    src = ROOT / "client" / "src"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(src), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "visloc_client/v1/locator.proto"],
        check=True, capture_output=True,
    )  # fmt: skip
    for name in ("locator_pb2.py", "locator_pb2.pyi", "locator_pb2_grpc.py"):
        fresh = (tmp_path / "visloc_client" / "v1" / name).read_text()
        assert fresh == (src / "visloc_client" / "v1" / name).read_text(), f"{name} is stale: run `make proto`"


def test_service_package_imports_no_web_page_demo_or_dev_tools():
    """What a production pod runs imports neither the web page nor the development tools."""
    import ast

    banned = ("visloc_client.web", "devtools", "visloc_export")
    bad = []
    for path in (ROOT / "swc_service" / "src" / "swc_service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.startswith(banned)]
    assert not bad, bad
