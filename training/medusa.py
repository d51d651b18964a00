"""Train Medusa heads for any HF causal LM, its backbone frozen (Medusa-1); seeded and resumable.

    python -m training.medusa --model models/default/target --out runs/medusa --minutes 20
    gorgon train medusa --model M --out DIR            (the same, from the command line)

Head k learns, from the model's final hidden state at position t, the token at t + k + 2. The targets are
the model's own next-token distributions over a text corpus (self-distillation: KL(model || head),
`--targets model`, the default) or the corpus tokens themselves (`--targets text`); `--generate N` first
continues N corpus windows with the model itself (`--generate-temperatures`, 0 = greedy) and trains on
those instead of the raw corpus. Head losses are weighted 0.8^k. By default every head's vocabulary
projection starts as the model's output head and stays frozen there, so only the ResBlocks train and at
inference the K projections run as one matmul over one shared weight (`--train-projections` trains them
too).

`--answers FILE --draft-vocab N` trains instead on an instruct model's own chat answers over its N most
frequent answer tokens (training/medusa_distill.py: the path for real models).

Progress goes to a bar and to OUT/train.log; OUT/checkpoint.pt is picked up again when the same command
is re-run; the heads are saved in the published Medusa format to OUT/final.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.medusa import MedusaHeads
from training.corpus import read_texts
from training.train import (SEQ_LEN, batches, learning_rate, optimizer_step, report_progress, resume,
                                   save_checkpoint, token_stream)

HEAD_DECAY = 0.8


def head_losses(heads: MedusaHeads, hidden: torch.Tensor, model_logits: torch.Tensor, tokens: torch.Tensor,
                targets: str, stride: int = 1, offset: int = 0) -> list[torch.Tensor]:
    """hidden [B, T, h] and model_logits [B, T, V] at positions 0..T-1 of `tokens` [B, T]; one loss per head,
    over positions offset, offset + stride, ... (the vocabulary-wide head outputs dominate the cost, and
    neighbouring positions teach nearly the same thing)."""
    losses = []
    length = hidden.shape[1]
    for k, head in enumerate(heads.heads):
        positions = torch.arange(offset, length - k - 2, stride, device=hidden.device)   # t + k + 2 < T
        if positions.numel() == 0:
            break
        logits = head(hidden[:, positions]).float().flatten(0, 1)
        if targets == "model":
            reference = torch.log_softmax(model_logits[:, positions + k + 1].float(), dim=-1).flatten(0, 1)
            losses.append(torch.nn.functional.kl_div(torch.log_softmax(logits, -1), reference, log_target=True,
                                                     reduction="batchmean"))
        else:
            losses.append(torch.nn.functional.cross_entropy(logits, tokens[:, positions + k + 2].reshape(-1)))
    return losses


def heldout_windows(corpus: Path, tokenizer, count: int = 48) -> torch.Tensor:
    """The first `count` consecutive windows of SEQ_LEN tokens of the corpus's held-out texts [count, SEQ_LEN]."""
    heldout = token_stream(read_texts(corpus / "heldout.jsonl"), tokenizer)
    return torch.stack([heldout[i : i + SEQ_LEN] for i in range(0, min(len(heldout) - SEQ_LEN, count * SEQ_LEN), SEQ_LEN)])


@torch.no_grad()
def head_accuracy(model, heads: MedusaHeads, windows: torch.Tensor) -> dict[str, list[float]]:
    """Per head, on held-out windows [N, T]: top-1 accuracy against the text (`text_top1`) and agreement
    with the model's own greedy prediction of that token (`model_top1`, what greedy acceptance needs)."""
    text_hits, model_hits, counts = [0] * heads.num_heads, [0] * heads.num_heads, [0] * heads.num_heads
    for batch in windows.split(8):
        out = model(batch, output_hidden_states=True)
        hidden, greedy = out.hidden_states[-1], out.logits.argmax(-1)
        all_logits = heads(hidden.flatten(0, 1)).view(heads.num_heads, *batch.shape, -1)
        for k in range(heads.num_heads):
            span = batch.shape[1] - k - 2
            predicted = heads.token_ids(all_logits[k, :, :span].argmax(-1))     # a draft vocabulary's ranks -> ids
            text_hits[k] += int((predicted == batch[:, k + 2 : k + 2 + span]).sum())
            model_hits[k] += int((predicted == greedy[:, k + 1 : k + 1 + span]).sum())
            counts[k] += predicted.numel()
    return {"text_top1": [round(h / c, 4) for h, c in zip(text_hits, counts)],
            "model_top1": [round(h / c, 4) for h, c in zip(model_hits, counts)]}


