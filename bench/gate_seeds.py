"""``make gate-seeds``: the parity gate on many demo seeds, and how far wrong models land.

For each seed the demo network is built as ``visloc-export demo --cells 2000`` builds it,
exported, and put through the same gate (:func:`visloc_export.parity.check_parity`): the
export's largest distance from float64, as a fraction of what the ``export`` class allows
(``ratio``; <= 1 passes). Then four wrong models are measured on the same photos against the
same float64 reference: fed BGR, normalisation left out, one layer's weights from another
seed, another bundle's heads. Their ratios under the gate (``export``) and under the model
check's classes on the four probes (``fp32``, ``fp16``) are their margins: how many times
over the allowance they land. (A wrong model's error is O(1), so its PyTorch float32 outputs
stand for its export's: the float32 noise between the two is 1e-5 of it.)

Results: bench/results/gate_seeds.json and the "Parity gate" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from swc_service import parity
from swc_service.bundle import ProbeReference
from swc_service.parity import CLASSES, compare_outputs
from visloc_export import demo, probes
from visloc_export.model import Normalize, VislocNet
from visloc_export.onnx_export import export_onnx
from visloc_export.parity import check_parity, parity_batches
from visloc_export.reference import TorchReference, cpu_model, run

from .report import GATE_JSON

CELLS = 2000
OTHER_SEED = 10_000  # the "other bundle" whose heads a wrong model carries
LAYER = 16  # the block whose projection conv gets another seed's weights
WRONG = ("bgr", "no_normalisation", "layer_from_another_seed", "another_bundles_heads")


class BGR(Normalize):
    """Channels fed in the wrong order."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image[..., [2, 1, 0]])


class NoNormalisation(Normalize):
    """``x / 255`` only: mean and std left out."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0


def wrong_model(net: VislocNet, which: str, other: VislocNet | None = None, seed: int = 0) -> VislocNet:
    """``net`` exported wrongly: one of :data:`WRONG`."""
    bad = copy.deepcopy(net)
    if which == "bgr":
        bad.normalize = BGR()
    elif which == "no_normalisation":
        bad.normalize = NoNormalisation()
    elif which == "layer_from_another_seed":
        conv = bad.backbone._blocks[LAYER]._project_conv
        torch.manual_seed(seed + 1)
        conv.reset_parameters()  # the layer as another seed's initialisation draws it
    elif which == "another_bundles_heads":
        if other is None:
            raise ValueError("another_bundles_heads needs the other bundle's network")
        bad.cell_head, bad.rrm_head = copy.deepcopy(other.cell_head), copy.deepcopy(other.rrm_head)
    else:
        raise ValueError(f"wrong must be one of {WRONG}, got {which!r}")
    return bad.eval()


def seed_run(seed: int, other: VislocNet, workdir: Path) -> dict:
    """One seed: the gate's verdict and ratio, and each wrong model's margins."""
    rng = np.random.default_rng(seed)
    centres = demo.cell_centres(CELLS, rng)
    net, _ = demo.build_demo_net(CELLS, centres, seed)
    export_onnx(net, workdir / "model.onnx")
    model = TorchReference(net)
    images, _ = probes.choose(model)
    report, measurement = check_parity(
        model, workdir / "model.onnx", centres, parity_batches(), extra_photos=images, progress=False
    )
    probe_rows = [measurement.index(image) for image in images]
    out = {
        "seed": seed,
        "ok": report.ok,
        "ratio": report.ratio,
        "distance": report.distance,
        "allowed": report.allowed,
        "envelope": measurement.envelope,
        "top_ranks_decided": report.top_ranks_decided,
        "wrong": {},
    }
    everything = ProbeReference(measurement.cell_probs, measurement.embeddings, measurement.envelope, {})
    on_probes = measurement.reference(probe_rows)
    for which in WRONG:
        probs, emb = run(TorchReference(wrong_model(net, which, other, seed)), measurement.photos, "fp32")
        margins = {"export": compare_outputs(everything, probs, emb, centres, precision="export")}
        for precision in ("fp32", "fp16"):
            margins[precision] = compare_outputs(
                on_probes, probs[probe_rows], emb[probe_rows], centres, precision=precision
            )
        out["wrong"][which] = {p: {"ok": r.ok, "ratio": r.ratio} for p, r in margins.items()}
    return out


def summarise(runs: list[dict]) -> dict:
    return {
        "seeds": len(runs),
        "all_pass": all(r["ok"] for r in runs),
        "worst_ratio": max(r["ratio"] for r in runs),
        "smallest_margin": {
            which: {p: min(r["wrong"][which][p]["ratio"] for r in runs) for p in ("export", "fp32", "fp16")}
            for which in WRONG
        },
        "wrong_always_refused": all(not v[p]["ok"] for r in runs for v in r["wrong"].values() for p in v),
    }


def write_result(path: Path, runs: list[dict]) -> dict:
    runs.sort(key=lambda r: r["seed"])
    result = {
        "cpu": cpu_model(),
        "cells": CELLS,
        "classes": CLASSES,
        "rule": parity.RULE_VERSION,
        "runs": runs,
        "summary": summarise(runs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def previous_runs(path: Path, wanted: range) -> list[dict]:
    """The runs of an earlier (interrupted) ``make gate-seeds`` worth keeping: same CPU, cells and classes."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if (
        old.get("cpu") != cpu_model()
        or old.get("cells") != CELLS
        or old.get("classes") != json.loads(json.dumps(CLASSES))
        or old.get("rule") != parity.RULE_VERSION
    ):
        print(f"[gate-seeds] {path} was measured elsewhere or under another rule; starting afresh", file=sys.stderr)
        return []
    return [r for r in old.get("runs", []) if r["seed"] in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gate_seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="how many seeds (default 20)")
    p.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--json", default=str(GATE_JSON))
    p.add_argument("--markdown", default="docs/BENCHMARKS.md", help="'' to leave it")
    p.add_argument(
        "--resume", action="store_true", help="keep the seeds already in --json measured on this CPU, run the rest"
    )
    args = p.parse_args(argv)
    other, _ = demo.build_demo_net(CELLS, demo.cell_centres(CELLS, np.random.default_rng(OTHER_SEED)), OTHER_SEED)
    wanted = range(args.first, args.first + args.seeds)
    runs = previous_runs(Path(args.json), wanted) if args.resume else []
    done = {r["seed"] for r in runs}
    if done:
        print(f"[gate-seeds] resuming: seeds {sorted(done)} kept from {args.json}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (s for s in wanted if s not in done):
            t0 = time.monotonic()
            runs.append(seed_run(seed, other, Path(tmp)))
            r = runs[-1]
            worst = {w: min(v[p]["ratio"] for p in v) for w, v in r["wrong"].items()}
            print(
                f"[gate-seeds] seed {seed}: {'pass' if r['ok'] else 'FAIL'} ratio {r['ratio']:.3f}; wrong models' "
                f"smallest margins {json.dumps({k: round(v, 2) for k, v in worst.items()})} "
                f"({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            # Written after every seed: an interrupted run keeps what it measured (--resume).
            result = write_result(Path(args.json), runs)
    result = write_result(Path(args.json), runs)
    if args.markdown:
        from bench.report import GATE_HEADING, gate_section, put_section

        put_section(Path(args.markdown), GATE_HEADING, gate_section(result))
    print(json.dumps(result["summary"], indent=2))
    return 0 if result["summary"]["all_pass"] and result["summary"]["wrong_always_refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
