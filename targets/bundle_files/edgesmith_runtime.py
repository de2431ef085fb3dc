#!/usr/bin/env python3
"""Loads this bundle's model with its backend's runtime, and checks it against the reference outputs shipped with it.

Standalone: it needs numpy and the runtime of the bundle's backend only (onnxruntime; tvm (apache-tvm); tensorrt with
polygraphy for its buffers), never edgesmith.

  python3 edgesmith_runtime.py --check             # parity on this device against parity_reference.npz
  python3 edgesmith_runtime.py --measure           # parity, then latency samples of this device, as JSON
  python3 edgesmith_runtime.py --rpc-server --tracker HOST:9190 --key raspberry-pi-4
                                                   # a TVM RPC server that also measures uploaded bundles
                                                   # (ONNX Runtime ones too), so `edgesmith run` chooses by
                                                   # latency measured on this device; it listens on 127.0.0.1
                                                   # (use `ssh -R`/`-L`), or on --host ADDR with --token SECRET
                                                   # (EDGESMITH_RPC_TOKEN; the same on the host)

  from edgesmith_runtime import open_bundle
  model = open_bundle("path/to/bundle")             # reads manifest.json
  logits, = model({"input": images})                # float32, already normalised as manifest.json's inputs say
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


class OnnxRuntimeModel:
    """The one ONNX Runtime session set-up: the host harness, parity checks, benchmarks and devices all run this, so
    host and device timings are taken with the same settings (all cores unless told, one inter-op thread, every
    graph optimisation)."""

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        self.threads = threads or os.cpu_count() or 1
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class TVMModel:
    """Relax VirtualMachine over the compiled library; inputs go in chunks of the batch it was compiled for."""

    def __init__(self, library: Path, input_names: list[str], batch_size: int, threads: int | None = None):
        self.threads = threads or os.cpu_count() or 1
        os.environ.setdefault("TVM_NUM_THREADS", str(self.threads))   # read once, when the runtime starts
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self.input_names = input_names
        self.batch = batch_size

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        total = len(feeds[self.input_names[0]])
        chunks = []
        for start in range(0, total, self.batch):
            args = [self._tvm.runtime.tensor(np.ascontiguousarray(_pad(feeds[n][start:start + self.batch],
                                                                       self.batch)), self.device)
                    for n in self.input_names]
            outputs = self.vm["main"](*args)
            outputs = [outputs] if hasattr(outputs, "numpy") else list(outputs)   # one tensor, or a tuple
            chunks.append([o.numpy() for o in outputs])
        return [np.concatenate([c[i] for c in chunks])[:total] for i in range(len(chunks[0]))]


class TensorRTModel:
    """A serialized engine run through Polygraphy's TrtRunner, which owns the CUDA buffers."""

    def __init__(self, engine: Path):
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(engine.read_bytes()))
        self.runner.activate()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.runner.infer(feeds)
        return [np.asarray(v) for v in outputs.values()]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (bundles' and the cache's hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pad(array: np.ndarray, batch: int) -> np.ndarray:
    if len(array) == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])


def open_bundle(folder: str | Path = ".", threads: int | None = None, check_nan: bool = False) -> CheckedModel:
    """The bundle's model, called with {input name: array}. Inputs are checked against manifest.json (names, dtypes,
    ranks, fixed axes, a non-empty batch) before the runtime sees them; `check_nan` also refuses NaN/Inf inputs."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    backend, artifact = manifest["backend"], folder / manifest["artifact"]
    if backend == "onnxruntime":
        model = OnnxRuntimeModel(artifact, threads)
    elif backend == "tvm":
        model = TVMModel(artifact, [i["name"] for i in manifest["inputs"]], manifest["compile"]["batch_size"], threads)
    elif backend == "tensorrt":
        engine = folder / manifest["tensorrt_build"]["engine"]
        if not engine.is_file():
            raise FileNotFoundError(f"{engine} does not exist yet: build it on the device with "
                                    f"`python3 {folder / 'build_tensorrt_engine.py'}`")
        model = TensorRTModel(engine)
    else:
        raise ValueError(f"unknown backend '{backend}' in {folder / 'manifest.json'}")
    return CheckedModel(model, manifest["inputs"], check_nan)


class InputError(ValueError):
    """Inputs that do not fit the bundle's model; the message lists what it takes."""


