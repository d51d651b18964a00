"""Train one member of the default model family (an HF Llama) on the corpus; seeded and resumable.

    python -m training.train --role target --out runs/target --minutes 60
    python -m training.train --role draft  --out runs/draft  --minutes 60

Progress goes to a bar and to OUT/train.log; OUT/checkpoint.pt is written every --save-every steps and
picked up again when the same command is re-run. The final model is saved to OUT/final in HF format.
On CUDA it runs in bfloat16 autocast on the GPU; on the CPU in bfloat16 autocast too (the matmuls are
~2.5x faster than float32 where the CPU has AVX512-BF16), with float32 master weights either way.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from training.corpus import read_texts

ROLES = {
    # The target: the model `gorgon serve` runs by default.
    "target": dict(hidden_size=320, intermediate_size=864, num_hidden_layers=8, num_attention_heads=5,
                   num_key_value_heads=5, tie_word_embeddings=True),
    # The draft: same tokenizer, under 1/6 of the target's parameters, a decode step several times cheaper.
    # Depth buys more agreement with the target than width once the embedding takes most of the budget.
    "draft": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, tie_word_embeddings=True),
}
SEQ_LEN = 256


def model_config(role: str, tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, rms_norm_eps=1e-5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **ROLES[role])


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All files as one stream of token ids, each file followed by EOS."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False).input_ids:
        ids += encoded
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch_size,), generator=generator)
        window = torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def learning_rate(step: int, max_steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "gorgon" / "corpus")
    parser.add_argument("--tokenizer", type=Path, default=Path("models/default/tokenizer"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this much training time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init", type=Path, default=None, help="start from this HF model folder")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="distil: match this model's next-token distribution (KL) instead of the data")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


def train(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train.log", "a")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(args.device)
    else:
        model = LlamaForCausalLM(model_config(args.role, tokenizer)).to(args.device)
    teacher = None
    if args.teacher is not None:
        teacher = LlamaForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).to(args.device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = args.out / "checkpoint.pt"
    step, seconds = resume(checkpoint, model, optimizer, generator, log)
    stream = token_stream(read_texts(args.corpus / "train.jsonl"), tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    log.write(json.dumps({"event": "start", "role": args.role, "params": num_params,
                          "train_tokens": len(stream), "step": step}) + "\n")
    step, seconds = train_steps(args, model, teacher, optimizer, generator,
                                batches(stream, args.batch_size, generator), log, step, seconds)
    save_checkpoint(checkpoint, model, optimizer, generator, step, seconds)
    save_final(args.out / "final", model, tokenizer)
    log.write(json.dumps({"event": "done", "step": step, "minutes": round(seconds / 60, 2)}) + "\n")
    log.close()


def train_steps(args: argparse.Namespace, model, teacher, optimizer, generator: torch.Generator, data, log,
                step: int, seconds: float) -> tuple[int, float]:
    """Optimizer steps until max_steps or the time limit, checkpointing every save_every; (step, seconds)."""
    checkpoint = args.out / "checkpoint.pt"
    progress = tqdm(total=args.max_steps, initial=step, desc=f"training {args.role}", unit="step")
    model.train()
    while step < args.max_steps and (args.minutes is None or seconds < args.minutes * 60):
        started = time.perf_counter()
        inputs, targets = (t.to(args.device) for t in next(data))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.max_steps, args.lr, args.warmup)
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16):
            logits = model(inputs).logits
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs).logits
        loss = next_token_loss(logits, targets, teacher_logits if teacher is not None else None)
        optimizer_step(loss, model.parameters(), optimizer)
        step += 1
        seconds += time.perf_counter() - started
        report_progress(progress, log, step, loss, optimizer, args.batch_size, seconds)
        if step % args.save_every == 0:
            save_checkpoint(checkpoint, model, optimizer, generator, step, seconds)
    return step, seconds


def next_token_loss(logits, targets, teacher_logits=None):
    """Cross-entropy on the data, or KL(teacher || student) when distilling: the student learns the
    teacher's whole distribution, which is what makes its proposals acceptable to the teacher."""
    logits = logits.float().view(-1, logits.shape[-1])
    if teacher_logits is None:
        return torch.nn.functional.cross_entropy(logits, targets.reshape(-1))
    teacher_logprobs = torch.log_softmax(teacher_logits.float().view(-1, logits.shape[-1]), dim=-1)
    return torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), teacher_logprobs, log_target=True,
                                      reduction="batchmean")


def optimizer_step(loss: torch.Tensor, params, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def report_progress(progress, log, step: int, loss: torch.Tensor, optimizer, batch_size: int, seconds: float,
                    **extra) -> None:
    """The bar after every step; a JSON line in the log every 20."""
    progress.update()
    progress.set_postfix(loss=f"{loss.item():.3f}")
    if step % 20 == 0:
        log.write(json.dumps({"step": step, "loss": round(loss.item(), 4), **extra,
                              "lr": optimizer.param_groups[0]["lr"],
                              "tokens_per_s": round(step * batch_size * SEQ_LEN / seconds, 1),
                              "minutes": round(seconds / 60, 2)}) + "\n")
        log.flush()


def resume(path: Path, model, optimizer, generator, log) -> tuple[int, float]:
    """(step, training seconds) of the checkpoint at `path`, loaded into the given objects; (0, 0.0)
    when there is none yet."""
    if not path.exists():
        return 0, 0.0
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    log.write(json.dumps({"event": "resumed", "step": state["step"]}) + "\n")
    return state["step"], state["seconds"]


def save_checkpoint(path: Path, model, optimizer, generator, step: int, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "step": step, "seconds": seconds}, tmp)
    tmp.replace(path)


def save_final(folder: Path, model, tokenizer) -> None:
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(folder)


if __name__ == "__main__":
    main()
