"""Triton Python-backend model that runs a repository model's ONNX file with ONNX Runtime.

The tritonserver that ships in NVIDIA's nvidia-pytriton wheel has the Python backend but no
ONNX Runtime backend. `tests/peers.py:start_triton` and `benchmarks/triton.py:start_tritonserver`
copy models/ and put this file beside each model's ONNX file, so Triton serves the same model
(same config.pbtxt batching) without the onnxruntime backend. A production Triton serves the
model.onnx directly with platform onnxruntime_onnx and never sees this file.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs ``model.onnx`` of this model version; batches of requests become one ONNX run."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests: list) -> list:
        # DLPack both ways: the stub's as_numpy()/Tensor(numpy) were built against NumPy 1 and
        # mis-read NumPy 2 arrays.
        arrays = [
            np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.inputs[0])) for r in requests
        ]
        sizes = [a.shape[0] for a in arrays]
        results = self.session.run(self.outputs, {self.inputs[0]: np.concatenate(arrays)})
        responses, start = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(out[start : start + n]))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
