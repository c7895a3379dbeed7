"""Fetch files over HTTP(S) into a cache: checksum-verified, atomic, with a progress bar."""

import hashlib
import os
import urllib.request
from pathlib import Path

from tqdm import tqdm

from emorec.errors import EmorecError


def cache_dir() -> Path:
    """emorec's cache: $EMOREC_CACHE_DIR, else $XDG_CACHE_HOME/emorec, else ~/.cache/emorec."""
    if os.environ.get("EMOREC_CACHE_DIR"):
        return Path(os.environ["EMOREC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emorec"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download url to dest. The bytes land in a temporary file that is renamed only after
    the checksum matches, so an interrupted or corrupted download never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and (got := sha256_of(tmp)) != sha256:
            raise EmorecError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