class CheckedModel:
    """A backend's model behind a check of its inputs: the runtimes' own errors (a KeyError, an IndexError deep in
    TVM) do not say what the model takes."""

    def __init__(self, model, inputs: list[dict], check_nan: bool = False):
        self.model, self.inputs, self.check_nan = model, inputs, check_nan

    def __getattr__(self, name):   # threads, input_names, ... of the backend's model
        return getattr(self.model, name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(feeds, self.inputs, self.check_nan)
        return self.model(feeds)


def _describe_inputs(inputs: list[dict]) -> str:
    def dims(spec: dict) -> str:
        axes = {int(k): v for k, v in spec.get("dynamic_axes", {}).items()}
        return ", ".join(axes.get(i, str(n)) for i, n in enumerate(spec["shape"]))
    return "; ".join(f"'{s['name']}' {s['dtype']}[{dims(s)}]" for s in inputs)


def check_feeds(feeds: dict, inputs: list[dict], check_nan: bool = False) -> None:
    takes = f"the model takes {_describe_inputs(inputs)}"
    if not isinstance(feeds, dict):
        raise InputError(f"inputs must be a dict of input name → numpy array, got {type(feeds).__name__}; {takes}")
    names = [s["name"] for s in inputs]
    if set(feeds) != set(names):
        missing, extra = [n for n in names if n not in feeds], [n for n in feeds if n not in names]
        raise InputError(f"missing input(s) {missing}, unexpected {extra}; {takes}")
    batches = set()
    for spec in inputs:
        array, name = feeds[spec["name"]], spec["name"]
        if not isinstance(array, np.ndarray):
            raise InputError(f"input '{name}' is a {type(array).__name__}, not a numpy array; {takes}")
        if array.dtype != np.dtype(spec["dtype"]):
            raise InputError(f"input '{name}' is {array.dtype}; {takes} (use .astype(np.{spec['dtype']}))")
        dynamic = {int(k) for k in spec.get("dynamic_axes", {})}
        fixed_ok = all(i in dynamic or array.shape[i] == n for i, n in enumerate(spec["shape"][:array.ndim]))
        if array.ndim != len(spec["shape"]) or not fixed_ok:
            raise InputError(f"input '{name}' has shape {list(array.shape)}; {takes}")
        if array.ndim and array.shape[0] == 0:
            raise InputError(f"input '{name}' has an empty batch (shape {list(array.shape)}); give at least one row")
        batches.add(array.shape[0] if array.ndim else None)
        if check_nan and np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise InputError(f"input '{name}' holds {nonfinite_count([array])} NaN/Inf value(s)")
    if len(batches) > 1:
        raise InputError(f"inputs have different batch sizes {sorted(batches)}; {takes}")


def nonfinite_count(arrays: list[np.ndarray]) -> int:
    """NaN and ±Inf values in float outputs: every parity gate fails on them (NaN compares false with anything)."""
    floats = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    return sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in floats)


PSNR_CAP_DB = 300.0   # identical outputs: PSNR is infinite, which JSON cannot hold; float32 noise is ~140 dB


