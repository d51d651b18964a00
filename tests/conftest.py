import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from families import FAMILY_OPTIONS, save_tiny_family  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

ARCHS = ["llama", "qwen2", "mistral", "mistral-sliding", "gpt2"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch) -> path of a tiny random HF model of that architecture (tiny_models.py) or family
    (families.py), made once per session."""
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            save = save_tiny_family if arch in FAMILY_OPTIONS else save_tiny_model
            made[arch] = str(save(arch, tmp_path_factory.mktemp(arch)))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def llama_dir(model_dir) -> str:
    return model_dir("llama")


@pytest.fixture(scope="session")
def llama_engine(llama_dir):
    from decoding import Engine
    return Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
