"""Medusa heads trained on the model's own chat answers, over a draft vocabulary (`--answers`).

The path for real instruct models (`gorgon train medusa --model M --answers A.jsonl --draft-vocab 8192`):
the answers come from `training.self_distill`, the model runs over them once (`training.draft_features`,
cached beside the answers), and the heads train on the cached hidden states alone, so an epoch costs the
heads' products, not the model's. Head k's label at position t is the answer's token at t + k + 2; with
greedy answers that is exactly what greedy verification will accept. With `--targets model` (the
default) each head learns instead the model's own distribution for that token, KL(model || head) over
the draft vocabulary, read off the cached hidden state of the position that predicts it. The projections are the output
head's rows for the draft vocabulary, frozen unless `--train-projections`, so the saved heads hold only
their ResBlocks and the token ids (a few MB), and at inference the K projections are one small product.

A twentieth of the samples (by index) is held out: `evaluation.json` gives each head's top-1 and top-8
accuracy on them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from models.medusa import MedusaHeads
from training.draft_features import coverage, start_answers_run
from training.train import learning_rate, optimizer_step

HEAD_DECAY = 0.8
HELDOUT_EVERY = 20
ROWS_PER_STEP = 2048


def head_loss(heads: MedusaHeads, hidden: torch.Tensor, labels: torch.Tensor,
              reference: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """hidden [B, h], labels [B, K] (draft-vocabulary indices, -1 to ignore) -> (weighted loss, per head).
    With `reference` [K, B, V'] (the model's own logits for the token each head guesses, over the draft
    vocabulary) the loss is KL(model || head) instead of cross-entropy on the label: the whole ranking the
    model would sample from, which a tree of top-k candidates needs, not only its top token."""
    logits = heads(hidden).float()                                                      # [K, B, V']
    if reference is None:
        losses = [torch.nn.functional.cross_entropy(logits[k], labels[:, k], ignore_index=-1)
                  for k in range(heads.num_heads)]
    else:
        losses = []
        for k in range(heads.num_heads):
            valid = labels[:, k] >= 0
            target = torch.log_softmax(reference[k][valid].float(), dim=-1)
            losses.append(torch.nn.functional.kl_div(torch.log_softmax(logits[k][valid], -1), target, log_target=True,
                                                     reduction="batchmean"))
    total = sum(HEAD_DECAY ** k * loss for k, loss in enumerate(losses))
    return total, [round(loss.item(), 4) for loss in losses]


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per head: how often the label is the top draft token, and how often it is among the top 8."""
    top1, top8, counts = [0] * heads.num_heads, [0] * heads.num_heads, [0] * heads.num_heads
    for rows in torch.arange(hidden.shape[0]).split(4096):
        logits = heads(hidden[rows].float())
        best = logits.topk(8, dim=-1).indices                                           # [K, B, 8]
        for k in range(heads.num_heads):
            label = labels[rows, k]
            valid = label >= 0
            top1[k] += int((best[k, :, 0] == label)[valid].sum())
            top8[k] += int((best[k] == label[:, None]).any(-1)[valid].sum())
            counts[k] += int(valid.sum())
    return {"top1": [round(h / max(c, 1), 4) for h, c in zip(top1, counts)],
            "top8": [round(h / max(c, 1), 4) for h, c in zip(top8, counts)]}


def draft_labels(next_tokens: torch.Tensor, vocab: torch.Tensor, vocab_size: int, num_heads: int) -> torch.Tensor:
    """next_tokens [P, LOOKAHEAD] -> each head's label as a draft-vocabulary index [P, K] (-1: none, or a
    token outside the draft vocabulary)."""
    to_draft = torch.full((vocab_size + 1,), -1, dtype=torch.long)                      # index -1 -> -1
    to_draft[vocab] = torch.arange(vocab.numel())
    return to_draft[next_tokens[:, 1 : 1 + num_heads]]


@torch.no_grad()
def model_reference(hidden: torch.Tensor, rows: torch.Tensor, projection: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The model's own logits, over the draft vocabulary, for the token each head guesses at `rows`
    [K, B, V']: row r + k + 1 is the position that predicts it (the same answer wherever the label
    exists; past the end the row is clamped and its label ignores it)."""
    later = (rows[None, :] + torch.arange(1, num_heads + 1)[:, None]).clamp_(max=hidden.shape[0] - 1)
    return hidden[later].float() @ projection.t()


def train_on_answers(args: argparse.Namespace) -> None:
    run = start_answers_run(args.model, args.answers, args.out, args.draft_vocab, args.seed)
    log, samples, config, vocab, features = run.log, run.samples, run.config, run.vocab, run.features
    labels = draft_labels(features.next_tokens, vocab, config.vocab_size, args.heads)    # [P, K]
    heldout = features.sample % HELDOUT_EVERY == 0
    train_rows, eval_rows = (~heldout).nonzero().squeeze(1), heldout.nonzero().squeeze(1)

    output_head = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).get_output_embeddings().weight.detach()
    heads = MedusaHeads(config.hidden_size, config.vocab_size, args.heads, args.layers, vocab)
    heads.init_projections(output_head, freeze=not args.train_projections)
    projection = output_head[vocab].clone()                                             # the model's rows, [V', h]
    del output_head
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    steps = args.max_steps
    log(json.dumps({"event": "start", "targets": args.targets, "samples": len(samples), "rows": int(train_rows.numel()),
                    "eval_rows": int(eval_rows.numel()), "draft_vocab": vocab.numel(),
                    "coverage": round(coverage(samples, vocab), 4), "heads": args.heads, "layers": args.layers,
                    "trainable_params": sum(p.numel() for p in params), "steps": steps}))
    progress = tqdm(total=steps, desc="training medusa heads", unit="step")
    started = time.perf_counter()
    heads.train()
    for step in range(steps):
        if args.minutes is not None and time.perf_counter() - started > args.minutes * 60:
            break
        rows = train_rows[torch.randint(train_rows.numel(), (ROWS_PER_STEP,), generator=generator)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup)
        reference = model_reference(features.hidden, rows, projection, heads.num_heads) if args.targets == "model" else None
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss, per_head = head_loss(heads, features.hidden[rows].float(), labels[rows], reference)
        optimizer_step(loss, params, optimizer)
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0:
            log(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "head_losses": per_head,
                            "minutes": round((time.perf_counter() - started) / 60, 2)}))
    heads.eval()
    accuracy = head_accuracy(heads, features.hidden[eval_rows], labels[eval_rows])
    heads.save(args.out / "final", str(args.model), getattr(torch, args.save_dtype),
               omit_projection=not args.train_projections)
    (args.out / "final" / "evaluation.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    log(json.dumps({"event": "done", "minutes": round((time.perf_counter() - started) / 60, 2), **accuracy}))
    print(json.dumps(accuracy))
