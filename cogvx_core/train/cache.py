"""The on-disk cache of VAE latents and T5 embeddings, keyed by content and settings.

A key is a hash of everything the cached tensors depend on: for latents the clip's bytes, the frames, size, fps and
crop it was prepared with, and the VAE's fingerprint; for text the caption, the encoder's fingerprint and the text
length. So a changed clip, caption or setting gets a new key and is encoded again, while every other entry is
reused, across runs and across datasets. Entries are never edited in place: a stale one is simply no longer asked
for (`prune` removes those a dataset no longer uses).

Layout: <root>/latents/ab/<key>.safetensors and <root>/text/ab/<key>.safetensors, each written to a temporary name
and renamed, so a killed run never leaves a half-written entry. File digests are remembered in <root>/digests.json
by (path, size, mtime), so an unchanged dataset is not re-read to be hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CogVXError

FORMAT = 1  # bump when what an entry holds changes


def key_of(kind: str, settings: dict) -> str:
    """The hex key of a cache entry: a hash of its kind, the cache format and its settings (JSON-able)."""
    text = json.dumps({"kind": kind, "format": FORMAT, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def module_fingerprint(module: torch.nn.Module, extra: dict | None = None) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and 64 strided values of every tensor.

    Two checkpoints that differ anywhere but in untouched elements get different fingerprints; hashing every byte of
    a T5-XXL would take longer than encoding a small dataset.
    """
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() and not t.is_complex():
                flat = t.detach().reshape(-1)
                idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()
                h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:32]


class Cache:
    """Latent and text entries under one root folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CogVXError(f"Cannot create the cache folder {self.root} ({e}); pass a writable --cache-dir.")
        self._digests_file = self.root / "digests.json"
        self._lock = threading.Lock()
        try:
            self._digests: dict = json.loads(self._digests_file.read_text())
        except (OSError, ValueError):
            self._digests = {}
        self._dirty = False

    # -- content digests ----------------------------------------------------------------------------------------
    def file_digest(self, path: Path) -> str:
        """sha256 of a file's bytes, remembered by (path, size, mtime_ns)."""
        st = path.stat()
        memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            if memo_key in self._digests:
                return self._digests[memo_key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with self._lock:
            self._digests[memo_key] = h.hexdigest()
            self._dirty = True
        return h.hexdigest()

    def media_digest(self, path: Path) -> str:
        """A video or image file's digest, or a frame folder's (its files' names and digests, in order)."""
        if path.is_dir():
            h = hashlib.sha256()
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                h.update(f"{f.name}:{self.file_digest(f)}".encode())
            return h.hexdigest()
        return self.file_digest(path)

    def save_digests(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            tmp = self._digests_file.with_name(f"digests.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._digests))
            os.replace(tmp, self._digests_file)
            self._dirty = False

    # -- entries ------------------------------------------------------------------------------------------------
    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
        return path

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, RuntimeError, ValueError) as e:  # deleted or damaged since the dataset was prepared
            raise CogVXError(f"Cache entry {path} cannot be read ({e}); delete it and prepare the dataset again.")

    def metadata(self, kind: str, key: str) -> dict[str, str]:
        with safe_open(str(self.path(kind, key)), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})

    def prune(self, keep: dict[str, set[str]]) -> int:
        """Deletes the entries of each kind whose key is not in keep[kind]; returns how many were deleted."""
        removed = 0
        for kind, keys in keep.items():
            for path in (self.root / kind).glob("*/*.safetensors"):
                if path.stem not in keys:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed
