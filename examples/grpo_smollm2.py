"""GRPO on SmolLM2-135M-Instruct with TRL against a Gorgon server on this machine, training on the matched
forward: the trainer's logprobs are the rollout's, bit for bit.

    python examples/grpo_smollm2.py --steps 60 --out runs/grpo_smollm2

The script starts `gorgon serve` on loopback (float32 weights, as the trainer holds them), then runs TRL's
GRPOTrainer (training/matched_grpo.py) with rollouts from the server and a weight push after every step
(through shared memory). The task: add two digits and reply with the equation ("3 + 4 = 7"); the reward
is 1 for the equation of the two terms with the right sum, 0.2 for an equation otherwise, else 0. Before
each update the script recomputes the step's completion logprobs three ways and logs the largest gap to
the server's rollout logprobs: `mismatch_matched` (the matched forward, must be 0.0), `mismatch_trl_float32`
and `mismatch_trl_bf16` (TRL's own forward in float32 and under bfloat16 autocast, its `bf16=True`). One
JSON line per step goes to OUT/steps.jsonl; the reward curve is drawn to OUT/reward.svg.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from benchmarks.common import benchmark_model_path, cpu_description, gorgon_server
from client import GorgonClient
from client.trl import PushWeightsCallback, make_rollout_func
from decoding.matched_forward import MatchedPolicy

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # rollout_func is marked experimental in TRL

EQUATION = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*(-?\d+)")


def addition_prompts(tokenizer, count: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "terms": []}
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        messages = [{"role": "user", "content": f"Compute {a} + {b}. Reply only with the equation, like 2 + 2 = 4."}]
        rows["prompt"].append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        rows["terms"].append([a, b])
    return Dataset.from_dict(rows)


def sum_reward(prompts, completions, terms, **_) -> list[float]:
    """1 for the equation of the two terms with the right sum, 0.2 for an equation otherwise, else 0."""
    rewards = []
    for completion, (a, b) in zip(completions, terms):
        found = EQUATION.search(completion)
        right = found is not None and int(found.group(3)) == a + b and {int(found.group(1)), int(found.group(2))} == {a, b}
        rewards.append(1.0 if right else 0.2 if found is not None else 0.0)
    return rewards


def logged_trainer_class():
    """MatchedGRPOTrainer that measures, before each update, how far three forwards sit from the rollout."""
    from trl import GRPOTrainer

    from training.matched_grpo import MatchedGRPOTrainer

    class LoggedTrainer(MatchedGRPOTrainer):
        def __init__(self, *args, rollout_func, log_path: Path, **kwargs):
            super().__init__(*args, rollout_func=rollout_func, **kwargs)
            self.rollout_outputs = rollout_func.outputs
            self.log_path = log_path

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            served = self.rollout_outputs.pop()
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            width = out["completion_ids"].shape[1]
            rollout = torch.zeros(out["completion_ids"].shape)
            counted = torch.zeros(out["completion_ids"].shape, dtype=torch.bool)
            for row, logprobs in enumerate(served["logprobs"]):
                rollout[row, : len(logprobs)] = torch.tensor(logprobs)
                counted[row, : len(logprobs)] = True
            counted &= out["completion_mask"].bool()
            with torch.no_grad():
                matched = self.matched(ids, mask)[:, -width:]
                trl_float32 = GRPOTrainer._get_per_token_logps_and_entropies(self, self.model, ids, mask, width)[0]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    trl_bf16 = GRPOTrainer._get_per_token_logps_and_entropies(self, self.model, ids, mask, width)[0]
            gap = lambda logprobs: float((logprobs.float() - rollout)[counted].abs().max())     # noqa: E731
            record = {"step": self.state.global_step + 1, "reward": self._metrics["train"]["reward"][-1],
                      "weight_version": served["weight_version"], "tokens": int(counted.sum()),
                      "mismatch_matched": gap(matched), "mismatch_trl_float32": gap(trl_float32),
                      "mismatch_trl_bf16": gap(trl_bf16)}
            with self.log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            return out

    return LoggedTrainer


def recording(rollout_func):
    """The rollout_func, keeping each call's server output for the mismatch measurement."""
    def wrapped(prompts, trainer):
        output = rollout_func(prompts, trainer)
        wrapped.outputs.append(output)
        return output
    wrapped.outputs = []
    wrapped.weight_versions = rollout_func.weight_versions
    return wrapped


