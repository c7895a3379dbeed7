"""ChatGLM2/3 in transformers' native GLM class (emorec.glm), checked against the models' own
code: a tiny random instance of each is built by that code under transformers 4.41.2 (the second
venv of `make glm-env`: tests/glm_reference.py), converted, and loaded under emorec's
transformers; the logits on the same inputs must agree."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmForCausalLM

from emorec.errors import EmorecError
from emorec.glm import convert_chatglm

ROOT = Path(__file__).parent.parent
MODELS = ROOT.parent / "shared" / "models"
REFERENCE_PYTHON = os.environ.get("EMOREC_GLM_PYTHON") or str(ROOT / ".venv-glm" / "bin" / "python")


@pytest.fixture(scope="module", params=["chatglm2-6b", "chatglm3-6b"])
def reference(request, tmp_path_factory) -> Path:
    """A tiny model saved by the original code (config.json, pytorch_model.bin) and its logits."""
    if not (MODELS / request.param / "modeling_chatglm.py").is_file():
        pytest.skip(f"needs the original code in {MODELS}")
    if not Path(REFERENCE_PYTHON).is_file():
        pytest.skip("needs the transformers 4.41 venv: make glm-env")
    out = tmp_path_factory.mktemp(request.param)
    done = subprocess.run(
        [REFERENCE_PYTHON, str(ROOT / "tests" / "glm_reference.py"), str(MODELS), request.param, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_converted_model_computes_the_original_logits(reference, tmp_path, attention):
    converted = convert_chatglm(reference / "model", tmp_path / "glm")
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    expected = load_file(reference / "reference.safetensors")
    model = GlmForCausalLM.from_pretrained(converted, attn_implementation=attention).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert expected["logits"].std() > 0.5  # a model whose logits carry information
    assert torch.allclose(logits, expected["logits"], atol=1e-4, rtol=0)


def test_a_checkpoint_of_another_kind_is_refused(reference, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EmorecError, match="model_type 'llama', not chatglm"):
        convert_chatglm(tmp_path, tmp_path / "out")
    weights = torch.load(reference / "model" / "pytorch_model.bin", weights_only=True)
    weights["transformer.encoder.layers.0.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((reference / "model" / "config.json").read_bytes())
    torch.save(weights, broken / "pytorch_model.bin")
    with pytest.raises(EmorecError, match="unexpected ChatGLM weight 'encoder.layers.0.extra.weight'"):
        convert_chatglm(broken, tmp_path / "out")


def test_the_command_line(reference, tmp_path, capsys):
    from emorec.glm import main

    main([str(reference / "model"), str(tmp_path / "glm")])
    assert f"emorec convert-glm: wrote {tmp_path / 'glm'} (" in capsys.readouterr().out
    assert (tmp_path / "glm" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="emorec convert-glm: error: .*/nowhere: no such folder"):
        main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
