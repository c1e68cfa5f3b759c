"""Writing user files safely: a file is complete under its final name or not there at all, an existing frame folder is
never written over, a folder has one training run at a time, and a failed write is a CogVXError, never a path to a
file that does not exist.

    with atomic_path("out/video.mp4") as tmp:    # write tmp (same folder, same suffix); it becomes out/video.mp4
        encode(tmp)                              # only when the block ends without an error
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CogVXError

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_message(error: OSError) -> CogVXError:
    """Any OSError that reached a front end, as one line (a full disk or a read-only folder says what to do)."""
    if error.errno in WRITE_ERRNOS:
        return write_error(error.filename or "the output", error)
    return CogVXError(f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}.")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turns the OSError of a write to `path` (or a Rust writer's "os error N") into a CogVXError."""
    try:
        yield
    except Exception as e:
        os_error = _as_os_error(e)
        if os_error is None or isinstance(e, CogVXError):
            raise
        raise write_error(path, os_error) from None


def write_error(path: str | os.PathLike, error: OSError) -> CogVXError:
    """An OSError while writing `path` as a message a user can act on."""
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        why = "the disk is full; free some space or write to another disk"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the folder is not writable (read-only or no permission); choose another output folder"
    else:
        why = f"{error.strerror or error}; choose another output path"
    return CogVXError(f"{path}: cannot write here: {why}. Nothing was written under this name.")


def _remove(path: Path) -> None:
    """Best effort: the write already failed, and its error is the one to report."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def fsync_path(path: Path) -> None:
    """Flushes a file or a folder entry to the disk (a rename is only durable once its folder is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """A hidden name in final's folder that keeps its suffix (encoders pick the format by it)."""
    return final.with_name(f".{final.stem}{TMP_MARK}{os.getpid()}-{threading.get_ident() % 10**6}{final.suffix}")


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `final` to write a file or a folder to; when the block ends without an error it
    replaces `final` in one rename (a kill or a full disk before that leaves the previous `final` untouched), else it
    is removed. An OSError becomes a CogVXError naming the file and the cause."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(final, e) from None
    tmp = temp_name(final)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise CogVXError(f"{final}: the writer finished without writing anything; nothing was written.")
        if tmp.is_file():
            if tmp.stat().st_size == 0:
                raise CogVXError(f"{final}: the writer produced an empty file; nothing was written.")
            fsync_path(tmp)
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()  # an empty folder of the same name: the new one takes its place
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as e:
        _remove(tmp)
        os_error = _as_os_error(e)
        if os_error is not None:
            raise write_error(final, os_error) from None
        raise


def _as_os_error(error: BaseException) -> OSError | None:
    """An OSError, or the one a Rust writer (safetensors) reports in its message as "(os error 28)"."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"os error (\d+)", str(error)) if isinstance(error, Exception) else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def fresh_folder(out: str | os.PathLike) -> Path:
    """`out` when it does not exist or is empty; else its first unused numbered sub-folder (out/001, out/002, ...), so
    frames never overwrite or mix with files already there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CogVXError(f"{out}: a file of this name exists; frames go to a folder. Choose another --out, or end "
                         "it in .mp4, .webm or .gif to write a video.")
    if not out.exists() or not any(out.iterdir()):
        return out
    for i in range(1, 10000):
        sub = out / f"{i:03d}"
        if not sub.exists():
            log.warning("%s already has files; the frames go to %s", out, sub)
            return sub
    raise CogVXError(f"{out}: this folder has 9999 numbered runs already; choose another output folder.")


def check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise CogVXError(f"fps must be a positive number of frames per second, got {fps!r}; e.g. 8 (CogVideoX) or "
                         "16 (CogVideoX 1.5).")
    return float(fps)


def check_writable(out: str | os.PathLike) -> Path:
    """Refuses an output path that cannot be written, before a long generation or training run starts: the nearest
    existing folder on its way gets a probe file (permission bits alone miss read-only disks and root)."""
    out = Path(out)
    folder = out if out.is_dir() else out.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise CogVXError(f"{out}: {folder} is a file, not a folder; choose another output path.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cogvx-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(out, e) from None
    if out.is_file() and not os.access(out, os.W_OK):
        raise CogVXError(f"{out}: this file exists and is read-only; choose another output path.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------------------------
LOCK_NAME = ".cogvx.lock"
_held: dict[str, list] = {}  # real folder path -> [open lock file, holders in this process]
_held_mutex = threading.Lock()


def _try_lock(f) -> bool:
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except ImportError:  # Windows: a lock on the file's first byte (every holder must lock the same byte)
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    except OSError:
        return False


def _release(key: str) -> None:
    with _held_mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()  # closing the file drops the lock
            del _held[key]


class FolderLock:
    """Holds a folder for one process: an exclusive lock on <folder>/.cogvx.lock that the operating system drops when
    the process ends, so a killed run leaves no stale lock. Holders in one process share it (a ComfyUI session that
    rebuilds its trainer); it is released by release() or when the last holder is garbage-collected."""

    def __init__(self, folder: str | os.PathLike, what: str = "training run", hint: str = "use another folder"):
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(folder, e) from None
        self.folder = folder
        key = os.path.realpath(folder)
        with _held_mutex:
            entry = _held.get(key)
            if entry is None:
                path = folder / LOCK_NAME
                try:
                    f = open(path, "a+")
                except OSError as e:
                    raise write_error(path, e) from None
                if not _try_lock(f):
                    try:
                        f.seek(0)
                        owner = f.read().strip() or "unknown"
                    except OSError:  # Windows refuses reads of a locked byte
                        owner = "unknown"
                    f.close()
                    raise CogVXError(f"{folder}: another {what} (process {owner}) is using this folder right now; two "
                                     f"runs would overwrite each other's files. Wait for it to end or stop it, or "
                                     f"{hint}.")
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
                entry = _held[key] = [f, 0]
            entry[1] += 1
        self._finalizer = weakref.finalize(self, _release, key)

    def release(self) -> None:
        self._finalizer()


def damaged_checkpoint(path: Path, error: BaseException, complete: list[Path]) -> CogVXError:
    """A checkpoint that cannot be read (truncated, corrupt): named, with the newest earlier one offered."""
    earlier = [p for p in complete if p != path and p.name < path.name]
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    if earlier:
        offer = (f"The previous complete checkpoint is {earlier[-1]}: delete {path.name} (or move it away) and "
                 f"resume again to continue from {earlier[-1].name}.")
    else:
        offer = "There is no earlier checkpoint in this folder; start the run again in an empty folder."
    return CogVXError(f"{path}: this checkpoint is damaged or incomplete ({reason}). {offer}")
