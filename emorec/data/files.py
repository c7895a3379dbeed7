"""Where a dataset's files are: a given folder, $EMOREC_DATA_DIR/<name>, or emorec's cache,
filled from the official source (one file per URL, or members of a zip), every download
checksum-verified and atomic, with a progress bar."""

import hashlib
import io
import logging
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from emorec.errors import EmorecError

log = logging.getLogger(__name__)


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


def locate(
    name: str,
    files: list[str],
    data_dir: str | None = None,
    url: str | None = None,
    sha256: dict | None = None,
    archive: str | None = None,
    source: str | None = None,
) -> Path:
    """The folder holding a dataset's files: data_dir, else $EMOREC_DATA_DIR/<name>, else the
    cache, filled when files are missing there from url (one file per name) or from archive (a
    zip, possibly of zips, holding the files), each checked against sha256."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise EmorecError(
                f"dataset.data_dir={folder} lacks {', '.join(missing)}; "
                f"point it at the folder that holds {', '.join(files)}"
            )
        return check_digests(folder, files, sha256)
    looked = []
    if os.environ.get("EMOREC_DATA_DIR"):
        folder = Path(os.environ["EMOREC_DATA_DIR"]).expanduser() / name
        if all((folder / f).is_file() for f in files):
            return check_digests(folder, files, sha256)
        looked.append(str(folder))
    folder = cache_dir() / "datasets" / name
    if all((folder / f).is_file() for f in files):
        return folder
    looked.append(str(folder))
    reason = source or "no download URL is configured"
    if url or archive:
        existed = folder.exists()
        try:
            if archive:
                _fetch_archive(archive, folder, [f for f in files if not (folder / f).is_file()], sha256 or {})
            for f in files:
                if not (folder / f).is_file():
                    fetch(f"{url.rstrip('/')}/{f}", folder / f, (sha256 or {}).get(f))
            return folder
        except (urllib.error.URLError, OSError, EmorecError, zipfile.BadZipFile) as e:
            reason = f"download from {archive or url} failed: {e}"
            if not existed:  # a failed download leaves no cache folder that looks like a start
                shutil.rmtree(folder, ignore_errors=True)
    raise EmorecError(
        f"{name} data not found in {' or '.join(looked)} ({reason}); either set dataset.data_dir=/path/to/{name}, "
        f"or set EMOREC_DATA_DIR to a folder with a {name}/ subfolder holding {', '.join(files)}"
        + (", or allow the download" if url or archive else "")
    )


def check_digests(folder: Path, files: list[str], sha256: dict | None) -> Path:
    """Local copies of files with a known digest (the downloads'): a warning for each that
    differs, naming both digests. Not an error: a newer release or a fixed copy differs too."""
    for f in files:
        want = (sha256 or {}).get(f)
        if want and (got := sha256_of(folder / f)) != want:
            log.warning(
                "%s: sha256 %s, not the release's %s: another version, or a damaged or cut-short copy",
                folder / f,
                got,
                want,
            )
    return folder


def _fetch_archive(url: str, folder: Path, files: list[str], sha256: dict) -> None:
    """Download a zip and copy out the members whose paths end with the wanted file paths,
    looking inside nested zips too (DailyDialog ships a zip of per-split zips). Members are
    written to our own paths, never to the paths the archive names."""
    archive = fetch(url, folder / ("_" + url.rstrip("/").rsplit("/", 1)[-1]))
    try:
        found = _extract(zipfile.ZipFile(archive), folder, set(files))
    finally:
        archive.unlink(missing_ok=True)
    missing = sorted(set(files) - found)
    if missing:
        raise EmorecError(f"{url} holds no {', '.join(missing)}")
    for f in files:
        if f in sha256 and (got := sha256_of(folder / f)) != sha256[f]:
            (folder / f).unlink()
            raise EmorecError(f"checksum mismatch for {f} from {url}: expected sha256 {sha256[f]}, got {got}")


def _extract(zf: zipfile.ZipFile, folder: Path, wanted: set[str]) -> set[str]:
    found = set()
    for member in zf.namelist():
        target = next((f for f in wanted if member == f or member.endswith("/" + f)), None)
        if target is not None:
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(folder / target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            found.add(target)
        elif member.endswith(".zip"):
            with zf.open(member) as inner:
                found |= _extract(zipfile.ZipFile(io.BytesIO(inner.read())), folder, wanted - found)
    return found
