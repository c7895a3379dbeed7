"""trainer.ema: a moving average of the trained weights, validated, kept and saved in their place,
while training goes on from the weights themselves; checkpointed with the rest."""

import json

import pytest
import torch
from safetensors.torch import load_file

from emorec.callbacks import Average
from emorec.checkpoint import checkpoints, load_checkpoint
from emorec.errors import EmorecError
from emorec.plan import GB, compose, plan
from emorec.run import run
from emorec.settings import check_config
from emorec.train import TrainingProgress


def decay_at(step: int, decay: float) -> float:
    return min(decay, (step - 1) / step)


def test_the_average_follows_the_weights_and_the_model_gets_its_weights_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen: not averaged
    average = Average(model, 0.9)
    assert set(average.state_dict()) == {"0.weight", "0.bias"}
    seen, expected = [], None
    for step in range(1, 40):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        average.on_step(TrainingProgress(step=step), 0.0)
        seen.append(model[0].weight.detach().clone())
        if step == 10:  # the window (10 steps) is full: until now, the plain mean of the steps' weights
            assert torch.allclose(average.state_dict()["0.weight"], torch.stack(seen).mean(0), atol=1e-6)
            expected = average.state_dict()["0.weight"].clone()
        elif step > 10:
            expected = 0.9 * expected + 0.1 * seen[-1]
    assert torch.allclose(average.state_dict()["0.weight"], expected, atol=1e-6)
    raw = model[0].weight.detach().clone()
    with average.applied():
        assert torch.allclose(model[0].weight, expected, atol=1e-6)
    assert torch.equal(model[0].weight, raw)  # training goes on from its own weights
    # A checkpoint's average comes back; one of other weights is refused in one line.
    other = Average(model, 0.9)
    other.load_state_dict(average.state_dict())
    assert torch.equal(other.state_dict()["0.weight"], average.state_dict()["0.weight"])
    with pytest.raises(EmorecError, match="other weights; resume with the same adapter"):
        other.load_state_dict({"1.weight": expected})


def test_a_run_with_the_average_trains_the_same_steps_and_saves_the_average(make_cfg, tmp_path):
    """Same seed with and without trainer.ema: the same losses (the average never feeds back into
    training). The checkpoints written at every step hold the weights and the average; the
    average moves by its rule from one to the next, and the saved adapter is the last one (no
    validation: the average at the end)."""
    settings = ["adapter=lora", "trainer.max_steps=6", "trainer.val_every_epoch=false"]
    plain = run(make_cfg(*settings, f"output_dir={tmp_path / 'plain'}"))
    ema_dir = tmp_path / "ema"
    saved = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=10", "trainer.ema=0.5"]
    averaged = run(make_cfg(*settings, *saved, f"output_dir={ema_dir}"))
    assert averaged["train"]["losses"] == plain["train"]["losses"]
    states = [load_checkpoint(path) for path in checkpoints(ema_dir)]
    assert [s["state"]["progress"]["step"] for s in states] == list(range(1, 7))
    for step, (before, now) in enumerate(zip(states, states[1:]), start=2):
        d = decay_at(step, 0.5)
        for name, weight in now["weights"].items():
            want = d * before["tensors"]["average"][name] + (1 - d) * weight.float()
            assert torch.allclose(now["tensors"]["average"][name], want, atol=1e-6), name
    last = states[-1]["tensors"]["average"]
    adapter = load_file(ema_dir / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(last) > 0
    for name, weight in last.items():
        assert torch.equal(adapter[name.replace(".default", "")], weight), name
    moved = [n for n in last if not torch.equal(last[n], states[-1]["weights"][n])]
    assert moved  # the average is not the weights themselves


def test_validation_keeps_the_best_epochs_average(make_cfg, tmp_path):
    """With validation, each epoch's end validates the average, and the best epoch's average is
    what the run keeps and saves as its adapter."""
    out = tmp_path / "run"
    settings = ["adapter=lora", "trainer.epochs=2", "trainer.ema=0.8", f"output_dir={out}"]
    metrics = run(make_cfg(*settings))
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"] in (1, 2)
    saved = {s["state"]["progress"]["epoch"]: s for s in map(load_checkpoint, checkpoints(out))}
    assert sorted(saved) == [1, 2]  # the checkpoints written at the epochs' ends
    best = saved[2]["best"]  # the best epoch's weights as the run kept them: its end's average
    average = saved[metrics["best_epoch"]]["tensors"]["average"]
    assert set(best) == set(average) and all(torch.equal(best[n], average[n].to(best[n].dtype)) for n in best)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[n.replace(".default", "")], w) for n, w in best.items())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.ema=1.0"], r"trainer.ema=1.0 is not valid; it must be a number in \[0, 1\)"),
        (["trainer.ema=0.99", "trainer.strategy=fsdp"], "with trainer.strategy=fsdp set trainer.ema=0"),
    ],
)
def test_a_bad_average_is_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(EmorecError, match=message):
        check_config(make_cfg(*overrides))


def test_the_plan_counts_the_average(tiny_model):
    """`emorec plan`: an fp32 copy of what trains, in the total."""
    tiny = ["model=hf", f"model.name_or_path={tiny_model}", "adapter=lora"]
    meta, *plain = plan(compose(tiny), [1], 32, "cpu")
    _, *averaged = plan(compose([*tiny, "trainer.ema=0.99"]), [1], 32, "cpu")
    row, base = averaged[0], plain[0]  # data parallel, one process
    assert row["average"] == pytest.approx(meta["trained"] * 4 / GB) and base["average"] == 0
    assert row["total"] == pytest.approx(base["total"] + row["average"])
