#!/usr/bin/env python3
"""Generate the TorchScript fixtures for oxserve's PyTorch engine (platform "pytorch_libtorch"),
with reference outputs computed by Python PyTorch.

    scripts/setup-torch.sh
    $HOME/.cache/oxserve/venv-torch/bin/python scripts/make_torch_models.py [--out DIR] [--if-needed]

The default output directory is

    ${OXSERVE_CACHE:-$HOME/.cache/oxserve}/torch-models/<first 16 hex digits of sha256(this file)>

so editing this script yields a fresh directory. The directory is printed as the last line on
stdout (progress goes to stderr). With --if-needed nothing is generated when `<out>/.complete`
exists. The tree is built in a temporary sibling directory and renamed into place, with
`.complete` already inside, so a reader never sees a half-written repository. Only the CPU is
used (CUDA_VISIBLE_DEVICES is set to "" unless the caller set it).

Layout (Triton's model repository; a TorchScript file does not declare its inputs and outputs,
so every config.pbtxt lists them):

    <out>/repo/<model>/config.pbtxt   platform: "pytorch_libtorch"
    <out>/repo/<model>/1/model.pt     torch.jit.save of a traced or scripted module
    <out>/references.json             {model: {"inputs": {name: tensor}, "outputs": {name: tensor}}},
                                      each tensor {"datatype": KServe v2 name ("FP32", "INT64",
                                      "BOOL", ...), "shape": [...] (with the batch dim where the
                                      model batches), "data": [flat, row-major]}; FP16 data are
                                      plain JSON numbers (exact in binary64), BOOL data true/false.

Models (batched ones list their dims without the batch dim):

    cnn_traced        torch.jit.trace of Conv2d(3->8, 3x3, pad 1) -> ReLU -> AdaptiveAvgPool2d(1)
                      -> flatten -> Linear(8->10). INPUT__0 FP32 [3,32,32] -> OUTPUT__0 FP32 [10];
                      max_batch_size 8. References: 3 rows.
    scripted_control  torch.jit.script, data-dependent control flow per row: OUTPUT__0 = x*2 where
                      the row sums to > 0, else x-1; OUTPUT__1 = OUTPUT__0 put through
                      `y = y*0.5 + 1` count times (a loop). INPUT__0 x FP32 [4], INPUT__1 count
                      INT64 [1]; a tuple result. max_batch_size 4. config.pbtxt lists INPUT__1
                      before INPUT__0 and OUTPUT__1 before OUTPUT__0 (the index in the name, not
                      the order, places them). References: 3 rows (positive and negative sums,
                      counts 0, 1, 3).
    dict_out          torch.jit.script, Dict[str, Tensor] result: forward(features FP32 [6],
                      scale FP32 [1]) -> {"logits": Linear(6->3)(features) * scale,
                      "probs": softmax(logits)}; named inputs (passed in configuration order),
                      outputs named by the dict keys. max_batch_size 8. References: 3 rows.
    fp16_model        Linear(4->2).half() scripted: INPUT__0 FP16 [4] -> OUTPUT__0 FP16 [2]
                      (libtorch 2.13 runs half-precision addmm on the CPU). max_batch_size 4.
                      References: 3 rows.
    int_types         torch.jit.script, named inputs a INT32, b UINT8, mask BOOL, each [2,3],
                      unbatched (max_batch_size 0): OUTPUT__0 INT32 = a*3 - 7,
                      OUTPUT__1 UINT8 = 255 - b, OUTPUT__2 BOOL = mask XOR (a > 0); a tuple.

Deterministic: weights and inputs come from fixed numpy seeds (torch is seeded too), so
references.json is identical between runs (a model.pt may not be byte for byte: TorchScript
records a serialization id, and orders some constants by string hash). Every reference is checked against an independent
numpy computation, and every saved file is loaded back with torch.jit.load and must give the
references (batched models also for 1..max_batch_size rows, row by row).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
SEED = 20240601
# The libtorch the server binds (tch 0.26); a newer PyTorch may write files it cannot read.
TORCH_VERSION = "2.13.0"


def log(msg: str) -> None:
    print(f"make_torch_models: {msg}", file=sys.stderr, flush=True)


def default_out() -> Path:
    digest = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]
    cache = os.environ.get("OXSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "oxserve")
    return Path(cache) / "torch-models" / digest


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the cache, keyed by this script's hash)")
    p.add_argument("--if-needed", action="store_true", help="do nothing when <out>/.complete exists")
    return p.parse_args()


ARGS = parse_args()
OUT = (ARGS.out or default_out()).absolute()
if ARGS.if_needed and (OUT / ".complete").is_file():
    print(OUT)
    sys.exit(0)

# CPU only, before torch is imported.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

if torch.__version__.split("+")[0] != TORCH_VERSION:
    log(f"warning: torch {torch.__version__}, the server's libtorch is {TORCH_VERSION}")
torch.manual_seed(SEED)
np.random.seed(SEED)
torch.use_deterministic_algorithms(True)


def rng(tag: str) -> np.random.Generator:
    """An independent, fixed random stream per purpose."""
    return np.random.default_rng([SEED, int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)])


def weights(tag: str, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng(tag).standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def grid_values(tag: str, shape: tuple[int, ...], lo: float, hi: float, step: float) -> np.ndarray:
    """Random float32 inputs on a grid of `step`, so they print short and are exact in any format."""
    v = rng(tag).uniform(lo, hi, size=shape)
    return (np.round(v / step) * step).astype(np.float32)


def set_param(param: nn.Parameter, value: np.ndarray) -> None:
    with torch.no_grad():
        param.copy_(torch.from_numpy(value))


# ---------------------------------------------------------------------------------------------
# Tensors, types, configs

# torch dtype -> (KServe v2 datatype, config.pbtxt data_type)
TYPES = {
    torch.bool: ("BOOL", "TYPE_BOOL"),
    torch.uint8: ("UINT8", "TYPE_UINT8"),
    torch.int8: ("INT8", "TYPE_INT8"),
    torch.int16: ("INT16", "TYPE_INT16"),
    torch.int32: ("INT32", "TYPE_INT32"),
    torch.int64: ("INT64", "TYPE_INT64"),
    torch.float16: ("FP16", "TYPE_FP16"),
    torch.bfloat16: ("BF16", "TYPE_BF16"),
    torch.float32: ("FP32", "TYPE_FP32"),
    torch.float64: ("FP64", "TYPE_FP64"),
}


def _num(v, dtype: torch.dtype):
    if dtype == torch.bool:
        return bool(v)
    if not dtype.is_floating_point:
        return int(v)
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        # Shortest decimal that reads back as the same float32 (half and bfloat16 values are
        # exact in float32); float64 keeps Python's full repr.
        return float(str(np.float32(v)))
    return float(v)


def tensor_json(t: Tensor) -> dict:
    t = t.detach().contiguous()
    flat = t.reshape(-1).float().tolist() if t.dtype in (torch.float16, torch.bfloat16) else t.reshape(-1).tolist()
    return {
        "datatype": TYPES[t.dtype][0],
        "shape": [int(d) for d in t.shape],
        "data": [_num(v, t.dtype) for v in flat],
    }


def config_pbtxt(name: str, max_batch_size: int, inputs: list[tuple[str, torch.dtype, list[int]]],
                 outputs: list[tuple[str, torch.dtype, list[int]]]) -> str:
    def entries(items):
        return ",\n".join(
            f'  {{ name: "{n}", data_type: {TYPES[dt][1]}, dims: [ {", ".join(str(d) for d in dims)} ] }}'
            for n, dt, dims in items
        )

    return (
        f'name: "{name}"\n'
        'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{entries(inputs)}\n]\n"
        f"output [\n{entries(outputs)}\n]\n"
    )


# ---------------------------------------------------------------------------------------------
# Models. Each builder returns a spec:
#   "module": the module to save (traced or scripted), "eager": the plain nn.Module,
#   "max_batch_size", "inputs": [(name, tensor)] in forward's argument order,
#   "config_inputs" / "config_outputs": [(name, dtype, dims)] in config.pbtxt's order,
#   "expect": {output name: numpy value} (independent numpy computation),
#   "outputs": function(result of forward) -> {output name: tensor}.


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def np_conv3x3_pad1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [N,C,H,W], w [O,C,3,3] -> [N,O,H,W] (float64)."""
    n, c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i:i + h, j:j + wd]  # [N,C,H,W]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out + b.astype(np.float64)[None, :, None, None]