def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """How close outputs are to reference outputs of the same inputs, for any task: cosine similarity (mean over
    samples, each sample's output flattened), PSNR in dB (peak: the largest |reference|) and the largest |difference|.
    With several outputs each figure is the worst output's. `top1_agreement` only where the first output is
    (batch, classes): the argmax of an embedding or a score map is not a class."""
    outputs = [np.asarray(o, np.float64) for o in outputs]
    reference = [np.asarray(r, np.float64) for r in reference]
    if [o.shape for o in outputs] != [r.shape for r in reference]:
        raise ValueError(f"outputs of shapes {[list(o.shape) for o in outputs]} cannot be compared with reference "
                         f"outputs of shapes {[list(r.shape) for r in reference]}")
    rows = len(reference[0])
    result = {"cosine": None, "psnr_db": None, "max_abs_diff": None, "samples": rows}
    if nonfinite_count(outputs + reference):
        return result
    cosines, psnrs = [], []
    for out, ref in zip(outputs, reference):
        a, b = out.reshape(rows, -1), ref.reshape(rows, -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        both_zero = (np.abs(a).max(1, initial=0) == 0) & (np.abs(b).max(1, initial=0) == 0)
        cosine = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), both_zero.astype(float))
        cosines.append(float(np.mean(cosine)))
        mse, peak = float(np.mean((a - b) ** 2)), float(np.max(np.abs(b), initial=0))
        psnrs.append(PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, float(10 * np.log10(max(peak, 1e-30) ** 2 / mse))))
    result.update(cosine=min(cosines), psnr_db=min(psnrs),
                  max_abs_diff=max(float(np.max(np.abs(o - r), initial=0)) for o, r in zip(outputs, reference)))
    if reference[0].ndim == 2 and reference[0].shape[1] > 1:
        result["top1_agreement"] = float(np.mean(outputs[0].argmax(1) == reference[0].argmax(1)))
    return result


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], tolerance: dict) -> dict:
    """Largest |difference| relative to the largest |reference output| (and top-1 agreement where the first output
    is (batch, classes) and the tolerance gives a minimum) against the tolerance. Any NaN or Inf in either side
    fails, and `problem` says which side."""
    outputs = [o.astype(np.float32) for o in outputs]
    rows = len(expected[0])
    nonfinite = {"outputs": nonfinite_count(outputs), "reference": nonfinite_count(expected)}
    if any(nonfinite.values()):
        side = "the outputs" if nonfinite["outputs"] else "the reference outputs"
        count = nonfinite["outputs"] or nonfinite["reference"]
        return {"max_abs_diff": None, "max_rel_diff": None, "top1_agreement": None, "samples": rows,
                "tolerance": tolerance, "passed": False, "nonfinite": nonfinite,
                "problem": f"{count} NaN/Inf value(s) in {side}"}
    figures = fidelity(outputs, expected)
    diff = figures["max_abs_diff"]
    scale = max(float(np.max(np.abs(e))) for e in expected) or 1.0
    agreement, min_agreement = figures.get("top1_agreement"), tolerance.get("min_top1_agreement")
    passed = diff / scale <= tolerance["max_rel_diff"] and (agreement is None or min_agreement is None
                                                            or agreement >= min_agreement)
    agreement_text = "" if agreement is None else f", top-1 agreement {agreement:.3f}"
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "top1_agreement": agreement,
            "cosine": figures["cosine"], "psnr_db": figures["psnr_db"], "samples": rows,
            "tolerance": tolerance, "passed": bool(passed), "nonfinite": nonfinite,
            "problem": None if passed else f"max_rel_diff {diff / scale:.3g}{agreement_text} "
                                           f"outside the tolerance {tolerance}"}


