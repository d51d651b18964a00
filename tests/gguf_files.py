"""Write a saved tiny HF Llama as a GGUF file the way llama.cpp's converter does (its tensor names, its
permutation of the q and k rows, the BPE tokenizer with its merges and chat template), in F32 or Q8_0."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer

_LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def _permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's order of the rotary halves in the q and k rows (transformers' reader undoes it)."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = name.split(".", 3)
    part, suffix = rest.rsplit(".", 1)
    return f"blk.{index}.{_LAYER_TENSORS[part]}.{suffix}"


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(folder: Path, target: Path, quantization: str = "F32") -> Path:
    """The HF Llama saved in `folder` as a GGUF file at `target`; matrices in `quantization` (F32 or Q8_0),
    norms in F32 as llama.cpp keeps them."""
    config = AutoConfig.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _write_tokenizer(writer, folder)
    quant = gguf.GGMLQuantizationType[quantization]
    for name, tensor in load_file(folder / "model.safetensors").items():
        tensor = tensor.astype(np.float32)
        if name.endswith("q_proj.weight"):
            tensor = _permute(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = _permute(tensor, config.num_key_value_heads)
        if tensor.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(tensor, quant), raw_dtype=quant)
        else:
            writer.add_tensor(_gguf_name(name), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