def make_cnn_traced() -> dict:
    m = Cnn().eval()
    wc, bc = weights("cnn/conv.w", (8, 3, 3, 3), 27), (rng("cnn/conv.b").standard_normal(8) * 0.1).astype(np.float32)
    wf, bf = weights("cnn/fc.w", (10, 8), 8), (rng("cnn/fc.b").standard_normal(10) * 0.1).astype(np.float32)
    set_param(m.conv.weight, wc)
    set_param(m.conv.bias, bc)
    set_param(m.fc.weight, wf)
    set_param(m.fc.bias, bf)
    x = grid_values("cnn/x", (3, 3, 32, 32), -1, 1, 1 / 64)
    # Traced with a batch of 2 (not 1, so no size-1 specialisation); the batch dim stays dynamic.
    with torch.no_grad():
        traced = torch.jit.trace(m, torch.from_numpy(x[:2]), check_trace=True)
    h = np.maximum(np_conv3x3_pad1(x, wc, bc), 0).mean(axis=(2, 3))
    logits = h @ wf.T.astype(np.float64) + bf
    return {
        "module": traced, "eager": m, "max_batch_size": 8,
        "inputs": [("INPUT__0", torch.from_numpy(x))],
        "config_inputs": [("INPUT__0", torch.float32, [3, 32, 32])],
        "config_outputs": [("OUTPUT__0", torch.float32, [10])],
        "expect": {"OUTPUT__0": logits},
        "outputs": lambda r: {"OUTPUT__0": r},
    }


