"""GRPO with TRL against a running Gorgon server: rollouts over HTTP, weights pushed back every step.

    gorgon serve --admin-key secret &
    python examples/grpo_trl.py --server http://127.0.0.1:8000 --admin-key secret --steps 20

The model trained here must be the one the server serves (the embedded default unless --model says
otherwise). The reward is verifiable: 1 when the prompt plus the completion parses as Python, else 0.
"""

from __future__ import annotations

import argparse
import ast
import os

from datasets import Dataset
from transformers import AutoTokenizer

from client import GorgonClient
from client.trl import PushWeightsCallback, make_rollout_func
from models.loader import DEFAULT_MODEL_DIR

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # rollout_func is marked experimental in TRL

PROMPTS = ["def add(a, b):\n", "def is_even(n):\n", "class Point:\n", "for i in range(10):\n",
           "def greet(name):\n", "import os\n\ndef exists(path):\n", "def square(x):\n", "while True:\n"]


def parses_as_python(prompts, completions, **_) -> list[float]:
    rewards = []
    for prompt, completion in zip(prompts, completions):
        try:
            ast.parse(prompt + completion)
            rewards.append(1.0)
        except (SyntaxError, ValueError):
            rewards.append(0.0)
    return rewards


def train(server: str, admin_key: str, model: str, steps: int, output_dir: str, max_completion_length: int = 32):
    from trl import GRPOConfig, GRPOTrainer

    client = GorgonClient(server, admin_key=admin_key)
    rollout_func = make_rollout_func(client)
    args = GRPOConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=max_completion_length, learning_rate=1e-5, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, bf16=False, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=parses_as_python, args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                          processing_class=AutoTokenizer.from_pretrained(model),
                          rollout_func=rollout_func, callbacks=[PushWeightsCallback(client)])
    trainer.train()
    return rollout_func.weight_versions, client.weight_version()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/grpo")
    args = parser.parse_args()
    versions, final = train(args.server, args.admin_key, args.model, args.steps, args.output_dir)
    print(f"rollout weight versions: {versions}; server weight version: {final}")


if __name__ == "__main__":
    main()
