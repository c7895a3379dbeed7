"""Where a dataset's files are: a given folder, $EMOREC_DATA_DIR/<name>, or emorec's cache,
filled from the official source (one file per URL, or members of a zip), with a progress bar.

What enters the cache is checked first: every download lands in a temporary file, is capped in
size and renamed only after its sha256 matches; an archive is extracted into a temporary folder,
every file it yields is checked, and they are moved in together, or none is. So the cache holds
checked files only and is not checked again. Local copies (dataset.data_dir, $EMOREC_DATA_DIR)
are the user's own: a digest that differs from the release's is a warning, or an error with
dataset.verify=strict."""

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from emorec.errors import EmorecError

log = logging.getLogger(__name__)

# The most bytes one download or archive member may have: about ten times the largest file emorec
# downloads (DailyDialog's train split, 6 MB), so a wrong or hostile URL cannot fill the disk.
MAX_BYTES = 64 << 20
# How many levels of zips are opened (DailyDialog: a zip of per-split zips, two levels).
MAX_NESTING = 2


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


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0, max_bytes: int | None = None) -> Path:
    """Download url to dest. The bytes land in a temporary file that is renamed only after
    the checksum matches, so an interrupted or corrupted download never looks complete; more
    than max_bytes (default MAX_BYTES) is an error."""
    max_bytes = max_bytes or MAX_BYTES
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total and total > max_bytes:
                raise _too_big(url, max_bytes)
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                copy_bounded(response, out, max_bytes, url, bar.update)
        if sha256 is not None and (got := sha256_of(tmp)) != sha256:
            raise EmorecError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def copy_bounded(src, dst, max_bytes: int, what: str, progress=None) -> int:
    """Copy a stream, stopping with an error past max_bytes (a response or archive member can
    say it is smaller than it is)."""
    n = 0
    for chunk in iter(lambda: src.read(1 << 16), b""):
        n += len(chunk)
        if n > max_bytes:
            raise _too_big(what, max_bytes)
        dst.write(chunk)
        if progress:
            progress(len(chunk))
    return n


def _too_big(what: str, max_bytes: int) -> EmorecError:
    size = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes} bytes"
    return EmorecError(
        f"{what} is larger than {size}, far above any dataset file emorec downloads; "
        "stopped: check the URL (or download the files yourself and set dataset.data_dir)"
    )


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
    archive: str | list[str] | None = None,
    source: str | None = None,
    verify: str = "warn",
) -> Path:
    """The folder holding a dataset's files: data_dir, else $EMOREC_DATA_DIR/<name>, else the
    cache, filled when files are missing there from url (one file per name) or from archive (a
    zip, possibly of zips, holding the files; or a list of its URLs, tried in order), each
    checked against sha256 (file name -> digest; the archive's under its own file name). A local
    copy whose digest differs is a warning (verify=warn) or an error (verify=strict)."""
    if verify not in ("warn", "strict"):
        raise EmorecError(f"dataset.verify={verify!r}; use warn or strict")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise EmorecError(
                f"dataset.data_dir={folder} lacks {', '.join(missing)}; "
                f"point it at the folder that holds {', '.join(files)}"
            )
        return check_digests(folder, files, sha256, verify)
    looked = []
    if os.environ.get("EMOREC_DATA_DIR"):
        folder = Path(os.environ["EMOREC_DATA_DIR"]).expanduser() / name
        if all((folder / f).is_file() for f in files):
            return check_digests(folder, files, sha256, verify)
        looked.append(str(folder))
    folder = cache_dir() / "datasets" / name
    if all((folder / f).is_file() for f in files):
        return folder  # checked when it came in
    looked.append(str(folder))
    reason = source or "no download URL is configured"
    if url or archive:
        existed = folder.exists()
        try:
            if archive:
                urls = [archive] if isinstance(archive, str) else list(archive)
                wanted = [f for f in files if not (folder / f).is_file()]
                _fetch_archive(urls, folder, wanted, sha256 or {})
            for f in files:
                if not (folder / f).is_file():
                    fetch(f"{url.rstrip('/')}/{f}", folder / f, (sha256 or {}).get(f))
            return folder
        except (urllib.error.URLError, OSError, EmorecError, zipfile.BadZipFile) as e:
            reason = f"download from {url or ', '.join(urls)} failed: {e}"
            if not existed:  # a failed download leaves no cache folder that looks like a start
                shutil.rmtree(folder, ignore_errors=True)
    raise EmorecError(
        f"{name} data not found in {' or '.join(looked)} ({reason}); either set dataset.data_dir=/path/to/{name}, "
        f"or set EMOREC_DATA_DIR to a folder with a {name}/ subfolder holding {', '.join(files)}"
        + (", or allow the download" if url or archive else "")
    )


