import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from models import ModelLoadError, load_model
from tiny_models import build_tokenizer


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), show_progress=False)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="neither a folder with config.json nor a reachable hub id"):
        load_model("some-org/some-model-that-is-not-here", show_progress=False)


def test_an_encoder_is_refused_naming_the_native_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 100}))
    with pytest.raises(ModelLoadError, match="bert is an encoder.*natively served model types: .*llama"):
        load_model(str(tmp_path), show_progress=False)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=None, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no EOS token"):
        load_model(str(tmp_path), show_progress=False)


def test_bad_dtype_and_device(llama_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(llama_dir, dtype="float8", show_progress=False)
    with pytest.raises(ModelLoadError, match="device"):
        load_model(llama_dir, device="tpu", show_progress=False)


def test_loads_a_saved_model(llama_dir):
    loaded = load_model(llama_dir, show_progress=False)
    assert loaded.config.model_type == "llama"
    assert loaded.eos_token_ids == {loaded.tokenizer.eos_token_id}
    assert loaded.max_model_len == 256
