"""Sharded training (trainer.strategy=fsdp, emorec.sharded) on CPU: two gloo processes under
torchrun shard the tiny model with FSDP2 and give the one-process run's losses and metrics, for
every weight trained (adapter=full) and for adapters; checkpoints are sharded, resume after
SIGTERM, and load on another number of processes; the saved weights are an unsharded run's files
and load in one process (emorec.load, emorec export). Tolerances as in test_distributed (fp32: the sums' order only)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import emorec
from emorec.errors import EmorecError
from emorec.export import export
from emorec.sharded import decoder_layers, shard
from tests.launching import ROOT, launch, metrics
from tests.test_distributed import assert_same_run
from tests.test_export import CHECK
from tests.test_inference import run_test_rows

FSDP = "trainer.strategy=fsdp"


def header(path: Path) -> dict:
    """A safetensors file's tensors: name -> (dtype, shape)."""
    with safe_open(path, "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def assert_same_files(folder: Path, unsharded: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in unsharded.iterdir())
    for path in unsharded.glob("*.safetensors"):
        assert header(folder / path.name) == header(path)


@pytest.mark.parametrize(
    "adapter,folder", [("lora", "adapter"), ("full", "model"), ("ptuning_v2", "adapter")], ids=["lora", "full", "ptv2"]
)
def test_two_sharded_processes_match_one_and_save_an_unsharded_runs_files(
    adapter, folder, tiny_model, tmp_path, one_process
):
    run_dir = tmp_path / "run"
    extra = (f"adapter={adapter}", "trainer.epochs=1")
    out = launch("torchrun", tiny_model, ROOT, f"hydra.run.dir={run_dir}", FSDP, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    single = one_process(*extra)
    assert_same_run(run_dir, single, shares_prefix=adapter != "ptuning_v2")
    chosen = metrics(run_dir)["fast"]
    assert chosen["backward"] == "fully sharded (FSDP2)"
    assert chosen["merged adapter"] in ("off: the weights are sharded", False)
    # The checkpoint holds every process's shards, no whole copy of the weights.
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in last.iterdir()) == ["shards", "state.json", "trainer.pt"]
    assert len(list((last / "shards").glob("*.safetensors"))) == 2
    # Gathered to the first process: the files of an unsharded run, which load in one process
    # and predict what the run's own evaluation predicted.
    assert_same_files(run_dir / folder, single / folder)
    # (The run evaluated its adapter unmerged, the loaded model merges it: rounding apart.)
    rows, labels = run_test_rows(run_dir), list(OmegaConf.load(run_dir / "config.yaml").dataset.labels)
    predicted = emorec.load(run_dir, device="cpu").predict([r["text"] for r in rows])
    assert [p["label"] for p in predicted] == [r["prediction"] for r in rows]
    if adapter != "ptuning_v2":  # emorec export takes what folds into plain weights
        export(run_dir, tmp_path / "exported")
        pairs = json.dumps([[str(tmp_path / "exported"), str(run_dir / "predictions.csv")]])
        done = subprocess.run([sys.executable, str(CHECK), pairs], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result.pop("emorec imported") is False
        (checked,) = result.values()
        assert checked["same"] == checked["rows"] > 0 and checked["max_prob_diff"] < 1e-3, checked
    for p, r in zip(predicted, rows):
        assert [p["probs"][lab] for lab in labels] == pytest.approx(
            [float(r[f"score_{lab}"]) for lab in labels], abs=2e-6
        )


def test_one_sharded_process_is_the_plain_run(tiny_model, tmp_path, one_process):
    run_dir = tmp_path / "run"
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={run_dir}", FSDP, "trainer.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    single, sharded = metrics(one_process("trainer.epochs=1")), metrics(run_dir)
    assert sharded["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=1e-6)
    assert sharded["test"]["confusion_matrix"] == single["test"]["confusion_matrix"]


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tiny_model, tmp_path):
    # Two processes train two epochs; the run is cut back to its first epoch's checkpoint and
    # continues in one process: the shards are re-sliced on load, and the global batch is the
    # same whatever the number of processes, so the run ends as the uninterrupted one did.
    whole = tmp_path / "whole"
    out = launch("torchrun", tiny_model, ROOT, f"hydra.run.dir={whole}", FSDP)
    assert out.returncode == 0, out.stderr[-3000:]
    first = sorted((whole / "checkpoints").iterdir())[0]
    cut = tmp_path / "cut"
    shutil.copytree(first, cut / "checkpoints" / first.name)
    shutil.copy(whole / "config.yaml", cut / "config.yaml")
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={cut}", FSDP, "resume=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {cut / 'checkpoints' / first.name}" in out.stdout + out.stderr
    assert "was written by 2 processes; its shards are re-sliced for 1" in out.stdout + out.stderr
    resumed, uninterrupted = metrics(cut), metrics(whole)
    assert resumed["train"]["losses"] == pytest.approx(uninterrupted["train"]["losses"], rel=1e-4)
    assert resumed["test"]["confusion_matrix"] == uninterrupted["test"]["confusion_matrix"]
    # A damaged shard is named, in one line, with what to do.
    for shard_file in (cut / "checkpoints" / first.name / "shards").glob("*.safetensors"):
        shard_file.write_bytes(b"not safetensors")
    shutil.rmtree(cut / "checkpoints" / sorted(p.name for p in (cut / "checkpoints").iterdir())[-1])
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={cut}", FSDP, "resume=true")
    assert out.returncode != 0
    assert f"checkpoint {cut / 'checkpoints' / first.name} cannot be read" in out.stderr, out.stderr[-2000:]
    assert "delete it to resume from the one before, or start afresh without resume" in out.stderr


def test_a_checkpoint_resumes_only_with_the_strategy_it_ran(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={run_dir}", "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={run_dir}", "trainer.max_steps=2", FSDP, "resume=true")
    assert out.returncode != 0
    assert "resume: trainer.strategy is 'fsdp' but the checkpoint's run used 'data_parallel'" in out.stderr


class Flat(torch.nn.Module):
    """A model that names no layer class to shard by."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


def test_what_cannot_shard_is_refused_in_one_line(tiny_model):
    with pytest.raises(EmorecError, match="model flat names no layer class to shard by .*strategy=data_parallel"):
        shard(Flat(), torch.device("cpu"), False, "flat")
    quantized = Flat()
    quantized.hf_quantizer = object()  # what transformers keeps on a bitsandbytes model
    with pytest.raises(EmorecError, match="cannot shard model q's 4/8-bit weights here .*data_parallel for QLoRA"):
        shard(quantized, torch.device("cpu"), False, "q")
    from transformers import AutoModelForCausalLM

    layers = decoder_layers(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2


def test_sharded_generation_is_refused_with_the_way_out(make_cfg):
    from emorec.settings import check_config

    with pytest.raises(EmorecError, match="trainer.strategy=fsdp predicts by scoring .*trainer.predict=score"):
        check_config(make_cfg(FSDP, "trainer.predict=generate"))


def test_the_sharded_state_keeps_only_the_trained_weights(tiny_model, tmp_path):
    # The shards hold the adapter's weights, Adam's moments and the best epoch's weights, never
    # the frozen base (which loads from the model); the first process writes how many there were.
    run_dir = tmp_path / "run"
    out = launch("python", tiny_model, ROOT, f"hydra.run.dir={run_dir}", FSDP, "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    (last,) = (run_dir / "checkpoints").iterdir()
    names = set()
    for path in (last / "shards").glob("*.safetensors"):
        names |= set(header(path))
    assert {n.split("/")[0] for n in names} == {"model", "optimizer", "best"}
    assert all("lora_" in n for n in names), sorted(names)[:3]
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("optimizer/")} == {"exp_avg", "exp_avg_sq", "step"}
    assert json.loads((last / "state.json").read_text())["processes"] == 1
