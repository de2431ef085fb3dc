"""Content-addressed step outputs: atomic commits, verified reuse, one builder per key.

A step's key hashes its inputs (pipeline/steps.py). Its output is built in a private temporary folder and renamed
into place only when complete (rename is atomic on one filesystem), so a run killed at any point leaves either a
whole artifact or none. The sidecar records each file's size and sha256; an entry is reused only when its files
still match (a truncated or edited file is discarded and rebuilt). A per-key file lock makes a second run wait for
a step another run is building instead of building it twice; the kernel drops the lock when its holder dies, so a
killed run leaves no stale lock.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from edgesmith.errors import EdgesmithError
from edgesmith.pipeline.progress import warn
from edgesmith.targets.bundle_files.edgesmith_runtime import file_sha256

SIDECAR = "sidecar.json"
_TMP_PREFIX = ".tmp-"
_LOCKS = ".locks"
_FICLONE = 0x40049409   # ioctl: share the source's blocks (btrfs, XFS); the copy is still independent
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(EdgesmithError):
    """A write failed for lack of space; the partial output was removed."""


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def disk_space(folder: Path) -> Iterator[None]:
    """Turns 'no space left' inside the block into one line naming the folder that filled up."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        raise DiskFullError(f"no space left on the device holding '{folder}'; free space there, or point "
                            "--cache-dir / --out at a larger disk (finished steps stay cached)") from None


def _is_disk_full(exc: BaseException | None) -> bool:
    """Tools report it their own way (safetensors and onnx as their own error types with the OS message inside)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if any(os.strerror(code) in str(exc) for code in _DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with disk_space(path.parent):
            tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        with disk_space(self.root):
            (self.root / _LOCKS).mkdir(parents=True, exist_ok=True)

    @property
    def locks_dir(self) -> Path:
        return self.root / _LOCKS

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key[:20]}"

    def load(self, kind: str, key: str) -> tuple[Path, dict] | None:
        """The committed artifact for (kind, key) and its sidecar, or None. An entry whose files no longer match
        the sidecar (truncated, edited, added) is discarded with a warning, so the caller rebuilds it."""
        path = self.path(kind, key)
        if not (path / SIDECAR).is_file():
            return None
        sidecar, problem = _verified(path)
        if problem:
            warn(f"cache entry '{path}' {problem}; discarding it and rebuilding")
            self.discard(kind, key)
            return None
        return path, sidecar

    def discard(self, kind: str, key: str) -> None:
        shutil.rmtree(self.path(kind, key), ignore_errors=True)

    @contextmanager
    def exclusive(self, kind: str, key: str, on_wait: Callable[[], None]) -> Iterator[None]:
        """Holds the key's lock; `on_wait` is called once if another process holds it (then this one waits)."""
        with disk_space(self.root), open(self.root / _LOCKS / f"{kind}-{key[:20]}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def build(self, kind: str, key: str, sidecar: dict) -> Iterator[Path]:
        """Yields an empty folder to write into; on success records its files in the sidecar and commits.

        `sidecar` may be filled in (metrics) by the caller while building. Call it holding `exclusive`.
        """
        final = self.path(kind, key)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.time()
        try:
            with disk_space(self.root):
                tmp.mkdir()
                yield tmp
                sidecar.setdefault("kind", kind)
                sidecar["key"] = key
                sidecar["files"] = {p.name: file_record(p) for p in sorted(tmp.iterdir())}
                sidecar["seconds"] = round(time.time() - started, 3)   # hashing its files is part of building it
                atomic_write_json(tmp / SIDECAR, sidecar)
            shutil.rmtree(final, ignore_errors=True)   # a corrupt entry discarded meanwhile, or --no-cache
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def sweep_stale(self, older_than_s: float = 3600) -> None:
        """Removes temporary folders left by killed runs (SIGKILL skips every cleanup handler)."""
        now = time.time()
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if not _pid_alive(pid) or now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)


def _verified(artifact: Path) -> tuple[dict, str | None]:
    """The sidecar, and what is wrong with the artifact's files (None: they are exactly what was built)."""
    try:
        sidecar = json.loads((artifact / SIDECAR).read_text())
        recorded = sidecar["files"]
        expected = {name: (int(r["bytes"]), str(r["sha256"])) for name, r in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, "has an unreadable sidecar"
    present = {p.name: p for p in artifact.iterdir() if p.name != SIDECAR}
    if set(present) != set(expected):
        changed = sorted(set(present) ^ set(expected))
        return sidecar, f"has missing or extra files ({', '.join(changed[:3])})"
    for name, path in present.items():
        if path.is_symlink() or not path.is_file():
            return sidecar, f"holds '{name}', which is not a plain file"
        size, digest = expected[name]
        if path.stat().st_size != size:
            return sidecar, f"has '{name}' of {path.stat().st_size} bytes, built with {size}"
    for name, path in present.items():   # sizes first: a truncated file costs no hashing
        if file_sha256(path) != expected[name][1]:
            return sidecar, f"has '{name}' changed since it was built (sha256 differs)"
    return sidecar, None


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(artifact: Path, dest: Path) -> None:
    """Places a cached artifact into the run folder as independent files (reflinks where the filesystem shares
    blocks, else copies): editing the run folder never reaches the cache."""
    tmp = dest.with_name(f"{_TMP_PREFIX}{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_space(dest.parent):
            tmp.mkdir(parents=True)
            for src in artifact.iterdir():
                _clone_or_copy(src, tmp / src.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def _clone_or_copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as source, open(dest, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
        except OSError:   # most filesystems (ext4, tmpfs, overlay) cannot share blocks
            shutil.copyfileobj(source, target, 1 << 20)
    shutil.copymode(src, dest)
