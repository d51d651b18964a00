"""Rebuild the whole embedded default model family, end to end, into models/default.

    python -m models.training.build_default [--runs runs] [--target-minutes 62] [--draft-minutes 10]
        [--distil-minutes 14]

Corpus -> tokenizer -> target -> draft (on the data, then distilled from the target), each step skipped
when its output exists, so an interrupted build resumes where it stopped (training resumes from its
checkpoint).
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
    parser.add_argument("--distil-steps", type=int, default=900)
    parser.add_argument("--distil-minutes", type=float, default=14)
    args = parser.parse_args()
    if not (CORPUS / "train.jsonl").exists():
        run("models.training.corpus", "--out", str(CORPUS))
    tokenizer = DEFAULT_DIR / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        run("models.training.tokenizer", "--corpus", str(CORPUS), "--out", str(tokenizer))
    common = ["--corpus", str(CORPUS), "--tokenizer", str(tokenizer)]
    stages = [  # (run folder, installed as, extra arguments)
        ("target", "target", ["--role", "target", "--max-steps", str(args.target_steps),
                              "--minutes", str(args.target_minutes)]),
        ("draft", None, ["--role", "draft", "--max-steps", str(args.draft_steps), "--minutes", str(args.draft_minutes)]),
        # The draft is then distilled from the target: it learns to propose what the target would accept.
        ("draft-distil", "draft", ["--role", "draft", "--init", str(args.runs / "draft" / "final"),
                                   "--teacher", str(args.runs / "target" / "final"), "--lr", "1e-3",
                                   "--warmup", "50", "--max-steps", str(args.distil_steps),
                                   "--minutes", str(args.distil_minutes)]),
    ]
    for folder, installed_as, extra in stages:
        out = args.runs / folder
        if not (out / "final" / "config.json").exists():
            run("models.training.train", *common, *extra, "--out", str(out))
        if installed_as:
            shutil.copytree(out / "final", DEFAULT_DIR / installed_as, dirs_exist_ok=True)
            shutil.copy(out / "train.log", DEFAULT_DIR / installed_as / "train.log")
    run("models.evaluate", "--json")


if __name__ == "__main__":
    main()
