"""The training corpus: Python source that every machine with Python has (the standard library).

Deduplicated by content, split into train and held-out by file (a stable hash of the relative path), so
held-out figures measure files the model never saw.

    python -m training.corpus --out ~/.cache/gorgon/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

HELDOUT_EVERY = 20            # 1 file in 20 is held out
MAX_FILE_BYTES = 400_000      # generated tables and data dumps teach little


def source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def is_heldout(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).hexdigest()
    return int(digest[:8], 16) % HELDOUT_EVERY == 0


def build(out: Path, root: Path | None = None) -> dict[str, int]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    counts = {"train": 0, "heldout": 0, "duplicates": 0, "train_bytes": 0, "heldout_bytes": 0}
    with open(out / "train.jsonl", "w") as train, open(out / "heldout.jsonl", "w") as heldout:
        for path in source_files(root):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or len(text.encode()) > MAX_FILE_BYTES:
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            relative = str(path.relative_to(root))
            split = "heldout" if is_heldout(relative) else "train"
            (heldout if split == "heldout" else train).write(json.dumps({"path": relative, "text": text}) + "\n")
            counts[split] += 1
            counts[f"{split}_bytes"] += len(text.encode())
    (out / "stats.json").write_text(json.dumps(counts, indent=2))
    return counts


def read_texts(path: Path) -> list[str]:
    with open(path) as handle:
        return [json.loads(line)["text"] for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "gorgon" / "corpus")
    args = parser.parse_args()
    print(json.dumps(build(args.out)))


if __name__ == "__main__":
    main()
