"""A run directory is data, not code (emorec.trust): a tampered config.yaml opened by `emorec
predict`, `emorec.load` or resume=true runs nothing it names, and says which key it refused.
Each hostile case also has a control that shows what the payload does when it is let through,
so a check that stopped nothing would fail here."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import emorec
from emorec.errors import EmorecError
from emorec.inference import opened_config
from emorec.predict_cli import main as predict_main
from emorec.run import run
from tests.conftest import compose_run

OVERRIDES = ("adapter=lora", "trainer.max_steps=2", "trainer.val_every_epoch=false", "trainer.checkpoint_every=1")


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> Path:
    """A finished LoRA run of the tiny model, with its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(compose_run(out, "model=hf", f"model.name_or_path={tiny_model}", "optimizer.lr=1e-2", *OVERRIDES))
    return out


@pytest.fixture
def shared(finished, tmp_path) -> Path:
    """A copy of the finished run, as if it came from someone else."""
    return Path(shutil.copytree(finished, tmp_path / "shared"))


def tamper(run_dir: Path, change) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    change(config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def refused(run_dir: Path, *overrides: str) -> str:
    with pytest.raises(EmorecError) as e:
        emorec.load(run_dir, device="cpu", overrides=list(overrides))
    return str(e.value)


def test_a_target_that_writes_a_file_is_refused_by_the_api_and_the_cli(shared, tmp_path, capsys):
    payload = tmp_path / "pwned.npz"
    # numpy.savez writes `file` and takes any keyword, so it survives the loader's own arguments.
    tamper(shared, lambda c: c["model"].update(load={"_target_": "numpy.savez", "file": str(payload)}))
    message = refused(shared)
    assert f"{shared / 'config.yaml'} is data, not code: model.load._target_=numpy.savez is not one of" in message
    assert message.endswith("pass model.load._target_=numpy.savez on the command line")
    with pytest.raises(SystemExit) as e:
        predict_main([str(shared), "--text", "hi"])
    assert "is data, not code: model.load._target_=numpy.savez" in str(e.value) and "\n" not in str(e.value)
    assert not payload.exists()
    # The control: named on the command line, the target is the user's, and it runs.
    with pytest.raises(TypeError):  # savez returns None, not (model, tokenizer)
        emorec.load(shared, device="cpu", overrides=["model.load._target_=numpy.savez"])
    assert payload.exists()


def test_a_nested_target_is_refused(shared, tmp_path):
    copied = tmp_path / "copied.yaml"
    hostile = {"_target_": "shutil.copyfile", "src": str(shared / "config.yaml"), "dst": str(copied)}
    tamper(shared, lambda c: c["model"]["load"].update(revision=hostile))
    message = refused(shared)
    assert "model.load.revision._target_=shutil.copyfile is a target where emorec puts none" in message
    assert not copied.exists()
    # The control: named on the command line, Hydra calls the nested target before the loader
    # (which takes the copy's path as a revision, and a local folder ignores it).
    emorec.load(shared, device="cpu", overrides=["model.load.revision._target_=shutil.copyfile"])
    assert copied.read_text() == (shared / "config.yaml").read_text()


def test_remote_code_switched_on_is_refused(shared, tiny_model, tmp_path, monkeypatch):
    """A model folder whose config maps to its own Python module (auto_map), which writes a
    file when imported; the saved config switches trust_remote_code on."""
    import transformers.dynamic_module_utils as dynamic

    # transformers copies a model's own code into its modules cache and imports it from there:
    # a folder of this test's own, on a sys.path restored afterwards.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    marker = tmp_path / "remote_code_ran"
    model = Path(shutil.copytree(tiny_model, tmp_path / "hostile_model"))
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    pass\n\n\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))

    def switch_on(c):
        c["model"].update(name_or_path=str(model), trust_remote_code=True)
        c["model"]["load"].update(name_or_path=str(model), trust_remote_code=True)

    # A base model folder that ships code is fine by itself: without the opt-in it loads as the
    # native class its config names, and its code stays unread.
    tamper(shared, lambda c: c["model"]["load"].update(name_or_path=str(model)))
    assert emorec.load(shared, device="cpu").predict(["hi"])[0]["label"]
    assert not marker.exists()
    tamper(shared, switch_on)
    message = refused(shared)
    assert "model.load.trust_remote_code=true would run code from the model's repository" in message
    assert message.endswith("if you trust that model, pass model.trust_remote_code=true on the command line")
    assert not marker.exists()
    try:  # the control: the user's own opt-in runs the folder's code
        emorec.load(shared, device="cpu", overrides=["model.trust_remote_code=true"])
    except Exception:  # noqa: BLE001 - whether the hostile class then loads does not matter here
        pass
    assert marker.read_text() == "ran"