def reward_svg(steps: list[dict], path: Path, window: int = 5) -> None:
    """The mean reward per step and its running mean over `window` steps, as an SVG line chart."""
    width, height, pad = 640, 320, 48
    rewards = [s["reward"] for s in steps]
    smooth = [statistics.mean(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]
    top = max(1.0, max(rewards))
    x = lambda i: pad + (width - 2 * pad) * i / max(1, len(rewards) - 1)            # noqa: E731
    y = lambda r: height - pad - (height - 2 * pad) * r / top                          # noqa: E731
    line = lambda values: " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))   # noqa: E731
    ticks = "".join(f'<text x="{pad - 8}" y="{y(t) + 4:.1f}" text-anchor="end">{t:.1f}</text>'
                    f'<line x1="{pad}" x2="{width - pad}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>'
                    for t in (0, top / 2, top))
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>{ticks}'
        f'<polyline points="{line(rewards)}" fill="none" stroke="#9bb" stroke-width="1"/>'
        f'<polyline points="{line(smooth)}" fill="none" stroke="#036" stroke-width="2"/>'
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">GRPO step (1 to {len(rewards)})</text>'
        f'<text x="{pad}" y="20">mean reward per step (thin) and over {window} steps (thick): SmolLM2-135M-Instruct, '
        f'matched forward</text></svg>\n')


def train(steps: int, out: Path, prompts_per_step: int = 4, generations: int = 8, max_completion_length: int = 16,
          learning_rate: float = 3e-5, seed: int = 0, model: str | None = None, server: str | None = None,
          admin_key: str = "grpo") -> list[dict]:
    """Run GRPO; -> the per-step records. model: an HF folder (default SmolLM2-135M-Instruct); server: the
    URL of a Gorgon server already serving it (default: start one on loopback)."""
    path = model or benchmark_model_path("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "steps.jsonl"
    log_path.unlink(missing_ok=True)
    if server is not None:
        _train_against(server, admin_key, path, steps, out, log_path, prompts_per_step, generations,
                       max_completion_length, learning_rate, seed)
    else:
        with gorgon_server(path, "--admin-key", admin_key, "--quantization", "none") as url:
            _train_against(url, admin_key, path, steps, out, log_path, prompts_per_step, generations,
                           max_completion_length, learning_rate, seed)
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def _train_against(url: str, admin_key: str, path: str, steps: int, out: Path, log_path: Path, prompts_per_step: int,
                   generations: int, max_completion_length: int, learning_rate: float, seed: int) -> None:
    from trl import GRPOConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = MatchedPolicy.from_pretrained(path)
    client = GorgonClient(url, admin_key=admin_key)
    client.share_weights(policy.hf)            # pushes copy nothing on the trainer's side
    args = GRPOConfig(output_dir=str(out / "trainer"), max_steps=steps, num_generations=generations,
                      per_device_train_batch_size=prompts_per_step * generations,
                      max_completion_length=max_completion_length, learning_rate=learning_rate, beta=0.0,
                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                      temperature=1.0, seed=seed, shuffle_dataset=True)
    trainer = logged_trainer_class()(
        policy=policy, reward_funcs=sum_reward, args=args, processing_class=tokenizer,
        train_dataset=addition_prompts(tokenizer, steps * prompts_per_step, seed),
        rollout_func=recording(make_rollout_func(client, logprobs_mode="raw")),
        callbacks=[PushWeightsCallback(client)], log_path=log_path)
    trainer.train()
    client.close()


def summary(steps: list[dict], edge: int = 10) -> dict:
    first, last = [s["reward"] for s in steps[:edge]], [s["reward"] for s in steps[-edge:]]
    return {"steps": len(steps), "cpu": cpu_description(),
            "reward_first": round(statistics.mean(first), 3), "reward_first_stdev": round(statistics.stdev(first), 3),
            "reward_last": round(statistics.mean(last), 3), "reward_last_stdev": round(statistics.stdev(last), 3),
            "max_mismatch_matched": max(s["mismatch_matched"] for s in steps),
            "max_mismatch_trl_float32": max(s["mismatch_trl_float32"] for s in steps),
            "max_mismatch_trl_bf16": max(s["mismatch_trl_bf16"] for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/grpo_smollm2")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    steps = train(args.steps, out, args.prompts_per_step, args.generations, args.max_completion_length,
                  args.learning_rate, args.seed)
    reward_svg(steps, out / "reward.svg")
    result = summary(steps)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
