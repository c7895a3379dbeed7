"""Every bad input tried, and the one line each gets. Where the input can be judged from the
config alone, the error must come before any model loads (the loaders are replaced by ones
that fail the test)."""

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

import emorec.model
from emorec.errors import EmorecError
from emorec.run import run
from emorec.schema import check_overrides
from tests.conftest import CONF
from tests.meld_fixture import MELD_DIR

ROOT = Path(__file__).parent.parent

# (id, overrides, a part of the message). All are rejected before a model loads.
BEFORE_MODEL = [
    ("batch size 0", ["trainer.batch_size=0"], "trainer.batch_size=0 is not valid; it must be a positive integer"),
    ("eval batch size < 0", ["trainer.eval_batch_size=-2"], "trainer.eval_batch_size=-2 is not valid"),
    ("lora rank 0", ["adapter=lora", "adapter.r=0"], "adapter.r=0 is not valid; it must be a positive integer"),
    ("prefix length 0", ["adapter=ptuning_v2", "adapter.num_virtual_tokens=0"], "adapter.num_virtual_tokens=0"),
    ("lr 0", ["optimizer.lr=0"], "optimizer.lr=0.0 is not valid; it must be a number > 0"),
    ("lr negative", ["optimizer.lr=-0.001"], "optimizer.lr=-0.001 is not valid"),
    ("dropout 1.5", ["adapter=lora", "adapter.dropout=1.5"], "adapter.dropout=1.5 is not valid; it must be a"),
    ("warmup ratio 2", ["trainer.warmup_ratio=2"], "trainer.warmup_ratio=2.0 is not valid"),
    ("max steps negative", ["trainer.max_steps=-5"], "trainer.max_steps=-5 is not valid; it must be a positive"),
    ("max train 0", ["dataset.max_train=0"], "dataset.max_train=0 is not valid"),
    ("checkpoint every negative", ["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1 is not valid"),
    ("keep 0 checkpoints", ["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0 is not valid"),
    ("negative context", ["dataset.context_window=-1"], "dataset.context_window=-1 is not valid"),
    ("unknown metric", ["dataset.metric=f2"], "dataset.metric='f2'; use one of accuracy"),
    ("neutral not a label", ["dataset.neutral_label=calm"], "dataset.neutral_label='calm' is not one of"),
    ("duplicate labels", ["dataset.labels=[joy,joy,anger]"], "has duplicates; list each label once"),
    (
        "full fine-tuning of a quantised base",
        ["adapter=full", "model=qwen2_5_7b_instruct", "model.quantization=4bit"],
        "adapter=full trains every weight, and a 4bit base cannot train; use a PEFT adapter",
    ),
    (
        "pass tokens text",
        ["trainer.max_pass_tokens=many"],
        "trainer.max_pass_tokens='many' is not valid; it must be auto",
    ),
    ("precision fp16", ["trainer.precision=fp16"], "trainer.precision='fp16' is not valid; it must be auto, bf16"),
    ("predict mode", ["trainer.predict=classify"], "trainer.predict='classify' is not valid; it must be score or"),
    ("scoring mode", ["trainer.scoring=best"], "trainer.scoring='best' is not valid"),
    ("not a device", ["trainer.device=tpu9"], "trainer.device='tpu9' is not a device; use auto, cpu or cuda"),
    ("quantization 2bit", ["model.quantization=2bit"], "model.quantization='2bit' is not valid; use 4bit, 8bit"),
    ("template field", ["prompt.template='Classify {sentence}'"], "prompt.template has an unknown field"),
    ("template brace", ["prompt.template='Classify {text'"], "prompt.template has an unknown field or a stray"),
    ("template without text", ["prompt.template='Classify to {labels}'"], "prompt.template has no {text} field"),
    ("context field", ["prompt.context='Before: {turns}'"], "prompt.context has an unknown field"),
    ("eval streams 0", ["fast.eval_streams=0"], "fast.eval_streams=0 is not valid; it must be a positive integer"),
    ("missing data", ["dataset.data_dir=/nonexistent/meld"], "dataset.data_dir=/nonexistent/meld"),
    (
        "model folder missing",
        ["model.name_or_path=/nonexistent/model"],
        "model.name_or_path=/nonexistent/model: no such folder; fix the path (or give a hub name, org/model)",
    ),
    ("unwritable output", ["output_dir=/proc/emorec-run"], "cannot write to output_dir=/proc/emorec-run"),
    ("resume from nowhere", ["resume=/nonexistent/run"], "resume=/nonexistent/run: no checkpoint there"),
    (
        "encoder with the LM head",
        ["model=minilm_l6", "head=lm"],
        "model=minilm_l6 is an encoder and has no LM head; use head=classifier",
    ),
    (
        "classifier generating",
        ["head=classifier", "trainer.predict=generate"],
        "head=classifier predicts with its head and cannot generate; use trainer.predict=score",
    ),
    (
        "logit adjustment of generations",
        ["trainer.logit_adjust=1", "trainer.predict=generate"],
        "trainer.logit_adjust adjusts label scores, and generation has none",
    ),
    (
        "head init",
        ["head=classifier", "head.init=vocab"],
        "head.init='vocab' is not valid; it must be labels or random",
    ),
    ("head lr 0", ["head=classifier", "head.lr=0"], "head.lr=0.0 is not valid; it must be a number > 0 or null"),
    ("balance negative", ["trainer.balance=-1"], "trainer.balance=-1.0 is not valid; it must be a number >= 0"),
    ("context layout", ["prompt.context_layout=middle"], "prompt.context_layout='middle' is not valid"),
    ("context after field", ["prompt.context_after='{turns}'"], "prompt.context_after has an unknown field"),
]


# Values of the wrong type: Hydra refuses them as it composes (the groups' schemas,
# emorec.schema), and the entrypoint says so in one line before Hydra starts.
WRONG_TYPE = [
    ("batch size text", ["trainer.batch_size=abc"], "trainer.batch_size='abc' is not valid; it must be an integer"),
    ("lora rank 2.5", ["adapter=lora", "adapter.r=2.5"], "adapter.r=2.5 is not valid; it must be an integer"),
    ("lr text", ["optimizer.lr=fast"], "optimizer.lr='fast' is not valid; it must be a number"),
    ("fast switch text", ["fast.pack=maybe"], "fast.pack='maybe' is not valid; it must be true or false"),
    (
        "max steps text",
        ["trainer.max_steps=ten"],
        "trainer.max_steps='ten' is not valid; it must be an integer or null",
    ),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in WRONG_TYPE], ids=[c[0] for c in WRONG_TYPE])
def test_a_value_of_the_wrong_type_is_refused_as_the_config_composes(overrides, expected):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"), pytest.raises(HydraException):
        compose("config", overrides=overrides)
    with pytest.raises(EmorecError) as e:
        check_overrides(overrides, CONF)
    assert str(e.value) == expected


def test_the_cli_tells_a_wrong_type_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "emorec", "trainer.batch_size=abc", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "emorec: error: trainer.batch_size='abc' is not valid; it must be an integer"
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run's directory


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(emorec.model, "load_pretrained", fail)
    monkeypatch.setattr(emorec.model, "load_gguf_from_package", fail)


def one_line_error(cfg) -> str:
    with pytest.raises(EmorecError) as e:
        run(cfg)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in BEFORE_MODEL], ids=[c[0] for c in BEFORE_MODEL])
