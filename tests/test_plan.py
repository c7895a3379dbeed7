"""`emorec plan` (emorec.plan): per-process memory of a run before it is launched, from the model
built on the meta device. Its parts are checked against the real model's counts, its activations
against the same count on real tensors, and its split over processes against what FSDP shards."""

import functools
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from emorec.plan import GB, compose, meta_model, optimizer_bytes_per_weight, plan, saved_bytes
from tests.launching import ROOT
from tests.meld_fixture import MELD_DIR


@pytest.fixture
def tiny(tiny_model):
    return ["model=hf", f"model.name_or_path={tiny_model}", f"dataset.data_dir={MELD_DIR}", "trainer.batch_size=4"]


def rows_by(table: list[dict]) -> dict:
    return {(r["strategy"], r["processes"]): r for r in table}


def test_the_parts_are_the_models_own_counts(tiny, tiny_model):
    meta, *table = plan(compose([*tiny, "adapter=full", "trainer.precision=fp32"]), [1, 2], 32, "cpu")
    real = AutoModelForCausalLM.from_pretrained(tiny_model)
    n = sum(p.numel() for p in real.parameters())  # the tied LM head once
    assert (meta["trained"], meta["frozen"]) == (n, 0)
    rows = rows_by(table)
    one, two = rows["data_parallel", 1], rows["fsdp", 2]
    assert one["weights"] == pytest.approx(n * 4 / GB)  # fp32
    assert one["optimizer"] == pytest.approx(2 * one["weights"])  # AdamW: two fp32 moments
    for part in ("weights", "gradients", "optimizer"):
        assert two[part] == pytest.approx(one[part] / 2)  # FSDP shards them
        assert rows["data_parallel", 2][part] == one[part]  # data parallel keeps them whole
    # Each process runs its share of a batch's rows, either way.
    assert two["activations"] == pytest.approx(one["activations"] / 2)
    assert two["gathered"] > 0 and one["gathered"] == 0


def test_lora_trains_a_sliver_and_a_bf16_base_is_counted_in_bf16(tiny):
    meta, *table = plan(compose([*tiny, "adapter=lora"]), [1], 32, "cuda")  # bf16 on a GPU
    assert meta["bf16"] and 0 < meta["trained"] < meta["frozen"] / 10
    row = rows_by(table)["data_parallel", 1]
    assert row["weights"] == pytest.approx((meta["frozen"] * 2 + meta["trained"] * 4) / GB)


def test_activation_checkpointing_keeps_less(tiny):
    settings = [*tiny, "adapter=full", "trainer.precision=fp32"]
    _, *plain = plan(compose(settings), [1], 64, "cpu")
    _, *checkpointed = plan(compose([*settings, "trainer.activation_checkpointing=true"]), [1], 64, "cpu")
    assert (
        0 < rows_by(checkpointed)["data_parallel", 1]["activations"] < rows_by(plain)["data_parallel", 1]["activations"]
    )


def test_the_meta_count_is_what_real_tensors_keep(tiny, tiny_model):
    # The same pass on the real model (CPU, real weights) and on the meta device keeps the same bytes.
    cfg = compose([*tiny, "adapter=lora"])
    meta = meta_model(cfg, torch.float32, attention="eager")
    real = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    from peft import get_peft_model

    from emorec.adapters import prepare
    from emorec.errors import instantiate

    real = get_peft_model(real, prepare(instantiate(cfg.adapter.peft), None, False))
    assert saved_bytes(meta, 3, 20) == saved_bytes(real, 3, 20)
    assert saved_bytes(meta, 3, 20)[0] > 0


def test_optimizer_state_is_counted_from_the_optimizer():
    assert optimizer_bytes_per_weight(functools.partial(torch.optim.AdamW, lr=1e-3)) == 8
    assert optimizer_bytes_per_weight(functools.partial(torch.optim.SGD, lr=1e-3)) == 0
    assert optimizer_bytes_per_weight(functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9)) == 4


def test_the_command_prints_a_table_and_refuses_in_one_line(tiny):
    out = subprocess.run(
        [sys.executable, "-m", "emorec", "plan", *tiny, "--processes", "1,4"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| fsdp | 4 |" in out.stdout and "| data_parallel | 1 |" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "emorec", "plan", "model=hf", "model.name_or_path=nobody/no-such-model"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode != 0
    assert out.stderr.strip().startswith("emorec: error: emorec plan reads model nobody/no-such-model's config.json")
    assert len(out.stderr.strip().splitlines()) == 1
