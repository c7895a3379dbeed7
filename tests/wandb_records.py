"""Read a W&B offline run file (.wandb): LevelDB-log framing around protobuf Records.

wandb >= 0.2x no longer ships a Python reader (its core is in Go) and offline runs no longer
write wandb-summary.json, so the tests read the records themselves to check what a run holds.
"""

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < HEADER.size:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        chunk, pos = data[pos : pos + length], pos + length
        if kind == FULL:
            whole = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            whole = pending + chunk
        else:
            break  # zero padding at the end of the file
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        yield record


def read_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """config, summary, history rows, group, name, id and artifacts from an offline run folder. W&B's core
    process writes the file asynchronously and may still be flushing after run.finish()
    returns, so this rereads (for at most `timeout` seconds) until the run and summary are in."""
    deadline = time.monotonic() + timeout
    while True:
        out = _read_run(run_dir)
        if (out["group"] is not None and out["summary"]) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_run(run_dir: Path) -> dict:
    out = {"config": {}, "summary": {}, "history": [], "group": None, "name": None, "id": None, "artifacts": []}
    for record in records(next(run_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"] = record.run.run_group
            out["name"] = record.run.display_name
            out["id"] = record.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            files = [entry.path for entry in a.manifest.contents]
            out["artifacts"].append(
                {"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"), "files": files}
            )
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return out
