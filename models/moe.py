"""A mixture-of-experts MLP for the native decoder (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts; each expert's products run once over the rows routed to it, in the packed layout of every other
product (models/layers.py), and the weighted results add up expert by expert in increasing order, as HF's
modeling code adds them. Each row's result depends on its own routing only: the packed product computes
every row independently of the others, so a token's output is the same in any batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from models.families import MoeSpec
from models.layers import FusedLinear, ParamSlot


@dataclass(frozen=True)
class ExpertSlots:
    """One HF tensor that stacks every expert's matrix ([experts, out, in]) over the experts' own packed
    matrices: the ParamSlot contract (hf_shape, target, copy_, read) for weight loads and pushes."""

    parts: tuple[ParamSlot, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].hf_shape)

    @property
    def target(self) -> torch.Tensor:
        return self.parts[0].target

    def copy_(self, tensor: torch.Tensor) -> None:
        for part, expert in zip(self.parts, tensor):
            part.copy_(expert)

    def read(self) -> torch.Tensor:
        return torch.stack([part.read() for part in self.parts])


class MoeMLP(torch.nn.Module):
    def __init__(self, hidden: int, moe: MoeSpec, activation: str, dtype, device):
        super().__init__()
        self.moe = moe
        inter = moe.intermediate_size
        self.router = FusedLinear(hidden, [moe.num_experts], [False], dtype, device)
        self.gate_up = torch.nn.ModuleList(FusedLinear(hidden, [inter, inter], [False, False], dtype, device)
                                           for _ in range(moe.num_experts))
        self.down = torch.nn.ModuleList(FusedLinear(inter, [hidden], [False], dtype, device)
                                        for _ in range(moe.num_experts))
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # [T, hidden]
        probs = torch.softmax(self.router(x).float(), dim=-1)                     # [T, experts]
        weights, experts = probs.topk(self.moe.top_k, dim=-1)                     # [T, k]
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        inter = self.moe.intermediate_size
        for expert in torch.unique(experts).tolist():
            rows, choice = torch.where(experts == expert)
            gate_up = self.gate_up[expert](x[rows])
            hidden = self.down[expert](self.act(gate_up[:, :inter]) * gate_up[:, inter:])
            out.index_add_(0, rows, hidden * weights[rows, choice, None])
        return out

    def slots(self, prefix: str) -> dict[str, ParamSlot | ExpertSlots]:
        """HF's names: `{prefix}.gate.weight` [experts, hidden], `{prefix}.experts.gate_up_proj`
        [experts, 2 * inter, hidden] and `{prefix}.experts.down_proj` [experts, hidden, inter]."""
        inter = self.moe.intermediate_size
        slots: dict[str, ParamSlot | ExpertSlots] = self.router.slots([f"{prefix}.gate.weight"], [None])
        gate_up = tuple(linear.slots_by_width(["w"], [None], [2 * inter])["w"] for linear in self.gate_up)
        down = tuple(linear.slots(["w"], [None])["w"] for linear in self.down)
        slots[f"{prefix}.experts.gate_up_proj"] = ExpertSlots(gate_up)
        slots[f"{prefix}.experts.down_proj"] = ExpertSlots(down)
        return slots
