"""Triton Python-backend model: the visloc ONNX graph run by onnxruntime.

Used by the embedded local Triton (``visloc-triton``), whose PyPI ``tritonserver`` has no
onnxruntime backend. Copied into the rendered model repository next to ``model.onnx``; it
runs inside ``triton_python_backend_stub``, not in the service.

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` several requests at once.
They are grouped by image shape (Triton merges only equal shapes; the grouping is a guard),
concatenated along the batch axis, run in ONE onnxruntime call and split back per request:
one call per batch is what makes dynamic batching pay on a GPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name: str = config["input"][0]["name"]
        self.output_names: list[str] = [o["name"] for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_filename", "model.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))  # 0: onnxruntime's default
        opts.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", "0"))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(path, opts, providers=providers)

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[1:], []).append(i)
        responses: list = [None] * len(requests)
        for members in groups.values():
            parts = [arrays[i] for i in members]
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            try:
                outputs = self.session.run(self.output_names, {self.input_name: batch})
            except Exception as exc:  # one failing batch answers its requests, never kills the model
                error = pb_utils.TritonError(f"onnxruntime failed on batch {batch.shape}: {exc}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            start = 0
            for i in members:
                stop = start + arrays[i].shape[0]
                tensors = [pb_utils.Tensor(n, o[start:stop]) for n, o in zip(self.output_names, outputs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses
