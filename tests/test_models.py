"""The embedded model: converted once into a cache folder, safely when several processes ask at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf.config import ArchConfig, ModelConfig
from rlhf.models import ModelError, load_causal_lm, load_tokenizer

CONVERT = (
    "from pathlib import Path; import sys; from rlhf.models import embedded_model_dir; "
    "print(embedded_model_dir(Path(sys.argv[1])))"
)

TINY_ARCH = ArchConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


@pytest.mark.slow
def test_two_processes_convert_the_embedded_model_once(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]  # after any library warning
    assert all(p.returncode == 0 for p in procs)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    assert outputs == [str(target)] * 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m-instruct.lock", target.name]
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def test_tiny_model_uses_the_embedded_tokenizer_with_a_distinct_pad() -> None:
    cfg = OmegaConf.structured(ModelConfig(name="tiny", source="tiny", arch=TINY_ARCH))
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_causal_lm(cfg, tokenizer, seed=0)
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 2


def test_missing_local_model_is_a_clear_error(tmp_path: Path) -> None:
    cfg = OmegaConf.structured(ModelConfig(name="local", source="local", path=str(tmp_path / "nothing")))
    with pytest.raises(ModelError, match="no Hugging Face model there"):
        load_tokenizer(cfg)
