"""Medusa heads at inference on the native CPU products, in a block format of their own.

The heads only propose (the target verifies every token they guess), so their precision never reaches
the output, and at batch 1 what they cost is the bytes they read: on the embedded model a proposal
through float32 heads (eight 320 x 320 ResBlock layers, then the 8,192-row vocabulary projection for
each head) read 14 MB and took about a third of a plain decode step, in the engine, where the target's
forward has just pushed the heads' weights out of the CPU's caches. In Q8_0 the same heads read about a
quarter of that. And only the heads the candidate tree reaches run: a tree two levels deep needs heads
0 and 1 of four.

Layer 0 of every head reads the same hidden state, so the heads' first ResBlocks run as one product;
later layers read each head's own state, one product per head. The vocabulary projections run as one
product over all heads' rows when they are one matrix (heads trained on the target's frozen output
head), else one per head.
"""

from __future__ import annotations

import torch

from models import kernels
from models.layers import FusedLinear
from models.medusa import MedusaHeads
from models.quantized_model import quantize_draft_products


def native_heads_available(heads: MedusaHeads) -> bool:
    weight = heads.heads[0][-1].weight
    return kernels.native_ops_available(weight.device, weight.dtype)


class NativeMedusaHeads(torch.nn.Module):
    """The first `used` heads of `heads`, their products in `weights` ("float", or a load scheme of a
    quantized model: models/quantized_model.quantize_draft_products)."""

    def __init__(self, heads: MedusaHeads, used: int, weights: str = "q8_0"):
        super().__init__()
        if not 1 <= used <= heads.num_heads:
            raise ValueError(f"{used} heads asked of {heads.num_heads}")
        self.used = used
        chosen = heads.heads[:used]
        with torch.inference_mode():
            self.first = _linear([head[0].linear.weight for head in chosen], [head[0].linear.bias for head in chosen])
            self.later = torch.nn.ModuleList(
                torch.nn.ModuleList(_linear([head[layer].linear.weight], [head[layer].linear.bias]) for head in chosen)
                for layer in range(1, heads.num_layers))
            projections = [head[-1].weight for head in chosen]
            if weights == "float" and heads.shared_projection is not None:
                self.projections = [heads.shared_projection]      # maybe the target's own output head: no copy
            else:
                shared = all(torch.equal(p, projections[0]) for p in projections[1:])
                self.projections = torch.nn.ModuleList(_linear([p]) for p in (projections[:1] if shared else projections))
        quantize_draft_products(self, weights)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (float32) -> logits [used, N, V]."""
        rows, size = hidden.shape
        # ResBlock(x) = x + SiLU(W x + b); layer 0's input is the same hidden state for every head.
        first = self.first.forward(hidden).view(rows, self.used, size).transpose(0, 1)       # [used, N, hidden]
        states = hidden.unsqueeze(0) + torch.nn.functional.silu(first)
        if self.later:
            heads = []
            for k in range(self.used):
                x = states[k]
                for layer in self.later:
                    x = x + torch.nn.functional.silu(layer[k].forward(x))
                heads.append(x)
            states = torch.stack(heads)
        if len(self.projections) == 1:
            return self.projections[0].forward(states.reshape(-1, size)).view(self.used, rows, -1)
        return torch.stack([projection.forward(states[k]) for k, projection in enumerate(self.projections)])

    def chain_heads(self, parents: list[int], ranks: list[int], max_depth: int,
                    vocab_map: torch.Tensor | None) -> kernels.MedusaChainHeads:
        """These heads and a candidate tree as the native Medusa chain reads them (parents -1 for the newest
        token, each node's rank in its head's top tokens, the tree's depth; vocab_map: the projection rows'
        token ids, None where they are the token ids). Built per call: a weight push may re-pack the
        target's output head, which float heads share."""
        later = [[(linear.linear_weights(), linear.bias) for linear in layer] for layer in self.later]
        projections = [projection.linear_weights() for projection in self.projections]
        return kernels.MedusaChainHeads(self.first.linear_weights(), self.first.bias, later, projections, vocab_map,
                                        sum(self.projections[0].out_features), parents, ranks, max_depth)


def _linear(weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None) -> FusedLinear:
    """One FusedLinear over these [out, in] matrices (and biases), float32 on the CPU."""
    size = weights[0].shape[1]
    linear = FusedLinear(size, [w.shape[0] for w in weights], [biases is not None] * len(weights), torch.float32, "cpu")
    linear.weight_t.copy_(torch.cat([w.detach().float().t() for w in weights], dim=1))
    if biases is not None:
        linear.bias.copy_(torch.cat([b.detach().float() for b in biases]))
    return linear
