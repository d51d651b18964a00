"""Rebuild the whole embedded default model family, end to end, into models/default.

    python -m models.training.build_default [--runs runs] [--target-minutes 62] [--draft-minutes 10]

Corpus -> tokenizer -> target -> draft, each step skipped when its output exists, so an interrupted
build resumes where it stopped (training resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from models.loader import DEFAULT_MODEL_DIR

DEFAULT_DIR = DEFAULT_MODEL_DIR.parent
CORPUS = Path.home() / ".cache" / "gorgon" / "corpus"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--target-steps", type=int, default=2000)
    parser.add_argument("--target-minutes", type=float, default=62)
    parser.add_argument("--draft-steps", type=int, default=1600)
    parser.add_argument("--draft-minutes", type=float, default=10)
    args = parser.parse_args()
    if not (CORPUS / "train.jsonl").exists():
        run("models.training.corpus", "--out", str(CORPUS))
    tokenizer = DEFAULT_DIR / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        run("models.training.tokenizer", "--corpus", str(CORPUS), "--out", str(tokenizer))
    for role, steps, minutes in (("target", args.target_steps, args.target_minutes),
                                 ("draft", args.draft_steps, args.draft_minutes)):
        out = args.runs / role
        if not (out / "final" / "config.json").exists():
            run("models.training.train", "--role", role, "--corpus", str(CORPUS), "--tokenizer", str(tokenizer),
                "--out", str(out), "--max-steps", str(steps), "--minutes", str(minutes))
        shutil.copytree(out / "final", DEFAULT_DIR / role, dirs_exist_ok=True)
        shutil.copy(out / "train.log", DEFAULT_DIR / role / "train.log")
    run("models.evaluate", "--json")


if __name__ == "__main__":
    main()
