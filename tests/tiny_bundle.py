"""A small bundle for tests that push thousands of photos through the model.

The demo model is EfficientNet-B4 (about 3.6 photos/s on this machine's shared cores), so a
test of 2,000 photos would take many minutes through it. This bundle keeps the demo's cells
and synthetic background (``visloc_export.demo``) and replaces the network by a small ONNX
graph with the same tensor contract: uint8 ``[B, H, W, 3]`` -> ``cell_probs [B, M]``,
``embedding [B, 1792]`` (L2-normalised). The graph samples the image on an 8x8 grid, centres
it and projects it with seeded random weights, so distinct photos get distinct embeddings
and a deterministic (arbitrary) top cell. Everything around it (preprocessing, bundle
format, onnxruntime, Triton, the service) is the real thing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from swc_service import bundle as B

GRID = 8


def tiny_weights(num_cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = 3 * GRID * GRID
    w_emb = rng.standard_normal((feats, B.EMBEDDING_DIM)).astype(np.float32)
    w_cell = (rng.standard_normal((feats, num_cells)) / 300).astype(np.float32)  # varied confidences
    return w_emb, w_cell


def tiny_model(num_cells: int, seed: int = 0, *, sampled_output: bool = False) -> onnx.ModelProto:
    """The graph; ``sampled_output`` also outputs ``x``, the centred 8x8 samples (exact in float32)."""
    w_emb, w_cell = tiny_weights(num_cells, seed)
    feats = w_emb.shape[0]
    inits = [
        numpy_helper.from_array(w_emb, "w_emb"),
        numpy_helper.from_array(w_cell, "w_cell"),
        numpy_helper.from_array(np.array([GRID, GRID], np.int64), "grid"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([0, feats], np.int64), "flat"),
        numpy_helper.from_array(np.array(127.5, np.float32), "mid"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["nchw"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["bc"]),
        helper.make_node("Concat", ["bc", "grid"], ["sizes"], axis=0),
        helper.make_node("Resize", ["nchw", "", "", "sizes"], ["small"], mode="nearest"),
        helper.make_node("Reshape", ["small", "flat"], ["x0"]),
        helper.make_node("Sub", ["x0", "mid"], ["x"]),
        helper.make_node("MatMul", ["x", "w_emb"], ["e"]),
        helper.make_node("LpNormalization", ["e"], [B.OUTPUT_EMBEDDING], axis=1, p=2),
        helper.make_node("MatMul", ["x", "w_cell"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [B.OUTPUT_PROBS], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(B.INPUT_NAME, TensorProto.UINT8, ["B", "H", "W", 3])],
        [
            helper.make_tensor_value_info(B.OUTPUT_PROBS, TensorProto.FLOAT, ["B", num_cells]),
            helper.make_tensor_value_info(B.OUTPUT_EMBEDDING, TensorProto.FLOAT, ["B", B.EMBEDDING_DIM]),
            *([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", feats])] if sampled_output else []),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class TinyReference:
    """The tiny graph as a float64-capable reference (:class:`visloc_export.reference.ReferenceModel`).

    Its samples ``x`` (uint8 minus 127.5) are exact in float32, so onnxruntime gives them; the two
    products, the softmax and the normalisation are computed here in float64, or in float32 with
    the emulated TF32/FP16 rounding of :func:`visloc_export.reference.round_to`."""

    def __init__(self, num_cells: int, seed: int = 0):
        import onnxruntime as ort

        self.w_emb, self.w_cell = tiny_weights(num_cells, seed)
        graph = tiny_model(num_cells, seed, sampled_output=True).SerializeToString()
        self.session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])

    def outputs(self, batch: np.ndarray, arithmetic: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from visloc_export.reference import round_to

        (x,) = self.session.run(["x"], {B.INPUT_NAME: batch})
        if arithmetic == "float64":
            x, w_emb, w_cell = (np.asarray(a, np.float64) for a in (x, self.w_emb, self.w_cell))
            rounded = lambda a: a  # noqa: E731
        else:
            rounded = lambda a: round_to(torch.from_numpy(np.ascontiguousarray(a)), arithmetic).numpy()  # noqa: E731
            x, w_emb, w_cell = rounded(x), rounded(self.w_emb), rounded(self.w_cell)
        out = (lambda a: rounded(a)) if arithmetic == "fp16" else (lambda a: a)
        e = out(x @ w_emb)
        logits = out(x @ w_cell)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        emb = e / np.linalg.norm(e, axis=1, keepdims=True)
        return probs.astype(np.float64), emb.astype(np.float64)

    def describe(self) -> dict:
        return {"runtime": "tests/tiny_bundle.py (numpy; samples from onnxruntime)"}


def build_tiny_bundle(out: Path, cells: int = 500, background: int = 5000, seed: int = 0) -> B.Bundle:
    from visloc_export import demo
    from visloc_export.build import gate

    rng = np.random.default_rng(seed)
    centres = demo.cell_centres(cells, rng)
    with B.BundleWriter(out) as w:
        onnx.save(tiny_model(cells, seed), str(w.path(B.MODEL)))
        extra = gate(w, TinyReference(cells, seed), centres)  # probes: the service checks its backend with them
        for rel, array in zip((B.OFFSETS, B.LABELS, B.ROW_IDS), demo.write_background(w, centres, background, rng)):
            w.save(rel, array)
        w.save(B.CELLS, centres)
        return w.commit(source="demo", tool="tests", extra={"warning": "TEST BUNDLE: a tiny random model."} | extra)
