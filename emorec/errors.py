"""One exception type for mistakes a user can fix; its message is one line that says how."""


class EmorecError(Exception):
    """A user-facing error: bad config, missing data or model, unwritable output."""
