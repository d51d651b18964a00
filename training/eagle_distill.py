"""An EAGLE draft head trained on the model's own chat answers (`gorgon train eagle`).

    gorgon train eagle --model M --answers A.jsonl --draft-vocab 8192 --out DIR

The answers come from `training.self_distill`; the frozen model's final hidden states over them are
cached once (`training.draft_features`, shared with Medusa's training), and the head trains on the cache
alone. Row q of an answer reads the answer's token q and the model's feature at q - 1 (EAGLE's input) and
learns (EAGLE-1's losses) to regress the model's feature at q (smooth L1) and to match the model's own
distribution for token q + 1 over the draft vocabulary (KL; weighted 1 here, EAGLE-1 weighs its token loss
0.1), the distribution read off that feature through the frozen output head. Input features get EAGLE's uniform noise, so the head tolerates
its own estimates, which stand in for the model's features when it drafts ahead. `--unroll 2` also trains
the second draft step on the head's own first-step output (as EAGLE-3's training-time test does).

The training layer is transformers' own decoder layer of the model's family (differentiable, the
reference the engine's native layer is checked against); the embedding and output head are the model's,
frozen and not saved. A twentieth of the samples is held out: `evaluation.json` gives the draft's top-1
and top-4 agreement with the model's next token at the first and second draft step.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from models.eagle import LAYER_PREFIX, WEIGHTS_NAME, EagleTree, save_eagle
from training.draft_features import AnswerFeatures, coverage, start_answers_run
from training.train import learning_rate, optimizer_step

HELDOUT_EVERY = 20
ROWS_PER_STEP = 4096            # padded rows per optimizer step
CLASSIFICATION_WEIGHT = 1.0     # the token loss beside the feature regression (see the docstring)
FEATURE_NOISE = 0.1             # EAGLE's uniform noise on input features, U(-a, a)


class EagleTrainingHead(torch.nn.Module):
    """fc + the family's HF decoder layer over [embedding; feature] rows, with the model's frozen
    embedding and output-head rows for the draft vocabulary."""

    def __init__(self, config, embed: torch.Tensor, projection: torch.Tensor):
        super().__init__()
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1
        if getattr(one, "layer_types", None):
            one.layer_types = ["full_attention"]
        one._attn_implementation = "sdpa"
        scaffold = AutoModelForCausalLM.from_config(one)
        self.layers = torch.nn.ModuleList([scaffold.model.layers[0]])
        self.rotary = scaffold.model.rotary_emb
        del scaffold
        hidden = config.hidden_size
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=True)
        with torch.no_grad():         # start by passing the feature through: g_q ~ f_{q-1}
            self.fc.weight[:, hidden:].copy_(torch.eye(hidden))
            self.fc.weight[:, :hidden].mul_(0.1)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("projection", projection, persistent=False)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], features [B, T, hidden] (row i: the feature before token i), lengths [B] of
        right-padded rows -> the layer's output [B, T, hidden]; positions count from each row 0."""
        batch, width = tokens.shape
        x = self.fc(torch.cat([self.embed[tokens.clamp(min=0)], features], dim=-1))
        positions = torch.arange(width).expand(batch, width)
        valid = positions < lengths[:, None]
        mask = torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :]
        mask = mask | torch.eye(width, dtype=torch.bool)[None]        # padded rows see themselves (no NaN)
        position_embeddings = self.rotary(x, positions)
        return self.layers[0](x, attention_mask=mask[:, None], position_ids=positions,
                              position_embeddings=position_embeddings)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.projection.t()

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """The fc and layer of a saved head (its d2t is the draft vocabulary, chosen again from the answers)."""
        self.fc.load_state_dict({name[len("fc."):]: t.float() for name, t in state.items() if name.startswith("fc.")})
        prefix = f"{LAYER_PREFIX}.0."
        self.layers[0].load_state_dict({name[len(prefix):]: t.float() for name, t in state.items() if name.startswith(prefix)})

    def head_state(self) -> dict[str, torch.Tensor]:
        """What a head file holds, in HF names."""
        state = {f"fc.{name}": tensor for name, tensor in self.fc.state_dict().items()}
        state |= {f"{LAYER_PREFIX}.0.{name}": tensor for name, tensor in self.layers[0].state_dict().items()}
        return state


