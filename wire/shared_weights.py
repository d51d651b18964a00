"""Weight pushes between processes of one machine through shared memory, beside the HTTP body.

The trainer writes its tensors into a safetensors file in /dev/shm (a RAM file system) and sends only its
path; the server maps the file and applies the tensors straight from it. The file is kept and rewritten in
place for the next push of the same tensors (same names, shapes and dtypes), so after the first push a
push costs one memory copy on each side: no serialization, no socket, no page faults.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from wire.safetensors import read_payload, safetensors_header

SHARED_DIRECTORY = Path("/dev/shm")


PREFIX = "gorgon-weights-"


def _remove_orphans() -> None:
    """Delete the files of trainers that died without closing their client (the pid in the name is gone):
    shared memory is RAM, and nobody else would free it."""
    for path in SHARED_DIRECTORY.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:            # alive, another user's
            pass


def shared_memory_available() -> bool:
    return SHARED_DIRECTORY.is_dir() and os.access(SHARED_DIRECTORY, os.W_OK)


class SharedWeightsFile:
    """The trainer's side: one safetensors file in shared memory, mapped once, rewritten per push."""

    def __init__(self):
        self.path: Path | None = None
        self._layout: tuple | None = None
        self._map: mmap.mmap | None = None
        self._views: dict[str, torch.Tensor] = {}
        self._adopted = False
        self._retired: list[tuple[mmap.mmap, Path]] = []      # mappings adopted tensors may still live in

    def write(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Copy the tensors (CPU, contiguous) into the file, creating it when their layout changed; a
        tensor that already lives in the file (adopt) is not copied."""
        layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
        if layout != self._layout:
            self._create(tensors, layout)
        for name, tensor in tensors.items():
            view = self._views[name]
            if tensor.data_ptr() != view.data_ptr():
                view.copy_(tensor)
        return self.path

    def adopt(self, tensors: Mapping[str, torch.nn.Parameter | torch.Tensor]) -> None:
        """Move the tensors' storage into the file: each becomes a view of its bytes there (its values
        kept), so an optimizer updates them in place and a push of the same tensors copies nothing."""
        self.write({name: t.detach() for name, t in tensors.items()})
        for name, tensor in tensors.items():
            tensor.data = self._views[name]
        self._adopted = True

    def _create(self, tensors: Mapping[str, torch.Tensor], layout: tuple) -> None:
        if self._adopted:
            # Tensors still live in the old mapping: keep it (and its file) until close().
            self._retired.append((self._map, self.path))
            self._map, self.path, self._views, self._adopted = None, None, {}, False
        self.close()
        header, ordered = safetensors_header(tensors)
        size = len(header) + sum(t.numel() * t.element_size() for t in ordered)
        _remove_orphans()
        descriptor, name = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", suffix=".safetensors",
                                            dir=SHARED_DIRECTORY)
        try:
            os.ftruncate(descriptor, size)
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        self._map[: len(header)] = header
        self.path, self._layout = Path(name), layout
        self._views = read_payload(self._map)

    def close(self) -> None:
        """Delete the file and unmap it, unless tensors were adopted into it: their memory stays mapped for
        as long as they live (a server reading it keeps its own mapping until it is done)."""
        self._views = {}
        if self._map is not None and not self._adopted:
            self._map.close()
        self._map = None
        for _, path in self._retired:
            path.unlink(missing_ok=True)
        self._retired = []
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self._layout, self._adopted = None, False


def in_shared_memory(path: str) -> bool:
    """The path names a file inside the shared-memory directory (after resolving links and '..')."""
    return Path(os.path.realpath(path)).parent == SHARED_DIRECTORY.resolve()


class SharedWeightsReader:
    """The server's side: the tensors of the shared file a push names, as read-only views of its pages.
    The last file stays mapped, so the next push of the same file (rewritten in place by the trainer)
    costs no mapping and no header parse; another file replaces it, which also frees a file its trainer
    deleted on exit (one model's size of RAM at most is held that long)."""

    def __init__(self):
        self._key: tuple | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def read(self, path: str) -> dict[str, torch.Tensor]:
        status = os.stat(path)
        # The header too: a writer that rewrote the same file with other tensors of the same total size
        # must not be read through the old offsets.
        key = (os.path.realpath(path), status.st_ino, status.st_size, _header(path))
        if key != self._key:
            self._key, self._tensors = None, {}
            self._tensors = mapped_weights(path)
            self._key = key
        return dict(self._tensors)


def _header(path: str) -> bytes:
    """A safetensors file's length prefix and JSON header, as bytes."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        return prefix + handle.read(int.from_bytes(prefix, "little")) if len(prefix) == 8 else prefix


def mapped_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a shared safetensors file as read-only views of its pages (the mapping lives as
    long as they do; the caller copies them into the model before the trainer writes again)."""
    with open(path, "rb") as handle:
        # Every page mapped in one call (MAP_POPULATE, Linux) rather than faulted in one by one as the
        # update reads them.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        region = mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    with warnings.catch_warnings():               # read-only views: an update only reads them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return read_payload(region)
