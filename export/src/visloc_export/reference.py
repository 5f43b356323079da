"""The network in float64, and how far known arithmetics land from it: measured at export.

Float32 results differ between machines and kernels, so nothing is compared with another
float32 result. At export the network runs in float64 on a set of photos (the reference), and
in each known arithmetic (:data:`swc_service.parity.ARITHMETICS`) on the same photos; the
largest distance of each from float64, per served quantity, is that arithmetic's **envelope**
(:class:`swc_service.parity.Distances`). The gate and the service's model check allow a
multiple of it (:mod:`swc_service.parity`).

``fp32`` is PyTorch float32 on this machine. ``tf32`` and ``fp16`` are emulated on the CPU:
every convolution's and linear layer's input and weights are rounded to TF32 (a 10-bit
mantissa, round to nearest even, as the tensor cores read them) or to float16 (whose outputs
are rounded too, as a TensorRT FP16 engine stores its activations); the sums stay float32.
"""

from __future__ import annotations

import copy
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from swc_service.bundle import ProbeReference, batches_by_shape
from swc_service.method import DEFAULT_SCALES_KM
from swc_service.parity import ARITHMETICS, Distances

from .model import VislocNet

FLOAT64 = "float64"
MEASURE_BATCH = 4  # photos per forward pass while measuring (memory, not numbers: float64 is batch-exact)
DESCRIPTIONS = {
    "fp32": "PyTorch float32 on the exporting machine",
    "tf32": "convolution and linear inputs and weights rounded to TF32 (10-bit mantissa), float32 sums",
    "fp16": "convolution and linear inputs, weights and outputs rounded to float16, float32 sums",
}


