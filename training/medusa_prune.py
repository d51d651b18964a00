"""Prune trained Medusa heads to a draft vocabulary, without retraining.

Heads whose projections are the model's frozen output head (the default way they train) score every
token; on a small model the K vocabulary-wide products cost as much as the model's own step. Kept to the
N tokens the model most often emits (counted over its corpus, or over self-distilled answers), the same
ResBlocks propose from N rows; a rank among N maps back to the model's id. A token outside the draft
vocabulary is never proposed, so acceptance falls only by how often such tokens would have been guessed.

    python -m training.medusa_prune --model models/default/target --heads models/default/medusa \\
        --out DIR --draft-vocab 1024
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.medusa import MedusaHeads
from training.corpus import read_texts
from training.draft_features import most_frequent, read_samples
from training.medusa import head_accuracy, heldout_windows


def token_counts(model: str, corpus: Path | None, answers: Path | None) -> Counter:
    if answers is not None:
        return Counter(token for sample in read_samples(answers) for token in sample["answer"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    counts: Counter = Counter()
    for text in read_texts(corpus / "train.jsonl"):
        counts.update(tokenizer(text, add_special_tokens=False).input_ids)
    return counts


def prune(model: str, heads_folder: Path, out: Path, size: int, counts: Counter, corpus: Path | None = None) -> dict:
    """Prune into `out`; with a `corpus`, the pruned heads' held-out accuracy replaces evaluation.json's."""
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm_head = loaded.get_output_embeddings().weight.detach()
    heads = MedusaHeads.load(heads_folder, output_head=lm_head)
    if heads.draft_vocab is not None:
        raise ValueError(f"the heads in {heads_folder} already have a draft vocabulary")
    if not all(torch.equal(head[-1].weight.to(heads.stored_dtype), lm_head.to(heads.stored_dtype)) for head in heads.heads):
        raise ValueError("only heads whose projections are the model's output head can be pruned without retraining")
    eos = loaded.generation_config.eos_token_id
    always = [eos] if isinstance(eos, int) else list(eos or [])
    vocab = most_frequent(counts, size, tuple(always))
    pruned = MedusaHeads(heads.hidden_size, heads.vocab_size, heads.num_heads, heads.num_layers, vocab)
    state = {name: tensor for name, tensor in heads.heads.state_dict().items() if not name.endswith(f".{heads.num_layers}.weight")}
    pruned.heads.load_state_dict(state, strict=False)
    pruned.init_projections(lm_head, freeze=True)
    config = json.loads((heads_folder / "config.json").read_text())
    pruned.save(out, config.get("base_model_name_or_path", model), heads.stored_dtype, omit_projection=True)
    if config.get("medusa_choices"):
        saved = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(saved | {"medusa_choices": config["medusa_choices"]}, indent=2) + "\n")
    for extra in ("train.log", "evaluation.json"):
        if (heads_folder / extra).exists() and heads_folder.resolve() != out.resolve():
            shutil.copy(heads_folder / extra, out / extra)
    total = sum(counts.values())
    figures = {"draft_vocab": vocab.numel(), "coverage": round(sum(counts[t] for t in vocab.tolist()) / max(total, 1), 4)}
    if corpus is not None:
        pruned.prepare_for_inference()
        windows = heldout_windows(corpus, AutoTokenizer.from_pretrained(model))
        figures |= head_accuracy(loaded.eval(), pruned, windows)
        (out / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--draft-vocab", type=int, required=True)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "gorgon" / "corpus")
    parser.add_argument("--answers", type=Path, default=None, help="count tokens over these answers instead")
    args = parser.parse_args()
    counts = token_counts(args.model, args.corpus, args.answers)
    print(json.dumps(prune(args.model, args.heads, args.out, args.draft_vocab, counts,
                           args.corpus if args.answers is None else None)))


if __name__ == "__main__":
    main()