class AnswerRows:
    """The cached features regrouped by answer: row i of sample s is its answer position i."""

    def __init__(self, features: AnswerFeatures):
        self.hidden = features.hidden
        self.tokens = features.next_tokens[:, :2]          # the token at q (input) and at q + 1 (label)
        samples, counts = torch.unique_consecutive(features.sample, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.spans = {int(s): (int(start), int(count)) for s, start, count in zip(samples, starts, counts)}

    def batch(self, samples: list[int], noise: float, generator: torch.Generator | None):
        """Padded [B, T] inputs and the targets of the rows that have one (all but each answer's last)."""
        lengths = torch.tensor([self.spans[s][1] for s in samples])
        width = int(lengths.max())
        size = self.hidden.shape[1]
        tokens = torch.full((len(samples), width), -1, dtype=torch.long)
        labels = torch.full((len(samples), width), -1, dtype=torch.long)
        features = torch.zeros(len(samples), width, size)
        targets = torch.zeros(len(samples), width, size)
        for b, s in enumerate(samples):
            start, count = self.spans[s]
            tokens[b, :count] = self.tokens[start : start + count, 0]
            labels[b, : count - 1] = self.tokens[start : start + count - 1, 1]
            features[b, :count] = self.hidden[start : start + count].float()
            targets[b, : count - 1] = self.hidden[start + 1 : start + count].float()
        if noise:
            features += (torch.rand(features.shape, generator=generator) * 2 - 1) * noise
        has_target = torch.arange(width)[None] < (lengths[:, None] - 1)
        return tokens, features, lengths, labels, targets, has_target


def step_losses(head: EagleTrainingHead, tokens, features, lengths, targets, has_target, unroll: int):
    """Per unrolled step: (regression, KL) over the rows with a target. Step 2 reads step 1's outputs as
    its features, one row on (row i + 1's input is token i + 1 and the head's estimate of feature i)."""
    losses = []
    for step in range(unroll):
        out = head(tokens, features, lengths)
        rows = has_target
        reference = torch.log_softmax(head.logits(targets[rows]).float(), dim=-1)
        predicted = torch.log_softmax(head.logits(out[rows]).float(), dim=-1)
        regression = torch.nn.functional.smooth_l1_loss(out[rows].float(), targets[rows])
        kl = torch.nn.functional.kl_div(predicted, reference, log_target=True, reduction="batchmean")
        losses.append((regression, kl))
        if step + 1 < unroll:        # shift: the next step's row i reads token i + 1 and estimate g_i
            tokens = torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), -1)], dim=1)
            features = out[:, :-1]
            features = torch.cat([features, features.new_zeros(features.shape[0], 1, features.shape[2])], dim=1)
            targets = torch.cat([targets[:, 1:], targets.new_zeros(targets.shape[0], 1, targets.shape[2])], dim=1)
            has_target = torch.cat([has_target[:, 1:], has_target.new_zeros(has_target.shape[0], 1)], dim=1)
            lengths = (lengths - 1).clamp(min=1)
    return losses


@torch.no_grad()
def agreement(head: EagleTrainingHead, rows: AnswerRows, samples: list[int]) -> dict[str, list[float]]:
    """How often the draft's top-1 (top-4) is the model's own next token, at draft step 1 (true features)
    and step 2 (the head's own estimate as the feature)."""
    hits = {"top1": [0, 0], "top4": [0, 0]}
    counts = [0, 0]
    for chunk in range(0, len(samples), 32):
        tokens, features, lengths, labels, targets, has_target = rows.batch(samples[chunk : chunk + 32], 0.0, None)
        model_next = head.logits(targets).argmax(-1)                       # the model's own next token
        out = head(tokens, features, lengths)
        for step in range(2):
            ranked = head.logits(out).topk(4, dim=-1).indices
            valid = has_target
            hits["top1"][step] += int((ranked[..., 0] == model_next)[valid].sum())
            hits["top4"][step] += int((ranked == model_next[..., None]).any(-1)[valid].sum())
            counts[step] += int(valid.sum())
            if step == 0:
                tokens = torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), -1)], dim=1)
                shifted = torch.cat([out[:, :-1], out.new_zeros(out.shape[0], 1, out.shape[2])], dim=1)
                model_next = torch.cat([model_next[:, 1:], model_next.new_zeros(model_next.shape[0], 1)], dim=1)
                has_target = torch.cat([has_target[:, 1:], has_target.new_zeros(has_target.shape[0], 1)], dim=1)
                out = head(tokens, shifted, (lengths - 1).clamp(min=1))
    return {name: [round(h / max(c, 1), 4) for h, c in zip(values, counts)] for name, values in hits.items()}