class Control(nn.Module):
    def forward(self, x: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        branch = torch.empty_like(x)
        looped = torch.empty_like(x)
        for i in range(x.size(0)):
            row = x[i]
            if bool(row.sum() > 0):
                y = row * 2
            else:
                y = row - 1
            branch[i] = y
            z = y
            for _ in range(int(count[i, 0])):
                z = z * 0.5 + 1
            looped[i] = z
        return branch, looped


def make_scripted_control() -> dict:
    m = Control().eval()
    scripted = torch.jit.script(m)
    x = np.array([[1.5, -0.25, 2.0, 0.5], [-3.0, 1.0, 0.5, -0.75], [0.0, 0.0, 0.0, 0.0]], np.float32)
    count = np.array([[3], [1], [0]], np.int64)
    branch = np.where(x.sum(axis=1, keepdims=True) > 0, x * 2, x - 1)
    looped = branch.copy()
    for i, k in enumerate(count[:, 0]):
        for _ in range(k):
            looped[i] = looped[i] * 0.5 + 1
    return {
        "module": scripted, "eager": m, "max_batch_size": 4,
        "inputs": [("INPUT__0", torch.from_numpy(x)), ("INPUT__1", torch.from_numpy(count))],
        # Listed out of order on purpose: INPUT__<i> goes to forward's argument i.
        "config_inputs": [("INPUT__1", torch.int64, [1]), ("INPUT__0", torch.float32, [4])],
        "config_outputs": [("OUTPUT__1", torch.float32, [4]), ("OUTPUT__0", torch.float32, [4])],
        "expect": {"OUTPUT__0": branch, "OUTPUT__1": looped},
        "outputs": lambda r: {"OUTPUT__0": r[0], "OUTPUT__1": r[1]},
    }


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, features: Tensor, scale: Tensor) -> dict[str, Tensor]:
        logits = self.linear(features) * scale
        return {"logits": logits, "probs": torch.softmax(logits, dim=1)}


