"""A finished run applied to new text (`emorec predict`, emorec.load): it predicts what the run's
own evaluation predicted for the same texts, for every kind of saved weights; and its errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import emorec
from emorec.data.corpora import load_meld
from emorec.errors import EmorecError
from emorec.predict_cli import main
from emorec.run import run
from tests.meld_fixture import MELD_DIR

ROOT = Path(__file__).parent.parent


def run_test_rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


def assert_reproduces(run_rows: list[dict], predicted: list[dict], labels: list[str]) -> None:
    """The same label and the same label probabilities (as predictions.csv rounds them)."""
    assert [p["label"] for p in predicted] == [r["prediction"] for r in run_rows]
    for p, r in zip(predicted, run_rows):
        probs = p["probs"] if "probs" in p else {lab: p[f"prob_{lab}"] for lab in labels}
        assert [round(float(probs[lab]), 6) for lab in labels] == [float(r[f"score_{lab}"]) for lab in labels]


@pytest.mark.parametrize(
    "overrides",
    [
        ["adapter=lora"],
        ["adapter=lora", "trainer.precision=bf16"],  # a bf16 base, the adapter merged while predicting
        ["head=classifier", "adapter=lora"],
        ["adapter=ptuning_v2", "trainer.logit_adjust=1.0"],
        ["adapter=lora", "prompt.speaker_template='What does {speaker} feel, of {labels}? {text}'"],
    ],
    ids=["lora", "lora-bf16", "classifier-head", "ptuning_v2-logit_adjust", "lora-speaker"],
)
def test_the_python_api_reproduces_the_runs_predictions(make_cfg, overrides):
    """With dialogue context (context_window=2), so contexts and speakers must match too."""
    cfg = make_cfg(*overrides, "trainer.epochs=1", "dataset.context_window=2")
    run(cfg)
    out = Path(cfg.output_dir)
    labels = list(cfg.dataset.labels)
    test = load_meld(labels, data_dir=str(MELD_DIR)).test
    assert any(ex.context for ex in test)
    trained = emorec.load(out, device="cpu")
    predicted = trained.predict(
        [ex.text for ex in test], [list(ex.context) for ex in test], [ex.speaker for ex in test]
    )
    assert_reproduces(run_test_rows(out), predicted, labels)
    assert sum(predicted[0]["probs"].values()) == pytest.approx(1, abs=1e-5)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_cli_reproduces_a_full_fine_tune_from_a_file(make_cfg, tmp_path, capsys):
    cfg = make_cfg("adapter=full", "trainer.epochs=1", "optimizer.lr=1e-3")
    run(cfg)
    out = Path(cfg.output_dir)
    assert (out / "model" / "model.safetensors").is_file() and not (out / "adapter").exists()
    rows = run_test_rows(out)
    source = write_csv(tmp_path / "in.csv", [{"id": r["id"], "utterance": r["text"]} for r in rows])
    main([str(out), "--input", str(source), "--column", "utterance", "--output", str(tmp_path / "p.jsonl")])
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predicted] == [r["text"] for r in rows]
    assert_reproduces(rows, predicted, list(cfg.dataset.labels))
    assert "labelled 8 texts in" in capsys.readouterr().err


def test_the_cli_on_an_encoder_with_dialogue_columns_and_stdout(make_cfg, tiny_encoder, tmp_path, capsys):
    cfg = make_cfg(
        "model=minilm_l6", f"model.name_or_path={tiny_encoder}", "trainer.epochs=1", "dataset.context_window=1"
    )
    run(cfg)
    out = Path(cfg.output_dir)
    labels = list(cfg.dataset.labels)
    test = load_meld(labels, data_dir=str(MELD_DIR)).test
    source = [{"text": ex.text, "dialogue": ex.dialogue_id, "who": ex.speaker} for ex in test]
    path = write_csv(tmp_path / "in.csv", source)
    capsys.readouterr()
    main([str(out), "--input", str(path), "--dialogue-column", "dialogue", "--speaker-column", "who"])
    predicted = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert list(predicted[0]) == ["text", "label", *[f"prob_{lab}" for lab in labels]]
    assert_reproduces(run_test_rows(out), predicted, labels)


def test_a_zero_shot_run_predicts_with_its_base_and_texts_come_from_the_command_line(make_cfg, capsys):
    cfg = make_cfg("adapter=none")
    run(cfg)
    rows = run_test_rows(Path(cfg.output_dir))[:2]
    main([cfg.output_dir, "--text", rows[0]["text"], "--text", rows[1]["text"], "--format", "jsonl"])
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_reproduces(rows, predicted, list(cfg.dataset.labels))


def test_stdin_and_the_console_script(make_cfg, tmp_path):
    """`python -m emorec predict RUN_DIR` reading lines from stdin, in a fresh process."""
    cfg = make_cfg("adapter=lora", "trainer.max_steps=2", "trainer.val_every_epoch=false")
    run(cfg)
    texts = "I love this song so much!\n\nYou broke it, you always break everything!\n"
    done = subprocess.run(
        [sys.executable, "-m", "emorec", "predict", cfg.output_dir, "--output", str(tmp_path / "p.csv")],
        input=texts,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert [r["text"] for r in rows] == ["I love this song so much!", "You broke it, you always break everything!"]
    assert all(r["label"] in cfg.dataset.labels for r in rows)


def predict_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    message = str(exit.value.code)
    assert message.startswith("emorec predict: error: ") and "\n" not in message
    return message


def test_errors_are_one_line_and_say_what_to_do(make_cfg, tiny_model, tmp_path, capsys):
    assert "is not an emorec run (no config.yaml)" in predict_error(capsys, tmp_path, "--text", "hi")
    cfg = make_cfg("adapter=lora", "trainer.max_steps=2", "trainer.val_every_epoch=false")
    run(cfg)
    out = Path(cfg.output_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert f"--input {empty} is empty; give it texts" in predict_error(capsys, out, "--input", empty)
    table = write_csv(tmp_path / "in.csv", [{"sentence": "hello"}])
    message = predict_error(capsys, out, "--input", table)
    assert "has no column 'text' (it has sentence); choose one with --column" in message
    # Another base model of the same architecture: its embeddings differ.
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(-1)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "other")
    message = predict_error(capsys, out, f"model.name_or_path={tmp_path / 'other'}", "--text", "hi")
    assert "differs from the one the adapter" in message and "(other input embedding values)" in message
    assert message.endswith("give the run's own base model (emorec predict RUN_DIR model.name_or_path=PATH)")
    message = predict_error(capsys, out, f"model.name_or_path={tmp_path / 'gone'}", "--text", "hi")
    assert message.endswith(
        f"model.name_or_path={tmp_path / 'gone'}: no such folder; fix the path (or give a hub name, org/model)"
    )
    with pytest.raises(EmorecError, match="no texts to label; give at least one"):
        emorec.load(out).predict([])
    (out / "adapter").rename(tmp_path / "moved")
    message = predict_error(capsys, out, "--text", "hi")
    assert "has no saved adapter/: the run did not finish; finish it with: python -m emorec" in message
    assert message.endswith(f"hydra.run.dir={out} resume=true")


def test_the_fingerprint_samples_stay_inside_large_embeddings():
    """A 7 B model's embeddings have more values than float32 counts exactly (2**24)."""
    from emorec.model import spread

    for n in (64, 1000, 2**24 + 3, 49152 * 576, 152064 * 3584):
        positions = spread(n, 64)
        assert positions[0] == 0 and positions[-1] == n - 1 and bool((positions.diff() > 0).all())