def corpus_windows(token_lists: list[list[int]], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens at seeded random places of the texts long enough to hold two."""
    generator = torch.Generator().manual_seed(seed)
    long_enough = [ids for ids in token_lists if len(ids) >= 2 * length]
    windows = []
    for _ in range(count):
        ids = long_enough[int(torch.randint(len(long_enough), (1,), generator=generator))]
        start = int(torch.randint(len(ids) - length, (1,), generator=generator))
        windows.append(ids[start : start + length])
    return windows


def generated_texts(model_path: str, texts: list[str], count: int, new_tokens: int, temperatures: list[float],
                    seed: int, prompt_tokens: int = 64) -> list[str]:
    """Self-generated data: the model continues `count` corpus windows of `prompt_tokens` tokens (code in
    progress), split evenly over `temperatures` in order (0 = greedy: the continuations greedy acceptance
    will be asked to predict)."""
    from decoding import Engine, SamplingParams
    engine = Engine(model=model_path, show_progress=False)
    token_lists = [engine.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    prompts = corpus_windows(token_lists, count, prompt_tokens, seed)
    per_temperature = -(-count // len(temperatures))
    samples = []
    for i, temperature in enumerate(temperatures):
        chunk = prompts[i * per_temperature : (i + 1) * per_temperature]
        params = SamplingParams(temperature=temperature, max_tokens=new_tokens, seed=seed + i)
        for prompt, out in zip(chunk, engine.generate(chunk, params)):
            samples.append(engine.tokenizer.decode(prompt + out.outputs[0].token_ids))
    return samples


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the HF causal LM the heads are for (frozen)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "gorgon" / "corpus",
                        help="folder with train.jsonl / heldout.jsonl ({'text': ...} per line)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1, help="ResBlocks per head")
    parser.add_argument("--targets", choices=["model", "text"], default="model")
    parser.add_argument("--generate", type=int, default=0, help="train on N self-generated continuations")
    parser.add_argument("--generate-temperatures", type=float, nargs="+", default=[1.0],
                        help="sampling temperatures of the generated continuations, split evenly (0 = greedy)")
    parser.add_argument("--generate-tokens", type=int, default=256, help="tokens per generated continuation")
    parser.add_argument("--answers", type=Path, default=None,
                        help="train on these self-distilled answers (training.self_distill) instead of the corpus")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="with --answers: score only the N most frequent answer tokens (0 = the whole vocabulary)")
    parser.add_argument("--train-projections", action="store_true")
    parser.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="precision of the saved heads (bfloat16 halves the file)")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--position-stride", type=int, default=4, help="train on every S-th position of a window")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train(parser.parse_args(argv))


def train(args: argparse.Namespace) -> None:
    if args.answers is not None:
        from training.medusa_distill import train_on_answers
        return train_on_answers(args)
    if not (args.corpus / "train.jsonl").exists():
        from training.corpus import build
        build(args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train.log", "a")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    model.requires_grad_(False)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, args.heads, args.layers).to(args.device)
    heads.init_projections(model.get_output_embeddings().weight, freeze=not args.train_projections)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = args.out / "checkpoint.pt"
    step, seconds = resume(checkpoint, heads, optimizer, generator, log)
    texts = read_texts(args.corpus / "train.jsonl")
    if args.generate:
        texts = generated_texts(args.model, texts, args.generate, args.generate_tokens, args.generate_temperatures,
                                args.seed)
    stream = token_stream(texts, tokenizer)
    log.write(json.dumps({"event": "start", "heads": args.heads, "layers": args.layers, "targets": args.targets,
                          "trainable_params": sum(p.numel() for p in params), "train_tokens": len(stream),
                          "step": step}) + "\n")
    step, seconds = train_steps(args, model, heads, optimizer, generator, batches(stream, args.batch_size, generator),
                                log, step, seconds)
    save_checkpoint(checkpoint, heads, optimizer, generator, step, seconds)
    heads.eval()
    heads.save(args.out / "final", str(args.model), getattr(torch, args.save_dtype))
    accuracy = head_accuracy(model, heads, heldout_windows(args.corpus, tokenizer).to(args.device))
    (args.out / "final" / "evaluation.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    log.write(json.dumps({"event": "done", "step": step, "minutes": round(seconds / 60, 2), **accuracy}) + "\n")
    log.close()
    print(json.dumps(accuracy))


def train_steps(args: argparse.Namespace, model, heads: MedusaHeads, optimizer, generator: torch.Generator, data,
                log, step: int, seconds: float) -> tuple[int, float]:
    """Optimizer steps until max_steps or the time limit, checkpointing every save_every; (step, seconds)."""
    params = [p for p in heads.parameters() if p.requires_grad]
    checkpoint = args.out / "checkpoint.pt"
    progress = tqdm(total=args.max_steps, initial=step, desc="training medusa heads", unit="step")
    heads.train()
    device_type = torch.device(args.device).type
    while step < args.max_steps and (args.minutes is None or seconds < args.minutes * 60):
        started = time.perf_counter()
        inputs, _ = next(data)
        inputs = inputs.to(args.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.max_steps, args.lr, args.warmup)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            with torch.no_grad():
                out = model(inputs, output_hidden_states=True)
            offset = int(torch.randint(args.position_stride, (1,), generator=generator))
            losses = head_losses(heads, out.hidden_states[-1], out.logits, inputs, args.targets,
                                 args.position_stride, offset)
            loss = sum(HEAD_DECAY ** k * l for k, l in enumerate(losses))
        optimizer_step(loss, params, optimizer)
        step += 1
        seconds += time.perf_counter() - started
        report_progress(progress, log, step, loss, optimizer, args.batch_size, seconds,
                        head_losses=[round(l.item(), 4) for l in losses])
        if step % args.save_every == 0:
            save_checkpoint(checkpoint, heads, optimizer, generator, step, seconds)
    return step, seconds


if __name__ == "__main__":
    main()
