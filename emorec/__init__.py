"""emorec: customise general chat LLMs for emotion recognition with parameter-efficient adapters."""

__version__ = "0.1.0"
