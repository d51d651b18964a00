"""The contract between the engine and a native model implementation."""

from __future__ import annotations

from typing import Protocol

import torch

from models.attention import AttentionMetadata, PagedKVCache
from models.layers import FusedLinear, ParamSlot


class NativeCausalLM(Protocol):
    """A decoder-only LM that reads and writes the paged KV cache.

    Tokens arrive packed: `input_ids` and `positions` are [T] over all scheduled sequences of a step.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    # The distinct sliding windows of the layers (None = full attention); the runner builds one mask
    # per window per step.
    attention_windows: frozenset[int | None]
    # The output head compute_logits runs (Medusa heads trained on it project through it too).
    lm_head: FusedLinear
    # Names a checkpoint may leave out (the head of a model whose head is tied to its embedding).
    optional_param_names: frozenset[str]
    # Optional, for layers that read back their own earlier inputs (LFM2's short convolutions): those
    # layers' channels per token (the cache keeps them in place of keys and values), and how many
    # previous positions a token reads (AttentionMetadata.history_slots). Absent: none.
    # history_layers: dict[int, int]; history_length: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                meta: AttentionMetadata, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> final hidden states (after the final norm) of `output_rows` [R] in that order, or of all
        T rows when None. Every row's keys and values are written in every layer either way; rows not
        asked for skip the last layer's projection and MLP."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        """HF checkpoint name -> where that tensor lives here (several places when weights are tied)."""


def load_state_dict(model: NativeCausalLM, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an HF state dict into a native model; every native slot must be covered."""
    slots = model.param_slots()
    missing = [name for name in slots if name not in state_dict and name not in model.optional_param_names]
    if missing:
        raise ValueError(f"checkpoint is missing parameters: {', '.join(missing[:5])}")
    for name, places in slots.items():
        if name in state_dict:
            for slot in places:
                slot.copy_(state_dict[name])