def batches(samples: list[int], rows: AnswerRows, generator: torch.Generator) -> list[list[int]]:
    """Samples of similar length together (little padding), in random order, about ROWS_PER_STEP rows each."""
    order = [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
    out = []
    for start in range(0, len(order), 256):
        chunk = sorted(order[start : start + 256], key=lambda s: rows.spans[s][1])
        current: list[int] = []
        for s in chunk:
            width = max([rows.spans[t][1] for t in current] + [rows.spans[s][1]])
            if current and width * (len(current) + 1) > ROWS_PER_STEP:
                out.append(current)
                current = []
            current.append(s)
        if current:
            out.append(current)
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the target model's HF folder")
    parser.add_argument("--answers", type=Path, required=True, help="self-distilled answers (training.self_distill)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary: the most frequent answer tokens")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this long (the learning-rate schedule then ends with the budget)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--unroll", type=int, choices=[1, 2], default=1)
    parser.add_argument("--init", type=Path, default=None, help="continue from this trained head (its final/ folder)")
    parser.add_argument("--save-dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(args)


def train(args: argparse.Namespace) -> None:
    run = start_answers_run(args.model, args.answers, args.out, args.draft_vocab, args.seed)
    log, samples, config, vocab = run.log, run.samples, run.config, run.vocab
    rows = AnswerRows(run.features)
    generator = torch.Generator().manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    embed = model.get_input_embeddings().weight.detach().clone()
    projection = model.get_output_embeddings().weight.detach()[vocab].clone()
    del model
    head = EagleTrainingHead(config, embed, projection)
    if args.init is not None:
        head.load_head_state(load_file(str(args.init / WEIGHTS_NAME)))
    train_samples = [s for s in rows.spans if s % HELDOUT_EVERY and rows.spans[s][1] > 1]
    eval_samples = [s for s in rows.spans if s % HELDOUT_EVERY == 0 and rows.spans[s][1] > 1]
    epoch_batches = len(batches(train_samples, rows, torch.Generator().manual_seed(0)))
    steps = max(1, int(args.epochs * epoch_batches))
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log(json.dumps({"event": "start", "samples": len(samples), "train_samples": len(train_samples),
                    "eval_samples": len(eval_samples), "draft_vocab": vocab.numel(),
                    "coverage": round(coverage(samples, vocab), 4), "unroll": args.unroll, "lr": args.lr,
                    "init": None if args.init is None else str(args.init), "minutes_budget": args.minutes,
                    "trainable_params": sum(p.numel() for p in params), "steps": steps,
                    "feature_rms": round(float(rows.hidden[:100000].float().pow(2).mean().sqrt()), 4)}))
    progress = tqdm(total=steps, desc="training the EAGLE head", unit="step")
    started, step, plan = time.perf_counter(), 0, []
    head.train()
    while step < steps:
        if args.minutes is not None and time.perf_counter() - started > args.minutes * 60:
            break
        if not plan:
            plan = batches(train_samples, rows, generator)
        # With a time budget the schedule runs on whichever is further along, steps or time, so the
        # learning rate has decayed when the budget ends.
        elapsed = time.perf_counter() - started
        at = step if args.minutes is None else max(step, int(steps * elapsed / (args.minutes * 60)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(at, steps, args.lr, args.warmup)
        tokens, features, lengths, _, targets, has_target = rows.batch(plan.pop(), FEATURE_NOISE, generator)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            losses = step_losses(head, tokens, features, lengths, targets, has_target, args.unroll)
        loss = sum(regression + CLASSIFICATION_WEIGHT * kl for regression, kl in losses)
        optimizer_step(loss, params, optimizer)
        step += 1
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % 20 == 0:
            log(json.dumps({"step": step, "loss": round(loss.item(), 4),
                            "regression": [round(r.item(), 4) for r, _ in losses],
                            "kl": [round(k.item(), 4) for _, k in losses],
                            "minutes": round((time.perf_counter() - started) / 60, 2)}))
    head.eval()
    evaluation = agreement(head, rows, eval_samples)
    save_eagle(args.out / "final", head.head_state(), config.to_dict(), str(args.model), vocab, EagleTree(),
               getattr(torch, args.save_dtype))
    (args.out / "final" / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    log(json.dumps({"event": "done", "steps": step, "minutes": round((time.perf_counter() - started) / 60, 2),
                    **evaluation}))
    print(json.dumps(evaluation))


if __name__ == "__main__":
    main()
