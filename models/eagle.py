"""EAGLE draft heads (Li et al. 2024): one decoder layer that drafts from the target's own features.

Row q of the draft reads fc([embed(x_q); f_{q-1}]): the embedding of token q and the target's final hidden
state at position q - 1 (the feature that predicted x_q). The decoder layer, of the target family's own
kind, attends over the draft's earlier rows in a paged KV cache of its own and outputs g_q, an estimate of
the target's feature f_q: the target's output-head rows for the draft vocabulary (FR-Spec; EAGLE-3 drafts
32k of 128k) turn it into logits for token q + 1, and it stands in for f_q in the next draft row, which is
how the draft runs ahead of the target autoregressively. The embedding and the projection are the
target's frozen tensors, read from the model at load, so a head file holds the fc and the layer only.

The draft's rows cover a sequence's generated tokens: its first row is the first generated token, whose
feature is the prompt's last hidden state, and row positions count from there (RoPE sees only offsets
between rows, so this is the absolute layout shifted). Training sees exactly this: rows over the model's
own answers (`training.eagle_distill`).

Saved format (the EAGLE repositories' layout): `config.json` is the target's HF config with
`num_hidden_layers` 1 and an `eagle` entry (`base_model_name_or_path`, `draft_vocab_size`, `projection`
"output_head", `embedding` "model", the tuned `tree`, and optionally `quantized_tree`, the tree tuned for a
target whose weights are quantized, where a verification row costs arithmetic as well as bytes);
`model.safetensors` holds `fc.weight`, `fc.bias`,
the layer as `layers.0.*` in the family's HF names, and `d2t`, EAGLE-3's map from draft index to target
id (target id = index + d2t[index]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models import kernels
from models.attention import AttentionMetadata, PagedKVCache
from models.decoder_layer import DecoderLayer
from models.families import DecoderSpec
from models.layers import FusedLinear, ParamSlot, RotaryEmbedding, layer_slots
from models.quantized_model import quantize_draft_products

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAYER_PREFIX = "layers"


@dataclass(frozen=True)
class EagleTree:
    """How the proposer grows its candidate tree (EAGLE-2's dynamic tree, ranked by the draft's confidence):
    up to `depth` levels; at each level the `width` candidates of highest cumulative draft log-probability
    get a draft row, whose `top_k` best tokens are the next level's candidates; the `nodes` candidates of
    highest score are kept for verification. Width 1 drafts along the best path only.

    Sampled requests under the lossless rule grow a drawn tree instead: `drawn[i]` candidates at level
    i + 1, drawn without replacement from the draft's distribution at the path's node, the first drawn
    drafted on and the others leaves (the rejection rule tries them in turn where the first is
    rejected). Empty: a chain `depth` deep."""

    nodes: int = 8
    depth: int = 6
    top_k: int = 4
    width: int = 1
    drawn: tuple[int, ...] = ()

    def __post_init__(self):
        if min(self.nodes, self.depth, self.top_k, self.width) < 1:
            raise ValueError(f"an EAGLE tree needs at least one node, level, candidate and expansion, got {self}")
        object.__setattr__(self, "drawn", tuple(self.drawn))
        if self.drawn and min(self.drawn) < 1:
            raise ValueError(f"every level of a drawn tree needs a candidate, got drawn={self.drawn}")

    @property
    def drawn_levels(self) -> tuple[int, ...]:
        """Candidates per level of the drawn tree."""
        return self.drawn or (1,) * self.depth

    @property
    def max_nodes(self) -> int:
        """The most candidates either tree verifies."""
        return max(self.nodes, sum(self.drawn_levels))

    @staticmethod
    def parse(text: str) -> tuple[int, ...]:
        """'NODES,DEPTH,TOP_K[,WIDTH]' (as the command line gives it) -> the ints; ValueError otherwise."""
        return _positive_ints(text, "NODES,DEPTH,TOP_K[,WIDTH] (e.g. 8,6,4,2)", lambda n: n in (3, 4))

    @staticmethod
    def parse_drawn(text: str) -> tuple[int, ...]:
        """'N1,N2,...' candidates per level of the drawn tree -> the ints; ValueError otherwise."""
        return _positive_ints(text, "candidates per level as N1,N2,... (e.g. 2,2,1,1)", lambda n: n > 0)

    def as_dict(self) -> dict:
        tree = {"nodes": self.nodes, "depth": self.depth, "top_k": self.top_k, "width": self.width}
        return tree | ({"drawn": list(self.drawn)} if self.drawn else {})


def _positive_ints(text: str, expected: str, count_fits) -> tuple[int, ...]:
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise ValueError(f"expected {expected}, got {text!r}") from err
    if not count_fits(len(numbers)) or min(numbers) < 1:
        raise ValueError(f"expected {expected}, positive, got {text!r}")
    return numbers


def one_layer_spec(spec: DecoderSpec) -> DecoderSpec:
    """The target family's layer, once, attending over its whole context (the draft's context is short)."""
    if spec.moe is not None:
        spec = replace(spec, moe=None)
    return replace(spec, num_layers=1, layer_windows=(None,), rope_layers=(True,),
                   rope_kinds=(spec.rope_kinds[0],) if spec.rope_kinds else ("default",))


def draft_to_target(draft_vocab: torch.Tensor) -> torch.Tensor:
    """EAGLE-3's d2t: target id minus draft index, per draft index."""
    return draft_vocab.to(torch.long) - torch.arange(draft_vocab.numel())


