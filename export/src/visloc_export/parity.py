"""The exporter's parity gate: PyTorch against its ONNX export, on what the service serves.

Both models run on the same uint8 batches; the outputs are compared by the one comparison,
:func:`swc_service.parity.compare_outputs`, under its ``export`` rules (top 5 cells, relative
probabilities on cells >= 1e-6, PD at every served scale from the service's own PD code,
embeddings; NaN or infinity anywhere fails and says where).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch

from swc_service import bundle as B
from swc_service.method import DEFAULT_SCALES_KM
from swc_service.parity import ParityReport, compare_outputs

from .model import VislocNet

PRECISION = "export"


def onnx_session(path: str | os.PathLike[str], threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(
    net: VislocNet,
    onnx_path: str | os.PathLike[str],
    batches: list[np.ndarray],
    scales_km: tuple[float, ...] = DEFAULT_SCALES_KM,
) -> ParityReport:
    """PyTorch vs onnxruntime on the same uint8 batches, every image compared."""
    net = net.eval()
    sess = onnx_session(onnx_path)
    refs, gots, names = [], [], []
    for batch in batches:
        refs.append(tuple(t.numpy() for t in net(torch.from_numpy(batch))))
        gots.append(tuple(sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch})))
        names += [f"batch {batch.shape[0]} {batch.shape[2]}x{batch.shape[1]} image {i}" for i in range(batch.shape[0])]
    return compare_outputs(
        *(np.concatenate([r[k] for r in refs]) for k in (0, 1)),
        *(np.concatenate([g[k] for g in gots]) for k in (0, 1)),
        net.cell_head.centres.numpy().astype(np.float64),
        scales_km,
        precision=PRECISION,
        names=names,
    )