def test_hub_kernels_are_turned_off_and_interpolations_refused(shared, caplog):
    tamper(shared, lambda c: c["model"]["load"].update(use_kernels=True))
    trained = emorec.load(shared, device="cpu")
    assert trained.config.model.load.use_kernels is False
    assert "sets model.load.use_kernels=true (kernels downloaded from the Hub): off" in caplog.text
    given = opened_config(shared / "config.yaml", ["model.use_kernels=true"])  # the user's own choice
    assert given.model.load.use_kernels is True and given.model.use_kernels is True
    tamper(shared, lambda c: c["model"]["load"].update(name_or_path="${oc.env:HOME}"))
    message = refused(shared)
    assert (
        "model.load.name_or_path holds an interpolation (${oc.env:HOME}), and emorec saves configs resolved" in message
    )


def test_a_target_emorec_would_not_call_passes_only_when_the_user_names_it(shared):
    """A custom optimizer is not called to predict, but a run directory's config may still name
    only what emorec's own groups do; the user can vouch for it."""
    tamper(shared, lambda c: c["optimizer"].update(_target_="mypkg.optim.Lion"))
    assert "optimizer._target_=mypkg.optim.Lion is not one of the targets" in refused(shared)
    labels = emorec.load(shared, "cpu", ["optimizer._target_=mypkg.optim.Lion"]).predict(["hi"])[0]["label"]
    assert labels in yaml.safe_load((shared / "config.yaml").read_text())["dataset"]["labels"]


def test_a_pickled_adapter_is_not_read(shared):
    weights = shared / "adapter" / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert "has no adapter_model.safetensors; emorec reads saved weights from safetensors only" in refused(shared)


def test_resume_refuses_a_hostile_config_without_asking_to_copy_it(shared, tiny_model, tmp_path):
    assert list((shared / "checkpoints").iterdir())
    payload = tmp_path / "pwned.npz"
    tamper(shared, lambda c: c["model"].update(load={"_target_": "numpy.savez", "file": str(payload)}))
    cfg = compose_run(shared, "model=hf", f"model.name_or_path={tiny_model}", "optimizer.lr=1e-2", *OVERRIDES)
    cfg.resume = True
    with pytest.raises(EmorecError, match=r"is data, not code: model.load._target_=numpy.savez") as e:
        run(cfg)
    assert "rerun with the overrides" not in str(e.value) and not payload.exists()


def test_a_planted_lock_link_truncates_nothing(tmp_path):
    from emorec.outputs import check_run_directory, run_directory_lock

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    for link in (lambda lock: lock.symlink_to(precious), lambda lock: lock.hardlink_to(precious)):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        link(out / ".lock")
        with pytest.raises(EmorecError, match=r"\.lock is (a symbolic link|not a plain file of its own); delete it"):
            with run_directory_lock(out):
                pass
        with pytest.raises(EmorecError, match="delete it"):
            check_run_directory(out)
        assert precious.read_text() == "keep me"
    with run_directory_lock(tmp_path / "fresh"):  # and a lock of its own works as before
        assert (tmp_path / "fresh" / ".lock").read_text().strip().isdigit()


def test_the_command_that_finishes_a_run_leaves_out_what_it_would_refuse(shared):
    """An unfinished run's error prints a command to copy from its .hydra/overrides.yaml, which
    is data too: targets and remote code are left out, and every word is quoted for the shell."""
    shutil.rmtree(shared / "adapter")
    hostile = ["adapter=lora", "model.load._target_=numpy.savez", "model.trust_remote_code=true", "x=$(touch pwned)"]
    (shared / ".hydra").mkdir(exist_ok=True)
    (shared / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hostile))
    message = refused(shared)
    assert "the run did not finish; finish it with: python -m emorec adapter=lora 'x=$(touch pwned)' " in message
    assert "numpy" not in message and "trust_remote_code" not in message


def test_damaged_metrics_and_configs_are_one_line(shared):
    (shared / "metrics.json").write_text("{not json")
    assert "metrics.json cannot be read (JSONDecodeError)" in refused(shared)
    (shared / "config.yaml").write_text("- just\n- a list\n")
    assert "is not a config emorec wrote (no model node)" in refused(shared)
    (shared / "config.yaml").write_text("model: {load: [unclosed\n")
    assert "config.yaml cannot be read" in refused(shared)