def test_rejected_before_the_model_loads(make_cfg, no_model_load, overrides, expected):
    assert expected in one_line_error(make_cfg(*overrides))


def test_cuda_requested_without_cuda(make_cfg, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "CUDA is not available; use trainer.device=auto or cpu" in one_line_error(make_cfg("trainer.device=cuda"))


def test_unknown_group_option_lists_the_available_ones():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"), pytest.raises(HydraException) as e:
        compose("config", overrides=["adapter=lorra"])
    message = str(e.value)
    assert "Could not find 'adapter/lorra'" in message and "Available options in 'adapter'" in message
    assert "ptuning_v2" in message


def test_unknown_key_is_named():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"), pytest.raises(HydraException) as e:
        compose("config", overrides=["trainer.batchsize=8"])
    assert "trainer.batchsize" in str(e.value)


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = [f"output_dir={tmp_path / 'run'}", "logger=none", f"dataset.data_dir={MELD_DIR}"]
        return compose("config", overrides=[*base, *overrides])


def test_required_model_name(tmp_path, no_model_load):
    message = one_line_error(compose_cfg(tmp_path, "model=hf"))
    assert message == "model.name_or_path is required and has no value; set it with model.name_or_path=..."


def test_missing_model_wheel(tmp_path):
    cfg = compose_cfg(tmp_path, "model.load.package=llm_not_installed", "model.load.install=pip install x")
    message = one_line_error(cfg)
    assert "the embedded model needs the llm_not_installed wheel; install it with: pip install x" in message


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "the hub's host refuses"])
def test_hub_model_out_of_reach_fails_at_once(make_cfg, monkeypatch, offline):
    """Without the hub (offline mode, or no network: here its host refuses connections) and
    without a cached copy, one line within seconds instead of a minute of retries."""
    if offline.startswith("HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    message = one_line_error(make_cfg("model.name_or_path=emorec-tests/never-published"))
    assert time.monotonic() - start < 10
    assert message == (
        "model emorec-tests/never-published is not in the Hugging Face cache and the hub is out of reach (offline, "
        "or HF_HUB_OFFLINE=1): download it once where there is a network, or set model.name_or_path to a local folder"
    )


def test_hub_dataset_out_of_reach_fails_at_once(make_cfg, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    message = one_line_error(make_cfg("dataset=hf", "dataset.load.path=emorec-tests/never-published"))
    assert time.monotonic() - start < 10
    assert "cannot load dataset (path=emorec-tests/never-published)" in message
    assert "point dataset.load.path at local files" in message


def test_run_directory_that_cannot_be_created_is_refused_before_hydra(tmp_path):
    """Hydra would raise from its own mkdir; the entrypoint answers first, in one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runs = {"run": [f"hydra.run.dir={blocker}/run"], "sweep": ["-m", f"hydra.sweep.dir={blocker}/sweep", "seed=1,2"]}
    for target, args in runs.items():
        done = subprocess.run(
            [sys.executable, "-m", "emorec", *args, "logger=none"], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 1 and done.stderr.strip() == (
            f"emorec: error: cannot create the run directory {blocker}/{target}: {blocker} is a file, not a folder; "
            "choose a writable folder with hydra.run.dir (hydra.sweep.dir for -m)"
        )


def copy_meld(tmp_path) -> Path:
    folder = tmp_path / "meld"
    shutil.copytree(MELD_DIR, folder)
    return folder


def test_csv_cut_inside_a_quoted_field(make_cfg, tmp_path, no_model_load):
    folder = copy_meld(tmp_path)
    path = folder / "train_sent_emo.csv"
    text = path.read_text()
    path.write_text(text[: text.index("Okay, so we meet") + 5])  # an interrupted copy, inside the quotes
    message = one_line_error(make_cfg(f"dataset.data_dir={folder}"))
    assert message == (
        f"{path}:3: unexpected end of data (a quoted field that never closes: the file is cut short or a quote "
        "is missing); re-copy or re-download the file"
    )


def test_csv_cut_in_the_middle_of_a_record(make_cfg, tmp_path, no_model_load, caplog):
    folder = copy_meld(tmp_path)
    path = folder / "test_sent_emo.csv"
    text = path.read_text()
    path.write_text(text[: text.rindex(",1,1,")])  # the last row loses its last four fields
    message = one_line_error(make_cfg(f"dataset.data_dir={folder}"))
    assert message == (
        f"{path}:9: 7 fields where the header has 11 (a file cut short, or a broken row); "
        "fix the row or set dataset.on_bad_row=skip"
    )
    assert "test_sent_emo.csv does not end with a newline: its last line may be cut short" in caplog.text
    # Skipped, the row is counted; the other seven remain.
    from emorec.data.corpora import load_meld

    splits = load_meld(
        ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"], str(folder), on_bad_row="skip"
    )
    assert len(splits.test) == 7 and splits.skipped == 1


def test_json_and_jsonl_cut_short(make_cfg, tmp_path, no_model_load):
    from emorec.data.readers import read_json

    path = tmp_path / "dialogues.json"
    path.write_text(json.dumps([[{"utterance": "hi", "emotion": "joy"}]] * 3)[:-20])
    with pytest.raises(
        EmorecError, match=r"dialogues.json: line 1 is not valid JSON \(.*\) \(it ends mid-way: cut short\?\)"
    ):
        read_json(path)
    rows = "".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2], "split": "train"}) + "\n" for i in range(6))
    rows += json.dumps({"text": "x", "label": "a", "split": "test"}) + "\n" + '{"text": "y", "lab'
    path = tmp_path / "data.jsonl"
    path.write_text(rows)
    files = ["dataset=jsonl", f"dataset.load.data_files={path}"]
    message = one_line_error(make_cfg(*files, "dataset.load.columns.split=split"))
    assert message == (
        f"{path}:8: not valid JSON (Unterminated string starting at; a file cut short?); one JSON object per line; "
        "fix the row or set dataset.on_bad_row=skip"
    )


def test_a_local_file_unlike_the_release_is_named_with_both_digests(caplog):
    from emorec.data.files import check_digests, sha256_of

    path = MELD_DIR / "test_sent_emo.csv"
    check_digests(MELD_DIR, ["test_sent_emo.csv"], {"test_sent_emo.csv": "0" * 64})
    assert f"{path}: sha256 {sha256_of(path)}, not the release's {'0' * 64}: another version" in caplog.text


def test_unknown_attention_implementation(make_cfg):
    assert "model.attn_implementation='bogus' is not available" in one_line_error(
        make_cfg("model.attn_implementation=bogus")
    )


def test_adapter_targets_missing_modules(make_cfg):
    message = one_line_error(make_cfg("adapter=lora", "adapter.target_modules=[no_such_proj]"))
    assert "adapter=lora does not fit model" in message and "check adapter.target_modules" in message


def test_bad_row_names_file_and_line(make_cfg, tmp_path, no_model_load):
    path = tmp_path / "own.csv"
    path.write_text("text,label,split\nfine,joy,train\nodd,elation,train\nok,anger,test\n")
    cfg = make_cfg(
        "dataset=csv",
        f"dataset.load.data_files={path}",
        "dataset.load.columns.split=split",
        "dataset.labels=[joy,anger]",
    )
    message = one_line_error(cfg)
    assert "own.csv:3" in message and "elation" in message


def test_rerun_into_a_run_with_checkpoints_needs_resume(make_cfg, tmp_path, no_model_load):
    cfg = make_cfg()
    (Path(cfg.output_dir) / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert "holds checkpoints of an earlier run; continue it with resume=true" in one_line_error(cfg)


def test_resume_with_another_config(make_cfg, no_model_load):
    from omegaconf import OmegaConf

    first = make_cfg("trainer.max_steps=4")
    out = Path(first.output_dir)
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    OmegaConf.save(first, out / "config.yaml", resolve=True)
    message = one_line_error(make_cfg("trainer.max_steps=4", "trainer.batch_size=2", "resume=true"))
    assert "resume: trainer.batch_size is 2 but the checkpoint's run used 4" in message


def test_corrupt_checkpoint(make_cfg):
    from omegaconf import OmegaConf

    first = make_cfg("trainer.max_steps=4")
    out = Path(first.output_dir)
    broken = out / "checkpoints" / "step-00000002"
    broken.mkdir(parents=True)
    (broken / "state.json").write_text("{}")
    (broken / "adapter.safetensors").write_bytes(b"\x00" * 10)
    OmegaConf.save(first, out / "config.yaml", resolve=True)
    message = one_line_error(make_cfg("trainer.max_steps=4", "resume=true"))
    assert f"checkpoint {broken} cannot be read" in message and "delete it to resume from the one before" in message


def test_full_disk_while_saving_leaves_no_partial_checkpoint(make_cfg, monkeypatch):
    import emorec.checkpoint

    real = emorec.checkpoint.save_file
    saved = []

    def fill_disk(tensors, path):
        if saved:  # the first checkpoint fits; the second finds the disk full half-way
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real(tensors, path)

    monkeypatch.setattr(emorec.checkpoint, "save_file", fill_disk)
    cfg = make_cfg("trainer.max_steps=4", "trainer.checkpoint_every=2")
    message = one_line_error(cfg)
    assert "No space left on device); free some disk space, then rerun with resume=true" in message
    folder = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002"]  # no partial step-4, no temp folder
    assert (folder / "step-00000002" / "adapter.safetensors").is_file()


def test_full_disk_while_writing_outputs_leaves_no_partial_file(tmp_path, monkeypatch):
    from emorec.outputs import write_json

    def full(self, data):
        Path.write_bytes(self, b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(EmorecError, match="free some disk space"):
        write_json(tmp_path / "metrics.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Unpickling this would run code; torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from emorec.checkpoint import load_checkpoint

    folder = tmp_path / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, folder / "adapter.safetensors")
    torch.save({"optimizer": Payload()}, folder / "trainer.pt")
    with pytest.raises(
        EmorecError, match=r"trainer.pt names print in its pickle, which could run code, so emorec refuses"
    ):
        load_checkpoint(folder)
    assert "unpickled!" not in capsys.readouterr().out


def test_no_model_config_runs_remote_code():
    """Remote code runs only where a model config opts in, and none does now: ChatGLM2/3, the
    last that needed it, are converted to transformers' native GLM class (emorec.glm)."""
    options = sorted(p.stem for p in (Path(CONF) / "model").glob("*.yaml"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        opted = [o for o in options if compose("config", overrides=[f"model={o}"]).model.get("trust_remote_code")]
    assert len(options) >= 10 and opted == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without bitsandbytes or CUDA")
def test_qlora_without_bitsandbytes_or_a_gpu_says_what_it_needs(make_cfg, no_model_load):
    with pytest.raises(EmorecError) as e:
        run(make_cfg("model.quantization=4bit"))
    assert "model.quantization=4bit needs " in str(e.value)
    assert "pip install bitsandbytes" in str(e.value) or "a CUDA GPU" in str(e.value)


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.csv", "", "is empty; give it texts"),
        ("empty.txt", "\n\n", "is empty; give it texts"),
        ("header.csv", "text,speaker\n", "has a header (text, speaker) but no rows; add rows to label"),
    ],
)
def test_predict_names_an_empty_input_file(tmp_path, name, content, expected):
    """Read before any model loads: the run directory need not exist for this error."""
    path = tmp_path / name
    path.write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "emorec", "predict", str(tmp_path / "no-run"), "--input", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"emorec predict: error: --input {path} {expected}" + (
        " (one per line in a .txt, rows in a csv or jsonl)" if "is empty" in expected else ""
    )


def test_a_small_file_whose_held_out_dev_comes_out_empty_is_one_line(tmp_path):
    """Four training rows: the 10 % held out as dev gets none; the run stops before any model
    loads, saying how to fix it (it crashed with an IndexError after training before)."""
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(4)))
    test.write_text("text,label\nsome text,a\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "emorec",
            "dataset=csv",
            f"dataset.load.data_files={{train: {train}, test: {test}}}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "emorec: error: csv: the dev split has no examples (4 train); give a dev file, or raise "
        "dataset.load.dev_fraction (now 0.1)"
    ), last
    assert not (tmp_path / "run" / "metrics.json").exists()
