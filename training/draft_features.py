"""What draft heads train on: the model's final hidden states over its own answers, and the tokens after.

From self-distilled samples (`training.self_distill`), the frozen model runs once over prompt + answer and
the final hidden state (after the last norm: what the engine hands a proposer) is kept at every position
that predicts an answer token, with the `LOOKAHEAD` tokens that follow it (-1 past the end). Row r's
column j is the token at position t + 1 + j: column 0 is the model's own next token (greedy answers:
its argmax), column k + 1 what Medusa head k must guess. Cached next to the samples, in float16 (the
heads only propose; the target verifies).

The draft vocabulary is the most frequent answer tokens (FR-Spec): what drafts of this model are right
about.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LOOKAHEAD = 6
FORWARD_TOKENS = 4096        # padded tokens per forward batch


@dataclass
class AnswerFeatures:
    hidden: torch.Tensor          # [P, hidden] float16
    next_tokens: torch.Tensor     # [P, LOOKAHEAD] int64, -1 past the end of the answer
    sample: torch.Tensor          # [P] index of the sample each row comes from


def read_samples(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def draft_vocabulary(samples: list[dict], size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most frequent answer tokens (ties by id), `always` included (end-of-sequence ids)."""
    return most_frequent(Counter(token for sample in samples for token in sample["answer"]), size, always)


def most_frequent(counts: Counter, size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most counted tokens (ties by id), `always` first among them; sorted ids."""
    chosen = list(dict.fromkeys([*always, *(token for token, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0])))]))
    return torch.tensor(sorted(chosen[:size]), dtype=torch.long)


def coverage(samples: list[dict], vocab: torch.Tensor) -> float:
    """Fraction of answer tokens inside `vocab`."""
    kept = set(vocab.tolist())
    tokens = [token for sample in samples for token in sample["answer"]]
    return sum(token in kept for token in tokens) / max(len(tokens), 1)


@torch.inference_mode()
def answer_features(model_path: str, samples: list[dict], cache: Path | None = None, log=print) -> AnswerFeatures:
    """The features of every sample, from `cache` when it holds them for the same samples."""
    if cache is not None and cache.exists():
        stored = torch.load(cache, weights_only=True)
        if int(stored["samples"]) == len(samples):
            return AnswerFeatures(stored["hidden"], stored["next_tokens"], stored["sample"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["prompt"]) + len(samples[i]["answer"]))
    hidden, next_tokens, sample_of = [], [], []
    started, i = time.perf_counter(), 0
    while i < len(order):
        longest = len(samples[order[i]]["prompt"]) + len(samples[order[i]]["answer"])
        batch = [order[i]]
        while i + len(batch) < len(order):
            candidate = order[i + len(batch)]
            longest = max(longest, len(samples[candidate]["prompt"]) + len(samples[candidate]["answer"]))
            if longest * (len(batch) + 1) > FORWARD_TOKENS:
                break
            batch.append(candidate)
        i += len(batch)
        sequences = [samples[j]["prompt"] + samples[j]["answer"] for j in batch]
        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state      # right padding: exact
        for row, (j, sequence) in enumerate(zip(batch, sequences)):
            start, end = len(samples[j]["prompt"]) - 1, len(sequence) - 1           # rows predicting the answer
            if end <= start:
                continue
            padded = torch.tensor(sequence + [-1] * LOOKAHEAD)
            positions = torch.arange(start, end)
            hidden.append(states[row, start:end].to(torch.float16))
            next_tokens.append(torch.stack([padded[positions + 1 + k] for k in range(LOOKAHEAD)], dim=1))
            sample_of.append(torch.full((end - start,), j))
        log(json.dumps({"features_samples": i, "of": len(order), "seconds": round(time.perf_counter() - started, 1)}))
    features = AnswerFeatures(torch.cat(hidden), torch.cat(next_tokens), torch.cat(sample_of))
    if cache is not None:
        torch.save({"samples": len(samples), "hidden": features.hidden, "next_tokens": features.next_tokens,
                    "sample": features.sample}, cache)
    return features


@dataclass
class AnswersRun:
    """What a draft head's training on self-distilled answers starts from (Medusa's and EAGLE's alike)."""

    log: Callable[[str], None]        # a JSON line to the run's train.log
    samples: list[dict]
    config: object                    # the model's HF config
    vocab: torch.Tensor               # the draft vocabulary, end-of-sequence ids included
    features: AnswerFeatures


def start_answers_run(model: str, answers: Path, out: Path, draft_vocab: int | None, seed: int) -> AnswersRun:
    """Open `out`/train.log, seed torch, read the answers, choose the draft vocabulary (`draft_vocab` most
    frequent answer tokens; None: the whole vocabulary) and read the features (cached beside the answers)."""
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    torch.manual_seed(seed)
    samples = read_samples(answers)
    config = AutoConfig.from_pretrained(model)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    vocab = draft_vocabulary(samples, draft_vocab or config.vocab_size, tuple(i for i in eos if i is not None))
    return AnswersRun(log, samples, config, vocab, answer_features(model, samples, answers.with_suffix(".features.pt"), log))
