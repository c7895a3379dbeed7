"""Downloads from a local HTTP server (emorec.data.files): each dataset's files checked against
their sha256; an archive checked all or nothing; sizes capped; and local copies whose digest
differs, a warning or (dataset.verify=strict) an error."""

import functools
import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emorec.data import files
from emorec.data.files import sha256_of
from emorec.errors import EmorecError, instantiate
from tests.conftest import DATASET_FOLDER
from tests.test_datasets import CONF, load, sizes


@pytest.fixture
def serve(tmp_path):
    """start(folder) -> the URL of a local HTTP server of that folder."""
    servers = []

    def start(root: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def cached(name: str) -> Path:
    return Path(os.environ["EMOREC_CACHE_DIR"]) / "datasets" / name


@pytest.mark.parametrize("option", ["emorynlp", "friends", "mastodon", "sst2", "sst5", "mosi3"])
def test_download_each_dataset_with_checksums(fixture_dir, serve, option):
    folder = fixture_dir(option)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={option}", f"dataset.load.url={serve(folder)}"])
    names = list(cfg.dataset.load.sha256)  # the files the real URL serves
    cfg.dataset.load.sha256 = {name: sha256_of(folder / name) for name in names}
    data = instantiate(cfg.dataset.load)
    assert len(data.train) > 0
    cache = cached(DATASET_FOLDER.get(option, option))
    assert sorted(p.name for p in cache.iterdir()) == sorted(names)
    cfg.dataset.load.sha256 = {name: "0" * 64 for name in names}  # the cache holds checked files only
    assert sizes(instantiate(cfg.dataset.load)) == sizes(data)


def _nested_zip(folder: Path) -> bytes:
    """DailyDialog's release layout: ijcnlp_dailydialog.zip holding train.zip, validation.zip, test.zip."""
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as zout:
        for split in ("train", "validation", "test"):
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zin:
                for f in sorted((folder / split).iterdir()):
                    zin.write(f, f"{split}/{f.name}")
            zout.writestr(f"ijcnlp_dailydialog/{split}.zip", inner.getvalue())
        zout.writestr("ijcnlp_dailydialog/readme.txt", "an invented release")
    return outer.getvalue()


ARCHIVE = "ijcnlp_dailydialog.zip"  # the archive's digest is under its file name


@pytest.fixture
def release(fixture_dir, serve, tmp_path):
    """(config of dataset=dailydialog over a served copy of the release, the fixture folder)."""
    folder = fixture_dir("dailydialog")
    served = tmp_path / "served"
    served.mkdir()
    archive = _nested_zip(folder)
    (served / "ijcnlp_dailydialog.zip").write_bytes(archive)
    url = serve(served) + "/ijcnlp_dailydialog.zip"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["dataset=dailydialog", f"dataset.load.archive={url}"])
    digests = {n: sha256_of(folder / n) for n in cfg.dataset.load.sha256 if n != ARCHIVE}
    cfg.dataset.load.sha256 = {ARCHIVE: hashlib.sha256(archive).hexdigest(), **digests}
    return cfg, folder


def nothing_kept() -> bool:
    """No file in the dataset's cache folder, and no temporary folder beside it."""
    root = cached("")
    return not any(p.is_file() for p in root.rglob("*")) if root.exists() else True


def test_an_archive_is_checked_all_or_nothing(release):
    cfg, folder = release
    names = [n for n in cfg.dataset.load.sha256 if n != ARCHIVE]
    # The last file checked is the wrong one: every other file was already extracted, and stays
    # out of the cache with it (the check used to stop at the first mismatch, keeping the rest).
    good = dict(cfg.dataset.load.sha256)
    cfg.dataset.load.sha256 = {**good, names[-1]: "0" * 64}
    with pytest.raises(EmorecError, match=f"checksum mismatch for {names[-1]} from .*nothing of the archive was kept"):
        instantiate(cfg.dataset.load)
    assert nothing_kept()
    cfg.dataset.load.sha256 = good
    assert sizes(instantiate(cfg.dataset.load)) == [5, 2, 3]
    cache = cached("dailydialog")
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == sorted(names)
    assert [p.name for p in cached("").iterdir()] == ["dailydialog"]  # no temporary folder left


def test_the_archive_itself_is_pinned_and_https_falls_back(release, serve, caplog):
    cfg, _ = release
    url = cfg.dataset.load.archive
    pinned = cfg.dataset.load.sha256[ARCHIVE]
    cfg.dataset.load.sha256[ARCHIVE] = "0" * 64
    with pytest.raises(EmorecError, match=f"checksum mismatch for {url}: expected sha256 0000"):
        instantiate(cfg.dataset.load)
    assert nothing_kept()
    # The configured list: HTTPS first; where it does not answer, the next URL, checked the same.
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        default = compose("config", overrides=["dataset=dailydialog"]).dataset.load
    assert default.archive[0].startswith("https://") and len(default.sha256[ARCHIVE]) == 64
    cfg.dataset.load.archive = ["https://127.0.0.1:9/ijcnlp_dailydialog.zip", url]
    cfg.dataset.load.sha256[ARCHIVE] = pinned
    assert sizes(instantiate(cfg.dataset.load)) == [5, 2, 3]
    assert "https://127.0.0.1:9/ijcnlp_dailydialog.zip failed" in caplog.text and f"trying {url}" in caplog.text


def test_downloads_and_archive_members_are_capped(release, serve, monkeypatch, tmp_path):
    cfg, folder = release
    size = (tmp_path / "served" / "ijcnlp_dailydialog.zip").stat().st_size
    monkeypatch.setattr(files, "MAX_BYTES", size - 1)
    with pytest.raises(EmorecError, match=f"ijcnlp_dailydialog.zip is larger than {size - 1} bytes, far above any"):
        instantiate(cfg.dataset.load)
    assert nothing_kept()
    # A member larger than its cap, in an archive under it: the check is per member too.
    big = folder / "train" / "dialogues_train.txt"
    big.write_text(big.read_text() + "filler __eou__ " * 1000)
    archive = _nested_zip(folder)
    monkeypatch.setattr(files, "MAX_BYTES", len(archive) + 100)
    assert big.stat().st_size > files.MAX_BYTES
    target = folder.parent / "big"
    target.mkdir()
    (target / "ijcnlp_dailydialog.zip").write_bytes(archive)
    cfg.dataset.load.archive = serve(target) + "/ijcnlp_dailydialog.zip"
    cfg.dataset.load.sha256[ARCHIVE] = None  # no pin for this other archive
    with pytest.raises(EmorecError, match=r"archive member train/dialogues_train.txt is larger than"):
        instantiate(cfg.dataset.load)
    assert nothing_kept()


def test_a_local_copy_unlike_the_release_is_an_error_with_verify_strict(fixture_dir, caplog):
    folder = fixture_dir("emorynlp")
    data, cfg = load("emorynlp", folder)  # the fixture is not the release: a warning
    assert "not the release's" in caplog.text and len(data.train) > 0
    with pytest.raises(EmorecError, match=r"not the release's .*dataset.verify=strict; replace it with the release"):
        load("emorynlp", folder, "dataset.verify=strict")
    with pytest.raises(EmorecError, match="dataset.verify='sometimes'; use warn or strict"):
        load("emorynlp", folder, "dataset.verify=sometimes")
