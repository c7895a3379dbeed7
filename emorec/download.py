"""Fetch files over HTTP(S) into a cache: checksum-verified, atomic, with a progress bar."""

import hashlib
import os
import socket
import urllib.parse
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


def hub_offline() -> bool:
    """Whether the Hugging Face hub is out of reach: HF_HUB_OFFLINE is set, or its host does not
    answer within a few seconds. Checked once before a hub load, because the hub libraries
    retry for a minute before they fall back to the cache or give up."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3.0).close()
        return False
    except OSError:
        return True
