"""What goes with an exported model (emorec.export): a tokenizer that wraps a raw text in the
run's prompt, its measured agreement with the run's own prompt tokens, and the model card.

The prompt is the run's (emorec.prompt) rendered around a marker and cut there: the tokens
before and after the text become the fast tokenizer's post-processor template (added around
the text's own tokens, as BERT's [CLS]/[SEP] are), and the text goes through emorec's own
normalisation first (typographic punctuation to ASCII, runs of whitespace to one space; not the
repair of mis-decoded bytes, which needs Python). Where the prompt has a space before the text,
the text gets it from a normaliser, so its first word tokenises as it does inside the prompt.
"""

import copy
import csv

import yaml
from omegaconf import OmegaConf
from tokenizers import Regex, normalizers, processors

from emorec import __version__
from emorec.build import Spec, prompts_of
from emorec.data.records import ASCII_FOLDS, Example
from emorec.errors import EmorecError
from emorec.prompt import render_prompt

MARK = "EMORECTEXTMARK"


def prompt_parts(trained) -> tuple[list[int], list[int], bool]:
    """(token ids before the text, token ids after it, whether a space precedes the text)."""
    tokenizer, prompt = trained.tokenizer, trained.config.prompt
    rendered = render_prompt(tokenizer, prompt.template, prompt.system, trained.labels, MARK, "", prompt.cue)
    if rendered.count(MARK) != 1:
        raise EmorecError("the prompt template does not place the text once; export needs prompt.template with {text}")
    before, after = rendered.split(MARK)
    space = before.endswith(" ")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    head, tail = encode(before[:-1] if space else before), encode(after)
    if tokenizer.chat_template is None:  # the run added the tokenizer's own special tokens
        plain, wrapped = encode("a"), tokenizer("a")["input_ids"]
        at = next(i for i in range(len(wrapped)) if wrapped[i : i + len(plain)] == plain)
        head, tail = wrapped[:at] + head, tail + wrapped[at + len(plain) :]
    return head, tail, space


def prompt_tokenizer(trained):
    """(a copy of the run's tokenizer that wraps a text in the run's prompt, the prompt's text
    with {text} where the text goes)."""
    head, tail, space = prompt_parts(trained)
    tokenizer = copy.deepcopy(trained.tokenizer)
    backend = tokenizer.backend_tokenizer
    names = {i: f"<emorec_{i}>" for i in {*head, *tail}}  # template pieces, one name per id
    backend.post_processor = processors.TemplateProcessing(
        single=[names[i] for i in head] + ["$A"] + [names[i] for i in tail],
        special_tokens=[(name, i) for i, name in names.items()],
    )
    folds = [normalizers.Replace(k, v) for k, v in ASCII_FOLDS.items()]
    folds += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    folds += [normalizers.Prepend(" ")] if space else []
    if backend.normalizer is not None:
        folds.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(folds)
    tokenizer.model_max_length = int(trained.config.trainer.max_length)
    text = tokenizer.decode(head) + ("{text}" if not space else " {text}") + tokenizer.decode(tail)
    return tokenizer, text


def tokenization_agreement(trained, exported, predictions) -> tuple[int, int]:
    """(texts whose exported tokens are the run's own prompt tokens, texts compared): the run's
    test texts from its predictions.csv."""
    if not predictions.is_file():
        return 0, 0
    with open(predictions, newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["split"] == "test"]
    examples = [Example(str(i), t, 0) for i, t in enumerate(texts)]
    spec = Spec.of(trained.config)
    own = prompts_of(trained.tokenizer, spec, examples, trained.labels, 0)
    theirs = exported(texts)["input_ids"] if texts else []
    return sum(a == b for a, b in zip(own, theirs)), len(texts)


CARD = """---
{front}
---

# {name}

A text classifier over {n} labels ({labels}), exported by emorec {version}
(`emorec export`) from the run `{run}`: {head} head, {adapter} adapter
merged into the weights, {dtype} weights.

## Use

```python
from transformers import pipeline

classify = pipeline("text-classification", model="path/to/this/folder", top_k=None)
classify("I can't believe you did that!")
```

The tokenizer puts each text into the prompt the run was trained with; give the raw utterance:

```
{prompt}
```

For {compared} test texts of the run, the tokenizer gave the run's own prompt tokens for
{same}. The run cut texts too long for its trainer.max_length={max_length}
by words; pass `truncation=True` to cut such texts by tokens instead. Dialogue context is not
part of this model's input.

## The run's evaluation ({record} is the metric of record)

| split | {record} | accuracy | macro F1 | weighted F1 |
|---|---|---|---|---|
{rows}

Data: {dataset}{sizes}. Seed {seed}.

## How it was made

The run's config (emorec's `config.yaml`):

```yaml
{config}
```
"""


def model_card(cfg, labels: list[str], facts: dict) -> str:
    """README.md of an exported model: what it is, how to use it, the run's metrics of record
    and how it was made (the run's config)."""
    metrics = facts["metrics"]
    record = metrics.get("metric", "macro_f1")
    front = {"library_name": "transformers", "pipeline_tag": "text-classification", "tags": ["emorec", "emotion"]}
    rows = [
        f"| {split} | {m.get(record, float('nan')):.4f} | {m.get('accuracy', 0):.4f} | "
        f"{m.get('macro_f1', 0):.4f} | {m.get('weighted_f1', 0):.4f} |"
        for split, m in ((s, metrics.get(s)) for s in ("val", "test"))
        if m
    ]
    counts = metrics.get("data", {}).get("train_counts") or {}
    sizes = [f"train {sum(counts.values())}"] if counts else []
    evaluated = {name: metrics.get(s, {}).get("n") for s, name in (("val", "dev"), ("test", "test"))}
    sizes += [f"{name} {n}" for name, n in evaluated.items() if n]
    return CARD.format(
        front=yaml.safe_dump(front, sort_keys=False).strip(),
        name=f"{cfg.model.name} + {cfg.adapter.name} on {cfg.dataset.name}",
        n=len(labels),
        labels=", ".join(labels),
        version=__version__,
        run=facts["run"],
        head=cfg.head.name,
        adapter=cfg.adapter.name,
        dtype=facts["dtype"],
        prompt=facts["prompt"],
        same=facts["tokens"][0],
        compared=facts["tokens"][1],
        max_length=cfg.trainer.max_length,
        record=record,
        rows="\n".join(rows),
        dataset=cfg.dataset.name,
        sizes=f" ({', '.join(sizes)})" if sizes else "",
        seed=cfg.seed,
        config=OmegaConf.to_yaml(cfg).strip(),
    )
