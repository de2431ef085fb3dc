"""Deployment bundles: `bundles/<profile>/` holds the artifact(s), a manifest (model, profile, backend, precision,
inputs/outputs with normalisation, sha256 of every file, tool versions, parity figures), parity inputs with their
reference outputs, and the standalone loader (`edgesmith_runtime.py`; for TVM also a C++ example; for TensorRT the
on-device builder). `verify` re-checks the hashes and re-runs parity wherever the backend runs on this machine."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgesmith.errors import TargetError
from edgesmith.pipeline.cache import file_sha256
from edgesmith.pipeline.fidelity import save_outputs
from edgesmith.targets import Profile
from edgesmith.targets.backends import BUNDLE_FILES, get_backend
from edgesmith.targets.bundle_files.edgesmith_runtime import FIDELITY_REFERENCE

MANIFEST = "manifest.json"
FORMAT = "edgesmith-bundle/1"
RUNTIME = "edgesmith_runtime.py"
RPC_SERVER = "edgesmith_rpc.py"   # `edgesmith_runtime.py --rpc-server` on a board: every bundle can serve measurements
README = "README.md"
_SKIP = ("sidecar.json",)   # cache bookkeeping


def write(folder: Path, *, profile: Profile, candidate, io_spec: dict, model: str, recipe: str,
          versions: dict) -> None:
    """Fills `folder` (an empty folder the cache commits atomically) with the chosen candidate's bundle."""
    backend = get_backend(candidate.backend)
    for src in candidate.compiled.artifact.iterdir():
        if src.name not in _SKIP:
            shutil.copy2(src, folder / src.name)
    for name in ("parity_inputs.npz", "parity_reference.npz", FIDELITY_REFERENCE):
        shutil.copy2(candidate.checked.artifact / name, folder / name)
    for name in {RUNTIME, RPC_SERVER, *backend.loader_files(profile)}:
        shutil.copy2(BUNDLE_FILES / name, folder / name)
    compile_facts = candidate.compiled.facts["compile"]
    manifest = {
        "format": FORMAT, "model": model, "recipe": recipe, "profile": profile.model_dump(mode="json"),
        "backend": candidate.backend, "precision": candidate.precision,
        "artifact": backend.ARTIFACT, "status": candidate.status,
        "inputs": io_spec["inputs"], "outputs": io_spec["outputs"], "compile": compile_facts,
        "parity": {"host": candidate.host_parity, "device": candidate.device_parity,
                   "tolerance": candidate.checked.facts["tolerance"],
                   "reference": "ONNX Runtime (CPU) on the source ONNX, on the build host"},
        # what compression cost: against the model as it entered the first compression stage (fidelity_reference.npz)
        "fidelity": candidate.fidelity,
        "latency_ms": candidate.latency,
        "latency_measured_on": candidate.measured_on,
        "device": candidate.device["device"] if candidate.device else None,
        "versions": versions,
    }
    if "tensorrt_build" in compile_facts:
        manifest["tensorrt_build"] = compile_facts["tensorrt_build"]
    (folder / README).write_text(readme(manifest))
    manifest["files"] = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def readme(manifest: dict) -> str:
    """The bundle's README.md: what is inside and how to load and check it on the device, for its backend."""
    backend, profile, versions = manifest["backend"], manifest["profile"], manifest["versions"]
    inputs = "; ".join(f"`{i['name']}` {i['dtype']}{list(i['shape'])}" + (
        f", normalised with mean {i['mean']} std {i['std']}" if i.get("mean") else "") for i in manifest["inputs"])
    runtime = {"onnxruntime": f"`pip install onnxruntime=={versions.get('onnxruntime')} numpy`",
               "tvm": f"the TVM runtime of apache-tvm {versions.get('apache-tvm')}, the version that compiled "
                      "model.so (`pip install apache-tvm==…` on the board, or its libtvm_runtime.so)",
               "tensorrt": "TensorRT with its Python bindings (JetPack, or an NVIDIA container), numpy"}[backend]
    latency = manifest.get("latency_ms") or {}
    timing = (f"p50 {latency['p50']:.3f} ms measured on {manifest.get('latency_measured_on')}" if latency
              else "not timed on the device by edgesmith")
    lines = [f"# {manifest['model']} for {profile['name']}: {backend} {manifest['precision']}", "",
             f"Built by edgesmith from recipe `{manifest['recipe']}` ({manifest['status']}; {timing}).",
             f"Inputs: {inputs}. The manifest lists the outputs, parity and fidelity figures, the tool versions and",
             "the sha256 of every file.", "",
             "## Inside", "",
             f"- `{manifest['artifact']}`: the model for {backend}; `manifest.json`: everything about it",
             "- `parity_inputs.npz` and `parity_reference.npz`: inputs and the outputs this artifact must reproduce; "
             "`fidelity_reference.npz`: the original (uncompressed) model's outputs for the same inputs",
             "- `edgesmith_runtime.py`: a standalone loader (numpy and the runtime; edgesmith is not needed)",
             "", "## Load and check it on the device", "", f"Needs {runtime}.", "", "```bash",
             "python3 edgesmith_runtime.py --check     # parity with parity_reference.npz and fidelity, as JSON",
             "python3 edgesmith_runtime.py --measure   # parity, then latency samples", "```", "", "```python",
             "import sys; sys.path.insert(0, \"path/to/this/folder\")",
             "from edgesmith_runtime import open_bundle",
             "model = open_bundle(\"path/to/this/folder\", check_nan=True)   # refuses wrong names, shapes, dtypes",
             "outputs = model({" + ", ".join(f"\"{i['name']}\": x{n}" for n, i in enumerate(manifest["inputs"]))
             + "})   # numpy arrays in, a list of numpy arrays out", "```"]
    if backend == "tvm":
        lines += ["", "## C++ (TVM runtime)", "", "`tvm_main.cc` and `CMakeLists.txt` run `model.so` from C++:",
                  "", "```bash", "cmake -S . -B build && cmake --build build",
                  "./build/tvm_main model.so input.bin " + " ".join(str(d) for d in manifest["inputs"][0]["shape"]),
                  "```", "", "`input.bin`: raw little-endian float32, already normalised as above."]
    if "tensorrt_build" in manifest:
        command = manifest["compile"].get("trtexec", "")
        lines += ["", "## Build the TensorRT engine on the device", "",
                  "The engine is built where it runs (engines are specific to the GPU and the TensorRT version):",
                  "", "```bash", "python3 build_tensorrt_engine.py   # the recorded settings; writes model.engine",
                  f"{command}   # the same with NVIDIA's trtexec (trtexec.sh)", "```",
                  "", "Then `python3 edgesmith_runtime.py --check` checks the engine against the references."]
    return "\n".join(lines) + "\n"


