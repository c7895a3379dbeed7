"""Data parallel on CPU: two gloo processes (torchrun, accelerate launch) on the tiny model give
one set of outputs, one W&B run and the metrics of one process with the same global batch and
seed.

Tolerance: fp32, so the two runs differ only in the order gradients are summed (per process,
then across processes): per-step losses agree to 1e-4 relative and the validation and test
metrics to 1e-6 (the same predictions). Batches of 3 rows over 2 processes give uneven shares
(2 and 1 rows) and a last batch of 1 row (one process runs a pass of weight 0); a small
trainer.max_pass_tokens, and under accelerate two batches per optimizer step
(trainer.grad_accum=2), give the processes several passes per step, and different numbers.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from hydra import compose, initialize_config_dir

from emorec.distributed import check_whole_model, from_slurm, world_size
from emorec.errors import EmorecError
from tests.conftest import CONF
from tests.launching import LAUNCHERS, ROOT, SETTINGS, free_port, launch, metrics
from tests.meld_fixture import MELD_DIR
from tests.wandb_records import read_run


def assert_same_run(run_dir: Path, one_process: Path, shares_prefix: bool = True) -> None:
    single, double = metrics(one_process), metrics(run_dir)
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "weighted_f1", "ua"):
            assert double[split][key] == pytest.approx(single[split][key], abs=1e-6), (split, key)
        assert double[split]["confusion_matrix"] == single[split]["confusion_matrix"]
    assert double["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=1e-4)
    # The counters are global: every example of every batch, once; each process runs the shared
    # prompt prefix once per pass, so more tokens were computed.
    for key in ("steps", "examples", "tokens"):
        assert double["train"][key] == single["train"][key], key
    if shares_prefix:  # (a prompt-learning adapter's virtual tokens come first: nothing shared)
        assert double["train"]["computed_tokens"] > single["train"]["computed_tokens"]


@pytest.mark.parametrize("launcher,extra", [("torchrun", ()), ("accelerate", ("trainer.grad_accum=2",))])
def test_two_processes_match_one_with_one_set_of_outputs(launcher, extra, tiny_model, tmp_path, one_process):
    run_dir = tmp_path / "run"
    out = launch(launcher, tiny_model, ROOT, f"hydra.run.dir={run_dir}", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(run_dir, one_process(*extra))
    # Written once, by the first process.
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list((run_dir / "checkpoints").iterdir())) >= 1
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_run(runs[0])
    m = metrics(run_dir)
    assert logged["summary"]["val/weighted_f1"] == pytest.approx(m["val"]["weighted_f1"])
    assert logged["summary"]["test/accuracy"] == pytest.approx(m["test"]["accuracy"])
    assert [float(row["train/loss"]) for row in logged["history"] if "train/loss" in row] == pytest.approx(
        m["train"]["losses"]
    )


def test_processes_agree_on_one_default_run_directory(tiny_model, tmp_path):
    # No hydra.run.dir: each process would name outputs/<date>/<time> from its own clock.
    out = launch("torchrun", tiny_model, tmp_path, "trainer.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1
    assert (runs[0] / "metrics.json").is_file() and (runs[0] / "__main__.log").is_file()


def test_a_sweep_under_torchrun_is_refused_with_the_way_to_do_it(tiny_model, tmp_path):
    out = launch("torchrun", tiny_model, tmp_path, "-m", "adapter.r=2,4")
    assert out.returncode != 0
    assert "+launcher=submitit_slurm hydra.launcher.gpus_per_node=N" in out.stderr


def test_a_multi_task_slurm_job_becomes_a_torch_process_group(monkeypatch):
    # What SLURM sets in task 3 of a 2-node job of 2 tasks (GPUs) per node.
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    # A copy of the environment: what from_slurm exports must not reach later tests' subprocesses.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", {**env, **slurm})
    from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    assert world_size() == 4


def test_slurm_preset_takes_partition_time_and_gpus_from_the_command_line():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "+launcher=submitit_slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=60",
                "hydra.launcher.gpus_per_node=4",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 60, 4)
    assert launcher.tasks_per_node == 4  # one process per GPU
    assert cfg.resume is True  # a requeued job continues from its checkpoint


@pytest.mark.parametrize(
    "kind,zero_stage,refused",
    [("FSDP", None, True), ("DEEPSPEED", 3, True), ("DEEPSPEED", 2, False), ("MULTI_GPU", None, False)],
)
def test_engines_that_shard_the_model_are_refused(kind, zero_stage, refused):
    # accelerate's FSDP and DeepSpeed need a GPU, so the engine's state is stood in for here.
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    state = SimpleNamespace(deepspeed_plugin=plugin)
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=state)
    if refused:
        with pytest.raises(
            EmorecError, match="shards the model behind emorec's back; for sharding use .*strategy=fsdp"
        ):
            check_whole_model(accelerator)
    else:
        check_whole_model(accelerator)  # no error


@pytest.mark.parametrize("strategy", ["data_parallel", "fsdp"])
def test_sigterm_stops_both_processes_at_one_checkpoint_and_the_run_resumes(strategy, tiny_model, tmp_path):
    # torchrun hands SIGTERM to both processes; they agree on the step, the first writes the
    # checkpoint (under fsdp, each its shards), and a resumed two-process run ends where an
    # uninterrupted one does.
    settings = ["logger=none", "trainer.max_steps=600", "trainer.checkpoint_every=20", "trainer.batch_size=2"]
    settings.append(f"trainer.strategy={strategy}")
    whole = tmp_path / "whole"
    assert launch("torchrun", tiny_model, ROOT, f"hydra.run.dir={whole}", *settings).returncode == 0
    run_dir = tmp_path / "run"
    cmd = [a.format(port=free_port()) for a in LAUNCHERS["torchrun"]]
    args = ["model=hf", f"model.name_or_path={tiny_model}", f"dataset.data_dir={MELD_DIR}", *SETTINGS, *settings]
    proc = subprocess.Popen(
        [*cmd, *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert output.count("resume with: torchrun --nproc_per_node 2 -m emorec") == 1  # said once, by the first
    assert f"checkpoints/step-{status['step']:08d}" in output
    out = launch("torchrun", tiny_model, ROOT, f"hydra.run.dir={run_dir}", *settings, "resume=true")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed, uninterrupted = metrics(run_dir), metrics(whole)
    assert resumed["train"]["losses"] == pytest.approx(uninterrupted["train"]["losses"], rel=1e-6)
    assert resumed["val"]["weighted_f1"] == pytest.approx(uninterrupted["val"]["weighted_f1"], abs=1e-9)