def make_dict_out() -> dict:
    m = DictOut().eval()
    w, b = weights("dict_out/w", (3, 6), 6), (rng("dict_out/b").standard_normal(3) * 0.1).astype(np.float32)
    set_param(m.linear.weight, w)
    set_param(m.linear.bias, b)
    scripted = torch.jit.script(m)
    features = grid_values("dict_out/features", (3, 6), -2, 2, 0.125)
    scale = np.array([[1.0], [0.5], [-2.0]], np.float32)
    logits = (features.astype(np.float64) @ w.T.astype(np.float64) + b) * scale
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {
        "module": scripted, "eager": m, "max_batch_size": 8,
        "inputs": [("features", torch.from_numpy(features)), ("scale", torch.from_numpy(scale))],
        "config_inputs": [("features", torch.float32, [6]), ("scale", torch.float32, [1])],
        "config_outputs": [("probs", torch.float32, [3]), ("logits", torch.float32, [3])],
        "expect": {"logits": logits, "probs": e / e.sum(axis=1, keepdims=True)},
        "outputs": lambda r: {"logits": r["logits"], "probs": r["probs"]},
    }


def make_fp16_model() -> dict:
    m = nn.Linear(4, 2)
    w, b = weights("fp16/w", (2, 4), 4), (rng("fp16/b").standard_normal(2) * 0.1).astype(np.float32)
    # Weights already at half precision, so the numpy check sees the same values.
    w, b = w.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32)
    set_param(m.weight, w)
    set_param(m.bias, b)
    m = m.half().eval()
    scripted = torch.jit.script(m)
    x = grid_values("fp16/x", (3, 4), -4, 4, 0.25).astype(np.float16)
    y = x.astype(np.float64) @ w.T.astype(np.float64) + b
    return {
        "module": scripted, "eager": m, "max_batch_size": 4,
        "inputs": [("INPUT__0", torch.from_numpy(x))],
        "config_inputs": [("INPUT__0", torch.float16, [4])],
        "config_outputs": [("OUTPUT__0", torch.float16, [2])],
        "expect": {"OUTPUT__0": y},
        "outputs": lambda r: {"OUTPUT__0": r},
    }


