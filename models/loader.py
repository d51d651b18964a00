"""Load any supported HF causal LM (local folder or hub id) into a native paged-cache model."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models import catalog
from models.base import NativeCausalLM, load_state_dict
from models.decoder import DecoderForCausalLM
from models.families import FAMILIES, UnsupportedModelError, decoder_spec
from models.fallback import ATTENTION_IMPLEMENTATION, TransformersCausalLM, check_fallback_config
from models.gguf_blocks import cached_gguf_name_maps
from models.layers import RotaryEmbedding
from models.quantized_model import SCHEMES, quantize_linears

# The model types served natively: every family of models/families.py. Every other decoder-only causal LM
# of transformers is served through the transformers fallback (models/fallback.py).
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
NATIVE, FALLBACK = "native", "transformers"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The embedded default model (models/default), used when no model is named.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default" / "target"
# Its draft model: same tokenizer, speculative decoding's default proposer.
DEFAULT_DRAFT_DIR = DEFAULT_MODEL_DIR.parent / "draft"
# Its Medusa heads (published Medusa format).
DEFAULT_MEDUSA_DIR = DEFAULT_MODEL_DIR.parent / "medusa"


logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model that cannot be served, with a message that says what to fix."""


@dataclass
class LoadedModel:
    name: str
    path: str
    model: NativeCausalLM
    tokenizer: object
    config: object
    eos_token_ids: frozenset[int]
    max_model_len: int
    device: torch.device
    backend: str = NATIVE       # NATIVE: the native decoder; FALLBACK: HF's modules (models/fallback.py)
    quantization: str | None = None   # the weights' block formats (models/quantized_model.py); None: float


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def default_model_path() -> str:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise ModelLoadError(
            f"no model was named and the embedded default model is missing at {DEFAULT_MODEL_DIR}; "
            "pass --model PATH_OR_HUB_ID")
    return str(DEFAULT_MODEL_DIR)


