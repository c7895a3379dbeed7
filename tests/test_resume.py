"""Nothing lost: a run killed with SIGKILL or stopped by SIGTERM/SIGUSR2 continues from its last
checkpoint to the same final metrics as a run never interrupted, and a NaN loss stops the run
with the last good checkpoint in place. Real subprocesses on the tiny model."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emorec.checkpoint import checkpoints, tidy_checkpoints
from emorec.errors import EmorecError
from emorec.run import run
from tests.conftest import compose_run
from tests.meld_fixture import MELD_DIR
from tests.wandb_records import read_run

ROOT = Path(__file__).parent.parent
# 16 training utterances in batches of 4: 4 steps an epoch, so 10 steps cross two epoch ends
# (with validation and best-adapter tracking); dropout makes the RNG state matter.
SETTINGS = [
    "logger=none",
    "trainer.precision=fp32",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=4",
    "trainer.max_steps=10",
    "trainer.checkpoint_every=3",
    "trainer.keep_checkpoints=2",
    "optimizer.lr=1e-2",
    "adapter=lora",
    "adapter.dropout=0.1",
]


def emorec(tiny_model, run_dir, *extra, interrupt=None):
    base = ["model=hf", f"model.name_or_path={tiny_model}", f"dataset.data_dir={MELD_DIR}", *SETTINGS]
    args = [*base, f"hydra.run.dir={run_dir}", *extra]
    cmd = [sys.executable, "-m", "emorec", *args]
    if interrupt:
        cmd = [sys.executable, str(ROOT / "tests" / "interrupt.py"), *interrupt, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def final(run_dir) -> dict:
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {"val": m["val"], "test": m["test"], "losses": m["train"]["losses"], "best_epoch": m["best_epoch"]}


def steps(run_dir) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = emorec(tiny_model, run_dir)
    assert out.returncode == 0, out.stderr
    return final(run_dir)


def test_kill_9_then_resume_gives_the_same_final_metrics(tiny_model, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed = emorec(tiny_model, run_dir, interrupt=["KILL", "7"])
    assert killed.returncode == -9  # died at step 7, between the checkpoints of steps 6 and 9
    assert not (run_dir / "metrics.json").exists()
    assert steps(run_dir) == ["step-00000004", "step-00000006"]  # epoch end 4, periodic 6 (3 pruned)
    # The run's wall time goes on from the checkpoint's: a resumed run reports all it took.
    state_file = run_dir / "checkpoints" / "step-00000006" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["progress"]["wall_seconds"] > state["progress"]["seconds"] > 0  # loading, validation
    state["progress"]["wall_seconds"] = 1000.0  # as if the killed process had run for long
    # The checkpoint says what precision trained it; one from a machine where trainer.precision=auto
    # chose bf16 resumes here in fp32 with a warning (the run is still continued).
    assert state["precision"] == "fp32"
    state["precision"] = "bf16"
    state_file.write_text(json.dumps(state))
    start = time.perf_counter()
    resumed = emorec(tiny_model, run_dir, "resume=true")
    took = time.perf_counter() - start
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-00000006 at step 6" in resumed.stdout
    assert "resuming in fp32 a run whose checkpoint at step 6 trained in bf16" in resumed.stdout
    assert final(run_dir) == uninterrupted
    assert len(uninterrupted["losses"]) == 10
    assert 1000.0 < json.loads((run_dir / "metrics.json").read_text())["wall_time_s"] < 1000.0 + took


def test_the_weight_average_resumes_with_the_run(tiny_model, tmp_path):
    """trainer.ema: a run killed at step 7 and resumed ends as the same run never interrupted (the
    average, checkpointed with the weights, goes on from where it was)."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    assert emorec(tiny_model, whole, "trainer.ema=0.7").returncode == 0
    killed = emorec(tiny_model, run_dir, "trainer.ema=0.7", interrupt=["KILL", "7"])
    assert killed.returncode == -9 and not (run_dir / "metrics.json").exists()
    resumed = emorec(tiny_model, run_dir, "trainer.ema=0.7", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert final(run_dir) == final(whole)
    adapter = "adapter/adapter_model.safetensors"
    resumed, once = load_file(run_dir / adapter), load_file(whole / adapter)
    assert set(resumed) == set(once) and all(torch.equal(resumed[k], v) for k, v in once.items())


def test_a_resumed_run_continues_its_wandb_run(tiny_model, tmp_path, uninterrupted):
    """One W&B run across the interruption: the resumed process logs to the same run id, its
    loss curve going on from the checkpoint's step; the adapter is logged once, at the end."""
    run_dir = tmp_path / "run"
    stopped = emorec(tiny_model, run_dir, "logger=wandb", interrupt=["TERM", "7"])
    assert stopped.returncode == 143, stopped.stderr
    resumed = emorec(tiny_model, run_dir, "logger=wandb", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    first, second = (read_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*")))
    assert first["id"] == second["id"] == (run_dir / "wandb_id").read_text().strip()
    steps = [[int(row["_step"]) for row in r["history"] if "train/loss" in row] for r in (first, second)]
    assert steps[0][-1] == 7 and steps[1][0] == 8 and steps[1][-1] == 10  # checkpointed at 7 (SIGTERM)
    models = [[a for a in r["artifacts"] if a["type"] == "model"] for r in (first, second)]
    assert models[0] == [] and len(models[1]) == 1
    assert final(run_dir) == uninterrupted
    # A fresh run in another directory is another W&B run.
    emorec(tiny_model, tmp_path / "other", "logger=wandb", "trainer.max_steps=1")
    assert (tmp_path / "other" / "wandb_id").read_text() != (run_dir / "wandb_id").read_text()


@pytest.mark.parametrize("signal_name,code", [("TERM", 143), ("INT", 130)])
def test_sigterm_and_sigint_checkpoint_and_say_how_to_resume(tiny_model, tmp_path, uninterrupted, signal_name, code):
    run_dir = tmp_path / "run"
    stopped = emorec(tiny_model, run_dir, interrupt=[signal_name, "5"])
    assert stopped.returncode == code, stopped.stderr
    message = stopped.stdout.strip().splitlines()[-1]
    assert message.startswith(f"emorec: SIG{signal_name} after step 5: checkpoint saved in {run_dir}")
    assert "resume with: python -m emorec" in message and f"hydra.run.dir={run_dir} resume=true" in message
    assert steps(run_dir)[-1] == "step-00000005"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    resumed = emorec(tiny_model, run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert final(run_dir) == uninterrupted


def test_sigusr2_checkpoints_then_hands_over_to_submitit_requeue(tiny_model, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    stopped = emorec(tiny_model, run_dir, interrupt=["USR2", "2", "--fake-requeue"])
    assert stopped.returncode == 0 and "fake submitit: requeued" in stopped.stdout
    assert steps(run_dir)[-1] == "step-00000002"
    # The requeued job runs the same command, with resume=true from the launcher preset.
    resumed = emorec(tiny_model, run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert final(run_dir) == uninterrupted


def test_one_run_per_directory_and_a_killed_holder_leaves_no_lock(tiny_model, tmp_path, uninterrupted):
    """A run holds its directory; a second run into it (fresh or resume, from the command line
    or through run()) stops at once naming the holder, and touches nothing there; once the
    holder is killed with kill -9, resume=true takes the directory and finishes the run."""
    run_dir, held = tmp_path / "run", tmp_path / "held"
    base = ["model=hf", f"model.name_or_path={tiny_model}", f"dataset.data_dir={MELD_DIR}", *SETTINGS]
    holder = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "interrupt.py"), "HOLD", "5", *base, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "EMOREC_TEST_HELD": str(held)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not held.exists():  # the holder is past step 5, its epoch-end checkpoint (4) written
            assert holder.poll() is None and time.monotonic() < deadline, "the holding run did not start"
            time.sleep(0.2)
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        expected = f"another emorec run (process {holder.pid}) is using {run_dir}; wait for it to end"
        for extra in ([], ["resume=true"]):
            second = emorec(tiny_model, run_dir, *extra)
            assert second.returncode == 1 and expected in second.stderr, second.stderr
        with pytest.raises(EmorecError, match=re.escape(expected)):  # run() itself takes the lock
            run(compose_run(run_dir, "model=hf", f"model.name_or_path={tiny_model}"))
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
        assert not (run_dir / "status.json").exists() and not (run_dir / "metrics.json").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    resumed = emorec(tiny_model, run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000004 at step 4" in resumed.stdout
    assert final(run_dir) == uninterrupted


def test_kill_9_while_writing_a_checkpoint(tiny_model, tmp_path, uninterrupted):
    """Killed halfway through the weights of the step-6 checkpoint: the half-written folder never
    has a checkpoint's name, and resume=true continues from step 4, the last complete one."""
    run_dir = tmp_path / "run"
    # Weights files written: step 3's adapter, step 4's adapter and best, then step 6's adapter.
    killed = emorec(tiny_model, run_dir, interrupt=["KILL_SAVING", "4"])
    assert killed.returncode == -9
    folder = run_dir / "checkpoints"
    partial = [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000003", "step-00000004"] and len(partial) == 1
    assert partial[0].startswith("step-00000006.tmp")
    resumed = emorec(tiny_model, run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000004 at step 4" in resumed.stdout
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]  # tidied away
    assert final(run_dir) == uninterrupted


def test_a_checkpoint_moved_aside_mid_replacement_takes_its_name_back(tmp_path):
    """Killed between outputs.atomic's two renames: the complete old copy was moved aside and the
    new one not yet renamed; the next run puts the old one back."""
    folder = tmp_path / "checkpoints"
    (folder / "step-00000008.old123").mkdir(parents=True)
    (folder / "step-00000008.old123" / "state.json").write_text("{}")
    (folder / "step-00000008.tmp123").mkdir()
    (folder / "step-00000004").mkdir()
    tidy_checkpoints(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000008"]
    assert (folder / "step-00000008" / "state.json").is_file()


def test_resume_true_without_checkpoints_starts_fresh(tiny_model, tmp_path, uninterrupted):
    """Also after a kill during the first checkpoint's write (its temporary folder left), and
    it says so."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004.tmp12345").mkdir(parents=True)  # outputs.atomic's temporary
    out = emorec(tiny_model, run_dir, "resume=true")
    assert out.returncode == 0, out.stderr
    assert final(run_dir) == uninterrupted
    said = f"resume=true: no complete checkpoint in {run_dir / 'checkpoints'}: starting from the beginning"
    assert said in out.stdout + out.stderr


@pytest.mark.parametrize(
    "overrides,fault",
    [
        # The batch-of-one prefix pass with SDPA: at this lr its backward overflows from step 2
        # (eager attention and the packed pass saturate instead: RMSNorm of an infinite square
        # gives zero gradients).
        (
            ["optimizer.lr=1e30", "trainer.max_grad_norm=null", "fast.pack=false", "model.attn_implementation=sdpa"],
            "weights are no longer finite after step",
        ),
        (
            ["optimizer.lr=1e30", "trainer.max_grad_norm=1.0", "fast.pack=false", "model.attn_implementation=sdpa"],
            "gradient norm is nan at step",
        ),
    ],
    ids=["loss", "gradient"],
)
def test_nan_stops_with_the_last_good_checkpoint(tiny_model, tmp_path, overrides, fault):
    run_dir = tmp_path / "run"
    out = emorec(tiny_model, run_dir, "trainer.checkpoint_every=1", *overrides)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"emorec: error: {fault}") and "lower optimizer.lr" in last, last
    assert "the last checkpoint holds the weights before it" in last
    failed = int(re.search(r"(?:at|after) step (\d+)", last).group(1))
    assert failed >= 2
    kept = steps(run_dir)
    assert kept and all(int(k.split("-")[1]) < failed for k in kept)
    for k in kept:
        weights = load_file(run_dir / "checkpoints" / k / "adapter.safetensors")
        assert weights and all(w.isfinite().all() for w in weights.values())
    assert not (run_dir / "metrics.json").exists()


def test_a_run_checkpointed_before_the_fast_group_resumes_under_the_new_names(tmp_path):
    from omegaconf import OmegaConf

    from emorec.errors import EmorecError
    from emorec.settings import check_resume_config
    from tests.conftest import compose_run

    cfg = compose_run(tmp_path / "run")
    old = OmegaConf.to_container(cfg, resolve=True)
    fast = old.pop("fast")
    names = {"share_prefix": "share_prefix", "pack": "pack_prefix", "bf16_base": "bf16_base"}
    names |= {"merge_adapter": "merge_adapter", "eval_streams": "eval_streams", "train_streams": "train_streams"}
    for new, before in names.items():
        old["trainer"][before] = fast[new]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    checkpoint.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "run" / "config.yaml")
    check_resume_config(cfg, checkpoint)  # the same settings, under their new names: no error
    old["trainer"]["pack_prefix"] = False
    OmegaConf.save(OmegaConf.create(old), tmp_path / "run" / "config.yaml")
    with pytest.raises(EmorecError, match="resume: fast.pack is True but the checkpoint's run used False"):
        check_resume_config(cfg, checkpoint)


def test_a_run_checkpointed_before_heads_and_context_layouts_resumes_as_it_ran(tmp_path):
    """A run from before head, balance and the context layout had settings ran as head=lm,
    unbalanced, context before the instruction and P-Tuning v2 from a random prefix: it resumes
    with those values, and is told which to set otherwise."""
    from omegaconf import OmegaConf

    from emorec.errors import EmorecError
    from emorec.settings import check_resume_config
    from tests.conftest import compose_run

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    checkpoint.mkdir(parents=True)
    old = OmegaConf.to_container(compose_run(tmp_path / "run", "adapter=ptuning_v2"), resolve=True)
    del old["head"], old["trainer"]["balance"], old["trainer"]["logit_adjust"], old["adapter"]["init"]
    del old["adapter"]["init_text"], old["prompt"]["context_layout"], old["prompt"]["context_after"]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "run" / "config.yaml")
    as_it_ran = ["adapter=ptuning_v2", "adapter.init=random", "prompt.context_layout=before"]
    check_resume_config(compose_run(tmp_path / "run", *as_it_ran), checkpoint)
    with pytest.raises(EmorecError, match="resume: adapter.init is 'text' but the checkpoint's run used 'random'"):
        check_resume_config(
            compose_run(tmp_path / "run", "adapter=ptuning_v2", "prompt.context_layout=before"), checkpoint
        )
    with pytest.raises(EmorecError, match="resume: head.init is 'labels' but the checkpoint's run used None"):
        check_resume_config(compose_run(tmp_path / "run", *as_it_ran, "head=classifier"), checkpoint)
