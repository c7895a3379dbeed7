"""What a dataset is made of: examples (an utterance, its label and the turns before it),
the splits a loader returns, the rows read from a file before validation, and the text
normalisation every loader applies."""

import re
from dataclasses import dataclass, field

SPLITS = ("train", "dev", "test")
# How split columns and datasets name the splits (MMSA writes "valid", HF "validation").
SPLIT_NAMES = {"train": "train", "dev": "dev", "valid": "dev", "val": "dev", "validation": "dev", "test": "test"}

Turn = tuple[str | None, str]  # (speaker or None, utterance)


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: int
    speaker: str | None = None
    dialogue_id: str | None = None
    # Every earlier turn of the same dialogue, oldest first; dataset.context_window picks how
    # many of the most recent ones reach the prompt.
    context: tuple[Turn, ...] = ()
    # Training utterances shown with their labels in the prompt (emorec.demonstrations), as
    # (text, label index), least similar first.
    demonstrations: tuple[tuple[str, int], ...] = ()


@dataclass
class Splits:
    """A loader's result: the label wording (index i = label i) and the three splits."""

    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    skipped: int = 0  # bad rows skipped under on_bad_row=skip
    left_out: dict[str, int] = field(default_factory=dict)  # utterances outside the task, by reason

    def __getitem__(self, split: str) -> list[Example]:
        return getattr(self, split)


# Typographic punctuation -> ASCII, so that the same sentence tokenises the same way whichever
# editor or release of a dataset it came through.
ASCII_FOLDS = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "-",
    "\u2026": "...",
    "\u00a0": " ",
}
_ASCII = str.maketrans(ASCII_FOLDS)
_C1_CONTROLS = re.compile("[\x80-\x9f]")


def normalise_text(text: str) -> str:
    """Undo the encoding artifacts of dialogue corpora and fold punctuation to ASCII.

    Three kinds occur: UTF-8 read as cp1252 ("donâ€™t"), cp1252 bytes read as Latin-1 (a bare
    "\\x92" for an apostrophe, as in EmotionLines), and typographic quotes and dashes.
    """
    if "â€" in text or "Ã" in text:
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:
            pass  # not mojibake after all; leave it
    text = _C1_CONTROLS.sub(lambda m: m.group().encode("latin-1").decode("cp1252", "ignore"), text)
    return " ".join(text.translate(_ASCII).split())


@dataclass(frozen=True)
class Row:
    """One utterance as read from a file, before validation."""

    where: str  # file:line (or file: dialogue d, utterance u) for messages
    id: str
    speaker: str | None
    text: str | None
    label: object  # the raw label value; None for an utterance that is context only
