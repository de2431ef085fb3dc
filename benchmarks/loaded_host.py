"""Training on a loaded host: the default recipe's training stage (1 epoch, torch's default thread count) timed by
`edgesmith run` as it ships, and with libgomp's own spin count put back (GOMP_SPINCOUNT=300000, its default, which
edgesmith leaves alone when a user sets it), on the idle host and beside busy processes, interleaved round by round.

    python -m edgesmith.benchmarks.loaded_host [--rounds N] [--busy N] [--json FILE]

Each run is a fresh `edgesmith run` process with its own cache (the step is built, never reused); its time is the
train step's build seconds from the run's manifest. `--busy`: processes that spin on the CPU beside the loaded runs
(default: one per core). Prints the median of the rounds and each ratio to edgesmith's setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}


def train_seconds(work: Path, environment: dict[str, str]) -> float:
    """One cold `edgesmith run` of the default recipe's training alone; the train step's build seconds."""
    out = Path(tempfile.mkdtemp(dir=work))
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "run", "--out", str(out / "run"), "--cache-dir",
                           str(out / "cache"), "--set", "stages=[{kind: train, epochs: 1}]", "--set", "targets=[]",
                           "--quiet"], capture_output=True, text=True, env={**env, **environment})
    if proc.returncode != 0:
        sys.exit(f"edgesmith run failed:\n{proc.stderr[-3000:]}")
    steps = json.loads((out / "run" / "manifest.json").read_text())["steps"]
    return next(s["build_seconds"] for s in steps if s["kind"] == "train")


def busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = {"edgesmith": {}, "libgomp default": LIBGOMP_DEFAULT}
    seconds: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgesmith-loaded-host-") as work:
        for round_ in range(1, args.rounds + 1):
            for host in ("idle", f"{args.busy} busy"):
                busy = busy_processes(args.busy) if host != "idle" else []
                try:
                    for label, environment in settings.items():
                        seconds.setdefault((host, label), []).append(train_seconds(Path(work), environment))
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
            print(f"· round {round_}/{args.rounds}: " + ", ".join(
                f"{host}/{label} {times[-1]:.1f} s" for (host, label), times in seconds.items()), flush=True)
    print(f"\nTraining stage (default recipe, 1 epoch, {len(os.sched_getaffinity(0))} cores), median of "
          f"{args.rounds} rounds")
    print(f"{'host':<10}{'setting':<18}{'train s':>9}{'× edgesmith':>13}")
    results = {}
    for (host, label), times in seconds.items():
        median = statistics.median(times)
        ratio = median / statistics.median(seconds[(host, "edgesmith")])
        results[f"{host}/{label}"] = {"seconds": times, "median": median, "ratio_to_edgesmith": ratio}
        print(f"{host:<10}{label:<18}{median:>9.2f}{ratio:>13.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
