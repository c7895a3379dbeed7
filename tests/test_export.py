"""`emorec export` (emorec.export): plain transformers, in a process that never imports emorec,
gives each kind of run's own test predictions from the exported folder, through
`pipeline("text-classification")` on the raw texts; and what cannot export says why in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emorec.errors import EmorecError
from emorec.export import export, main
from emorec.run import run
from tests.conftest import compose_run

KINDS = {
    "lora-label-scoring": ["adapter=lora"],
    "lora-classifier-head": ["adapter=lora", "head=classifier"],
    "full-fine-tuning": ["adapter=full", "optimizer.lr=1e-3"],
    "encoder": ["model=minilm_l6", "adapter=lora"],
    # The other adapters that merge into plain weights, and a run that trained nothing.
    "dora": ["adapter=dora"],
    "ia3": ["adapter=ia3", "optimizer.lr=1e-2"],
    "zero-shot": ["adapter=none"],
}

# Run by a fresh interpreter: transformers alone, as a user without emorec would.
CHECK = Path(__file__).parent.parent / "experiments" / "export" / "check.py"


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    """A finished run of each kind on the tiny models (one epoch of the MELD fixture)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind, overrides in KINDS.items():
        base = tiny_encoder if kind == "encoder" else tiny_model
        out[kind] = root / kind
        run(compose_run(out[kind], "model=hf", f"model.name_or_path={base}", "trainer.epochs=1", *overrides))
    return out


def test_plain_transformers_gives_each_runs_own_predictions(runs, tmp_path):
    exported = []
    for kind, run_dir in runs.items():
        facts = export(run_dir, tmp_path / kind)
        assert facts["tokens"][0] == facts["tokens"][1] > 0, kind  # the run's own prompt tokens, every text
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["architectures"][0].endswith("ForSequenceClassification"), kind
        assert (
            list(config["id2label"].values())
            == yaml.safe_load((run_dir / "config.yaml").read_text())["dataset"]["labels"]
        )
        assert (tmp_path / kind / "model.safetensors").is_file() and (tmp_path / kind / "README.md").is_file()
        exported.append((str(tmp_path / kind), str(run_dir / "predictions.csv")))
    done = subprocess.run(
        [sys.executable, str(CHECK), json.dumps(exported)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("emorec imported") is False
    for folder, r in result.items():
        assert r["same"] == r["rows"] > 0 and r["max_prob_diff"] < 1e-3, (folder, r)


def test_the_card_and_the_command(runs, tmp_path, capsys):
    out = tmp_path / "card"
    main([str(runs["lora-label-scoring"]), str(out), "--dtype", "bf16"])
    message = capsys.readouterr().err
    assert f"emorec export: {out} (" in message and "bf16) in" in message
    assert 'pipeline("text-classification"' in message
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification")
    assert "| test | " in card and "Classify the sentiment of the sentence to neutral" in card and "{text}" in card
    assert "_target_: emorec.model.load_pretrained" in card  # the run's config, as it ran


def tampered(run_dir: Path, tmp_path: Path, change) -> Path:
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    change(config)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda c: c["dataset"].update(context_window=2), "dataset.context_window=2: the exported model sees one text"),
        (
            lambda c: c["prompt"].update(speaker_template="{speaker} feels, of {labels}: {text}"),
            "prompt.speaker_template names each utterance's speaker, and the exported model sees one text",
        ),
        (lambda c: c["trainer"].update(logit_adjust=1.0), "trainer.logit_adjust shifts each label's score"),
        (lambda c: c["trainer"].update(predict="generate"), "trainer.predict=generate parses generated text"),
        (lambda c: c["model"].update(quantization="4bit"), "model.quantization=4bit: an adapter merged into"),
        (lambda c: c["trainer"].update(scoring="answer"), "scores whole multi-token answers"),
        (
            lambda c: c["adapter"].update(name="ptuning_v2", peft={"_target_": "peft.PrefixTuningConfig"}),
            "adapter=ptuning_v2 adds trained prompt states to every pass",
        ),
    ],
    ids=["context", "speaker", "logit_adjust", "generate", "quantised", "answer_scoring", "prompt_learning"],
)
def test_what_cannot_export_says_why_and_writes_nothing(runs, tmp_path, change, expected):
    run_dir = tampered(runs["lora-label-scoring"], tmp_path, change)
    with pytest.raises(EmorecError, match=expected) as e:
        export(run_dir, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_an_unfinished_run_and_an_occupied_folder(runs, tmp_path, capsys):
    run_dir = tampered(runs["lora-label-scoring"], tmp_path, lambda c: None)
    (run_dir / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="cannot export: the run did not finish"):
        main([str(run_dir), str(tmp_path / "out")])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(EmorecError, match="exists and is not empty; choose another folder, or pass --force"):
        export(runs["lora-label-scoring"], taken)
    assert (taken / "mine.txt").read_text() == "keep"
    export(runs["lora-label-scoring"], taken, force=True)
    assert not (taken / "mine.txt").exists() and (taken / "config.json").is_file()
