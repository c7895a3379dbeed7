"""`python -m emorec [overrides]`: a thin Hydra wrapper around emorec.run.run.

It adds what only the launcher knows: in a multirun, every job is a W&B run named after its
overrides in a group named after the sweep, and a failing job records its error in
`status.json` and lets the other jobs run.
"""

import logging
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from emorec.checkpoint import Interrupted
from emorec.distributed import hydra_overrides, is_main_process, world_size
from emorec.errors import EmorecError
from emorec.outputs import RunDirectoryBusy, check_run_directory, write_json
from emorec.run import run
from emorec.schema import check_overrides, register

CONF = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("emorec")


def swept_keys(sweep_dir: Path) -> set[str]:
    """The keys a multirun varies, from the multirun.yaml Hydra writes before any job starts (so
    it holds for every launcher): the sweeper's params and comma- or function-valued overrides."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return set()
    hydra_cfg = OmegaConf.load(path).hydra
    keys = set(hydra_cfg.sweeper.get("params") or {})
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        if not value.startswith(("[", "{")) and ("," in value or re.match(r"\w+\(", value)):
            keys.add(key.lstrip("+~"))
    return keys


def main():
    """Hydra's entrypoint, the config groups' schemas registered first (emorec.schema)."""
    register()
    return job()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def job(cfg: DictConfig) -> float:
    """One job. Returns the validation metric of record, which Hydra's sweepers optimise."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    named = [node for node in cfg.logger.values() if "group" in node]
    if multirun and named:  # every logger that groups runs: the sweep's group, the job's name
        sweep = Path(hc.sweep.dir)
        keys = swept_keys(sweep)
        swept = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in keys]
        with open_dict(cfg):
            for node in named:
                node.group = node.group or f"{cfg.sweep_name or 'multirun'}-{sweep.parent.name}_{sweep.name}"
                node.name = node.name or ",".join(swept) or f"job{hc.job.num}"
    out = Path(cfg.output_dir)
    start = time.time()
    try:
        metrics = run(cfg)
    except Interrupted as e:
        if not is_main_process():  # the first process says it
            raise SystemExit(128 + getattr(signal, e.signal_name)) from None
        keep = [o for o in hc.overrides.task if not o.startswith(("resume=", "hydra.run.dir=", "output_dir="))]
        launcher = f"torchrun --nproc_per_node {world_size()}" if world_size() > 1 else "python"
        command = " ".join([launcher, "-m emorec", *keep, f"hydra.run.dir={out}", "resume=true"])
        write_json(out / "status.json", {"status": "interrupted", "signal": e.signal_name, "step": e.step})
        print(f"emorec: {e.signal_name} after step {e.step}: checkpoint saved in {e.path}; resume with: {command}")
        raise SystemExit(128 + getattr(signal, e.signal_name)) from None
    except Exception as e:
        message = str(e) if isinstance(e, EmorecError) else f"{type(e).__name__}: {e}"
        if is_main_process() and not isinstance(e, RunDirectoryBusy):  # the folder is another run's
            out.mkdir(parents=True, exist_ok=True)
            status = {"status": "failed", "error": message, "traceback": traceback.format_exc()}
            write_json(out / "status.json", {**status, "seconds": time.time() - start})
        if multirun:  # the other jobs go on; the report lists this one
            log.error("job %s failed: %s", hc.job.num, message)
            return float("nan")
        if isinstance(e, EmorecError):
            raise SystemExit(f"emorec: error: {e}") from None
        raise
    if is_main_process():
        write_json(out / "status.json", {"status": "ok", "seconds": time.time() - start})
    return metrics["val"][cfg.dataset.metric]


def cli() -> None:
    """`emorec report ...` makes tables (emorec.report), `emorec predict RUN_DIR ...` labels text
    with a finished run (emorec.predict_cli), `emorec export RUN_DIR OUT` writes it as a Hugging
    Face classifier (emorec.export), `emorec plan [overrides]` estimates a run's memory per process
    (emorec.plan), `emorec convert-glm SRC DST` converts a ChatGLM2/3 checkpoint (emorec.glm);
    anything else runs an experiment."""
    if sys.argv[1:2] == ["report"]:
        from emorec.report import main as report_main

        report_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["predict"]:
        from emorec.predict_cli import main as predict_main

        predict_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["export"]:
        from emorec.export import main as export_main

        export_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["plan"]:
        from emorec.plan import main as plan_main

        plan_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["convert-glm"]:
        from emorec.glm import main as convert_main

        convert_main(sys.argv[2:])
        return
    register()  # the config groups' schemas, before the overrides are checked
    try:
        sys.argv += hydra_overrides(sys.argv[1:])
        asks = {"-h", "--help", "-c", "--cfg", "-i", "--info", "--hydra-help"} & set(sys.argv[1:])
        if not asks:  # a value of the wrong type, in one line
            check_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")], CONF)
        if is_main_process() and not asks:  # the first process of a torchrun run locks the folder
            check_run_directory(planned_directory(sys.argv[1:]))
    except EmorecError as e:
        raise SystemExit(f"emorec: error: {e}") from None
    main()


def planned_directory(args: list[str]) -> Path:
    """The directory Hydra is about to create and write its .hydra/ files to: hydra.run.dir
    (hydra.sweep.dir for a multirun), up to any interpolation in it, else the folder of the
    default dated ones."""
    multirun = bool({"-m", "--multirun"} & set(args)) or any(a.startswith("+sweep=") for a in args)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1].strip("'\"") for a in args if a.startswith(key)]
    if not given:
        return Path("multirun" if multirun else "outputs")
    return Path(given[-1].split("${")[0] or ".")  # its first existing folder is what gets checked


if __name__ == "__main__":
    cli()
