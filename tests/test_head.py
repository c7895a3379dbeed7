"""head=classifier: a linear head over the labels on a decoder's last prompt token (emorec.classifier),
through every engine component and adapter, saved with the adapter and reloaded by plain
transformers + PEFT in a fresh process."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from emorec import reference
from emorec.adapters import prepare
from emorec.build import Optimizer
from emorec.classifier import decoder_classifier, head_parameters
from emorec.errors import EmorecError
from emorec.evaluate import predict
from emorec.fast import Fast, candidates, dispatch
from emorec.run import run
from emorec.tasks import Balance, LabelHead, LabelWords
from emorec.tensors import all_logits
from tests.conftest import compose_run
from tests.dataset_fixtures import write_sst
from tests.test_adapters import ADAPTERS

LABELS = ["neutral", "joy", "surprise", "anger"]
PROMPTS = [[5, 9, 30, 41, 7], [5, 9, 30, 12, 13], [5, 9, 30, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 9, 30, 40]]
FIRST = [20, 21, 22, 23]  # the labels' first answer tokens


def classifier(tiny_model, init="labels"):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    return decoder_classifier(lm, LABELS, 2, init, FIRST)


def test_labels_init_predicts_as_first_token_scoring(tiny_model):
    """Before training, the head's logits are the LM's next-token logits at the labels' first
    tokens: the same argmax as first-token label scoring, on every engine component."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    expected = reference.score_labels(lm, PROMPTS, [[t] for t in FIRST], 2, first_token=True)
    model = classifier(tiny_model)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.score.weight.dtype == torch.float32
    assert torch.equal(model.score.weight, lm.get_output_embeddings().weight[FIRST])
    for name, impl in candidates(model):
        scores = impl.scores(model, PROMPTS, [[i] for i in range(len(LABELS))], 2, True)
        assert torch.equal(scores.argmax(-1), expected.argmax(-1)), name
        # Log-probabilities over the labels: the vocabulary's, renormalised over the label set.
        assert torch.allclose(scores.log_softmax(-1), expected.log_softmax(-1), atol=1e-5), name


def test_random_init_needs_no_distinct_first_tokens(tiny_model, tmp_path):
    """SST-5's "very negative" and "very positive" share their first answer token: a head started
    from the label words refuses them, a random head trains on them."""
    write_sst(tmp_path / "sst")
    common = ["dataset=sst5", f"dataset.data_dir={tmp_path / 'sst'}", "head=classifier", "trainer.max_steps=1"]
    common += ["model=hf", f"model.name_or_path={tiny_model}"]
    with pytest.raises(EmorecError, match="head.init=labels needs labels whose answers start with different tokens"):
        run(compose_run(tmp_path / "labels", *common))
    metrics = run(compose_run(tmp_path / "random", *common, "head.init=random"))
    assert metrics["head"] == "classifier" and metrics["train"]["steps"] == 1 and metrics["test"]["n"] > 0


def test_random_init_is_a_new_head(tiny_model):
    model = classifier(tiny_model, "random")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.score.weight.shape == (4, 32)
    assert not torch.allclose(model.score.weight, lm.get_output_embeddings().weight[FIRST])


@pytest.mark.parametrize("adapter", ["lora", "ptuning_v2", "prompt_tuning"])
def test_every_component_matches_the_head_at_the_last_token(adapter, make_cfg, tiny_model):
    """The loss and scores of each engine component equal the head's logits read at each row's
    last token from one unpadded forward pass per prompt; label smoothing spreads over the labels,
    as torch's cross-entropy does."""
    from hydra.utils import instantiate

    cfg = make_cfg(
        f"adapter={adapter}", "head=classifier", "adapter.num_virtual_tokens=4" if "tuning" in adapter else "seed=0"
    )
    model = get_peft_model(classifier(tiny_model), prepare(instantiate(cfg.adapter.peft), None, True))
    with torch.no_grad():  # away from the adapters' identity initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    plain = torch.stack([all_logits(model, input_ids=torch.tensor([p]))[0, -1].log_softmax(-1) for p in PROMPTS])
    targets = [1, 3, 0, 2]
    expected = -plain[range(4), targets].mean()
    smoothed = torch.nn.functional.cross_entropy(plain, torch.tensor(targets), label_smoothing=0.5)
    assert abs(smoothed.item() - expected.item()) > 1e-3  # the two differ here
    answers = [[i] for i in range(len(LABELS))]
    for name, impl in candidates(model):
        assert torch.allclose(impl.scores(model, PROMPTS, answers, 2, True), plain, atol=1e-5), name
        loss = impl.loss(model, PROMPTS, [answers[t] for t in targets], 2)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), name
        loss = impl.loss(model, PROMPTS, [answers[t] for t in targets], 2, None, 0.5)
        assert loss.item() == pytest.approx(smoothed.item(), abs=1e-5), name


