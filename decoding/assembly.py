"""How an engine's parts are built from its configuration: the paged KV cache and its block manager,
and the speculative decoding the configuration asks for."""

from __future__ import annotations

from dataclasses import replace

from decoding.block_manager import BlockManager
from decoding.config import EngineConfig
from decoding.kv_cache_manager import KVCacheManager
from decoding.sampler import Sampler
from decoding.speculative.decoder import SpeculativeDecoding
from decoding.speculative.draft import DraftModelProposer
from decoding.speculative.eagle import EagleProposer
from decoding.speculative.governor import SpeculationGovernor
from decoding.speculative.medusa import MedusaProposer
from decoding.speculative.ngram import NgramProposer
from decoding.speculative.proposer import AcceptanceRule
from models import catalog, load_model
from models.attention import PagedKVCache
from models.eagle import EagleDraft, EagleTree
from models.loader import DEFAULT_DRAFT_DIR, DEFAULT_MEDUSA_DIR, LoadedModel
from models.medusa import MedusaHeads



def history_layers(model) -> dict[int, int]:
    """The layers that keep their inputs per token instead of keys and values (models/base.py)."""
    return getattr(model, "history_layers", None) or {}


def build_cache(loaded: LoadedModel, cfg: EngineConfig) -> KVCacheManager:
    """The KV cache (`num_kv_blocks`, or as many blocks as `kv_cache_memory_gb` holds) and its manager."""
    model = loaded.model
    num_blocks = cfg.num_kv_blocks
    if num_blocks is None:
        per_block = PagedKVCache.bytes_per_block(model.num_layers, cfg.block_size, model.num_kv_heads,
                                                 model.head_dim, model.dtype, history_layers(model))
        num_blocks = max(2, int(cfg.kv_cache_memory_gb * 2**30) // per_block)
    cache = PagedKVCache(model.num_layers, num_blocks, cfg.block_size, model.num_kv_heads, model.head_dim,
                         model.dtype, loaded.device, history_layers(model))
    return KVCacheManager(BlockManager(num_blocks, cfg.block_size), cache, loaded.device, cfg.prefix_caching)


def build_speculation(cfg: EngineConfig, loaded: LoadedModel, sampler: Sampler,
                      num_blocks: int, max_model_len: int) -> SpeculativeDecoding | None:
    """The proposer `cfg.speculative` names (None: no speculation) inside the speculative decoder."""
    if cfg.speculative is None:
        return None
    model = loaded.model
    acceptance = AcceptanceRule.named(cfg.speculative_acceptance, (cfg.typical_epsilon, cfg.typical_delta))
    if cfg.speculative == "ngram":
        proposer = NgramProposer(cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
    elif cfg.speculative == "medusa":
        folder = cfg.medusa_heads or catalog.shipped_heads(cfg.model, "medusa") or DEFAULT_MEDUSA_DIR
        heads = MedusaHeads.load(folder, model.dtype, loaded.device,
                                 hidden_size=model.hidden_size, vocab_size=model.vocab_size,
                                 output_head=model.lm_head.weight_t.t())
        heads.use_output_head(model.lm_head)
        acceptance = AcceptanceRule.named(cfg.medusa_acceptance, (cfg.typical_epsilon, cfg.typical_delta))
        choices = cfg.medusa_choices
        if choices is None and loaded.quantization is not None:
            # Over quantized weights a verified row costs arithmetic, not only the weights' bytes: the heads'
            # smaller tree for such targets, where they carry one.
            choices = heads.quantized_choices
        proposer = MedusaProposer(heads, choices, cfg.medusa_weights)
    elif cfg.speculative == "eagle":
        proposer = _eagle_proposer(cfg, loaded, sampler, num_blocks, acceptance)
    else:
        draft = load_model(cfg.draft_model or str(DEFAULT_DRAFT_DIR), cfg.dtype, cfg.device,
                           show_progress=cfg.show_progress)
        if draft.model.vocab_size != model.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.model.vocab_size} tokens) differs from the "
                             f"target's ({model.vocab_size}); a draft must share the target's tokenizer")
        # As many blocks as the target: the draft never shares a prompt between samples, and a draft
        # that runs out of blocks only stops proposing for the sequences that do not fit.
        proposer = DraftModelProposer(draft, cfg.num_speculative_tokens, num_blocks, cfg.block_size,
                                      sampler, loaded.eos_token_ids)
    governor = SpeculationGovernor() if cfg.speculative_adaptive else None
    return SpeculativeDecoding(proposer, max_model_len, sampler, model.vocab_size, loaded.eos_token_ids,
                               loaded.device, cfg.speculative_disable_by_batch_size, acceptance, governor)


def _eagle_proposer(cfg: EngineConfig, loaded: LoadedModel, sampler: Sampler, num_blocks: int,
                    acceptance: AcceptanceRule) -> EagleProposer:
    folder = cfg.eagle_head or catalog.shipped_heads(cfg.model, "eagle")
    if folder is None:
        raise ValueError(f"no EAGLE head is shipped for {cfg.model or 'the embedded model'}: name one with "
                         "eagle_head (--eagle-head), trained with `gorgon train eagle`")
    draft = EagleDraft.load(folder, loaded.model, loaded.model.dtype, loaded.device, cfg.eagle_weights)
    tree = draft.tree
    if loaded.quantization is not None and draft.quantized_tree is not None:
        # Over quantized weights each verified row costs arithmetic, not only the weights' bytes (a 6-row
        # verification of SmolLM2 at Q8_0 took 1.6x one row): the head's smaller tree for such targets.
        tree = replace(draft.quantized_tree, drawn=tree.drawn)
    if cfg.eagle_tree:
        tree = EagleTree(*cfg.eagle_tree, drawn=tree.drawn)
    if cfg.eagle_drawn:
        tree = replace(tree, drawn=tuple(cfg.eagle_drawn))
    # As many blocks as the target's cache (one layer of them): a sequence the draft cannot hold waits.
    return EagleProposer(draft, num_blocks, cfg.block_size, sampler, loaded.eos_token_ids, loaded.model.vocab_size,
                         loaded.device, tree, acceptance)
