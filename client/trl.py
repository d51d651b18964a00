"""Plugging Gorgon into TRL's GRPOTrainer: a `rollout_func` and a weight-push callback.

    client = GorgonClient("http://127.0.0.1:8000", admin_key="...")
    trainer = GRPOTrainer(..., rollout_func=make_rollout_func(client),
                          callbacks=[PushWeightsCallback(client)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from client.http import GorgonClient


def make_rollout_func(client: GorgonClient, **overrides):
    """A rollout_func for GRPOTrainer: G completions per prompt from the server, with their token ids,
    logprobs (of the distribution sampled from: `processed` mode) and the weight version that made them.

    TRL hands over each prompt repeated G times in a row; the server is asked for n = G samples of each
    distinct prompt instead, so the prompt is prefilled once per group. The sampling settings come from
    the trainer's arguments; `overrides` win over them. `rollout_func.weight_versions` records the
    version of every call, for checks and logging.
    """

    def rollout_func(prompts: list, trainer) -> dict:
        num_generations = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        args = trainer.args
        sampling = {"max_tokens": args.max_completion_length, "temperature": args.temperature,
                    "top_p": args.top_p, "top_k": args.top_k or 0, "min_p": args.min_p or 0.0,
                    "repetition_penalty": args.repetition_penalty, "logprobs_mode": "processed"}
        out = client.rollouts(prompts[::num_generations], n=num_generations, **(sampling | overrides))
        rollout_func.weight_versions.append(out["weight_version"])
        return {"prompt_ids": out["prompt_ids"], "completion_ids": out["completion_ids"], "logprobs": out["logprobs"],
                "weight_version": out["weight_versions"]}

    rollout_func.weight_versions = []
    return rollout_func


class PushWeightsCallback(TrainerCallback):
    """Push the model's weights when training begins (so the first rollouts come from the policy the
    trainer holds, not from whatever the server loaded) and after every `every_n_steps` optimizer steps;
    the version is the step. The first push may go back in version: a new run starts the count again."""

    def __init__(self, client: GorgonClient, every_n_steps: int = 1, policy: str = "wait"):
        self.client = client
        self.every_n_steps = every_n_steps
        self.policy = policy

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.client.push_weights(model, weight_version=state.global_step, policy=self.policy,
                                     allow_version_rollback=True)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every_n_steps == 0:
            self.client.push_weights(model, weight_version=state.global_step, policy=self.policy)
        return control