def _check_files(folder: Path, listed: dict[str, str]) -> None:
    """Exactly the manifest's files, each a plain file with its recorded sha256: a link (to /etc/passwd, say) or an
    added file is reported like a changed one, since the device would load or ship it."""
    entries = {p.name: p for p in folder.iterdir()}
    links = sorted(name for name, p in entries.items() if p.is_symlink())
    extra = sorted(set(entries) - set(listed) - {MANIFEST} - set(links))
    bad = [name for name, digest in listed.items() if name not in links and
           (not (folder / name).is_file() or file_sha256(folder / name) != digest)]
    problems = [f"{what}: {', '.join(names)}" for what, names in (
        ("missing or changed since the bundle was written", bad), ("not in the manifest", extra),
        ("symbolic links", links)) if names]
    if problems:
        raise TargetError(f"{folder}: {'; '.join(problems)}; rebuild the bundle with `edgesmith run`")


def save_parity_data(folder: Path, inputs: dict[str, np.ndarray], reference: list[np.ndarray],
                     original: list[np.ndarray]) -> None:
    """The parity inputs, the source ONNX's outputs for them (parity), and the reference model's (fidelity)."""
    np.savez(folder / "parity_inputs.npz", **inputs)
    save_outputs(folder / "parity_reference.npz", reference)
    save_outputs(folder / FIDELITY_REFERENCE, original)


def verify(folder: Path) -> dict:
    """Hashes of every listed file, then parity on this machine where the bundle's backend runs here."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise TargetError(f"{folder}: no {MANIFEST}; give the folder of one bundle, e.g. runs/<name>/bundles/<profile>")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise TargetError(f"{manifest_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise TargetError(f"{manifest_path}: format '{manifest.get('format')}' is not {FORMAT}")
    _check_files(folder, manifest["files"])
    profile = Profile(**manifest["profile"])
    backend = get_backend(manifest["backend"])
    result = {"bundle": str(folder), "files": len(manifest["files"]), "hashes": "ok", "backend": manifest["backend"],
              "precision": manifest["precision"], "parity": None}
    if not backend.runs_here(profile) or manifest.get("status", "").endswith("build on device"):
        result["parity"] = f"not run here: the {manifest['backend']} artifact for '{profile.name}' runs on the device"
        return result
    from edgesmith.targets.bundle_files.edgesmith_runtime import check

    result["parity"] = check(folder)   # through the bundle's own loader, as on the device
    if not result["parity"]["passed"]:
        raise TargetError(f"{folder}: parity failed on this host: {result['parity']['problem']}")
    return result
