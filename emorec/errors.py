"""The error a user sees: one line that says what is wrong and how to fix it."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate


class EmorecError(Exception):
    """A problem with the user's input or setup, reported as one line (no traceback)."""


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, but a user-facing error raised by the target reaches the user
    as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, EmorecError):
            raise e.__cause__ from None
        raise