class ReferenceModel(Protocol):
    """A network that can run in float64 and in each known arithmetic."""

    def outputs(self, batch: np.ndarray, arithmetic: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, H, W, 3]`` -> (cell_probs ``[B, M]``, embedding ``[B, D]``) as float64 arrays,
        computed in ``arithmetic``: ``"float64"`` or one of :data:`ARITHMETICS`."""
        ...

    def describe(self) -> dict:
        """What runs it (for the bundle's record)."""
        ...


def round_to(x: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """``x`` (float32) as ``arithmetic`` holds it: TF32 (round to nearest even, 10-bit mantissa),
    float16, or unchanged for fp32. Infinities and NaN pass unchanged."""
    if arithmetic == "fp32":
        return x
    if arithmetic == "fp16":
        return x.to(torch.float16).to(torch.float32)
    if arithmetic != "tf32":
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    bits = x.contiguous().view(torch.int32)
    drop = 23 - 10
    lsb = (bits >> drop) & 1
    rounded = ((bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def emulated(net: VislocNet, arithmetic: str) -> VislocNet:
    """A copy of ``net`` whose convolutions and linear layers compute in ``arithmetic``."""
    out = copy.deepcopy(net).float().eval()
    if arithmetic == "fp32":
        return out
    for module in out.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            with torch.no_grad():
                module.weight.copy_(round_to(module.weight, arithmetic))
            module.register_forward_pre_hook(lambda _m, args: (round_to(args[0], arithmetic), *args[1:]))
            if arithmetic == "fp16":
                module.register_forward_hook(lambda _m, _args, y: round_to(y, arithmetic))
    return out


class TorchReference:
    """A :class:`~visloc_export.model.VislocNet` as a :class:`ReferenceModel`."""

    def __init__(self, net: VislocNet):
        self.net = net.eval()
        self._nets: dict[str, VislocNet] = {}

    def _net(self, arithmetic: str) -> VislocNet:
        if arithmetic not in self._nets:
            if arithmetic == FLOAT64:
                self._nets[arithmetic] = copy.deepcopy(self.net).double().eval()
            else:
                self._nets[arithmetic] = emulated(self.net, arithmetic)
        return self._nets[arithmetic]

    @torch.no_grad()
    def outputs(self, batch: np.ndarray, arithmetic: str) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = self._net(arithmetic)(torch.from_numpy(np.ascontiguousarray(batch)))
        return probs.double().numpy(), emb.double().numpy()

    def describe(self) -> dict:
        return {"runtime": f"PyTorch {torch.__version__}", "threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (the envelope is a property of the machine that measured it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Measurement:
    """The float64 outputs of ``photos`` and each arithmetic's distance from them on every photo."""

    photos: list[np.ndarray]
    cell_probs: np.ndarray  # float64 [N, M]
    embeddings: np.ndarray  # float64 [N, D]
    per_photo: dict[str, dict[str, np.ndarray]]  # arithmetic -> quantity -> [N]
    info: dict

    @property
    def envelope(self) -> dict[str, dict[str, float]]:
        """Each arithmetic's largest distance over the photos."""
        return {a: {q: float(np.max(v)) for q, v in d.items()} for a, d in self.per_photo.items()}

    @property
    def typical(self) -> dict[str, dict[str, float]]:
        """Each arithmetic's median distance over the photos."""
        return {a: {q: float(np.median(v)) for q, v in d.items()} for a, d in self.per_photo.items()}

    def reference(self, indices: Sequence[int]) -> ProbeReference:
        """The reference of some of the measured photos: their distances, the envelope over all."""
        idx = list(indices)
        per_probe = {a: {q: [float(v[i]) for i in idx] for q, v in d.items()} for a, d in self.per_photo.items()}
        return ProbeReference(
            self.cell_probs[idx], self.embeddings[idx], self.envelope, dict(self.info), per_probe, self.typical
        )

    def index(self, photo: np.ndarray) -> int:
        """Which measured photo ``photo`` is (same shape and pixels)."""
        for i, p in enumerate(self.photos):
            if p.shape == photo.shape and np.array_equal(p, photo):
                return i
        raise KeyError(f"photo {list(photo.shape)} was not measured")


def run(
    model: ReferenceModel, photos: Sequence[np.ndarray], arithmetic: str, step: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``model`` in ``arithmetic`` on every photo (batched by shape): float64 ``[N, M]``, ``[N, D]``."""
    probs: list[np.ndarray | None] = [None] * len(photos)
    embs: list[np.ndarray | None] = [None] * len(photos)
    for idx, batch in batches_by_shape(list(photos), MEASURE_BATCH):
        p, e = model.outputs(batch, arithmetic)
        for row, i in enumerate(idx):
            probs[i], embs[i] = p[row], e[row]
        if step is not None:
            step(len(idx))
    return np.stack(probs).astype(np.float64), np.stack(embs).astype(np.float64)


def distinct(photos: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``photos`` without repeats (the gate's batch of 1 is the first photo of its batch of 4)."""
    out: list[np.ndarray] = []
    for p in photos:
        if not any(q.shape == p.shape and np.array_equal(q, p) for q in out):
            out.append(p)
    return out


def measure(
    model: ReferenceModel,
    photos: Sequence[np.ndarray],
    centres: np.ndarray,
    *,
    arithmetics: Sequence[str] = ARITHMETICS,
    scales_km: Sequence[float] = DEFAULT_SCALES_KM,
    float64: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
) -> Measurement:
    """Float64 outputs of ``photos`` (or the given ones) and the envelope of each arithmetic."""
    photos = list(photos)
    runs = ([] if float64 is not None else [FLOAT64]) + list(arithmetics)
    with tqdm(
        total=len(photos) * len(runs), unit="photo", desc="reference and envelopes", file=sys.stderr,
        disable=not progress, dynamic_ncols=True, mininterval=0.5,
    ) as bar:  # fmt: skip
        if float64 is None:
            bar.set_postfix_str(FLOAT64)
            float64 = run(model, photos, FLOAT64, bar.update)
        distances = Distances(centres, scales_km)
        per_photo = {}
        for arithmetic in arithmetics:
            bar.set_postfix_str(arithmetic)
            probs, emb = run(model, photos, arithmetic, bar.update)
            per_photo[arithmetic] = distances.each(probs, emb, *float64)
    info = {
        **model.describe(),
        "photos": len(photos),
        "cpu": cpu_model(),
        "arithmetics": {a: DESCRIPTIONS[a] for a in arithmetics},
        "scales_km": [float(s) for s in scales_km],
    }
    return Measurement(photos, float64[0], float64[1], per_photo, info)
