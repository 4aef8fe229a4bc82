#!/usr/bin/env python3
"""SavedModels of a realistic size for the TensorFlow figures (bench/tf_figures.py --models
mlp_large,cnn_large), in TF Serving's layout under OUT (default
$OXSERVE_CACHE/tf-bench-models): the test fixtures' mlp and cnn run in 35-70 µs, too little
work to say anything but the protocol's own cost; these run in the milliseconds, as served
models do.

  mlp_large/1  x f32[-1, 512] -> Dense 2048 relu -> Dense 2048 relu -> Dense 10 -> y  (~5.2 M weights)
  cnn_large/1  image f32[-1, 64, 64, 3] -> 4 × (Conv 3x3 relu, 32-64-128-128 channels, maxpool 2)
               -> global average pool -> Dense 10 -> logits

Run with the TensorFlow venv: ~/.cache/oxserve/venv-tf/bin/python bench/make_tf_bench_models.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def dense(rng, n_in, n_out):
    return (tf.Variable(rng.normal(0, (2.0 / n_in) ** 0.5, (n_in, n_out)).astype(np.float32)),
            tf.Variable(np.zeros(n_out, np.float32)))


class Mlp(tf.Module):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.layers = [dense(rng, 512, 2048), dense(rng, 2048, 2048), dense(rng, 2048, 10)]

    @tf.function(input_signature=[tf.TensorSpec([None, 512], tf.float32, name="x")])
    def serve(self, x):
        h = x
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = tf.nn.relu(h)
        return {"y": h}


class Cnn(tf.Module):
    def __init__(self):
        rng = np.random.default_rng(2)
        channels = [3, 32, 64, 128, 128]
        self.kernels = [tf.Variable(rng.normal(0, (2.0 / (9 * c_in)) ** 0.5, (3, 3, c_in, c_out)).astype(np.float32))
                        for c_in, c_out in zip(channels, channels[1:])]
        self.head = dense(rng, 128, 10)

    @tf.function(input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32, name="image")])
    def serve(self, image):
        h = image
        for k in self.kernels:
            h = tf.nn.relu(tf.nn.conv2d(h, k, 1, "SAME"))
            h = tf.nn.max_pool2d(h, 2, 2, "SAME")
        h = tf.reduce_mean(h, axis=[1, 2])
        w, b = self.head
        return {"logits": h @ w + b}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(
        os.environ.get("OXSERVE_CACHE", Path.home() / ".cache/oxserve")) / "tf-bench-models"
    for name, module in (("mlp_large", Mlp()), ("cnn_large", Cnn())):
        path = out / name / "1"
        if (path / "saved_model.pb").exists():
            continue
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    print(out)


if __name__ == "__main__":
    main()
