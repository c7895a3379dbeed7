"""`python -m emorec [overrides]`: a thin Hydra wrapper around emorec.run.run."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from emorec.errors import EmorecError
from emorec.run import run

CONF = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the validation metric of record, which Hydra's sweepers optimise."""
    try:
        metrics = run(cfg)
    except EmorecError as e:
        raise SystemExit(f"emorec: error: {e}") from None
    return metrics["val"][cfg.dataset.metric]


if __name__ == "__main__":
    main()
