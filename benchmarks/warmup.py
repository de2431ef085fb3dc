"""How long a timing loop must warm up after other work: p50 of one ONNX Runtime model timed right after a burst
of torch training and numpy BLAS work (whose thread pools keep spinning for a while: OpenBLAS for 2^28 cycles),
with several warm-up minimums, interleaved round by round. Two cases: the burst in this process (a pipeline step
that just trained) and in another process that pauses when the timing starts (a batch's other job).

    python -m edgesmith.benchmarks.warmup [--rounds N]

Prints each minimum's median p50 as a ratio to the longest one's: the shortest minimum whose ratio is ~1.00 in
both cases is enough (edgesmith_runtime.MIN_WARMUP_S).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from edgesmith.targets.bundle_files.edgesmith_runtime import MIN_WARMUP_S, time_calls

MINIMUMS_S = (0.0, 0.1, MIN_WARMUP_S, 0.5)
BURST_S = 0.4


def burst(seconds: float, net: torch.nn.Module, optimizer, matrix: np.ndarray) -> None:
    """Training steps and a BLAS product, the work a pipeline step leaves its thread pools spinning after."""
    end = time.time() + seconds
    while time.time() < end:
        loss = net(torch.rand(64, 1, 28, 28)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        matrix @ matrix


def busy_kit() -> tuple:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(32 * 26 * 26, 10))
    return net, torch.optim.SGD(net.parameters(), 0.01), np.random.rand(300, 300)


def other_job(go, paused) -> None:
    """Another process's training that stops at the next batch when `go` is cleared, as host_lock's builds do."""
    kit = busy_kit()
    while True:
        if not go.is_set():
            paused.set()
            go.wait()
            paused.clear()
        burst(0.0, *kit)


def timed_model():
    """A ~0.3 ms ONNX Runtime call here: convolutions as in a small CNN (benchmarks import no edgesmith model)."""
    layers = [torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU()]
    for _ in range(4):
        layers += [torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(64, 10)).eval()
    example = torch.zeros(1, 1, 28, 28)
    buffer = io.BytesIO()
    torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.numpy()}
    return lambda: session.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    run_once, kit = timed_model(), busy_kit()
    spawn = multiprocessing.get_context("spawn")
    go, paused = spawn.Event(), spawn.Event()
    go.set()
    worker = spawn.Process(target=other_job, args=(go, paused), daemon=True)
    worker.start()
    results = {case: {m: [] for m in MINIMUMS_S} for case in ("this process", "other process")}
    for _ in range(args.rounds):
        for minimum in MINIMUMS_S:
            go.clear()   # the other process first, so this one's burst is the only spin
            paused.wait()
            burst(BURST_S, *kit)
            results["this process"][minimum].append(float(np.median(time_calls(run_once, 5, 50, minimum))))
            go.set()
            time.sleep(BURST_S)   # the other process trains meanwhile
            go.clear()
            paused.wait()
            results["other process"][minimum].append(float(np.median(time_calls(run_once, 5, 50, minimum))))
            go.set()
    worker.terminate()
    print(f"p50 after a burst of work, ratio to a {MINIMUMS_S[-1]} s warm-up ({args.rounds} rounds, interleaved)")
    for case, by_minimum in results.items():
        longest = statistics.median(by_minimum[MINIMUMS_S[-1]])
        cells = "  ".join(f"{m:.2f} s: {statistics.median(v) / longest:.2f}" for m, v in by_minimum.items())
        print(f"{case:14} {cells}   ({longest:.3f} ms)")


if __name__ == "__main__":
    main()
