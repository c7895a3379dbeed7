"""emorec: customise general chat LLMs for emotion recognition with parameter-efficient adapters."""

__version__ = "0.1.0"


def load(run_dir, device: str = "auto", overrides=()):
    """A finished run's model, to label new text as the run's evaluation did:
    `emorec.load("outputs/...").predict(["I can't believe it!"])`. See emorec.inference.load."""
    from emorec.inference import load as load_run  # torch and transformers load on first use only

    return load_run(run_dir, device, overrides)