def check(folder: str | Path = ".", model=None) -> dict:
    """Runs the shipped parity inputs and compares with the reference outputs (ONNX Runtime on the source ONNX);
    `fidelity`: against the original model's outputs (fidelity_reference.npz), what compression cost."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    inputs = dict(np.load(folder / "parity_inputs.npz", allow_pickle=False))
    outputs = (model or open_bundle(folder))(inputs)
    result = compare(outputs, read_outputs(folder / "parity_reference.npz"), manifest["parity"]["tolerance"])
    if (folder / FIDELITY_REFERENCE).is_file():
        result["fidelity"] = fidelity(outputs, read_outputs(folder / FIDELITY_REFERENCE))
    return result


FIDELITY_REFERENCE = "fidelity_reference.npz"


def read_outputs(path: str | Path) -> list[np.ndarray]:
    """output_0, output_1, ... of an .npz, in order."""
    with np.load(path, allow_pickle=False) as npz:
        return [npz[f"output_{i}"] for i in range(len(npz.files))]


EMULATED = "EDGESMITH_EMULATED"   # set by an emulator's wrapper: its timings are not a device's latency


def cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo as field → value (every core reports the same; empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def cpu_model() -> str:
    """x86 names its CPU in "model name"; ARM boards name the board in "Model" or "Hardware"."""
    fields = cpuinfo()   # x86's lowercase "model" is a number: not used
    return fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.processor() \
        or "unknown"


def device_facts() -> dict:
    return {"hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "emulated": os.environ.get(EMULATED) or None}


MIN_WARMUP_S = 0.25  # thread pools of work just finished spin (OpenBLAS: 2^28 cycles) and slow a timing: with no
#                     minimum p50 reads 1.5–1.7× slow here, 0.1–0.5 s agree within ±5 % (benchmarks/warmup.py)


def time_calls(run_once, warmup: int, runs: int, min_warmup_s: float = MIN_WARMUP_S) -> list[float]:
    """Milliseconds of `runs` calls after at least `warmup` calls and `min_warmup_s` seconds of warm-up."""
    started = time.perf_counter()
    done = 0
    while done < warmup or (warmup and time.perf_counter() - started < min_warmup_s):
        run_once()
        done += 1
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run_once()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure(folder: str | Path = ".", warmup: int = 10, runs: int = 100, batch_size: int = 1,
            threads: int | None = None) -> dict:
    """Parity on this device, then latency samples of one batch of the shipped inputs (skipped if parity fails).
    A TensorRT bundle's engine is built first, here, if it is not there yet."""
    engine_build = build_tensorrt_engine(folder)
    model = open_bundle(folder, threads)
    result = {"device": device_facts(), "parity": check(folder, model), "samples_ms": None,
              "threads": getattr(model, "threads", None) or threads or os.cpu_count(), "engine_build": engine_build}
    if result["parity"]["passed"]:
        inputs = dict(np.load(Path(folder) / "parity_inputs.npz", allow_pickle=False))
        feeds = {name: _pad(array[:batch_size], batch_size) for name, array in inputs.items()}
        result["samples_ms"] = time_calls(lambda: model(feeds), warmup, runs)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:   # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def build_tensorrt_engine(folder: str | Path) -> dict | None:
    """Runs the bundle's build_tensorrt_engine.py when its engine is missing; its facts, or None if nothing to do."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest["backend"] != "tensorrt" or (folder / manifest["tensorrt_build"]["engine"]).is_file():
        return None
    done = subprocess.run([sys.executable, str(folder / "build_tensorrt_engine.py")], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"TensorRT engine build failed on this device (exit {done.returncode}): "
                           f"{said[-1] if said else 'no output'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load this bundle's model; --check runs the parity test.")
    parser.add_argument("--check", action="store_true", help="compare with parity_reference.npz")
    parser.add_argument("--measure", action="store_true", help="parity, then latency samples (JSON)")
    parser.add_argument("--rpc-server", action="store_true", help="serve measurements to `edgesmith run`")
    parser.add_argument("--tracker", help="HOST:PORT of the TVM RPC tracker (with --rpc-server)")
    parser.add_argument("--key", help="RPC key: the profile's rpc_key (with --rpc-server)")
    parser.add_argument("--host", default="127.0.0.1", help="address the RPC server listens on (default: loopback "
                        "only; any other address needs --token)")
    parser.add_argument("--token", help="shared secret a client must present (default: $EDGESMITH_RPC_TOKEN)")
    parser.add_argument("--port", type=int, default=9090, help="first port the RPC server tries")
    parser.add_argument("--folder", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    if args.rpc_server:
        if not args.tracker or not args.key:
            parser.error("--rpc-server needs --tracker HOST:PORT and --key KEY")
        sys.path.insert(0, str(Path(__file__).resolve().parent))   # the server module ships beside this one
        import edgesmith_rpc

        try:
            edgesmith_rpc.serve_rpc(args.tracker, args.key, args.host, args.port, args.token)
        except edgesmith_rpc.ServerSetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.measure:
        print(json.dumps(measure(args.folder)))
        return 0
    if not args.check:
        open_bundle(args.folder)
        print("loaded")
        return 0
    result = check(args.folder)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