def test_weighted_loss_weighs_each_example(tiny_model):
    model = classifier(tiny_model).eval()
    answers = [[i] for i in range(len(LABELS))]
    targets = [1, 3, 0, 2]
    weights = torch.tensor([0.5, 2.0, 1.0, 0.25])
    each = torch.stack([reference.answer_loss(model, [p], [answers[t]], 2) for p, t in zip(PROMPTS, targets)])
    for name, impl in candidates(model):
        loss = impl.loss(model, PROMPTS, [answers[t] for t in targets], 2, weights)
        assert loss.item() == pytest.approx((each * weights).mean().item(), abs=1e-5), name


def test_balance_weights_and_adjustment():
    targets = [0] * 6 + [1] * 3 + [2]
    balance = Balance.of(targets, 4, power=1.0, tau=1.0)
    weights = [balance.weights[t] for t in targets]
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    # Fully balanced: every class present weighs the same in total.
    totals = [sum(w for w, t in zip(weights, targets) if t == c) for c in range(3)]
    assert totals == pytest.approx([totals[0]] * 3)
    # An absent class counts once, the adjustment subtracts tau * log(share).
    assert balance.adjust == pytest.approx([torch.log(torch.tensor(s)).item() for s in (0.6, 0.3, 0.1, 0.1)])
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert balance.adjusted(scores).argmax().item() == 2  # the rare class wins once the prior is out
    assert Balance.of(targets, 4, 0.0, 0.0) == Balance()
    half = Balance.of(targets, 4, power=0.5, tau=0.0)
    assert half.weights[2] / half.weights[0] == pytest.approx(6**0.5)


def test_head_has_its_own_learning_rate(tiny_model, make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg("head=classifier", "head.lr=0.1")
    model = get_peft_model(classifier(tiny_model), prepare(instantiate(cfg.adapter.peft), None, True))
    head = head_parameters(model)
    assert [p.shape for p in head] == [(4, 32)]
    optimizer = Optimizer(instantiate(cfg.optimizer), cfg.head.lr).build(model, torch.device("cpu"))
    lrs = [(g["lr"], len(g["params"])) for g in optimizer.param_groups]
    assert lrs == [(cfg.optimizer.lr, sum(p.requires_grad for p in model.parameters()) - 1), (0.1, 1)]


RELOAD = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base_path, adapter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(base_path)
base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=7, pad_token_id=tok.pad_token_id)
model = PeftModel.from_pretrained(base, adapter).eval()
width = max(map(len, prompts))
ids = torch.tensor([p + [tok.pad_token_id] * (width - len(p)) for p in prompts])
mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
with torch.no_grad():
    probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
