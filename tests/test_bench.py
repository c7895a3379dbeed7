"""The benchmark's lever rows (experiments/bench/bench.py) are valid runs: each composes, and
each switches off exactly the levers listed after it."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.bench import bench
from experiments.common import matmul_peak

REPO = Path(__file__).parent.parent

# What each lever's "off" setting looks like in the composed config.
OFF = {
    "shared prompt prefix": lambda c: c.fast.share_prefix is False,
    "bf16 frozen base": lambda c: c.fast.bf16_base is False,
    "eager attention": lambda c: c.model.attn_implementation == "sdpa",
    "no LoRA dropout": lambda c: c.adapter.peft.lora_dropout == 0.05,
    "merged adapter at evaluation": lambda c: c.fast.merge_adapter is False,
    "first-token scoring": lambda c: c.trainer.scoring == "answer",
    "prefix packed into the rows' pass": lambda c: c.fast.pack is False,
    "evaluation streams": lambda c: c.fast.eval_streams == 1 and c.trainer.eval_batch_size == 32,
    "training streams": lambda c: c.fast.train_streams == 1,
}


def composed(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=bench.emorec_overrides(overrides, 480, 300))


def test_every_lever_row_composes_and_switches_off_the_later_levers():
    rows = bench.levers()
    assert set(OFF) == set(bench.LATER)
    assert [name for name, _ in rows][-len(OFF) :] == [f"+ {k}" for k in bench.LATER]
    names = list(bench.LATER)
    for name, overrides in rows:
        cfg = composed(overrides)
        assert cfg.dataset.name == "meld" and cfg.dataset.max_train == 480 and cfg.adapter.peft.r == 8
        # Rows before the later levers have them all off; lever row k has those after k off.
        first_on = names.index(name[2:]) + 1 if name[2:] in names else 0
        for k, lever in enumerate(names):
            assert OFF[lever](cfg) == (k >= first_on), (name, lever)
    first, last = composed(rows[0][1]), composed(rows[-1][1])
    assert first.trainer.precision == "fp32" and first.prompt.system is None
    assert last.trainer.precision == "auto" and last.prompt.system == ""  # emorec's default
    reference = composed(bench.REFERENCE[1])
    assert not any(reference.fast[k] for k in ("share_prefix", "pack", "head_at", "merge_adapter", "token_batches"))
    assert reference.fast.eval_streams == reference.fast.train_streams == 1 and reference.trainer.precision == "auto"


def test_median_row_takes_each_figure_median_and_keeps_the_runs():
    runs = [{"train_s": t, "eval_examples_per_s": e, "tokens": 100} for t, e in [(3.0, 7.0), (1.0, 9.0), (2.0, 8.0)]]
    row = bench.median_row(runs)
    assert row["train_s"] == 2.0 and row["eval_examples_per_s"] == 8.0 and row["tokens"] == 100
    assert row["runs"] == runs


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_matmul_peak_is_a_plausible_measurement(dtype):
    import torch

    # Small sizes: one emulated bf16 matmul of 1024 takes seconds.
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    peak = matmul_peak(dtype, seconds=0.3, sizes=(256, 384, 512, 768))
    # GFLOP/s of a real matmul on any CPU: about 1 where bf16 is emulated (no AVX-512 BF16 or AMX)
    assert 0.1 < peak < 100_000
