"""The embedded default model family: loads with no model named, decodes deterministically, evaluates."""

import json
import subprocess
import sys

from decoding import Engine, SamplingParams
from models.loader import DEFAULT_DRAFT_DIR
from models.loader import DEFAULT_MODEL_DIR

HELDOUT_PROMPT = "def fibonacci(n):\n"


def test_default_target_loads_when_no_model_is_named():
    engine = Engine(show_progress=False, num_kv_blocks=64)
    assert engine.loaded.path == str(DEFAULT_MODEL_DIR)
    assert engine.loaded.config.model_type == "llama"
    assert engine.tokenizer.chat_template


def test_greedy_generation_is_deterministic_and_not_degenerate():
    params = SamplingParams(temperature=0, max_tokens=48)
    first = Engine(show_progress=False, num_kv_blocks=64).generate(HELDOUT_PROMPT, params)[0].outputs[0]
    again = Engine(show_progress=False, num_kv_blocks=64).generate(HELDOUT_PROMPT, params)[0].outputs[0]
    assert first.token_ids == again.token_ids
    assert len(set(first.token_ids)) > 8
    assert first.text.strip()


def test_draft_shares_the_tokenizer_and_is_much_smaller():
    target = Engine(show_progress=False, num_kv_blocks=16)
    draft = Engine(model=str(DEFAULT_DRAFT_DIR), show_progress=False, num_kv_blocks=16)
    assert draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()

    def count(engine):
        return sum(p.numel() for p in engine.loaded.model.parameters()
                   if p is not engine.loaded.model.lm_head.weight_t)

    assert count(draft) * 6 <= count(target)


def test_evaluation_runs_in_quick_mode():
    result = subprocess.run([sys.executable, "-m", "training.evaluate", "--quick", "--json"],
                            capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("target_top1", "target_loss", "draft_top1", "draft_acceptance"):
        assert 0 <= figures[key] and figures[key] == figures[key]
    assert 0 <= figures["draft_acceptance"] <= 1
