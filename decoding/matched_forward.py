"""A trainer's policy forward whose logprobs are the engine's rollout logprobs, bit for bit.

RL's importance ratio compares the logprob the rollout engine sampled a token under with the logprob the
trainer recomputes for it; when two code paths compute them, the ratio is not 1 even on-policy. Here the
forward runs the engine's own model (models/decoder.py, the native kernels, the engine's reduction
order) over each (prompt, completion) as one prefill, and reports `kernels.raw_log_softmax`, the function
every raw logprob of the engine comes from. Rollout logprobs do not depend on how the engine computed a
token (decode row, prefill chunk of any size, prefix-cache hit, recomputation, batch company: the kernels
compute each row alike, see models/kernels/attention_row.h), so a prefill here reproduces them exactly.

The backward is transformers' model of the same checkpoint, recomputed on the same tokens (positions
counted from each row's first real token, as the engine counts them): its parameters are the ones an
optimizer trains. After an optimizer step changes them, the next forward copies them into the native model
first (one weight update, as a push to a server applies it), so the forward always runs today's weights.

    policy = MatchedPolicy.from_pretrained("path/to/hf-folder")
    logprobs = policy(input_ids, attention_mask)      # [B, T]: log p(token t | its sequence before t)
    loss = -(advantages * logprobs[:, -completion_length:]).mean(); loss.backward(); optimizer.step()
    policy.push_to(client)                            # the server's next rollouts run these weights

Bit-exact for the natively served float32 families on the CPU, with raw logprobs (temperature 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from decoding.runner import ModelRunner
from decoding.step_plan import ScheduledSeq
from decoding.weights import apply_update, validate_update
from models import kernels
from models.attention import PagedKVCache
from models.loader import LoadedModel, load_model

# Tokens of one native forward: sequences are packed into calls of about this many tokens.
PACKED_TOKENS = 2048
BLOCK_SIZE = 16
_BITS = {4: torch.int32, 2: torch.int16, 8: torch.int64}


@dataclass
class _Row:
    """What ModelRunner.pack reads of a sequence: its id, tokens and cache blocks."""

    seq_id: int
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)


class MatchedPolicy(torch.nn.Module):
    """`forward(input_ids, attention_mask)` -> per-token logprobs equal to a Gorgon engine's rollout
    logprobs for the same tokens and weights; differentiable through transformers' model (`self.hf`)."""

    def __init__(self, hf: torch.nn.Module, native: LoadedModel):
        super().__init__()
        if native.quantization is not None or native.model.dtype != torch.float32:
            raise ValueError("the matched forward reproduces float32 weights; load the native model with "
                             "quantization='none' and dtype float32")
        self.hf = hf
        self._native = native
        self._synced_fingerprint: tuple | None = None
        self._sync()

    @classmethod
    def from_pretrained(cls, path: str) -> MatchedPolicy:
        """The checkpoint in an HF folder, as a server loads it with `--quantization none`."""
        native = load_model(path, dtype=torch.float32, show_progress=False, quantization="none")
        hf = AutoModelForCausalLM.from_pretrained(native.path, dtype=torch.float32)
        return cls(hf, native)

    @classmethod
    def from_engine(cls, engine) -> MatchedPolicy:
        """The weights an in-process engine serves now (after any pushes), on its model's architecture."""
        policy = cls.from_pretrained(engine.loaded.path)
        served = engine.weights.current(list(engine.loaded.model.param_slots()))
        policy.hf.load_state_dict(served, strict=False)      # copied into the native model by the next forward
        return policy

    # ---- weights ------------------------------------------------------------------------------
    def _fingerprint(self) -> tuple:
        """Changes whenever a parameter's bits change (an optimizer step) or it is replaced: a sum of each
        parameter's bit patterns, since a fused optimizer writes without bumping tensors' version counters."""
        return tuple((p.data_ptr(), int(p.detach().view(_BITS[p.element_size()]).sum(dtype=torch.int64)))
                     for p in self.hf.parameters())

    @torch.no_grad()
    def _sync(self) -> None:
        """Copy the trained parameters into the native model when they changed since the last copy."""
        fingerprint = self._fingerprint()
        if fingerprint == self._synced_fingerprint:
            return
        tensors = self.state_for_push()
        validate_update(self._native.model, tensors, allow_non_finite=False)
        apply_update(self._native.model, tensors)
        self._synced_fingerprint = fingerprint

    def state_for_push(self) -> dict[str, torch.Tensor]:
        """The parameters by their HF names, as a server's weight update takes them."""
        slots = self._native.model.param_slots()
        return {name: tensor.detach().float() for name, tensor in self.hf.state_dict().items() if name in slots}

    def push_to(self, target, weight_version: int | None = None) -> int:
        """Send the current weights to a server (a client.GorgonClient) or an in-process Engine; -> the
        version they are served under."""
        tensors = self.state_for_push()
        if hasattr(target, "push_weights"):
            return target.push_weights(tensors, weight_version=weight_version)
        target.weights.update(tensors, weight_version)
        return target.weights.version

    # ---- the forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> [B, T]: at each real token after its sequence's first, its logprob given the
        sequence's tokens before it; 0 elsewhere. Padded: attention_mask [B, T] marks each row's one run of
        real tokens (padding anywhere outside it). Packed (padding-free, as TRL packs): position_ids [B, T]
        start each sequence of a row at 0. return_entropy: also the entropy of the distribution each of those
        tokens was drawn from [B, T] (not differentiable)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        spans = _sequence_spans(attention_mask, position_ids)
        trained = [p for p in self.hf.parameters() if p.requires_grad]
        logprobs, entropies = _MatchedLogprobs.apply(self, input_ids, spans, *trained)
        return (logprobs, entropies) if return_entropy else logprobs

    def native_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, the raw logprob of each token after the first given those before it [len - 1]:
        the engine's model over packed prefills of at most PACKED_TOKENS tokens (a row's numbers do not
        depend on what it is packed with)."""
        return [logprobs for logprobs, _ in self.native_logprobs_and_entropies(sequences)]

    @torch.inference_mode()
    def native_logprobs_and_entropies(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """native_logprobs, each with the entropies of the distributions its tokens were drawn from."""
        self._sync()
        results: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        while start < len(sequences):
            end, tokens = start, 0
            while end < len(sequences) and (end == start or tokens + len(sequences[end]) <= PACKED_TOKENS):
                tokens += len(sequences[end])
                end += 1
            batch = sequences[start:end]
            rows, next_block = [], 1                # block 0 is the null block
            for index, tokens_of_row in enumerate(batch):
                blocks = (len(tokens_of_row) + BLOCK_SIZE - 1) // BLOCK_SIZE
                rows.append(_Row(index, list(tokens_of_row), list(range(next_block, next_block + blocks))))
                next_block += blocks
            model = self._native.model
            cache = PagedKVCache(model.num_layers, next_block, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                                 model.dtype, self._native.device, getattr(model, "history_layers", None) or {})
            runner = ModelRunner(model, cache, self._native.device)
            packed = runner.pack([ScheduledSeq(row, 0, len(row.token_ids), True) for row in rows])
            hidden = model.forward(packed.input_ids, packed.positions, cache, packed.meta)
            for row in rows:
                first, length = packed.first_row[row.seq_id], len(row.token_ids)
                logits = model.compute_logits(hidden[first : first + length - 1]).float()
                targets = torch.tensor(row.token_ids[1:], dtype=torch.long).unsqueeze(1)
                distribution = kernels.raw_log_softmax(logits)
                entropies = -(distribution.exp() * distribution).sum(-1)
                results.append((distribution.gather(1, targets).squeeze(1), entropies))
            start = end
        return results

    def hf_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same [B, T] logprobs from transformers' forward (differentiable), positions counted from
        each row's first real token as the engine counts them."""
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(logprobs.dtype)
        return torch.nn.functional.pad(logprobs * keep, (1, 0))


