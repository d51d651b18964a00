"""Medusa heads (Cai et al. 2024): K extra predictors of the tokens after next, on the target's final
hidden state.

Head k (0-based) reads the hidden state at position t and predicts the token at t + k + 2 (the target's
own head predicts t + 1). Each head is ResBlock(s) then a vocabulary projection, where
ResBlock(x) = x + SiLU(Linear(x)) with a zero-initialised weight (the bias keeps nn.Linear's default
initialisation, as in the Medusa repository), so an untrained head reads the hidden state shifted by a
constant, close to the target's own head applied one step early.

Saved in the published format (the Medusa repository's): `config.json` with `medusa_num_heads`,
`medusa_num_layers` and `base_model_name_or_path`, and the heads' state dict in `medusa_lm_head.pt`
(keys `{head}.{layer}.linear.weight|bias` and `{head}.{num_layers}.weight`); `medusa_lm_head.safetensors`
is read too.

Two extensions keep heads for a large vocabulary small and fast (FR-Spec's observation: the tokens a
draft gets right are the frequent ones). A draft vocabulary (`draft_vocab_size` in the config, the token
ids in `draft_vocab.pt`): the projections score only those tokens, and the proposer maps their ranks back
to the model's ids. And projections that are rows of the model's own output head (`"projection":
"output_head"`), frozen while training: the file then holds only the ResBlocks and the token ids, and
the rows are taken from the model when the heads are loaded beside it. A config may also carry the
candidate tree tuned for the heads (`medusa_choices`, as training/medusa_tree.py prints it), which the
proposer then uses unless the engine names another, and a smaller one for a quantized target
(`quantized_medusa_choices`: there each verified row costs arithmetic, not only the weights' bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.layers import FusedLinear

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "medusa_lm_head.pt"
DRAFT_VOCAB_NAME = "draft_vocab.pt"
OUTPUT_HEAD_PROJECTION = "output_head"


class ResBlock(torch.nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.linear.weight)
        self.act = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(torch.nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1,
                 draft_vocab: torch.Tensor | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"Medusa needs at least one head and one layer, got {num_heads} and {num_layers}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        # The model's token id of each projection output; None: the projections score the whole vocabulary.
        self.draft_vocab = None if draft_vocab is None else draft_vocab.to(torch.long)
        if self.draft_vocab is not None and (self.draft_vocab.numel() == 0 or int(self.draft_vocab.max()) >= vocab_size
                                             or int(self.draft_vocab.min()) < 0):
            raise ValueError(f"a Medusa draft vocabulary must hold token ids below {vocab_size}")
        outputs = vocab_size if self.draft_vocab is None else self.draft_vocab.numel()
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)],
                                torch.nn.Linear(hidden_size, outputs, bias=False))
            for _ in range(num_heads))
        # Set when every head's vocabulary projection is the same matrix (heads trained on top of the
        # target's frozen output head): the K projections then run as one product, on the engine's own
        # linear layer (packed on the CPU, see models/layers.py).
        self._shared_projection: FusedLinear | None = None
        # At inference, layer l of every head stacked: weights [K, hidden, hidden] (as x @ W) and biases
        # [K, 1, hidden], so each layer of all K heads is one batched matmul.
        self._stacked: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.stored_dtype: torch.dtype | None = None     # the precision of the loaded file, when loaded
        # The candidate tree tuned for these heads (training/medusa_tree.py), when their config names one.
        self.choices: tuple[tuple[int, ...], ...] | None = None
        self.quantized_choices: tuple[tuple[int, ...], ...] | None = None     # the tree for a quantized target

    def init_projections(self, lm_head_weight: torch.Tensor, freeze: bool = True) -> None:
        """Start every head from the target's output head [vocab, hidden] (its draft-vocabulary rows),
        optionally frozen there."""
        rows = lm_head_weight if self.draft_vocab is None else lm_head_weight[self.draft_vocab.to(lm_head_weight.device)]
        for head in self.heads:
            head[-1].weight.data.copy_(rows)
            head[-1].weight.requires_grad_(not freeze)

    @property
    def projects_through_output_head(self) -> bool:
        """Whether every projection is still the output head's rows, frozen (what save() can leave out)."""
        return not any(head[-1].weight.requires_grad for head in self.heads)

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Projection output indices -> the model's token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab.to(indices.device)[indices]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [num_heads, N, V] (V: the draft vocabulary, or the whole one)."""
        if self._shared_projection is not None:
            features = self._features(hidden).reshape(-1, hidden.shape[-1])        # [K * N, hidden]
            return self._shared_projection.forward(features).view(self.num_heads, hidden.shape[0], -1)
        return torch.stack([head(hidden) for head in self.heads])

    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> every head's ResBlock output [K, N, hidden]."""
        if self._stacked is None:
            return torch.stack([head[:-1](hidden) for head in self.heads])
        x = hidden.unsqueeze(0).expand(self.num_heads, -1, -1)
        for weight, bias in self._stacked:
            x = x + torch.nn.functional.silu(torch.baddbmm(bias, x, weight))
        return x

    def prepare_for_inference(self) -> MedusaHeads:
        self.eval().requires_grad_(False)
        self._stacked = [(torch.stack([head[layer].linear.weight.t() for head in self.heads]).contiguous(),
                          torch.stack([head[layer].linear.bias for head in self.heads]).unsqueeze(1).contiguous())
                         for layer in range(self.num_layers)]
        first = self.heads[0][-1].weight
        if all(torch.equal(head[-1].weight, first) for head in self.heads[1:]):
            projection = FusedLinear(self.hidden_size, [first.shape[0]], [False], first.dtype, first.device)
            projection.slots(["weight"], [None])["weight"].copy_(first)
            self._shared_projection = projection
        return self

    @property
    def shared_projection(self) -> FusedLinear | None:
        """The one product all heads project through (None: each head has its own projection)."""
        return self._shared_projection

    def use_output_head(self, output_head: FusedLinear) -> bool:
        """Project through the target's own output head when that is what the heads' shared projection
        is: equal to it after rounding to the precision the heads were stored in (heads trained on the
        frozen output head). The product then runs at the head's full precision, follows weight pushes
        to the target, and the heads' copy is dropped (float32 heads, `medusa_weights="float"`; in a block
        format the proposer quantizes a copy, models/medusa_native.py)."""
        if self._shared_projection is None or self.draft_vocab is not None:
            return False
        mine, target = self._shared_projection.weight_t, output_head.weight_t
        stored = self.stored_dtype or mine.dtype
        if target.shape != mine.shape or not torch.equal(target.to(stored).to(mine.dtype), mine):
            return False
        self._shared_projection = output_head
        return True

    # ---- the published format ----------------------------------------------------------------
    def save(self, folder: str | Path, base_model: str, dtype: torch.dtype | None = None,
             omit_projection: bool = False) -> None:
        """`dtype` (e.g. bfloat16) halves the file; heads only propose, so their precision never reaches
        the output, which the target verifies. `omit_projection` leaves the projections out (they must
        be the model's output-head rows, frozen: see the module docstring)."""
        if omit_projection and not self.projects_through_output_head:
            raise ValueError("only frozen output-head projections can be left out of the saved heads")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers,
                  "base_model_name_or_path": base_model, "hidden_size": self.hidden_size,
                  "vocab_size": self.vocab_size}
        if self.draft_vocab is not None:
            config["draft_vocab_size"] = self.draft_vocab.numel()
            torch.save(self.draft_vocab.cpu().to(torch.int32).clone(), folder / DRAFT_VOCAB_NAME)
        if omit_projection:
            config["projection"] = OUTPUT_HEAD_PROJECTION
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        projection_key = f".{self.num_layers}.weight"
        state = {name: tensor.detach().to(dtype or tensor.dtype).clone().contiguous()
                 for name, tensor in self.heads.state_dict().items()
                 if not (omit_projection and name.endswith(projection_key))}
        torch.save(state, folder / WEIGHTS_NAME)

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             hidden_size: int | None = None, vocab_size: int | None = None,
             output_head: torch.Tensor | None = None) -> MedusaHeads:
        """Heads saved by this module or by the Medusa repository; raises ValueError saying what is wrong.
        `output_head` [vocab, hidden]: the model's output head, for heads saved without their projections."""
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.exists():
            raise ValueError(f"{folder} has no {CONFIG_NAME}: not a Medusa heads folder")
        config = json.loads(config_path.read_text())
        if "medusa_num_heads" not in config:
            raise ValueError(f"{config_path} has no medusa_num_heads: not a Medusa heads config")
        state = _read_state(folder)
        num_heads, num_layers = int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
        draft_vocab = _read_draft_vocab(folder, config)
        stored_dtype = state[next(iter(state))].dtype if state else torch.float32
        if config.get("projection") == OUTPUT_HEAD_PROJECTION:
            if output_head is None:
                raise ValueError(f"the Medusa heads in {folder} project through the model's output head: "
                                 "load them beside their model")
            rows = output_head if draft_vocab is None else output_head[draft_vocab.to(output_head.device)]
            for k in range(num_heads):
                state[f"{k}.{num_layers}.weight"] = rows.detach().to(stored_dtype).cpu()
        projection = state.get(f"0.{num_layers}.weight")
        if projection is None:
            raise ValueError(f"{folder}: expected the key '0.{num_layers}.weight' (head 0's vocabulary projection)")
        found_outputs, found_hidden = projection.shape
        found_vocab = found_outputs if draft_vocab is None else int(config.get("vocab_size", -1))
        if draft_vocab is not None and (found_outputs != draft_vocab.numel() or found_vocab <= 0):
            raise ValueError(f"{folder}: the projections score {found_outputs} tokens, the draft vocabulary has "
                             f"{draft_vocab.numel()} (and the config must give vocab_size)")
        for name, expected in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            found = found_hidden if name == "hidden_size" else found_vocab
            if expected is not None and found != expected:
                raise ValueError(f"Medusa heads in {folder} have {name} {found}, the model has {expected}")
        heads = cls(found_hidden, found_vocab, num_heads, num_layers, draft_vocab)
        missing, unexpected = heads.heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Medusa heads in {folder} do not match their config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        heads = heads.to(device=device, dtype=dtype).prepare_for_inference()
        heads.stored_dtype = projection.dtype
        if config.get("medusa_choices"):
            heads.choices = tuple(tuple(int(rank) for rank in path) for path in config["medusa_choices"])
        if config.get("quantized_medusa_choices"):
            heads.quantized_choices = tuple(tuple(int(rank) for rank in path)
                                            for path in config["quantized_medusa_choices"])
        return heads


def _read_draft_vocab(folder: Path, config: dict) -> torch.Tensor | None:
    if "draft_vocab_size" not in config:
        return None
    if not (folder / DRAFT_VOCAB_NAME).exists():
        raise ValueError(f"{folder}: the config names a draft vocabulary but {DRAFT_VOCAB_NAME} is missing")
    ids = torch.load(folder / DRAFT_VOCAB_NAME, map_location="cpu", weights_only=True).to(torch.long)
    if ids.dim() != 1 or ids.numel() != int(config["draft_vocab_size"]):
        raise ValueError(f"{folder}: {DRAFT_VOCAB_NAME} must hold draft_vocab_size = {config['draft_vocab_size']} ids")
    return ids


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).exists():
        return torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    safetensors = folder / "medusa_lm_head.safetensors"
    if safetensors.exists():
        from safetensors.torch import load_file
        return load_file(safetensors)
    raise ValueError(f"{folder} has neither {WEIGHTS_NAME} nor medusa_lm_head.safetensors")
