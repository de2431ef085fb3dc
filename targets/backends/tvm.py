"""Apache TVM (0.27, Relax): ONNX → Relax → `tvm.compile` for the profile's target → one shared library.

Host targets run in-process on Relax's VirtualMachine; aarch64 targets are cross-compiled with the profile's `cc`
(Debian's gcc-aarch64-linux-gnu) and checked to be aarch64 ELF shared objects. FP32 only: TVM imports Q/DQ ONNX
but runs it as float convolutions between quantize/dequantize (DESIGN.md §3), so CPU INT8 goes through ONNX Runtime.
Optional MetaSchedule tuning keeps its database per (ONNX hash, target, trial budget) and reuses it on later runs.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from edgesmith.targets.backends import BackendError, CompileOptions, DeviceUnreachable, declared_input_shapes
from edgesmith.targets.bundle_files.edgesmith_runtime import file_sha256
from edgesmith.targets.profile import Profile

NAME = "tvm"
ARTIFACT = "model.so"
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "armv7l"}   # ELF e_machine values
_TRIPLE_ARCH = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "armv7": "armv7l"}
_CROSS_INSTALL = {"aarch64-linux-gnu-gcc": "apt-get install gcc-aarch64-linux-gnu",
                  "arm-linux-gnueabihf-gcc": "apt-get install gcc-arm-linux-gnueabihf"}


def precisions(profile: Profile) -> list[str]:
    return ["fp32"]


def unavailable_reason(profile: Profile) -> str | None:
    # looked up, not imported: importing TVM takes 1.5 s, which a run whose TVM steps are all cached need not pay
    if importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed (pip install apache-tvm)"
    cc = profile.tvm.cc if profile.tvm else None
    if cc and shutil.which(cc) is None:
        how = _CROSS_INSTALL.get(cc, "install it or set tvm.cc in the profile")
        return f"cross compiler '{cc}' not found on PATH; install it: {how}"
    return None


def target_arch(profile: Profile) -> str:
    triple = str(profile.tvm.target.get("mtriple", "")) if profile.tvm else ""
    return _TRIPLE_ARCH.get(triple.split("-")[0], platform.machine()) if triple else platform.machine()


def runs_here(profile: Profile) -> bool:
    return unavailable_reason(profile) is None and target_arch(profile) == platform.machine()


def loader_files(profile: Profile) -> list[str]:
    return ["tvm_main.cc", "CMakeLists.txt"]   # a C++ example on the TVM runtime, besides the Python loader


def unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Operator type → node names that TVM's Relax ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    missing: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in known or node.domain not in ("", "ai.onnx"):
            missing.setdefault(f"{node.domain + '.' if node.domain else ''}{node.op_type}", []).append(
                node.name or f"#{index}")
    return missing


def resolved_target(profile: Profile, *, tuning: bool = False) -> dict:
    """The profile's target dict; mcpu 'native' becomes this machine's CPU, and tuning needs a core count."""
    from tvm.target import codegen

    target = dict(profile.tvm.target)
    if target.get("mcpu") == "native":
        target["mcpu"] = codegen.llvm_get_system_cpu()
    if tuning:
        target.setdefault("num-cores", os.cpu_count() or 1)
    return target


def compile(onnx_path: Path, profile: Profile, out_dir: Path, options: CompileOptions = CompileOptions()) -> dict:
    try:
        import tvm
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as exc:   # installed (unavailable_reason found it) but broken, e.g. a missing libtvm
        raise BackendError(f"apache-tvm is installed but cannot be imported: {exc}") from exc

    if options.precision != "fp32":
        raise BackendError(f"TVM builds fp32 only (it runs Q/DQ as float); got precision '{options.precision}'")
    reason = unavailable_reason(profile)
    if reason:
        raise BackendError(f"target '{profile.name}': {reason}")
    model = onnx.load(str(onnx_path))
    missing = unsupported_ops(model)
    if missing:
        listed = "; ".join(f"{op} ({', '.join(nodes[:3])}{', …' if len(nodes) > 3 else ''})"
                           for op, nodes in missing.items())
        raise BackendError(f"TVM cannot import these ONNX ops: {listed}; use backend onnxruntime for this model or "
                           "export it without them")
    start = time.time()
    shapes = _static_shapes(model, options.batch_size, declared_input_shapes(onnx_path))
    options.pause()
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    target_dict = resolved_target(profile, tuning=options.tuning_trials > 0)
    target = tvm.target.Target(target_dict)
    tuning = None
    if options.tuning_trials > 0:
        mod, tuning = _tune(mod, target, onnx_path, profile, options)
    with _pausing_between_passes(options):
        executable = tvm.compile(mod, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / ARTIFACT
    cc = profile.tvm.cc
    options.pause()   # writing the object file (LLVM's code generation) cannot pause; linking pauses first
    executable.export_library(str(library), fcompile=_linking_after_a_pause(options), **({"cc": cc} if cc else {}))
    arch = elf_arch(library)
    if arch != target_arch(profile):
        raise BackendError(f"{library} is a {arch} shared object, the target '{profile.name}' needs "
                           f"{target_arch(profile)}; check tvm.target.mtriple and tvm.cc in the profile")
    return {"target": target_dict, "cc": cc or "host", "elf_arch": arch, "input_shapes": shapes,
            "batch_size": options.batch_size, "tuning": tuning, "compile_seconds": round(time.time() - start, 2)}


def _pausing_between_passes(options: CompileOptions):
    """The current pass context (TVM's defaults unless a caller set its own) with `options.pause()` before every
    pass (~80 of them): a compile can pause every few tens of ms (0.5 s at most, for resnet18 here) instead of only
    when it ends, 1–5 s later in a batch."""
    import tvm

    @tvm.instrument.pass_instrument
    class PausePoints:
        def run_before_pass(self, mod, info):
            options.pause()

    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=current.opt_level, required_pass=list(current.required_pass),
                                     disabled_pass=list(current.disabled_pass),
                                     instruments=[*current.instruments, PausePoints()], config=dict(current.config))


def _linking_after_a_pause(options: CompileOptions):
    """TVM's linker (the C compiler, a process that would not pause) with a pause point before it starts."""
    from tvm.support import cc as tvm_cc

    @functools.wraps(tvm_cc.create_shared)   # and its attributes, which export_library reads
    def link(output, objects, **kwargs):
        options.pause()
        return tvm_cc.create_shared(output, objects, **kwargs)

    return link


def _static_shapes(model: onnx.ModelProto, batch_size: int, declared: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every symbolic dimension fixed (MetaSchedule tunes static shapes): the batch axis to `batch_size`, any other
    (a sequence length) to the size the model's input spec declares."""
    initializers = {t.name for t in model.graph.initializer}

    def size(name: str, axis: int, dim) -> int:
        if dim.HasField("dim_value"):
            return dim.dim_value
        if axis == 0:
            return batch_size
        return declared.get(name, [])[axis] if axis < len(declared.get(name, [])) else 1

    return {i.name: [size(i.name, axis, d) for axis, d in enumerate(i.type.tensor_type.shape.dim)]
            for i in model.graph.input if i.name not in initializers}


def _tune(mod, target, onnx_path: Path, profile: Profile, options: CompileOptions):
    """MetaSchedule with a trial budget. The database is kept per (ONNX hash, target, budget): a later run with the
    same key applies it without tuning again."""
    from tvm import relax

    if target_arch(profile) != platform.machine():
        raise BackendError(f"target '{profile.name}': MetaSchedule measures candidates on the device; tuning an "
                           f"{target_arch(profile)} target from this {platform.machine()} host is not supported — set "
                           "compile.tvm.tuning_trials to 0 for it")
    per_task = max(8, options.tuning_trials // 8)
    key = hashlib.sha256(json.dumps([file_sha256(onnx_path), str(target), options.tuning_trials, per_task,
                                     options.batch_size]).encode()).hexdigest()[:20]
    root = Path(options.tuning_dir or Path(tempfile.gettempdir()) / "edgesmith-tuning")
    database = root / key
    reused = (database / "database_tuning_record.json").is_file()
    start = time.time()
    if not reused:  # tune into a scratch folder and rename it into place: a killed tuning leaves no half database
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tuning-", dir=root))
        relax.pipeline.static_shape_tuning_pipeline(options.tuning_trials, target, str(scratch),
                                                    max_trials_per_task=per_task)(mod)
        if database.exists():   # a concurrent run finished the same tuning first: keep its database
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, database)
    mod = relax.pipeline.static_shape_tuning_pipeline(0, target, str(database))(mod)  # applies the database
    return mod, {"trials": options.tuning_trials, "max_trials_per_task": per_task, "database": str(database),
                 "reused": reused, "seconds": round(time.time() - start, 1)}


def elf_arch(path: Path) -> str:
    """The machine an ELF shared object is built for, read from its header (like `file`, without needing it)."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF" or int.from_bytes(header[16:18], "little") != 3:   # e_type 3: shared object
        raise BackendError(f"{path} is not an ELF shared object")
    machine = int.from_bytes(header[18:20], "little")
    return _ELF_MACHINES.get(machine, f"e_machine {machine}")


def load(folder: Path, profile: Profile | None = None):
    """A runner for a compiled folder (its compile.json says the input names and the compiled batch size)."""
    from edgesmith.targets.bundle_files.edgesmith_runtime import TVMModel

    facts = json.loads((Path(folder) / "compile.json").read_text())
    threads = profile.threads if profile is not None and profile.is_host else None
    return TVMModel(Path(folder) / ARTIFACT, list(facts["input_shapes"]), facts["batch_size"], threads)


def rpc_session(tracker: str, key: str, session_timeout_s: float, token: str | None = None):
    """A TVM RPC session with the device registered at `tracker` under `key`: the transport targets/device.py
    uploads bundles through (TVM's RPC is the one every backend's device measurement uses). `token`: the device
    server's shared secret, sent in TVM's handshake options (see edgesmith_rpc.serve_rpc)."""
    from tvm import rpc

    from edgesmith.targets.bundle_files.edgesmith_rpc import TOKEN_ENV, TOKEN_OPTION

    host, port = tracker.rsplit(":", 1)
    tracker_session = rpc.connect_tracker(host, int(port))
    try:
        if key not in tracker_session.summary()["queue_info"]:
            raise DeviceUnreachable(f"no device with RPC key '{key}' at tracker {tracker}; on the device run "
                                    f"`python3 edgesmith_runtime.py --rpc-server --tracker {tracker} --key {key}`")
        url, server_port, matchkey = _request_server(tracker_session, key)
    finally:
        tracker_session.close()
    try:
        return rpc.connect(url, server_port, f"{matchkey} {TOKEN_OPTION}{token}" if token else matchkey,
                           session_timeout_s)
    except Exception as exc:   # TVM raises its own error types; the refusal's reason is in the last line
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if any("session refused" in line for line in lines):
            raise DeviceUnreachable(f"the device with RPC key '{key}' refused the session: missing or wrong token; "
                                    f"set {TOKEN_ENV} to the token its server was started with") from None
        raise


def _request_server(tracker_session, key: str) -> tuple[str, int, str]:
    """The address and one-time match key of a free server under `key`: TrackerSession.request's first half (TVM's
    tracker protocol), so the connection itself can carry the token."""
    from tvm.rpc import base

    base.sendjson(tracker_session._sock, [base.TrackerCode.REQUEST, key, "", 1])
    reply = base.recvjson(tracker_session._sock)
    if reply[0] != base.TrackerCode.SUCCESS:
        raise DeviceUnreachable(f"the RPC tracker gave no server for key '{key}' ({reply})")
    url, port, matchkey = reply[1]
    return url, int(port), matchkey
