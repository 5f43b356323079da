"""Export :class:`VislocNet` to ONNX (dynamic batch, height and width; opset 17)."""

from __future__ import annotations

import os
import warnings

import onnx
import torch

from swc_service.bundle import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS

from .model import VislocNet

OPSET = 17


def export_onnx(net: VislocNet, path: str | os.PathLike[str]) -> None:
    """Write ``net`` as a single-file ONNX model and check it with the ONNX checker."""
    net = net.for_export()
    example = torch.zeros(1, 300, 400, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_PROBS, OUTPUT_EMBEDDING],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                OUTPUT_PROBS: {0: "batch"},
                OUTPUT_EMBEDDING: {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            external_data=False,
        )
    onnx.checker.check_model(str(path))
