"""MLServer 1.7.1 custom runtime for bench/peers.sh: any ONNX model through onnxruntime
(MLServer has no ONNX runtime package). model-settings.json: parameters.uri = the .onnx file."""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.sess.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i).astype(np.float32) for i in payload.inputs}
        results = self.sess.run(None, feeds)
        outputs = [NumpyCodec.encode_output(n, r) for n, r in zip(self.output_names, results)]
        return InferenceResponse(model_name=self.name, outputs=outputs)
