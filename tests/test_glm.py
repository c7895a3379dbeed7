"""ChatGLM2/3 in transformers' native GLM class (emorec.glm), checked against the models' own
code: a tiny random instance of each is built by that code under transformers 4.41.2 (the second
venv of `make glm-env`: tests/glm_reference.py), converted, and loaded under emorec's
transformers; the logits on the same inputs must agree."""

import csv
import json
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
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".bin", ".py", ".model"))]  # no pickles, no code
    expected = load_file(reference / "reference.safetensors")
    model = GlmForCausalLM.from_pretrained(converted, attn_implementation=attention).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert expected["logits"].std() > 0.5  # a model whose logits carry information
    assert torch.allclose(logits, expected["logits"], atol=1e-4, rtol=0)


def test_in_bf16_the_difference_is_rounding(reference, tmp_path):
    """ChatGLM2's code rounds its rotary table to bf16, the native class keeps it in fp32 (as
    ChatGLM3's code does): in bf16 the two differ by about bf16's own rounding of the logits."""
    expected = load_file(reference / "reference.safetensors")
    converted = convert_chatglm(reference / "model", tmp_path / "glm")
    model = GlmForCausalLM.from_pretrained(converted, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits.float()
    difference = (logits - expected["logits_bf16"]).abs().max().item()
    assert 0 < difference < 0.1, difference  # logits of std 0.8; bf16 keeps 8 bits of mantissa


def test_the_tokenizer_encodes_as_the_original_code(reference, tmp_path):
    """The same ids as ChatGLM's own tokenizer for English and Chinese text ([gMASK] sop first),
    and for the model's chat prompt, rendered by the chat template."""
    from transformers import AutoTokenizer

    expected = json.loads((reference / "tokens.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(convert_chatglm(reference / "model", tmp_path / "glm"))
    assert len(expected["texts"]) == 5
    for text, ids in expected["texts"].items():
        assert tokenizer(text)["input_ids"] == ids, text
    messages = [{"role": "user", "content": expected["chat"]["query"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == expected["chat"]["ids"]
    assert prompt.startswith("[gMASK]sop" + ("<|user|>" if "chatglm3" in reference.name else "[Round 1]"))


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


def test_a_hub_name_out_of_reach_fails_at_once(monkeypatch):
    from emorec.glm import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="THUDM/chatglm2-6b is not in the Hugging Face cache and the hub is out of"):
        main(["THUDM/chatglm2-6b", "/nonexistent/out"])


@pytest.mark.parametrize("adapter", ["lora", "ptuning_v2"])
def test_the_papers_adapters_train_and_reload_on_the_converted_model(reference, tmp_path, adapter):
    """model=chatglm2_6b (or chatglm3_6b) pointed at a ChatGLM checkpoint folder: converted on
    first use into the cache, trained through the normal run with its tokenizer and prompt
    format, and the saved adapter predicts what the run predicted."""
    import emorec
    from emorec.run import run
    from tests.conftest import compose_run

    option = "chatglm3_6b" if "chatglm3" in reference.name else "chatglm2_6b"
    overrides = [f"model={option}", f"model.name_or_path={reference / 'model'}", f"adapter={adapter}"]
    cfg = compose_run(tmp_path / "run", *overrides, "trainer.max_steps=4", "trainer.eval_batch_size=4")
    metrics = run(cfg)
    assert metrics["train"]["steps"] == 4 and metrics["test"]["n"] == 8
    converted = list((tmp_path / "cache" / "models").glob("model-glm-*"))
    assert len(converted) == 1 and (converted[0] / "tokenizer.json").is_file()
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["split"] == "test"]
    predicted = emorec.load(tmp_path / "run").predict([r["text"] for r in rows])
    assert [p["label"] for p in predicted] == [r["prediction"] for r in rows]
