"""How speculative acceptance decays as the policy moves away from its draft model and its Medusa heads
over weight pushes, and what pushing the draft's own weights (names under "draft.") brings back.

RL drift, emulated: the embedded target is fine-tuned (AdamW, lr 1e-4, batches of 8 x 128 tokens) on code
it was not trained on (the installed transformers' source: it was trained on the standard library), and
its weights are pushed to two speculative engines (the embedded draft, 4 tokens a step; the embedded
Medusa heads, which read the target's hidden states) after every `steps_per_push` steps, as a trainer
pushes after each optimizer step. After each push: the acceptance of greedy drafts (accepted / drafted
tokens, and accepted tokens per verified proposal) on 8 prompts from that code, 64 new tokens each.
Then the draft
is fine-tuned on the same batches, the cheap thing a trainer can run beside the policy, and pushed under
"draft." names; acceptance again. Speculation is lossless: no push of the draft changes an output.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from benchmarks.common import cpu_description, parse_args, report
from decoding import Engine, SamplingParams
from models.loader import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR

BATCH, LENGTH, PROMPT_LENGTH, NEW_TOKENS = 8, 128, 48, 64


def token_stream(tokenizer) -> list[int]:
    """The installed transformers' Python source, tokenized: code the embedded models never saw."""
    root = Path(transformers.__file__).parent
    files = sorted(root.rglob("*.py"))
    random.Random(0).shuffle(files)
    ids: list[int] = []
    for path in files[:300]:
        ids += tokenizer(path.read_text(errors="ignore"), add_special_tokens=False).input_ids
    return ids


def batches(stream: list[int], count: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    starts = [[rng.randrange(len(stream) - LENGTH) for _ in range(BATCH)] for _ in range(count)]
    return [torch.tensor([stream[s : s + LENGTH] for s in batch]) for batch in starts]


def train(model, data: list[torch.Tensor]) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for batch in data:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def acceptance(engine: Engine, prompts: list[list[int]]) -> dict:
    """Accepted over drafted tokens, and accepted tokens per verified proposal (the measure that compares
    a chain with a Medusa tree, whose nodes are mostly alternatives)."""
    counters = engine.speculation.counters
    before = counters.num_drafts, counters.num_draft_tokens, counters.num_accepted_tokens
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    drafts, drafted, accepted = (now - then for now, then in zip(
        (counters.num_drafts, counters.num_draft_tokens, counters.num_accepted_tokens), before))
    return {"rate": round(accepted / max(1, drafted), 3), "per_step": round(accepted / max(1, drafts), 3)}


def main() -> None:
    args = parse_args(__doc__)
    pushes, steps_per_push = (2, 5) if args.quick else (4, 10)
    engine = Engine(model=str(DEFAULT_MODEL_DIR), speculative="draft", num_speculative_tokens=4, show_progress=False)
    medusa = Engine(model=str(DEFAULT_MODEL_DIR), speculative="medusa", show_progress=False)
    policy = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(DEFAULT_DRAFT_DIR, dtype=torch.float32)
    stream = token_stream(engine.tokenizer)
    rng = random.Random(1)
    prompts = [stream[s : s + PROMPT_LENGTH] for s in (rng.randrange(len(stream) - PROMPT_LENGTH) for _ in range(8))]
    curve = [{"push": 0, "acceptance": acceptance(engine, prompts), "medusa_acceptance": acceptance(medusa, prompts)}]
    seen: list[torch.Tensor] = []
    for push in range(1, pushes + 1):
        data = batches(stream, steps_per_push, seed=push)
        seen += data
        loss = train(policy, data)
        for served in (engine, medusa):
            served.weights.update(policy.state_dict())
        curve.append({"push": push, "policy_loss": round(loss, 3), "acceptance": acceptance(engine, prompts),
                      "medusa_acceptance": acceptance(medusa, prompts)})
    draft_loss = train(draft, seen)
    engine.weights.update({f"draft.{name}": tensor for name, tensor in draft.state_dict().items()})
    report({"benchmark": "draft_drift", "cpu": cpu_description(), "steps_per_push": steps_per_push,
            "batch_tokens": BATCH * LENGTH, "acceptance_by_push": curve,
            "after_draft_push": {"draft_loss": round(draft_loss, 3), "acceptance": acceptance(engine, prompts)},
            "weight_version": engine.weights.version}, args.json)


if __name__ == "__main__":
    main()