class IntTypes(nn.Module):
    def forward(self, a: Tensor, b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return a * 3 - 7, 255 - b, torch.logical_xor(mask, a > 0)


def make_int_types() -> dict:
    m = IntTypes().eval()
    scripted = torch.jit.script(m)
    a = np.array([[5, -2, 0], [1 << 20, -(1 << 20), 7]], np.int32)
    b = np.array([[0, 1, 128], [200, 254, 255]], np.uint8)
    mask = np.array([[True, False, True], [False, True, False]])
    return {
        "module": scripted, "eager": m, "max_batch_size": 0,
        "inputs": [("a", torch.from_numpy(a)), ("b", torch.from_numpy(b)), ("mask", torch.from_numpy(mask))],
        "config_inputs": [("a", torch.int32, [2, 3]), ("b", torch.uint8, [2, 3]), ("mask", torch.bool, [2, 3])],
        "config_outputs": [("OUTPUT__0", torch.int32, [2, 3]), ("OUTPUT__1", torch.uint8, [2, 3]),
                           ("OUTPUT__2", torch.bool, [2, 3])],
        "expect": {"OUTPUT__0": a * 3 - 7, "OUTPUT__1": 255 - b, "OUTPUT__2": mask ^ (a > 0)},
        "outputs": lambda r: {"OUTPUT__0": r[0], "OUTPUT__1": r[1], "OUTPUT__2": r[2]},
    }


MODELS = [
    ("cnn_traced", make_cnn_traced),
    ("scripted_control", make_scripted_control),
    ("dict_out", make_dict_out),
    ("fp16_model", make_fp16_model),
    ("int_types", make_int_types),
]


# ---------------------------------------------------------------------------------------------
# Checks


def compare(label: str, got: Tensor, want: np.ndarray | Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype, f"{label}: dtype {got.dtype} != {dtype}"
    have = got.detach().float().numpy() if dtype in (torch.float16, torch.bfloat16) else got.detach().numpy()
    want = want.detach().float().numpy() if isinstance(want, Tensor) and want.dtype in (torch.float16, torch.bfloat16) \
        else np.asarray(want)
    assert have.shape == want.shape, f"{label}: shape {have.shape} != {want.shape}"
    if dtype.is_floating_point:
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(have.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol * scale,
                                   err_msg=label)
    else:
        assert np.array_equal(have, want), f"{label}: {have} != {want}"


def run(module, inputs: list[Tensor]):
    with torch.no_grad():
        return module(*inputs)


def check_model(name: str, spec: dict, path: Path) -> dict:
    """Runs the eager module (the references), checks them against numpy, then loads the saved
    file back and checks it gives the same, for every batch size it serves."""
    dtypes = {n: dt for n, dt, _ in spec["config_outputs"]}
    in_dtypes = {n: dt for n, dt, _ in spec["config_inputs"]}
    inputs = [t for _, t in spec["inputs"]]
    for n, t in spec["inputs"]:
        assert t.dtype == in_dtypes[n], f"{name}/{n}: input dtype {t.dtype}"
    refs = spec["outputs"](run(spec["eager"], inputs))
    assert sorted(refs) == sorted(dtypes), f"{name}: outputs {sorted(refs)}"
    for out, t in refs.items():
        compare(f"{name}/{out} (eager vs numpy)", t, spec["expect"][out], dtypes[out])

    loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    got = spec["outputs"](run(loaded, inputs))
    for out, t in refs.items():
        compare(f"{name}/{out} (torch.jit.load)", got[out], t, dtypes[out])

    mbs = spec["max_batch_size"]
    if mbs > 0:
        rows = inputs[0].shape[0]
        for size in range(1, mbs + 1):
            picks = torch.tensor([(i * 2 + size) % rows for i in range(size)])
            part = spec["outputs"](run(loaded, [t[picks] for t in inputs]))
            for out, t in refs.items():
                compare(f"{name}/{out} ({size} rows)", part[out], t[picks], dtypes[out])
    # Config dims: the tensors' shapes without the batch dim.
    for (n, t) in spec["inputs"]:
        dims = next(d for cn, _, d in spec["config_inputs"] if cn == n)
        assert list(t.shape[1:] if mbs else t.shape) == dims, f"{name}/{n}: shape {list(t.shape)} vs dims {dims}"
    for out, t in refs.items():
        dims = next(d for cn, _, d in spec["config_outputs"] if cn == out)
        assert list(t.shape[1:] if mbs else t.shape) == dims, f"{name}/{out}: shape {list(t.shape)} vs dims {dims}"
    return {
        "inputs": {n: tensor_json(t) for n, t in spec["inputs"]},
        "outputs": {n: tensor_json(refs[n]) for n in sorted(refs)},
    }


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    start = time.monotonic()
    log(f"torch {torch.__version__}, numpy {np.__version__}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{OUT.name}.tmp-", dir=OUT.parent))
    try:
        references: dict = {}
        for name, build in MODELS:
            t0 = time.monotonic()
            spec = build()
            mdir = tmp / "repo" / name
            (mdir / "1").mkdir(parents=True)
            path = mdir / "1" / "model.pt"
            torch.jit.save(spec["module"], str(path))
            (mdir / "config.pbtxt").write_text(
                config_pbtxt(name, spec["max_batch_size"], spec["config_inputs"], spec["config_outputs"]))
            references[name] = check_model(name, spec, path)
            log(f"{name}: {dir_size(mdir)} bytes, {time.monotonic() - t0:.1f} s")

        text = json.dumps(references, indent=1, sort_keys=True, allow_nan=False)
        (tmp / "references.json").write_text(text + "\n", encoding="utf-8")
        total = dir_size(tmp)
        assert total < 10 * 1024 * 1024, f"fixtures too large: {total} bytes"
        (tmp / ".complete").write_text("")
        tmp.chmod(0o755)

        if OUT.exists():
            shutil.rmtree(OUT)
        try:
            tmp.rename(OUT)
        except OSError:
            # A concurrent run finished first; keep its (identical) result.
            if not (OUT / ".complete").is_file():
                raise
            shutil.rmtree(tmp)
        log(f"done: {total} bytes in {time.monotonic() - start:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(OUT)


if __name__ == "__main__":
    main()
