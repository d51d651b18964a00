"""Rebuild the whole embedded default model family, end to end, into models/default.

    python -m training.build_default [--runs runs] [--target-minutes 62] [--draft-minutes 55]
        [--medusa-minutes 12]

Corpus -> tokenizer -> target -> draft (distilled from the target from the start) -> Medusa heads (the
target frozen, self-distillation), each step skipped when its output exists, so an interrupted build
resumes where it stopped (training resumes from its checkpoint).
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
    parser.add_argument("--draft-steps", type=int, default=2400)
    parser.add_argument("--draft-minutes", type=float, default=55)
    parser.add_argument("--medusa-steps", type=int, default=900)
    parser.add_argument("--medusa-minutes", type=float, default=12)
    args = parser.parse_args()
    if not (CORPUS / "train.jsonl").exists():
        run("training.corpus", "--out", str(CORPUS))
    tokenizer = DEFAULT_DIR / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        run("training.tokenizer", "--corpus", str(CORPUS), "--out", str(tokenizer))
    common = ["--corpus", str(CORPUS), "--tokenizer", str(tokenizer)]
    stages = [  # (run folder, installed as, extra arguments)
        ("target", "target", ["--role", "target", "--max-steps", str(args.target_steps),
                              "--minutes", str(args.target_minutes)]),
        # The draft learns the target's next-token distribution (KL) from its first step: what it
        # proposes is then what the target would accept.
        ("draft", "draft", ["--role", "draft", "--teacher", str(args.runs / "target" / "final"), "--lr", "2e-3",
                            "--warmup", "100", "--max-steps", str(args.draft_steps), "--minutes", str(args.draft_minutes)]),
    ]
    for folder, installed_as, extra in stages:
        out = args.runs / folder
        if not (out / "final" / "config.json").exists():
            run("training.train", *common, *extra, "--out", str(out))
        shutil.copytree(out / "final", DEFAULT_DIR / installed_as, dirs_exist_ok=True)
        shutil.copy(out / "train.log", DEFAULT_DIR / installed_as / "train.log")
    medusa = args.runs / "medusa"
    if not (medusa / "final" / "config.json").exists():
        run("training.medusa", "--model", str(args.runs / "target" / "final"), "--corpus", str(CORPUS),
            "--out", str(medusa), "--heads", "4", "--layers", "2", "--batch-size", "16", "--lr", "2e-3",
            "--save-dtype", "bfloat16",
            "--max-steps", str(args.medusa_steps), "--minutes", str(args.medusa_minutes))
    # Pruned to the target's 2,048 most frequent tokens: on this small model the heads' vocabulary-wide
    # projections cost more of a step than the rarer tokens' guesses return (models/default/README.md).
    shutil.rmtree(DEFAULT_DIR / "medusa", ignore_errors=True)
    run("training.medusa_prune", "--model", str(args.runs / "target" / "final"), "--heads", str(medusa / "final"),
        "--out", str(DEFAULT_DIR / "medusa"), "--draft-vocab", "2048", "--corpus", str(CORPUS))
    shutil.copy(medusa / "train.log", DEFAULT_DIR / "medusa" / "train.log")
    run("training.evaluate", "--json")


if __name__ == "__main__":
    main()