def _sequence_spans(attention_mask: torch.Tensor, position_ids: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """Each sequence as (row, start, end): a row's run of real tokens, cut where position_ids restart at 0
    (packed rows); refused where the mask has a hole in a row."""
    spans = []
    positions = None if position_ids is None else position_ids.tolist()
    for row, mask in enumerate(attention_mask.tolist()):
        ones = [i for i, m in enumerate(mask) if m]
        if not ones:
            raise ValueError(f"row {row} of attention_mask has no real token")
        if ones[-1] - ones[0] + 1 != len(ones):
            raise ValueError(f"row {row} of attention_mask is not one run of real tokens (padding inside it)")
        starts = [ones[0]] if positions is None else \
            [ones[0]] + [i for i in ones[1:] if positions[row][i] == 0]
        spans += [(row, begin, end) for begin, end in zip(starts, starts[1:] + [ones[-1] + 1])]
    return spans


class _MatchedLogprobs(torch.autograd.Function):
    """Forward: the engine's numbers. Backward: transformers' model recomputed on the same sequences, one
    per row of a padded batch."""

    @staticmethod
    def forward(ctx, policy: MatchedPolicy, input_ids: torch.Tensor, spans: list[tuple[int, int, int]], *trained):
        sequences = [input_ids[row, start:end].tolist() for row, start, end in spans]
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        entropy = torch.zeros(input_ids.shape, dtype=torch.float32)
        for (row, start, end), (logprobs, entropies) in zip(spans, policy.native_logprobs_and_entropies(sequences)):
            out[row, start + 1 : end] = logprobs
            entropy[row, start + 1 : end] = entropies
        ctx.policy, ctx.spans = policy, spans
        ctx.save_for_backward(input_ids)
        ctx.mark_non_differentiable(entropy)
        return out.to(input_ids.device), entropy.to(input_ids.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_entropy: torch.Tensor | None = None):
        (input_ids,) = ctx.saved_tensors
        policy: MatchedPolicy = ctx.policy
        width = max(end - start for _, start, end in ctx.spans)
        ids = torch.zeros(len(ctx.spans), width, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        grads_out = torch.zeros(len(ctx.spans), width, dtype=grad_output.dtype, device=grad_output.device)
        for i, (row, start, end) in enumerate(ctx.spans):
            ids[i, : end - start], mask[i, : end - start] = input_ids[row, start:end], 1
            grads_out[i, : end - start] = grad_output[row, start:end]
        trained = [p for p in policy.hf.parameters() if p.requires_grad]
        with torch.enable_grad():
            recomputed = policy.hf_logprobs(ids, mask)
            grads = torch.autograd.grad(recomputed, trained, grads_out, allow_unused=True)
        return (None, None, None, *grads)
