"""The device server: a TVM RPC server that also measures uploaded bundles (`edgesmith.measure`), started by
`python3 edgesmith_runtime.py --rpc-server ...`. Ships in every bundle beside edgesmith_runtime.py; standalone (numpy,
tvm and the bundle's runtime, never edgesmith).

TVM's RPC has no authentication and a session may upload and load any library: whoever reaches the port runs code as
this user. So the server listens on loopback unless told otherwise (reach it through an SSH tunnel), and on any other
address only with a shared token, checked before a session starts.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import tarfile
from pathlib import Path


def register_rpc_functions() -> None:
    """Runs in the TVM RPC server's process before it serves: `edgesmith.measure(tar, warmup, runs, batch, threads)`
    unpacks a bundle uploaded into the session's work folder and returns `measure`'s JSON."""
    import multiprocessing

    import edgesmith_runtime  # beside this file, on sys.path in the server's process (serve_rpc)
    import tvm_ffi

    # The server serves each session in a child process; fork carries this registration into it (spawn would not).
    multiprocessing.set_start_method("fork", force=True)
    if os.environ.get(TOKEN_ENV):
        _require_token(os.environ[TOKEN_ENV])

    @tvm_ffi.register_global_func("edgesmith.measure", override=True)
    def _measure(tar_name: str, warmup: int, runs: int, batch_size: int, threads: int) -> str:
        tar_path = Path(tvm_ffi.get_global_func("tvm.rpc.server.workpath")(tar_name))
        folder = tar_path.with_suffix("")
        _unpack_flat(tar_path, folder)
        return json.dumps(edgesmith_runtime.measure(folder, warmup, runs, batch_size, threads or None))


def _unpack_flat(tar_path: Path, folder: Path) -> None:
    """A bundle is flat: plain files only, no folders, links or paths (Debian 12's Python lacks tarfile filters)."""
    folder.mkdir(exist_ok=True)
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            if not member.isfile() or Path(member.name).name != member.name or member.name.startswith("."):
                raise ValueError(f"{tar_path.name}: '{member.name}' is not a plain bundle file")
            (folder / member.name).write_bytes(archive.extractfile(member).read())


TOKEN_ENV = "EDGESMITH_RPC_TOKEN"
TOKEN_OPTION = "-edgesmith-token="   # carried in TVM's handshake key: "client:<matchkey> -edgesmith-token=..."
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ServerSetupError(ValueError):
    """The server's options are unsafe or incomplete; the message says what to give."""


def serve_rpc(tracker: str, key: str, host: str = "127.0.0.1", port: int = 9090, token: str | None = None) -> None:
    """A TVM RPC server registered at `tracker` under `key` (the profile's rpc_key), able to measure bundles.

    TVM's RPC has no authentication and a session may upload and load any library: whoever reaches the port runs
    code as this user. So it listens on loopback unless told otherwise (reach it through `ssh -L`), and on any other
    address only with a shared token, checked before a session starts."""
    from tvm import rpc

    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK and not token:
        raise ServerSetupError(f"--host {host} exposes the RPC server beyond this machine, and a session can run any "
                               f"code: give --token (or {TOKEN_ENV}) and the same {TOKEN_ENV} to `edgesmith run`, or "
                               "keep the default 127.0.0.1 and reach it through an SSH tunnel")
    if token:
        os.environ[TOKEN_ENV] = token   # the server's worker process reads it (register_rpc_functions)
    # The server runs in a worker process that imports the init callback by module name.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, here)
    callback = importlib.import_module("edgesmith_rpc").register_rpc_functions
    tracker_host, tracker_port = tracker.rsplit(":", 1)
    # On loopback the tracker hands clients 127.0.0.1: the host reaches it through `ssh -L PORT:127.0.0.1:PORT`.
    server = rpc.Server(host, port, port + 100, key=key, tracker_addr=(tracker_host, int(tracker_port)),
                        server_init_callback=callback, custom_addr="127.0.0.1" if host in LOOPBACK else None)
    print(f"edgesmith RPC server on {host}:{server.port}, key '{key}', tracker {tracker}, "
          f"{'token required' if token else 'no token (loopback only)'}", flush=True)
    server.proc.join()


def _require_token(token: str) -> None:
    """Refuses every session whose handshake lacks the token, before TVM starts serving it: nothing of the session
    (upload, load_module, any global function, edgesmith.measure) is reachable without it. TVM's server parses the
    handshake options and serves accepted connections through two module functions; both are wrapped here, in the
    server's own process."""
    import hmac

    from tvm.rpc import _ffi_api, server

    parse_options, serve_session = server._parse_server_opt, server._serving

    def options_with_token(options: list[str]) -> dict:
        parsed = parse_options(options)
        parsed["edgesmith_token"] = next((o[len(TOKEN_OPTION):] for o in options if o.startswith(TOKEN_OPTION)), "")
        return parsed

    def serve_with_token(sock, addr, options: dict, load_library) -> None:
        if hmac.compare_digest(options.get("edgesmith_token", "").encode(), token.encode()):
            return serve_session(sock, addr, options, load_library)
        server.logger.warning("refused a session from %s: missing or wrong edgesmith token", addr)
        try:
            _ffi_api.ReturnException(sock.fileno(), f"edgesmith RPC server: session refused, missing or wrong token; "
                                                    f"set {TOKEN_ENV} on the host to the server's token")
            sock.shutdown(socket.SHUT_WR)   # then read what the client sent: closing with unread data resets the
            sock.settimeout(5)              # connection, and the client would lose the reason
            while sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()

    server._parse_server_opt, server._serving = options_with_token, serve_with_token