print(json.dumps(probs.tolist()))
"""


@pytest.mark.parametrize("adapter", ["lora", "ptuning_v2"])
def test_head_trains_saves_and_reloads_in_a_fresh_process(adapter, make_cfg, tiny_model):
    """The head trains with the adapter and is saved with it: plain transformers and PEFT in
    another process (AutoModelForSequenceClassification on the base, PeftModel.from_pretrained)
    give the predictions and probabilities the run wrote."""
    extra = "adapter.num_virtual_tokens=4" if "tuning" in adapter else "seed=42"
    cfg = make_cfg(f"adapter={adapter}", "head=classifier", extra, "trainer.epochs=1")
    metrics = run(cfg)
    out = Path(cfg.output_dir)
    assert metrics["head"] == "classifier" and metrics["predict"] == "classify"
    assert metrics["train"]["steps"] == 4 and all(0 < loss < 5 for loss in metrics["train"]["losses"])
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "score" in saved["modules_to_save"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    from emorec.data.corpora import load_meld
    from emorec.prompt import PromptFormat, encode_prompts
    from tests.meld_fixture import MELD_DIR

    labels = list(cfg.dataset.labels)
    test = load_meld(labels, data_dir=str(MELD_DIR))["test"]
    prompts = encode_prompts(tokenizer, test, PromptFormat(cfg.prompt.template, cfg.prompt.system), labels, 256)
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_model), str(out / "adapter"), json.dumps(prompts)],
        capture_output=True,
        text=True,
        check=True,
    )
    probs = json.loads(done.stdout.strip().splitlines()[-1])
    with open(out / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert len(rows) == len(probs)
    for p, row in zip(probs, rows):
        assert p == pytest.approx([float(row[f"score_{lab}"]) for lab in labels], abs=1e-4)
        assert labels[max(range(len(p)), key=p.__getitem__)] == row["prediction"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_trains_the_head(adapter, make_cfg):
    extra = "adapter.num_virtual_tokens=4" if "tuning" in adapter else "seed=42"
    cfg = make_cfg(f"adapter={adapter}", "head=classifier", extra, "trainer.epochs=1")
    metrics = run(cfg)
    assert metrics["train"]["steps"] == 4 and metrics["test"]["invalid"] == 0
    out = Path(cfg.output_dir)
    saved = out / ("model/model.safetensors" if adapter == "full" else "adapter/adapter_model.safetensors")
    with safe_open(saved, "pt") as f:
        head = [f.get_tensor(k) for k in f.keys() if "score" in k]
    assert head and all(t.shape[0] == len(cfg.dataset.labels) for t in head)


@pytest.mark.parametrize("adapter", ["lora", "ptuning_v2"])
def test_head_trains_over_a_bf16_base(adapter, make_cfg):
    """With bf16 (a frozen bf16 base, an fp32 head, autocast), P-Tuning v2's prefix from text."""
    extra = "adapter.num_virtual_tokens=4" if "tuning" in adapter else "seed=42"
    metrics = run(
        make_cfg(f"adapter={adapter}", "head=classifier", extra, "trainer.precision=bf16", "trainer.epochs=1")
    )
    assert metrics["precision"] == "bf16" and metrics["train"]["steps"] == 4
    assert all(0 < loss < 5 for loss in metrics["train"]["losses"])


def test_label_smoothing_reaches_the_runs_loss(make_cfg, tmp_path):
    """trainer.label_smoothing: the same seed's first step (the same weights and batch) has another
    loss with it; every value outside [0, 1) is refused in one line."""
    plain, smoothed = (
        run(make_cfg("head=classifier", "seed=3", "trainer.max_steps=1", f"output_dir={tmp_path / name}", *extra))
        for name, extra in (("plain", []), ("smoothed", ["trainer.label_smoothing=0.3"]))
    )
    assert plain["train"]["losses"][0] != pytest.approx(smoothed["train"]["losses"][0], abs=1e-4)
    with pytest.raises(EmorecError, match=r"trainer.label_smoothing=1.0 is not valid; it must be a number in \[0, 1\)"):
        run(make_cfg("trainer.label_smoothing=1.0"))


def test_zero_shot_head_equals_label_scoring(make_cfg):
    """adapter=none: the untrained head (init=labels) predicts what first-token scoring predicts."""
    scoring = run(make_cfg("adapter=none", "trainer.scoring=first_token"))
    head = run(make_cfg("adapter=none", "head=classifier"))
    assert head["test"]["accuracy"] == scoring["test"]["accuracy"]
    assert head["test"]["confusion_matrix"] == scoring["test"]["confusion_matrix"]


def test_head_predictions_through_the_engine(tiny_model):
    model = classifier(tiny_model).eval()
    engine = dispatch(model, Fast(), torch.device("cpu"))
    task = LabelHead(LABELS, 2, engine.answers)
    got = predict(model, task, PROMPTS, engine, batch_size=2, autocast=False)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    lm_engine = dispatch(lm, Fast(), torch.device("cpu"))
    words = LabelWords([[t] for t in FIRST], [[t] for t in FIRST], LABELS, 2, True, lm_engine.answers)
    expected = predict(lm, words, PROMPTS, lm_engine, batch_size=2, autocast=False)
    assert got["preds"] == expected["preds"]
    assert task.describe() == {"predict": "classify", "scoring": None}
