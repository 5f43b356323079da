"""Write the files that Kubernetes manifests need from elsewhere in the repository.

kustomize loads files only from inside a kustomization's directory, so the one Triton config
(``model_repository/visloc/config.pbtxt``), the alert rules (``deploy/prometheus/alerts.yml``)
and the Grafana dashboard (``deploy/grafana/dashboards/visloc.json``) are rendered into
``k8s/`` by this script; ``tests/test_deploy.py`` fails when a rendered file is stale.

    python deploy/render.py           # write
    python deploy/render.py --check   # exit 1 and list the stale files

Rendered:

* ``k8s/base/triton/config.pbtxt``: the production config, verbatim (GPU, onnxruntime).
* ``k8s/overlays/dev/triton-config.pbtxt``: derived for the dev overlay: the same tensors
  and batching, ``cell_probs`` sized for the dev demo bundle (DEV_CELLS), one KIND_CPU
  instance, without the GPU-only settings (cuDNN search, TensorRT).
* ``k8s/base/monitoring/prometheusrule.yaml``: alerts.yml as a PrometheusRule.
* ``k8s/base/monitoring/visloc-dashboard.json``: the dashboard, verbatim.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_CONFIG = ROOT / "model_repository" / "visloc" / "config.pbtxt"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "visloc.json"

# Cells of the demo bundle the dev overlay's Job builds (visloc-export demo --cells).
DEV_CELLS = 2000


def _header(source: Path, comment: str = "#") -> str:
    return f"{comment} Rendered from {source.relative_to(ROOT)} by deploy/render.py; do not edit (edit the source).\n"


def base_triton_config() -> str:
    return _header(PRODUCTION_CONFIG) + PRODUCTION_CONFIG.read_text()


def dev_triton_config(cells: int = DEV_CELLS) -> str:
    """The production config for a CPU node: onnxruntime backend, KIND_CPU, no GPU-only knobs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from swc_service.triton_config import production_config

    cfg = production_config(cells, PRODUCTION_CONFIG)
    cfg.ClearField("optimization")  # TensorRT execution accelerator (GPU only)
    cfg.ClearField("parameters")  # cudnn_conv_algo_search (GPU only)
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return (
        _header(PRODUCTION_CONFIG)
        + f"# Dev overlay: KIND_CPU, cell_probs sized for the demo bundle (M={cells}).\n"
        + text_format.MessageToString(cfg)
    )


def prometheus_rule() -> str:
    """alerts.yml's groups under a PrometheusRule's spec, as text (so the rules read as they do there)."""
    text = ALERTS.read_text()
    body = text[text.index("\ngroups:") + 1 :]
    indented = "".join(("  " + line if line.strip() else line) for line in body.splitlines(keepends=True))
    return (
        _header(ALERTS)
        + "apiVersion: monitoring.coreos.com/v1\n"
        + "kind: PrometheusRule\n"
        + "metadata:\n"
        + "  name: visloc\n"
        + "  labels:\n"
        + "    app.kubernetes.io/part-of: visloc\n"
        + "spec:\n"
        + indented
    )


def dashboard() -> str:
    return DASHBOARD.read_text()


def outputs() -> dict[Path, str]:
    return {
        ROOT / "k8s" / "base" / "triton" / "config.pbtxt": base_triton_config(),
        ROOT / "k8s" / "overlays" / "dev" / "triton-config.pbtxt": dev_triton_config(),
        ROOT / "k8s" / "base" / "monitoring" / "prometheusrule.yaml": prometheus_rule(),
        ROOT / "k8s" / "base" / "monitoring" / "visloc-dashboard.json": dashboard(),
    }


def stale() -> list[Path]:
    return [p for p, text in outputs().items() if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path.relative_to(ROOT)} (run: python deploy/render.py)", file=sys.stderr)
        return 1 if bad else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