def test_a_run_from_before_heads_and_context_layouts_predicts_as_it_ran(make_cfg):
    """Its config.yaml lacks the settings added since; they fill in at the values it ran with."""
    from omegaconf import OmegaConf

    cfg = make_cfg("adapter=lora", "trainer.max_steps=2", "trainer.val_every_epoch=false")
    run(cfg)
    out = Path(cfg.output_dir)
    saved = OmegaConf.load(out / "config.yaml")
    for node, key in [(saved, "head"), (saved.trainer, "balance"), (saved.trainer, "logit_adjust")]:
        del node[key]
    del saved["config_version"]  # runs from then saved none
    OmegaConf.save(saved, out / "config.yaml")
    rows = run_test_rows(out)
    assert_reproduces(rows, emorec.load(out).predict([r["text"] for r in rows]), list(cfg.dataset.labels))


def test_a_run_from_before_the_data_package_predicts_as_it_ran(make_cfg):
    """Its config.yaml names the loaders by their old module and has no config version."""
    from omegaconf import OmegaConf

    from tests.test_upgrade import as_before_issue_37

    cfg = make_cfg("adapter=lora", "trainer.max_steps=2", "trainer.val_every_epoch=false")
    run(cfg)
    out = Path(cfg.output_dir)
    old = as_before_issue_37(OmegaConf.load(out / "config.yaml"))
    del old["config_version"]
    assert old["dataset"]["load"]["_target_"] == "emorec.datasets.load_meld"
    OmegaConf.save(OmegaConf.create(old), out / "config.yaml")
    rows = run_test_rows(out)
    assert_reproduces(rows, emorec.load(out).predict([r["text"] for r in rows]), list(cfg.dataset.labels))
