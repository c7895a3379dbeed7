"""Whole runs on a CUDA GPU (marked gpu: skipped without one; `make gpu-check` runs them there):
every adapter, generation, whole-answer scoring and a sequence classifier train and predict with
the model, its inputs and its checkpoints on the GPU, through the GPU's speed components. The
engine's equivalence tests (test_engine) run on the GPU too; test_device catches mixed-device
operations on a CPU-only machine."""

import json

import pytest
import torch

from emorec.checkpoint import load_checkpoint, restore_rng, save_checkpoint, torch_rng_state
from emorec.run import run
from tests.test_adapters import CASES

pytestmark = pytest.mark.gpu


def check_gpu_run(metrics: dict, run_dir) -> None:
    train = metrics["train"]
    if train is not None:
        assert train["losses"] and all(torch.isfinite(torch.tensor(train["losses"])))
    assert metrics["fast"]["eval streams"] == 1 and metrics["fast"]["train streams"] == 1
    assert metrics["peak_gpu_mb"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"] == metrics["test"]["accuracy"]


@pytest.mark.parametrize("adapter,extra", CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_every_adapter_trains_and_predicts_on_the_gpu(adapter, extra, make_cfg, tmp_path):
    metrics = run(make_cfg(f"adapter={adapter}", extra, "trainer.device=cuda", "trainer.checkpoint_every=2"))
    check_gpu_run(metrics, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides",
    [["trainer.predict=generate"], ["trainer.scoring=answer"], ["fast=off"], ["trainer.precision=bf16"]],
    ids=["generate", "answer", "reference", "bf16"],
)
def test_prediction_kinds_on_the_gpu(overrides, make_cfg, tmp_path):
    metrics = run(make_cfg("adapter=lora", "trainer.device=cuda", *overrides))
    check_gpu_run(metrics, tmp_path / "run")
    assert metrics["test"]["invalid"] == 0 or overrides == ["trainer.predict=generate"]


def test_checkpoints_keep_the_cuda_generators_and_load_on_the_host(tmp_path):
    """A checkpoint holds the CUDA RNG (dropout masks continue as if never stopped) and loads to
    the host first (map_location), so a GPU run's checkpoint resumes anywhere."""
    torch.cuda.manual_seed(3)
    torch.rand(5, device="cuda")
    rng = torch_rng_state()
    expected = torch.rand(3, device="cuda")
    path = save_checkpoint(
        tmp_path, 1, weights={"w": torch.ones(2, device="cuda")}, best=None, tensors=rng, state={}, keep=1
    )
    saved = load_checkpoint(path)
    assert saved["weights"]["w"].device.type == "cpu"
    assert len(saved["tensors"]["cuda_rng"]) == torch.cuda.device_count()
    assert all(t.device.type == "cpu" for t in saved["tensors"]["cuda_rng"])
    restore_rng(saved["state"], saved["tensors"])
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_a_sequence_classifier_on_the_gpu(tiny_encoder, tmp_path, make_cfg):
    for adapter in ("full", "lora"):
        cfg = make_cfg("model=minilm_l6", f"model.name_or_path={tiny_encoder}", f"adapter={adapter}")
        cfg.trainer.device, cfg.output_dir = "cuda", str(tmp_path / adapter)
        metrics = run(cfg)
        assert metrics["predict"] == "classify"
        check_gpu_run(metrics, tmp_path / adapter)
