"""Configs written by older code: one ordered list of upgrades (emorec.upgrade) brings each to
today's settings, for resuming (settings.check_resume_config) and loading (inference.load)."""

from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from emorec.errors import EmorecError
from emorec.settings import check_resume_config
from emorec.trust import check_saved
from emorec.upgrade import VERSION, VERSION_KEY, upgrade, versioned
from tests.conftest import compose_run

ROOT = Path(__file__).parent.parent


def as_before_issue_37(cfg) -> dict:
    """A config as the code before the emorec.data package wrote it: loaders in
    emorec.datasets, no fast.bf16_adapter_inputs, no config version."""
    old = OmegaConf.to_container(cfg, resolve=True)
    old["dataset"]["load"]["_target_"] = "emorec.datasets." + old["dataset"]["load"]["_target_"].rsplit(".", 1)[1]
    del old["fast"]["bf16_adapter_inputs"]
    return old


def saved_run(tmp_path: Path, config: dict) -> Path:
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    checkpoint.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), tmp_path / "run" / "config.yaml")
    return checkpoint


@pytest.mark.parametrize("dataset", ["meld", "sst2", "mosi2"])
def test_a_run_from_before_the_data_package_resumes(tmp_path, dataset):
    cfg = compose_run(tmp_path / "run", f"dataset={dataset}")
    checkpoint = saved_run(tmp_path, as_before_issue_37(cfg))
    check_resume_config(cfg, checkpoint)  # loaders found at their new names, the switch as it ran
    with pytest.raises(EmorecError, match="resume: fast.bf16_adapter_inputs is False but the checkpoint's run"):
        check_resume_config(
            compose_run(tmp_path / "run", f"dataset={dataset}", "fast.bf16_adapter_inputs=false"), checkpoint
        )


def test_the_version_a_run_saves_skips_the_upgrades_it_needs_no_longer(tmp_path):
    cfg = compose_run(tmp_path / "run")
    now = OmegaConf.to_container(cfg, resolve=True)
    del now["head"]  # with today's version no upgrade fills it in: what it saved is what it ran
    assert "head" not in upgrade(versioned(now)) and upgrade(now)["head"] == {"name": "lm"}
    with pytest.raises(EmorecError, match=f"{VERSION_KEY}={VERSION + 1},.* a newer emorec wrote it"):
        upgrade({**now, VERSION_KEY: VERSION + 1})


def test_a_new_run_saves_its_version(make_cfg):
    from emorec.run import run

    cfg = make_cfg("adapter=none")
    run(cfg)
    saved = OmegaConf.load(Path(cfg.output_dir) / "config.yaml")
    assert saved[VERSION_KEY] == VERSION


COMMITTED = sorted(ROOT.glob("experiments/**/config.yaml"))


def test_every_committed_run_config_upgrades_to_todays_settings():
    """The results folders hold configs from every format emorec has written: each upgrades to
    one that today's schemas take as they are (no unknown key, no wrong type), whose loader
    imports, and that the checks of a run directory pass."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    assert len(COMMITTED) > 100
    formats, composed = set(), {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for path in COMMITTED:
            saved = OmegaConf.to_container(OmegaConf.load(path))
            formats.add(("share_prefix" in saved["trainer"], "head" in saved))
            cfg = upgrade(saved)
            choices = (f"adapter={cfg['adapter']['name']}", f"head={cfg['head']['name']}")
            now = composed.get(choices) or composed.setdefault(choices, compose("config", overrides=list(choices)))
            for key in ("trainer", "fast", "head", "adapter", "optimizer", "prompt"):
                OmegaConf.merge(now[key], cfg[key])  # raises on a key or type today's schema lacks
            assert callable(get_method(cfg["dataset"]["load"]["_target_"])), path
            check_saved(cfg, path)  # and opens as data: only emorec's own targets (emorec.trust)
    assert formats == {(True, False), (False, True)}  # before the fast group and heads (issue 19), after