def check_digests(folder: Path, files: list[str], sha256: dict | None, verify: str = "warn") -> Path:
    """Local copies of files with a known digest (the downloads'): for each that differs, a
    warning naming both digests (a newer release or a fixed copy differs too), or with
    verify=strict an error."""
    for f in files:
        want = (sha256 or {}).get(f)
        if want and (got := sha256_of(folder / f)) != want:
            if verify == "strict":
                raise EmorecError(
                    f"{folder / f}: sha256 {got}, not the release's {want}, and dataset.verify=strict; "
                    "replace it with the release's file, or set dataset.verify=warn to use it anyway"
                )
            log.warning(
                "%s: sha256 %s, not the release's %s: another version, or a damaged or cut-short copy",
                folder / f,
                got,
                want,
            )
    return folder


def _fetch_archive(urls: list[str], folder: Path, files: list[str], sha256: dict) -> None:
    """Download a zip (from the first of `urls` that answers) and take out the members whose
    paths end with the wanted file paths, looking inside nested zips too (DailyDialog ships a
    zip of per-split zips), all in a temporary folder: every file is checked, then all are
    moved into `folder` together, or none is. Members are written to our own paths, never to
    the paths the archive names."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        tmp = Path(tmp)
        name = urls[0].rstrip("/").rsplit("/", 1)[-1]  # the archive's digest is under its file name
        url, archive = _fetch_first(urls, tmp / name, sha256.get(name))
        with zipfile.ZipFile(archive) as zf:
            found = _extract(zf, tmp / "files", set(files), tmp, 0)
        missing = sorted(set(files) - found)
        if missing:
            raise EmorecError(f"{url} holds no {', '.join(missing)}")
        for f in files:
            if f in sha256 and (got := sha256_of(tmp / "files" / f)) != sha256[f]:
                raise EmorecError(
                    f"checksum mismatch for {f} from {url}: expected sha256 {sha256[f]}, got {got}; "
                    "nothing of the archive was kept"
                )
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / "files" / f, folder / f)


def _fetch_first(urls: list[str], dest: Path, sha256: str | None) -> tuple[str, Path]:
    """(url, file) of the first URL that downloads; a checksum mismatch stops the search."""
    for i, url in enumerate(urls):
        try:
            return url, fetch(url, dest, sha256)
        except (urllib.error.URLError, OSError) as e:
            if i == len(urls) - 1:
                raise
            log.warning("%s failed (%s); trying %s", url, e, urls[i + 1])
    raise EmorecError("no archive URL is configured; set dataset.load.archive")


def _extract(zf: zipfile.ZipFile, out: Path, wanted: set[str], scratch: Path, depth: int) -> set[str]:
    """Copy the wanted members of zf to out (each capped at MAX_BYTES); zips inside it are
    copied to `scratch` (not read into memory) and searched too, MAX_NESTING levels deep."""
    found = set()
    for info in zf.infolist():
        member = info.filename
        target = next((f for f in wanted - found if member == f or member.endswith("/" + f)), None)
        if target is None and not (member.endswith(".zip") and depth + 1 < MAX_NESTING and wanted - found):
            continue
        if info.file_size > MAX_BYTES:
            raise _too_big(f"archive member {member}", MAX_BYTES)
        path = out / target if target is not None else scratch / f"nested-{depth}-{len(found)}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(path, "wb") as dst:
            copy_bounded(src, dst, MAX_BYTES, f"archive member {member}")
        if target is not None:
            found.add(target)
            continue
        with zipfile.ZipFile(path) as inner:
            found |= _extract(inner, out, wanted - found, scratch, depth + 1)
        path.unlink()
    return found
