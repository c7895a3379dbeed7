"""dataset=hf: any dataset that Hugging Face `datasets` opens (a hub name, a local folder, a
save_to_disk folder, or a builder such as parquet, csv or json over data files), its rows then
turned into splits by the same rules as a user's csv or jsonl (emorec.data.tables)."""

import contextlib
import os
from pathlib import Path

from emorec.data.files import hub_offline
from emorec.data.readers import BadRows
from emorec.data.records import SPLITS, Splits
from emorec.data.tables import Columns, table_splits
from emorec.errors import EmorecError

# --- Hugging Face datasets ----------------------------------------------------------------------

DEV_NAMES = ("validation", "dev", "valid", "val")


def load_hf(
    labels: list[str] | None = None,
    splits=None,
    columns=None,
    dev_fraction: float = 0.1,
    multi_label: str = "error",
    on_bad_row: str = "error",
    **source,
) -> Splits:
    """Any dataset `datasets.load_dataset(**source)` opens (source: path, name, revision,
    data_files, ...), or a folder written by save_to_disk. splits maps train/dev/test to the
    dataset's split names (dev null: validation, dev, valid or val if there is one, else held
    out of train). Label names come from a ClassLabel feature, unless `labels` rewords them."""
    dataset = open_hf(source)
    columns = Columns.of(columns)
    chosen = _chosen_splits(dataset, dict(splits or {}), source["path"], columns.split is not None)
    names = _label_names(dataset[chosen[0][1]], columns.label, labels, source["path"])
    rows = {}
    for split, name in chosen:
        part = dataset[name]
        missing = {role: c for role, c in columns.assigned().items() if c not in part.column_names}
        if missing:
            raise EmorecError(
                f"dataset {source['path']} split {name} has no column(s) {', '.join(missing.values())} "
                f"(it has {', '.join(part.column_names)}); set "
                + " ".join(f"dataset.load.columns.{key}=..." for key in missing)
            )
        values = part.select_columns(columns.named()).to_dict()
        where = f"{source['path']}:{name}"
        rows[split] = [
            (f"{where}:{i}", {c: _value(values[c][i], names if c == columns.label else None) for c in values})
            for i in range(len(part))
        ]
    return table_splits(rows, labels or names, columns, dev_fraction, multi_label, BadRows("hf data", on_bad_row))


def open_hf(source: dict):
    """The DatasetDict that load_dataset (or load_from_disk, for a save_to_disk folder) opens."""
    import datasets

    source = {k: _plain(v) for k, v in source.items() if v is not None}
    path = source.get("path")
    if not path:
        raise EmorecError(
            "dataset=hf needs dataset.load.path: a hub name, a local folder, a save_to_disk folder, "
            "or a builder (parquet, csv, json) with dataset.load.data_files"
        )
    folder = Path(path).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
    else:
        from datasets import packaged_modules

        builders = getattr(packaged_modules, "_PACKAGED_DATASETS_MODULES", {})
        hub = not folder.exists() and path not in builders
        try:
            with cached_only(hub and hub_offline()):
                loaded = datasets.load_dataset(**source)
        except Exception as e:  # datasets raises many kinds; the user needs one line
            raise EmorecError(_hf_load_error(source, e)) from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


@contextlib.contextmanager
def cached_only(on: bool):
    """The hub libraries in offline mode while the block runs (when `on`): with the hub out of
    reach they would retry for half a minute before reading the cache or giving up. Their
    offline switch is a module constant read at import, so it is set and put back here."""
    import datasets
    import huggingface_hub.constants as hub

    if not on:
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _hf_load_error(source: dict, error: Exception) -> str:
    import datasets

    what = ", ".join(f"{k}={v}" for k, v in source.items())
    problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, ConnectionError) or datasets.config.HF_HUB_OFFLINE:
        cache = os.environ.get("HF_DATASETS_CACHE", datasets.config.HF_DATASETS_CACHE)
        return (
            f"cannot load dataset ({what}): {problem}; it is not in the Hugging Face cache ({cache}) and the "
            "hub is offline or unreachable: load it once online, or point dataset.load.path at local files "
            "(a folder, a save_to_disk folder, or parquet/csv/json with dataset.load.data_files)"
        )
    return f"cannot load dataset ({what}): {problem}; check dataset.load.path, name, revision and data_files"


def _plain(value):
    """OmegaConf containers as plain ones (load_dataset checks for dict and list)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _chosen_splits(dataset, splits: dict, path: str, by_column: bool) -> list[tuple[str, str]]:
    """[(emorec split, dataset split)]: every split of the dataset when a column routes rows."""
    have = list(dataset)
    if by_column:
        return [(name, name) for name in have]
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise EmorecError(f"dataset.load.splits has key(s) {', '.join(sorted(unknown))}; use train, dev, test")
    dev = splits.get("dev") or next((n for n in DEV_NAMES if n in have), None)
    chosen = [("train", splits.get("train") or "train"), ("dev", dev), ("test", splits.get("test") or "test")]
    for split, name in chosen:
        if name is not None and name not in have:
            raise EmorecError(
                f"dataset {path} has no split {name!r} (it has {', '.join(have)}); "
                f"set dataset.load.splits.{split} to one of them"
            )
    return [(split, name) for split, name in chosen if name is not None]


def _label_names(part, column: str, labels: list[str] | None, path: str) -> list[str] | None:
    """The label names of integer labels: a ClassLabel feature's (or `labels`, rewording them
    in index order); None for labels that are text. Integers without names need `labels`."""
    import datasets

    lists = tuple(getattr(datasets, kind) for kind in ("Sequence", "List", "LargeList") if hasattr(datasets, kind))
    feature = part.features.get(column)
    while isinstance(feature, (*lists, list)):  # multi-label: a list of labels
        feature = feature[0] if isinstance(feature, list) else feature.feature
    if isinstance(feature, datasets.ClassLabel):
        if labels is not None and len(labels) != feature.num_classes:
            raise EmorecError(
                f"dataset.labels has {len(labels)} names for the {feature.num_classes} classes of "
                f"{path}'s {column} ({', '.join(feature.names)}); give one per class, in that order"
            )
        return list(labels or feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        if labels is None:
            raise EmorecError(
                f"{path}'s {column} column holds integers without names; name them in index order "
                "with dataset.labels=[name0,name1,...]"
            )
        return list(labels)
    return None


def _value(value, names: list[str] | None):
    """A cell as text; an integer label as its name (-1, HF's "no label", as none)."""
    if isinstance(value, list):
        return [_value(v, names) for v in value]
    if value is None or (names is not None and value == -1):
        return None
    if names is not None:
        return names[value] if 0 <= value < len(names) else f"class {value}"
    return str(value)