def _looks_local(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a path on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads a model: a folder or hub id, or a GGUF file (its folder, and the file
    as `gguf_file`: transformers' GGUF reader gives the config, the tokenizer with its chat template, and
    the weights dequantized to the requested dtype)."""

    location: str
    gguf_file: str | None = None

    @classmethod
    def of(cls, name: str) -> ModelSource:
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {name!r} does not exist")
            return cls(str(path.parent), path.name)
        if _looks_local(name) and not path.exists():
            raise ModelLoadError(f"model path {name!r} does not exist")
        return cls(name)

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _load_config(name: str, source: ModelSource):
    try:
        return AutoConfig.from_pretrained(source.location, **source.kwargs)
    except ImportError as err:    # a GGUF file without the gguf package
        raise ModelLoadError(f"could not read {name!r}: {str(err).splitlines()[0]}") from err
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a model config from {name!r}: it is neither a folder with config.json nor a "
            f"reachable hub id ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err


def _eos_token_ids(name: str, source: ModelSource, tokenizer, config) -> frozenset[int]:
    ids: set[int] = set()
    try:
        if source.gguf_file:
            raise OSError("a GGUF file has no generation config")
        generation = GenerationConfig.from_pretrained(source.location)
        eos = generation.eos_token_id
    except OSError:
        eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ModelLoadError(
            f"the tokenizer of {name!r} has no EOS token and the model config names none; "
            "set eos_token in tokenizer_config.json or eos_token_id in generation_config.json")
    return frozenset(ids)


def _rotaries(hf_model, spec) -> dict[str, RotaryEmbedding]:
    """HF's own RoPE frequencies and attention scaling (whatever scaling kind computed them): one table, or
    one per layer type where the model keeps several (OLMo 3, Gemma 3), merged where they are equal."""
    if not any(spec.rope_layers):
        return {kind: None for kind in set(spec.rope_kinds)}
    module = hf_model.base_model.rotary_emb
    if hasattr(module, "inv_freq"):
        table = RotaryEmbedding(module.inv_freq.detach().clone(), float(module.attention_scaling))
        return {kind: table for kind in set(spec.rope_kinds)}
    kinds = sorted(set(hf_model.config.layer_types))
    tables = {kind: (getattr(module, f"{kind}_inv_freq"), float(getattr(module, f"{kind}_attention_scaling")))
              for kind in kinds}
    first = tables[kinds[0]]
    if all(torch.equal(freq, first[0]) and scaling == first[1] for freq, scaling in tables.values()):
        table = RotaryEmbedding(first[0].detach().clone(), first[1])
        return {kind: table for kind in set(spec.rope_kinds)}
    if set(spec.rope_kinds) != set(kinds):
        raise UnsupportedModelError(f"{hf_model.config.model_type} rotates its layer types ({', '.join(kinds)}) "
                                    "with different RoPE tables, which its native spec does not read")
    return {kind: RotaryEmbedding(freq.detach().clone(), scaling) for kind, (freq, scaling) in tables.items()}


def backend_of(config, impl: str = "auto") -> str:
    """NATIVE for a native family whose options its spec reads, unless impl is "transformers"; else
    FALLBACK (a native family with an option its spec does not read yet runs there, and says why)."""
    if impl != "auto" or config.model_type not in SUPPORTED_MODEL_TYPES:
        return FALLBACK
    try:
        decoder_spec(config)
    except UnsupportedModelError as err:
        logger.warning("%s: %s; it runs on the transformers fallback", config.model_type, err)
        return FALLBACK
    return NATIVE


def _build_model(hf_model, config, dtype, device, backend: str) -> NativeCausalLM:
    if backend == FALLBACK:
        return TransformersCausalLM(hf_model, dtype, device).eval()
    spec = decoder_spec(config)
    positions = getattr(config, "n_positions", 0) if spec.position_embedding_name else 0
    native = DecoderForCausalLM(spec, _rotaries(hf_model, spec), dtype, device, positions)
    load_state_dict(native, hf_model.state_dict())
    return native.eval()


def _check_supported(name: str, config, backend: str) -> None:
    """Refuse, before any weight is read, a model the fallback cannot serve (a native backend was chosen
    by backend_of only for a spec it could read)."""
    if backend == NATIVE:
        return
    try:
        check_fallback_config(config)
    except UnsupportedModelError as err:
        raise ModelLoadError(f"{name!r}: {err}; natively served model types: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}") from err


def load_model(model: str | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", show_progress: bool = True, impl: str = "auto",
               quantization: str = "auto") -> LoadedModel:
    """Load tokenizer and weights of an HF causal LM; raise ModelLoadError with a fix on any problem."""
    name = model or default_model_path()
    try:
        name = catalog.resolve(name)
    except catalog.CatalogError as err:
        raise ModelLoadError(str(err)) from err
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if quantization not in SCHEMES:
        raise ModelLoadError(f"quantization {quantization!r} is not supported; use one of {', '.join(SCHEMES)}")
    steps = tqdm(total=4, desc=f"loading {Path(name).name or name}", disable=not show_progress, unit="step")
    source = ModelSource.of(name)
    config = _load_config(name, source)
    backend = backend_of(config, impl)
    _check_supported(name, config, backend)
    steps.update()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {str(err).splitlines()[0]}") from err
    eos_token_ids = _eos_token_ids(name, source, tokenizer, config)
    steps.update()
    native, quantized = _load_weights(name, source, config, backend, torch_dtype, torch_device, quantization)
    steps.update()
    steps.update()
    steps.close()
    return LoadedModel(name=name, path=name, model=native, tokenizer=tokenizer, config=config,
                       eos_token_ids=eos_token_ids, max_model_len=_context_length(name, config), device=torch_device,
                       backend=backend, quantization=quantized)


def _load_weights(name: str, source: ModelSource, config, backend: str, dtype: torch.dtype,
                  device: torch.device, quantization: str) -> tuple[NativeCausalLM, str | None]:
    """The HF model read from `source`, turned into the backend's model (HF's own modules are dropped
    unless the fallback runs them), with its weights quantized as `quantization` says; and what they run
    in (None: float)."""
    attention = {"attn_implementation": ATTENTION_IMPLEMENTATION} if backend == FALLBACK else {}
    try:
        with cached_gguf_name_maps() if source.gguf_file else contextlib.nullcontext():
            hf_model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.kwargs,
                                                            **attention)
    except ValueError as err:     # not a causal LM, or an architecture transformers does not know
        raise ModelLoadError(f"could not load {name!r} as a causal LM: {str(err).splitlines()[0]}") from err
    with torch.inference_mode():
        try:
            model = _build_model(hf_model, config, dtype, device, backend)
        except UnsupportedModelError as err:
            raise ModelLoadError(f"{name!r}: {err}") from err
    if backend == FALLBACK:
        logger.warning("%s (%s) runs on the transformers fallback (HF's modules with Gorgon's paged attention), "
                       "slower than the native decoder", name, config.model_type)
    return model, _quantize(name, source, hf_model, model, backend, dtype, device, quantization)


def _quantize(name: str, source: ModelSource, hf_model, model, backend: str, dtype: torch.dtype,
              device: torch.device, quantization: str) -> str | None:
    """Keep the weights in block formats: a GGUF file's own blocks (auto), or quantized at load (int8, ...).
    Quantized products are native CPU kernels of the native decoder, in float32 activations."""
    if quantization == "none" or (quantization == "auto" and not source.gguf_file):
        return None
    from models import kernels
    from models.gguf_blocks import read_gguf_blocks

    reason = None
    if backend == FALLBACK:
        reason = "it runs on the transformers fallback"
    elif not kernels.native_ops_available(device, dtype):
        reason = "quantized products run on the native CPU kernels, in float32 (--device cpu --dtype float32)"
    elif quantization == "bf16" and not kernels.bf16_products_supported():
        reason = "bfloat16 weights run on CPUs with AVX512_BF16 only (elsewhere float32 is the faster choice)"
    if reason is not None:
        if quantization != "auto":
            raise ModelLoadError(f"{name!r} cannot run with --quantization {quantization}: {reason}")
        logger.warning("%s: the GGUF weights run dequantized to %s: %s", name, dtype, reason)
        return None
    # A load scheme (int8, bf16, ...) quantizes the float weights itself: the file's blocks are read for auto only.
    file_blocks = read_gguf_blocks(str(Path(source.location) / source.gguf_file), hf_model) \
        if quantization == "auto" else {}
    with torch.inference_mode():
        quantized = quantize_linears(model, quantization, file_blocks)
    if quantized:
        logger.info("%s: weights kept quantized (%s)", name, quantized)
    return quantized


def _context_length(name: str, config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelLoadError(f"the config of {name!r} names no context length (max_position_embeddings)")
