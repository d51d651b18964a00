"""TRL's GRPOTrainer whose policy forward is the matched forward (decoding/matched_forward.py): the
logprobs it trains on equal the Gorgon server's rollout logprobs bit for bit, so the importance ratio is
exactly 1 on-policy. Gradients are transformers' (the backward recomputes the same tokens).

    policy = MatchedPolicy.from_pretrained(path)               # the checkpoint the server serves
    client = GorgonClient(url, admin_key=key)
    trainer = MatchedGRPOTrainer(policy=policy, reward_funcs=..., args=GRPOConfig(temperature=1.0, ...),
                                 rollout_func=make_rollout_func(client, logprobs_mode="raw"),
                                 callbacks=[PushWeightsCallback(client)], ...)

Requires temperature 1 (the matched forward reproduces raw logprobs) and text-only inputs; anything else
(a reference model's forward, multimodal inputs) takes TRL's own path.
"""

from __future__ import annotations

from trl import GRPOTrainer

from decoding.matched_forward import MatchedPolicy


class MatchedGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, policy: MatchedPolicy, **kwargs):
        if "model" in kwargs:
            raise ValueError("MatchedGRPOTrainer trains policy.hf; pass the policy, not a model")
        self.matched = policy
        super().__init__(*args, model=policy.hf, **kwargs)
        if self.temperature != 1.0:
            raise ValueError(f"the matched forward reproduces raw (temperature 1) logprobs; temperature is "
                             f"{self.temperature}: set GRPOConfig(temperature=1.0)")

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        if (compute_aux_loss or any(value is not None for value in extra.values())
                or self.accelerator.unwrap_model(model) is not self.matched.hf):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **extra)
        logprobs, entropies = self.matched(input_ids, attention_mask, return_entropy=True)
        return (logprobs[:, -logits_to_keep:], entropies[:, -logits_to_keep:] if compute_entropy else None, None)