def save_eagle(folder: str | Path, state: dict[str, torch.Tensor], target_config: dict, base_model: str,
               draft_vocab: torch.Tensor, tree: EagleTree, dtype: torch.dtype | None = None) -> None:
    """Write a trained head: `state` holds fc.* and layers.0.* (HF names); the config is the target's."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(target_config)
    config["num_hidden_layers"] = 1
    config["eagle"] = {"base_model_name_or_path": base_model, "draft_vocab_size": int(draft_vocab.numel()),
                       "projection": "output_head", "embedding": "model", "tree": tree.as_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: tensor.detach().to(dtype or tensor.dtype).contiguous() for name, tensor in state.items()}
    tensors["d2t"] = draft_to_target(draft_vocab)
    save_file(tensors, str(folder / WEIGHTS_NAME))


def set_tree(folder: str | Path, tree: EagleTree) -> None:
    """Record a tuned tree in a head's config (the proposer's default)."""
    path = Path(folder) / CONFIG_NAME
    config = json.loads(path.read_text())
    config["eagle"]["tree"] = tree.as_dict()
    path.write_text(json.dumps(config, indent=2) + "\n")


class EagleDraft(torch.nn.Module):
    """The draft at inference, on the engine's native layer and kernels, beside its target."""

    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding, embed: torch.Tensor, output_rows: torch.Tensor,
                 draft_vocab: torch.Tensor, tree: EagleTree, dtype: torch.dtype, device):
        super().__init__()
        if rotary is None:
            raise ValueError("EAGLE heads need a model with rotary positions")
        self.spec = one_layer_spec(spec)
        self.dtype = dtype
        self.native_ops = kernels.native_ops_available(torch.device(device), dtype)
        self.layers = torch.nn.ModuleList([DecoderLayer(self.spec, 0, dtype, device, self.native_ops)])
        hidden = spec.hidden_size
        self.hidden_size = hidden
        self.fc = FusedLinear(2 * hidden, [hidden], [True], dtype, device)
        self.projection = FusedLinear(hidden, [draft_vocab.numel()], [False], dtype, device)
        self.projection.slots(["weight"], [None])["weight"].copy_(output_rows)
        self.embed = embed                          # the target's, shared
        self.rotary = rotary
        self.draft_vocab = draft_vocab.to(device=device, dtype=torch.long)
        if bool((self.draft_vocab[1:] <= self.draft_vocab[:-1]).any()):
            raise ValueError("the draft vocabulary must be sorted by token id (EagleDraft.load sorts it)")
        # Each model token's column in the draft's logits, -1 off the draft vocabulary.
        self._column = torch.full((spec.vocab_size,), -1, dtype=torch.long)
        self._column[self.draft_vocab.cpu()] = torch.arange(self.draft_vocab.numel())
        self.tree = tree
        self.quantized_tree: EagleTree | None = None     # the tree for a quantized target, where the head has one
        # What the runner's batch packing reads of a model.
        self.num_layers = 1
        self.num_kv_heads, self.head_dim = self.spec.num_kv_heads, self.spec.head_dim
        self.attention_windows = frozenset({None})
        self.history_length = 0

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        slots = layer_slots(self.layers, LAYER_PREFIX)
        slots |= {name: [slot] for name, slot in self.fc.slots(["fc.weight"], ["fc.bias"]).items()}
        return slots

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                cache: PagedKVCache, meta: AttentionMetadata, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T], features [T, hidden] (the feature before each token) -> the layer's output, the
        draft's estimate of each row's own feature ([len(output_rows), hidden] when given)."""
        x = self.fc.forward(torch.cat([self.embed.index_select(0, input_ids), features.to(self.dtype)], dim=-1))
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        layer = self.layers[0]
        if layer.plain:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
        return layer.forward(x, cos, sin, cache, meta, output_rows)

    def chain_draft(self, cache: PagedKVCache, tree: EagleTree, depth: int) -> kernels.EagleChainDraft | None:
        """The draft over its own `cache` and the greedy tree (its `nodes` kept, `depth` levels as the proposer
        caps them) as the native EAGLE chain reads them (models/kernels/eagle_chain.c); None where its layer
        does not run on the one-call stack (not a plain float32 layer on the native kernels)."""
        layer = self.layers[0]
        if not (layer.plain and self.dtype == torch.float32 and tree.top_k <= 64):
            return None
        spec = self.spec
        shape = kernels.DecoderShape(spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
                                     spec.head_dim, cache.block_size, spec.eps, spec.attention_scale)
        entry = layer.native_entry(cache)
        return kernels.EagleChainDraft(shape, kernels.decoder_layers([entry]), self.fc.linear_weights(), self.fc.bias,
                                       self.projection.linear_weights(), self.draft_vocab, tree.nodes, depth,
                                       tree.top_k, tree.width, keep=entry)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> logits over the draft vocabulary [N, V']."""
        return self.projection.forward(hidden).float()

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return self.draft_vocab[indices]

    def columns_of(self, token_ids: list[int]) -> list[int]:
        """The draft-logit columns of those of `token_ids` the draft vocabulary holds."""
        columns = self._column[torch.tensor(token_ids, dtype=torch.long)].tolist() if token_ids else []
        return [c for c in columns if c >= 0]

    @classmethod
    def load(cls, folder: str | Path, target, dtype: torch.dtype, device, weights: str = "q8_0") -> EagleDraft:
        """A head saved by save_eagle, beside its loaded native `target` (DecoderForCausalLM); raises
        ValueError saying what does not fit. `weights`: "float", or a load scheme (q8_0, bf16, ...) the
        draft's products then run in where the native CPU kernels do (a draft only proposes: its precision
        never reaches the output, and at batch 1 its products are memory-bound, so Q8_0 drafts ~4x fewer
        bytes per row than float32)."""
        from safetensors.torch import load_file
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.exists() or not (folder / WEIGHTS_NAME).exists():
            raise ValueError(f"{folder} is not an EAGLE head folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = json.loads(config_path.read_text())
        eagle = config.get("eagle")
        if not isinstance(eagle, dict):
            raise ValueError(f"{config_path} has no 'eagle' entry: not an EAGLE head config")
        spec = getattr(target, "spec", None)
        if spec is None:
            raise ValueError("EAGLE heads run beside a natively served model (this one runs on the transformers fallback)")
        for key, expected in (("hidden_size", spec.hidden_size), ("vocab_size", spec.vocab_size)):
            if int(config.get(key, -1)) != expected:
                raise ValueError(f"the EAGLE head in {folder} has {key} {config.get(key)}, the model has {expected}")
        state = load_file(str(folder / WEIGHTS_NAME))
        d2t = state.pop("d2t", None)
        if d2t is None or d2t.numel() != int(eagle.get("draft_vocab_size", -1)):
            raise ValueError(f"{folder}: d2t must hold draft_vocab_size = {eagle.get('draft_vocab_size')} offsets")
        # Sorted by id (EAGLE-3's d2t is; a head's own order means nothing): a draw over the draft's
        # columns is then the draw over the whole vocabulary (EagleProposer._sampling_distribution).
        draft_vocab = (d2t.to(torch.long) + torch.arange(d2t.numel())).sort().values
        if bool((draft_vocab[1:] == draft_vocab[:-1]).any()):
            raise ValueError(f"{folder}: d2t names a token twice")
        if int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= spec.vocab_size:
            raise ValueError(f"{folder}: the draft vocabulary names tokens outside the model's {spec.vocab_size}")
        output_head = target.lm_head.weight_t.t()
        tree = EagleTree(**eagle.get("tree", {}))
        quantized_tree = EagleTree(**eagle["quantized_tree"]) if "quantized_tree" in eagle else None
        with torch.inference_mode():
            draft = cls(spec, target.rotaries[spec.rope_kinds[0]] if spec.rope_kinds else target.rotary, target.embed,
                        output_head[draft_vocab.to(output_head.device)], draft_vocab, tree, dtype, device)
            slots = draft.param_slots()
            missing = sorted(set(slots) - set(state))
            unexpected = sorted(set(state) - set(slots))
            if missing or unexpected:
                raise ValueError(f"the EAGLE head in {folder} does not fit its model's layer: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
            for name, places in slots.items():
                for slot in places:
                    slot.copy_(state[name])
            if draft.native_ops and torch.device(device).type == "cpu" and dtype == torch.float32:
                quantize_draft_products(draft, weights)
        draft.quantized_tree = quantized_tree
        return draft.eval()
