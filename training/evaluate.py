"""Evaluate the default model family on held-out files.

    python -m training.evaluate --json            # full
    python -m training.evaluate --quick --json    # a few seconds, for tests

Prints one JSON object last: `target_top1` and `target_loss` (teacher-forced next-token accuracy and
cross-entropy on held-out windows), `draft_top1`, `draft_acceptance` (greedy, k = 4: the fraction of
drafted tokens the target accepts when the draft proposes 4 tokens per round on held-out prompts), the
parameter counts and `step_cost_ratio` (a batch-1 decode step of the target over one of the draft, both
on Gorgon's engine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.loader import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR
from training.corpus import build, read_texts

WINDOW = 256


def heldout_texts(corpus: Path) -> list[str]:
    if not (corpus / "heldout.jsonl").exists():
        build(corpus)
    return read_texts(corpus / "heldout.jsonl")


@torch.inference_mode()
def teacher_forced(model, windows: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of next-token prediction over [N, WINDOW + 1] windows."""
    correct, loss, count = 0, 0.0, 0
    for batch in windows.split(8):
        logits = model(batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        correct += (logits.argmax(-1) == targets).sum().item()
        loss += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                  reduction="sum").item()
        count += targets.numel()
    return correct / count, loss / count


@torch.inference_mode()
def greedy_acceptance(target, draft, prompts: list[list[int]], new_tokens: int, k: int = 4) -> float:
    """Greedy speculative rounds: the draft proposes k tokens, the target keeps the agreeing prefix."""
    drafted = accepted = 0
    for prompt in prompts:
        context = list(prompt)
        while len(context) - len(prompt) < new_tokens:
            proposal = []
            for _ in range(k):
                logits = draft(torch.tensor([context + proposal])).logits[0, -1]
                proposal.append(int(logits.argmax()))
            verify = target(torch.tensor([context + proposal])).logits[0, len(context) - 1 :].argmax(-1).tolist()
            agree = 0
            while agree < k and proposal[agree] == verify[agree]:
                agree += 1
            drafted += k
            accepted += agree
            context += proposal[:agree] + [verify[agree]]
    return accepted / drafted


def step_cost_ratio(target_dir: Path, draft_dir: Path, new_tokens: int) -> float:
    from decoding import Engine, SamplingParams

    seconds = {}
    for name, folder in (("target", target_dir), ("draft", draft_dir)):
        engine = Engine(model=str(folder), show_progress=False)
        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
        engine.generate([[5, 6, 7, 8]], params)
        started = time.perf_counter()
        engine.generate([[5, 6, 7, 8]], params)
        seconds[name] = time.perf_counter() - started
    return seconds["target"] / seconds["draft"]


def evaluate(target_dir: Path, draft_dir: Path, corpus: Path, quick: bool) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    texts = heldout_texts(corpus)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    stream = torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]])
    num_windows = 4 if quick else 96
    stride = max(WINDOW + 1, (len(stream) - WINDOW - 1) // num_windows)
    windows = torch.stack([stream[i : i + WINDOW + 1] for i in range(0, stride * num_windows, stride)])
    target_top1, target_loss = teacher_forced(target, windows)
    draft_top1, draft_loss = teacher_forced(draft, windows)
    num_prompts, prompt_len, new_tokens = (2, 32, 16) if quick else (24, 64, 64)
    prompts = [doc[:prompt_len] for doc in ids if len(doc) > prompt_len][:num_prompts]
    return {
        "target_top1": round(target_top1, 4), "target_loss": round(target_loss, 4),
        "draft_top1": round(draft_top1, 4), "draft_loss": round(draft_loss, 4),
        "draft_acceptance": round(greedy_acceptance(target, draft, prompts, new_tokens), 4),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "step_cost_ratio": round(step_cost_ratio(target_dir, draft_dir, 16 if quick else 128), 2),
        "heldout_tokens_scored": windows.shape[0] * WINDOW, "quick": quick,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--draft", type=Path, default=DEFAULT_DRAFT_DIR)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "gorgon" / "corpus")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = evaluate(args.target, args.draft, args.corpus, args.quick)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
