#!/usr/bin/env python3
"""Loads this bundle's model with its backend's runtime, and checks it against the reference outputs shipped with it.

Standalone: it needs numpy and the runtime of the bundle's backend only (onnxruntime; tvm (apache-tvm); tensorrt with
polygraphy for its buffers), never edgesmith.

  python3 edgesmith_runtime.py --check             # parity on this device against parity_reference.npz

  from edgesmith_runtime import open_bundle
  model = open_bundle("path/to/bundle")             # reads manifest.json
  logits, = model({"input": images})                # float32, already normalised as manifest.json's inputs say
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


class OnnxRuntimeModel:
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

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


def _pad(array: np.ndarray, batch: int) -> np.ndarray:
    if len(array) == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])


def open_bundle(folder: str | Path = ".", threads: int | None = None):
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    backend, artifact = manifest["backend"], folder / manifest["artifact"]
    if backend == "onnxruntime":
        return OnnxRuntimeModel(artifact, threads)
    if backend == "tvm":
        return TVMModel(artifact, [i["name"] for i in manifest["inputs"]], manifest["compile"]["batch_size"], threads)
    if backend == "tensorrt":
        engine = folder / manifest["tensorrt_build"]["engine"]
        if not engine.is_file():
            raise FileNotFoundError(f"{engine} does not exist yet: build it on the device with "
                                    f"`python3 {folder / 'build_tensorrt_engine.py'}`")
        return TensorRTModel(engine)
    raise ValueError(f"unknown backend '{backend}' in {folder / 'manifest.json'}")


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], tolerance: dict) -> dict:
    """Largest |difference| relative to the largest |reference output|, and top-1 agreement of the first output."""
    diff = max(float(np.max(np.abs(o.astype(np.float32) - e))) for o, e in zip(outputs, expected))
    scale = max(float(np.max(np.abs(e))) for e in expected) or 1.0
    rows = len(expected[0])
    agreement = float(np.mean(outputs[0].reshape(rows, -1).argmax(1) == expected[0].reshape(rows, -1).argmax(1)))
    passed = diff / scale <= tolerance["max_rel_diff"] and agreement >= tolerance["min_top1_agreement"]
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "top1_agreement": agreement, "samples": rows,
            "tolerance": tolerance, "passed": bool(passed)}


def check(folder: str | Path = ".", model=None) -> dict:
    """Runs the shipped parity inputs and compares with the reference outputs (ONNX Runtime on the source ONNX)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    inputs = dict(np.load(folder / "parity_inputs.npz", allow_pickle=False))
    reference = np.load(folder / "parity_reference.npz", allow_pickle=False)
    expected = [reference[f"output_{i}"] for i in range(len(reference.files))]
    return compare((model or open_bundle(folder))(inputs), expected, manifest["parity"]["tolerance"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load this bundle's model; --check runs the parity test.")
    parser.add_argument("--check", action="store_true", help="compare with parity_reference.npz")
    parser.add_argument("--folder", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    if not args.check:
        open_bundle(args.folder)
        print("loaded")
        return 0
    result = check(args.folder)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
