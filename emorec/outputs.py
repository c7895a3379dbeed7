"""A run's directory: its lock, and what a run leaves there besides the adapter (metrics,
predictions, a plot), each written whole or not at all."""

import contextlib
import csv
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from emorec.errors import EmorecError

try:
    import fcntl
except ImportError:  # Windows: no POSIX file locks, so run directories go unlocked there
    fcntl = None

LOCK = ".lock"


class RunDirectoryBusy(EmorecError):
    """Another live process holds the run directory's lock."""


def _lock(handle, out: Path) -> None:
    """An exclusive lock on the open lock file, released when it closes; a live holder is an error
    naming its process id."""
    if fcntl is None:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise RunDirectoryBusy(
            f"another emorec run (process {holder}) is using {out}; wait for it to end, "
            "or give this run another hydra.run.dir"
        ) from None


def _open_lock(out: Path, create: int):
    """The run directory's lock file, open to read and write (created with `create`=os.O_CREAT),
    never through a link: a symbolic (or hard) link planted as .lock would have the truncation
    in run_directory_lock empty the file it points to."""
    try:
        fd = os.open(out / LOCK, os.O_RDWR | create | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EmorecError(f"{out / LOCK} is a symbolic link; delete it (emorec writes its lock there)") from None
        raise EmorecError(f"cannot write to output_dir={out} ({e.strerror}); choose a writable folder") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise EmorecError(f"{out / LOCK} is not a plain file of its own; delete it (emorec writes its lock there)")
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def run_directory_lock(out: Path, hold: bool = True):
    """An exclusive lock on the run directory (creating it) while the block runs: one run writes
    there at a time. An OS file lock, so the kernel releases it when the process dies and a
    killed run never leaves a stale lock; the file names the holder's process id. hold=False
    (the other processes of a torchrun run) takes nothing: the first process holds it."""
    if not hold:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EmorecError(f"cannot write to output_dir={out} ({e.strerror}); choose a writable folder") from None
    handle = _open_lock(out, os.O_CREAT)
    try:
        _lock(handle, out)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def check_run_directory(path: Path) -> None:
    """Before anything writes there (Hydra writes its .hydra/ files before emorec runs): that
    `path` can be created, and that no live run holds it."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    problem = None if existing.is_dir() else "is a file, not a folder"
    try:
        if problem is None:
            tempfile.TemporaryDirectory(dir=existing).cleanup()  # the real test: create something there
    except OSError as e:
        problem = f"is not writable ({e.strerror})"
    if problem:
        raise EmorecError(
            f"cannot create the run directory {path}: {existing} {problem}; "
            "choose a writable folder with hydra.run.dir (hydra.sweep.dir for -m)"
        )
    if (path / LOCK).is_file() or (path / LOCK).is_symlink():
        with _open_lock(path, 0) as handle:
            _lock(handle, path)


@contextlib.contextmanager
def atomic(path: Path):
    """Yields a temporary path next to `path` (a file or a folder) to write; renames it to
    `path` when the block succeeds. On a full disk or any write error the partial output is
    removed, so nothing half-written ever carries the final name."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            # A folder cannot be renamed over another: move the old one aside first, so one
            # complete copy carries the name at every moment but the two renames.
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        hint = "free some disk space" if e.errno == errno.ENOSPC else "check the run directory's permissions"
        raise EmorecError(f"cannot write {path} ({e.strerror}); {hint}, then rerun with resume=true") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def prediction_rows(split: str, examples, result: dict, labels: list[str]) -> list[list]:
    rows = []
    for ex, pred, extra in zip(examples, result["preds"], result["extra"]):
        scores = extra if isinstance(extra, list) else [None] * len(labels)
        text_out = extra if isinstance(extra, str) else None
        rows.append(
            [split, ex.id, ex.text, labels[ex.label], labels[pred] if pred >= 0 else "INVALID", text_out]
            + [None if s is None else round(s, 6) for s in scores]
        )
    return rows


def prediction_columns(labels: list[str]) -> list[str]:
    return ["split", "id", "text", "gold", "prediction", "generated"] + [f"score_{lab}" for lab in labels]


def write_predictions(path: Path, columns: list[str], rows: list[list]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def plot_confusion(path: Path, matrix: list[list[int]], labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
