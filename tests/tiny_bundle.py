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


def tiny_model(num_cells: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    feats = 3 * GRID * GRID
    w_emb = rng.standard_normal((feats, B.EMBEDDING_DIM)).astype(np.float32)
    w_cell = (rng.standard_normal((feats, num_cells)) / 300).astype(np.float32)  # varied confidences
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
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_tiny_bundle(out: Path, cells: int = 500, background: int = 5000, seed: int = 0) -> B.Bundle:
    from visloc_export import demo
    from visloc_export.probes import record_probes

    rng = np.random.default_rng(seed)
    centres = demo.cell_centres(cells, rng)
    with B.BundleWriter(out) as w:
        onnx.save(tiny_model(cells, seed), str(w.path(B.MODEL)))
        record_probes(w, centres)  # the service checks its backend with them
        for rel, array in zip((B.OFFSETS, B.LABELS, B.ROW_IDS), demo.write_background(w, centres, background, rng)):
            w.save(rel, array)
        w.save(B.CELLS, centres)
        return w.commit(source="demo", tool="tests", extra={"warning": "TEST BUNDLE: a tiny random model."})
