"""Every option of every config group composes, and the CLI lists and prints them."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf

from emorec.trust import check_saved

CONF = Path(__file__).parent.parent / "conf"
GROUPS = ["model", "adapter", "head", "dataset", "optimizer", "trainer", "fast", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_defaults():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    assert cfg.model.name == "smollm2_135m"
    assert cfg.adapter.name == "lora" and cfg.adapter.r == 8 and cfg.adapter.peft.r == 8
    assert cfg.dataset.name == "meld" and cfg.dataset.metric == "weighted_f1"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert list(cfg.logger) == ["wandb"] and cfg.logger.wandb._target_ == "emorec.loggers.WandbLogger"
    assert cfg.trainer.batch_size == 16
    assert cfg.prompt.system == ""  # from the model config
    assert cfg.head.name == "lm" and cfg.prompt.context_layout == "after"
    assert cfg.adapter.peft.task_type == "CAUSAL_LM"


def test_an_encoder_chooses_the_classifier_head():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        encoder = compose("config", overrides=["model=minilm_l6"])
        decoder_head = compose("config", overrides=["head=classifier", "adapter=ptuning_v2"])
    assert encoder.head.name == "classifier" and encoder.adapter.peft.task_type == "SEQ_CLS"
    assert decoder_head.head.init == "labels" and decoder_head.adapter.init == "text"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        required = {("model", "hf"): "model.name_or_path=x", ("dataset", "hf"): "dataset.load.path=x"}
        overrides = [f"{group}={option}", required.get((group, option), "seed=1"), "output_dir=out"]
        cfg = compose("config", overrides=overrides)
    node = OmegaConf.to_container(cfg[group], resolve=True)
    assert node, f"{group}={option} composed to an empty node"
    # A run of it can be opened from its directory: it names only targets emorec allows there.
    check_saved(OmegaConf.to_container(cfg, resolve=True), Path("config.yaml"))
    if group == "fast":  # every switch of the group is a field of emorec.fast.Fast, and back
        from dataclasses import fields

        from emorec.fast import Fast

        assert set(node) == {f.name for f in fields(Fast)} and Fast(**node)


def test_lora_config_instantiates_as_peft_dataclass():
    from hydra.utils import instantiate
    from peft import LoraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["adapter.r=4"])
    peft_config = instantiate(cfg.adapter.peft)
    assert isinstance(peft_config, LoraConfig)
    assert peft_config.r == 4
    assert set(peft_config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "emorec", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_lists_groups_and_options():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for line in [
        "adapter: dora, full, ia3, lora, none, prompt_tuning, ptuning, ptuning_v2",
        "dataset: chsims, csv, dailydialog, emocontext, emorynlp, friends, hf, iemocap, jsonl, m3ed, mastodon, meld, "
        "meld_sentiment, mosi2, mosi3, sst2, sst5",
        "experiment: cpu_budget, cpu_full, erc_best, own_data",
        "head: classifier, lm",
        "launcher: joblib, submitit_local, submitit_slurm",
        "logger: csv, mlflow, none, tensorboard, wandb",
        "model: chatglm2_6b, chatglm3_6b, glm4_9b_chat, hf, llama3_1_8b_instruct, minilm_l6, qwen2_5_7b_instruct, "
        "random_llama3_1_70b, random_llama3_1_8b, random_qwen2_5_7b, random_smollm2_135m, smollm2_135m",
        "optimizer: adamw",
        "sweep: lora_rank, optuna, paper, paper_baseline, paper_context, prefix_length, ptuning_v2_init",
    ]:
        assert line in out.stdout


def test_cli_cfg_job_prints_composed_config():
    out = _cli("adapter=none", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.adapter.name == "none" and cfg.adapter.train is False
    assert cfg.dataset.labels[0] == "neutral"


def test_cli_user_error_is_one_line(tmp_path):
    out = _cli(f"dataset.data_dir={tmp_path}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("emorec: error: dataset.data_dir=") and "lacks train_sent_emo.csv" in last
    assert "Traceback" not in out.stderr


PRESETS = [(g, p.stem) for g in ("sweep", "launcher") for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", PRESETS, ids=[f"+{g}={o}" for g, o in PRESETS])
def test_presets_compose(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+{group}={option}"], return_hydra_config=True)
    if group == "sweep":
        assert cfg.sweep_name == option and cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper.params
    else:
        assert option.split("_")[0] in cfg.hydra.launcher._target_.lower()
