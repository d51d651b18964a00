"""A mixture-of-experts MLP for the native decoder (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts; each expert's products run once over the rows routed to it, in the packed layout of every other
product (models/layers.py), and the weighted results add up expert by expert in increasing order, as HF's
modeling code adds them. Each row's result depends on its own routing only: the packed product computes
every row independently of the others, so a token's output is the same in any batch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.activations import ACT2FN

from models.families import MoeSpec
from models.layers import FusedLinear, ParamSlot


@dataclass(frozen=True)
class ExpertSlots:
    """One HF tensor that stacks every expert's matrix ([experts, out, in], or [experts, in, out] where
    `in_out`) or bias over the experts' own packed ones: the ParamSlot contract (hf_shape, target, copy_,
    read) for weight loads and pushes."""

    parts: tuple[ParamSlot, ...]
    in_out: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        shape = self.parts[0].hf_shape
        return (len(self.parts), *(reversed(shape) if self.in_out else shape))

    @property
    def target(self) -> torch.Tensor:
        return self.parts[0].target

    def copy_(self, tensor: torch.Tensor) -> None:
        for part, expert in zip(self.parts, tensor):
            part.copy_(expert.t() if self.in_out else expert)

    def read(self) -> torch.Tensor:
        return torch.stack([part.read().t() if self.in_out else part.read() for part in self.parts])


class MoeMLP(torch.nn.Module):
    def __init__(self, hidden: int, moe: MoeSpec, activation: str, dtype, device):
        super().__init__()
        self.moe = moe
        inter, bias = moe.intermediate_size, moe.biases
        self.router = FusedLinear(hidden, [moe.num_experts], [bias], dtype, device)
        self.gate_up = torch.nn.ModuleList(FusedLinear(hidden, [inter, inter], [bias, bias], dtype, device)
                                           for _ in range(moe.num_experts))
        self.down = torch.nn.ModuleList(FusedLinear(inter, [hidden], [bias], dtype, device)
                                        for _ in range(moe.num_experts))
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # [T, hidden]
        weights, experts = self._route(self.router(x))                           # [T, k] each
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in torch.unique(experts).tolist():
            rows, choice = torch.where(experts == expert)
            hidden = self.down[expert](self._gated(self.gate_up[expert](x[rows])))
            out.index_add_(0, rows, hidden * weights[rows, choice, None])
        return out

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, experts] -> each token's expert weights and experts [T, k]."""
        if self.moe.routing == "topk_softmax":
            top, experts = logits.topk(self.moe.top_k, dim=-1)
            return torch.softmax(top, dim=-1), experts
        weights, experts = torch.softmax(logits.float(), dim=-1).topk(self.moe.top_k, dim=-1)
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        inter = self.moe.intermediate_size
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if not self.moe.gpt_oss_experts:
            return self.act(gate) * up
        limit = self.moe.swiglu_limit
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.moe.swiglu_alpha))

    def slots(self, prefix: str) -> dict[str, ParamSlot | ExpertSlots]:
        """HF's names under `{prefix}`: the router (`gate.weight` [experts, hidden], or gpt-oss's
        `router.weight` and `.bias`), `experts.gate_up_proj` [experts, 2 * inter, hidden] and
        `experts.down_proj` [experts, hidden, inter]; gpt-oss's are [in, out] with gate and up columns
        interleaved, and biased."""
        moe, inter = self.moe, self.moe.intermediate_size
        router = f"{prefix}.{moe.router_name}"
        slots: dict = self.router.slots([f"{router}.weight"], [f"{router}.bias"])
        # gpt-oss interleaves gate and up (gate at even columns): regrouped to [gate; up] at load.
        order = torch.cat((torch.arange(0, 2 * inter, 2), torch.arange(1, 2 * inter, 2))) \
            if moe.gpt_oss_experts else None
        gate_up = [linear.slots_by_width(["w"], ["b"], [2 * inter]) for linear in self.gate_up]
        down = [linear.slots(["w"], ["b"]) for linear in self.down]
        in_out = moe.gpt_oss_experts
        slots[f"{prefix}.experts.gate_up_proj"] = ExpertSlots(tuple(replace(s["w"], row_order=order) for s in gate_up),
                                                             in_out)
        slots[f"{prefix}.experts.down_proj"] = ExpertSlots(tuple(s["w"] for s in down), in_out)
        if moe.biases:
            slots[f"{prefix}.experts.gate_up_proj_bias"] = ExpertSlots(
                tuple(replace(s["b"], row_order=order) for s in gate_up))
            slots[f"{prefix}.experts.down_proj_bias"] = ExpertSlots(tuple(s["b"] for s in down))
        return slots
