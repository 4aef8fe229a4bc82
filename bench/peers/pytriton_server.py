"""nvidia-pytriton 0.7.0 (Triton 2.51 with its Python backend) serving add_sub through
onnxruntime, for bench/peers.sh.

Usage: python pytriton_server.py MODEL.onnx HTTP_PORT GRPC_PORT METRICS_PORT WORKSPACE
Start it with LD_LIBRARY_PATH=<this interpreter's LIBDIR> (the Python backend stub links
libpython; see /work/shared/notes/dependencies.md §8.1); stop it with SIGTERM.
"""

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

model_path, http_port, grpc_port, metrics_port, workspace = sys.argv[1:6]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


@batch
def infer_fn(INPUT0, INPUT1):
    out0, out1 = sess.run(None, {"INPUT0": INPUT0.astype(np.float32), "INPUT1": INPUT1.astype(np.float32)})
    return {"OUTPUT0": out0, "OUTPUT1": out1}


config = TritonConfig(
    http_address="127.0.0.1", http_port=int(http_port),
    grpc_address="127.0.0.1", grpc_port=int(grpc_port),
    metrics_address="127.0.0.1", metrics_port=int(metrics_port), allow_gpu_metrics=False,
)
vec16 = (16,)
with Triton(config=config, workspace=workspace) as triton:
    triton.bind(
        model_name="add_sub",
        infer_func=infer_fn,
        inputs=[Tensor(name="INPUT0", dtype=np.float32, shape=vec16),
                Tensor(name="INPUT1", dtype=np.float32, shape=vec16)],
        outputs=[Tensor(name="OUTPUT0", dtype=np.float32, shape=vec16),
                 Tensor(name="OUTPUT1", dtype=np.float32, shape=vec16)],
        config=ModelConfig(max_batch_size=8),
    )
    triton.serve()
