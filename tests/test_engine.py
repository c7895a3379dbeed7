"""The speed components (emorec.fast) against the reference path (emorec.reference), and the
reference against plain one-sequence-at-a-time computations, on the tiny model."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from emorec import reference
from emorec.batches import passes, train_batches
from emorec.errors import EmorecError
from emorec.evaluate import predict
from emorec.fast import Fast, candidates, dispatch
from emorec.fast.merge import merged_adapter
from emorec.fast.packed import PackedAttention, can_pack, shared_rows
from emorec.fast.prefix import common_prefix
from emorec.fast.streams import Streamed, draws_random, streamed
from emorec.tasks import LabelWords
from emorec.train import OnePass, Passes, Plan, TrainingProgress, train
from tests.conftest import TINY_SIZES

TOL = 1e-4  # fp32; padding, packing and batching only reorder floating-point sums

PROMPTS = [[5, 9, 30, 41, 7], [12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
ANSWERS = [[20, 2], [21, 22, 2], [23, 24, 25, 2], [26]]
SHARED = [[5, 9, 30, 41, 7, 8], [5, 9, 30, 12, 13], [5, 9, 30, 41, 3, 4, 6, 10, 11]]
# Rows of different lengths after the shared [5, 9, 30]; the last has one token before its
# answer, shorter than the longest answer (its unused positions reach into the row before).
PACKED_PROMPTS = SHARED + [[5, 9, 30, 7]]
PACKED_ANSWERS = [ANSWERS[0], ANSWERS[2], ANSWERS[1], ANSWERS[3]]
CPU = torch.device("cpu")
# The equivalence tests run on the CPU, and on a GPU where there is one (`make gpu-check`).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def model(tiny_model, device):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval().to(device)


def lora_model(tiny_model, dtype=torch.float32, device=CPU, **kwargs):
    """The tiny model with a LoRA adapter whose B is not zero, so the adapter changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft.eval().to(device)


def seq_logprob(model, prompt, answer):
    """log P(answer | prompt) from one unpadded full forward pass (the last positions are the
    input's, after any virtual tokens)."""
    ids = torch.tensor([prompt + answer], device=model.device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, -ids.shape[1] :].float(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


def next_token(model, prompt, answer) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits predicting each answer token, those tokens) from one unpadded forward pass."""
    ids = torch.tensor([prompt + answer], device=model.device)
    logits = model(input_ids=ids).logits[0, -ids.shape[1] :].float()
    return logits[len(prompt) - 1 : -1], ids[0, len(prompt) :]


def names(model) -> list[str]:
    return [name for name, _ in candidates(model)]


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the calls of the packed attention, so a test knows the packed path ran."""
    import emorec.fast.packed

    real, calls = emorec.fast.packed.packed_attention, []

    def counted(*args, **kwargs):
        calls.append(kwargs["packed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(emorec.fast.packed, "packed_attention", counted)
    return calls


def test_the_reference_matches_one_sequence_at_a_time(model):
    loss = reference.answer_loss(model, PROMPTS, ANSWERS[:3], pad_id=2)
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(PROMPTS, ANSWERS[:3])) / 3
    assert loss.item() == pytest.approx(expected, abs=TOL)
    # Label smoothing: each answer token's cross-entropy as torch's, summed over the answer.
    smoothed = reference.answer_loss(model, PROMPTS, ANSWERS[:3], pad_id=2, smoothing=0.1)
    cross_entropy = torch.nn.functional.cross_entropy
    each = [
        cross_entropy(*next_token(model, p, a), label_smoothing=0.1, reduction="sum")
        for p, a in zip(PROMPTS, ANSWERS[:3])
    ]
    assert smoothed.item() == pytest.approx(sum(each).item() / 3, abs=TOL) and smoothed.item() > loss.item()
    for first_token in (False, True):
        scores = reference.score_labels(model, PROMPTS, ANSWERS, pad_id=2, first_token=first_token)
        for i, p in enumerate(PROMPTS):
            for j, a in enumerate(ANSWERS):
                assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a[:1] if first_token else a), abs=TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_component_gives_the_reference_loss_and_gradients(tiny_model, device, packed_calls, smoothing):
    """With label smoothing too (over the vocabulary: reference.target_logp)."""
    model = lora_model(tiny_model, device=device).train()  # nonzero B, and dropout off (as the default)
    assert names(model) == ["packed pass (SDPA)", "packed pass", "prefix cache", "head at positions", "reference"]
    results = {}
    for name, impl in candidates(model):
        model.zero_grad()
        loss = impl.loss(model, PACKED_PROMPTS, PACKED_ANSWERS, 2, None, smoothing)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (loss.item(), grads)
    assert len(packed_calls) == 2 and packed_calls[0].n == 3 and packed_calls[0].rows == 4  # one per layer
    ref_loss, ref_grads = results.pop("reference")
    assert ref_grads.abs().sum() > 0
    for name, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, abs=TOL), name
        assert torch.allclose(grads, ref_grads, atol=1e-5), name


@pytest.mark.parametrize("first_token", [False, True])
def test_every_component_gives_the_reference_scores(model, first_token, packed_calls):
    expected = reference.score_labels(model, PACKED_PROMPTS, ANSWERS, 2, first_token)
    for name, impl in candidates(model):
        with torch.no_grad():  # as predict computes the evaluation set's prefix
            prefix = impl.open(model, PACKED_PROMPTS)
        for cached in (prefix, None):  # the set's prefix, or each batch's own
            scores = impl.scores(model, PACKED_PROMPTS, ANSWERS, 2, first_token, cached)
            assert torch.allclose(scores, expected, atol=TOL), name
    if first_token:  # the packed pass scored on the prefix's cache, rows without padding
        assert packed_calls and packed_calls[0].prefix is not None and packed_calls[0].index.shape == (4, 6)


def test_common_prefix_keeps_a_last_token():
    assert common_prefix(SHARED) == 3 and common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix(PROMPTS) == 0


def test_parse_label():
    labels = ["neutral", "joy", "sadness"]
    assert reference.parse_label("Sadness", labels) == 2
    assert reference.parse_label("The answer is joy, not neutral.", labels) == 1
    assert reference.parse_label("joyful", labels) == -1
    assert reference.parse_label("", labels) == -1


def test_train_batches_cover_every_example_once():
    lengths = [(i * 37) % 50 for i in range(103)]
    batches = train_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert batches == train_batches(lengths, 8, torch.Generator().manual_seed(0))


def test_shared_rows_run_the_common_start_of_rows_once():
    tokens, depth, last, layout = shared_rows([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]])
    assert tokens == [1, 2, 3, 4, 5] and depth == [0, 1, 2, 2, 0] and last == [2, 3, 2, 4]
    assert layout.index.tolist() == [[0, 1, 2], [0, 1, 3], [0, 1, 2], [4, 4, 4]]
    assert layout.keep.tolist() == [0, 1, 2, 5, 9]  # each token's first place in the 4 x 3 layout


def test_rows_that_start_alike_score_as_if_run_alone(model, packed_calls):
    # After the shared [5, 9, 30]: two identical rows, two that share a start, one of one token.
    prompts = [[5, 9, 30, 41, 7], [5, 9, 30, 41, 8, 12], [5, 9, 30, 41, 7], [5, 9, 30, 7], [5, 9, 30, 41, 8, 3]]
    packed = [(name, impl) for name, impl in candidates(model) if name.startswith("packed pass")]
    assert [name for name, _ in packed] == ["packed pass (SDPA)", "packed pass"]
    for name, impl in packed:
        with torch.no_grad():
            prefix = impl.open(model, prompts)
        scores = impl.scores(model, prompts, ANSWERS, 2, True, prefix)
        for i, p in enumerate(prompts):
            for j, a in enumerate(ANSWERS):
                assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a[:1]), abs=TOL), name
        assert torch.equal(scores[0], scores[2]), name
    # 41, 41 7, 41 8, 41 8 12, 7, 41 8 3: 6 tokens run instead of 11.
    assert len(packed_calls[0].keep) == 6


def test_the_dispatcher_skips_components_a_model_cannot_use(tiny_model):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, MistralConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert can_pack(base)
    prefix_tuned = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert names(prefix_tuned) == ["head at positions", "reference"]
    sizes = dict(vocab_size=64, **TINY_SIZES)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**sizes, sliding_window=4))
    assert names(windowed) == ["prefix cache", "head at positions", "reference"]
    expected = reference.answer_loss(windowed, PACKED_PROMPTS, PACKED_ANSWERS, 2).item()
    for name, impl in candidates(windowed):
        assert impl.loss(windowed, PACKED_PROMPTS, PACKED_ANSWERS, 2).item() == pytest.approx(expected, abs=TOL), name
    assert can_pack(AutoModelForCausalLM.from_config(LlamaConfig(**sizes)))
    assert not can_pack(AutoModelForCausalLM.from_config(LlamaConfig(**sizes, attention_dropout=0.1)))
    assert dispatch(base, Fast(**OFF), CPU).chosen["answers"] == "reference"


OFF = dict(share_prefix=False, pack=False, head_at=False, bf16_base=False, merge_adapter=False, token_batches=False)


def test_components_put_virtual_tokens_first(tiny_model):
    """Prompt tuning puts virtual tokens before the input; positions counted from the end
    still pick each row's answer positions."""
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    assert names(model) == ["head at positions", "reference"]
    for name, impl in candidates(model):
        scores = impl.scores(model, PROMPTS, ANSWERS, 2, False)
        for i, p in enumerate(PROMPTS):
            for j, a in enumerate(ANSWERS):
                assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a), abs=TOL), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_adapter_scores_the_same_and_restores_weights_bit_for_bit(tiny_model, dtype):
    model = lora_model(tiny_model, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = next(k for k in before if "q_proj.base_layer.weight" in k)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        unmerged = reference.score_labels(model, SHARED, ANSWERS, 2)
        with merged_adapter(model):
            assert not torch.equal(model.state_dict()[q], before[q])  # the adapter is folded in
            merged = reference.score_labels(model, SHARED, ANSWERS, 2)
        after = reference.score_labels(model, SHARED, ANSWERS, 2)
    # fp32: merging only reorders sums; bf16: the merged weight is rounded to bf16 once.
    assert torch.allclose(merged, unmerged, atol=TOL if dtype == torch.float32 else 0.1)
    assert torch.equal(after, unmerged)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


# The fast bf16 path against the fp32 reference: bf16 keeps about 3 significant digits, so a
# log-likelihood of magnitude ~6 may move by a few hundredths. Documented tolerance: 0.05.
BF16_TOL = 0.05


def test_bf16_fast_path_matches_the_fp32_reference(tiny_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    ref_model = lora_model(tiny_model)
    fast = lora_model(tiny_model, torch.bfloat16)  # bf16 base, fp32 adapter (as run() sets it up)
    for module in fast.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    ref_loss = reference.answer_loss(ref_model, SHARED, ANSWERS[:3], 2)
    ref_scores = reference.score_labels(ref_model, SHARED, ANSWERS, 2)
    engine = dispatch(fast, Fast(), CPU)
    assert engine.chosen["answers"] == "packed pass"
    with torch.autocast("cpu", torch.bfloat16):
        fast_loss = engine.answers.loss(fast, SHARED, ANSWERS[:3], 2)
        with engine.merge(fast):
            fast_scores = engine.answers.scores(fast, SHARED, ANSWERS, 2, False)
    assert fast_loss.item() == pytest.approx(ref_loss.item(), abs=BF16_TOL)
    assert torch.allclose(fast_scores, ref_scores, atol=BF16_TOL)
    top2 = ref_scores.topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 2 * BF16_TOL  # rows whose winner no rounding can change
    assert clear.sum() >= 2
    assert torch.equal(fast_scores.argmax(-1)[clear], ref_scores.argmax(-1)[clear])


@pytest.mark.parametrize(
    "first_token,batch_size,streams", [(False, 1, 1), (True, 1, 1), (True, 8, 1), (False, 1, 2), (True, 1, 2)]
)
def test_predict_reuses_one_prefix_cache_across_batches_exactly(model, first_token, batch_size, streams):
    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13, 3, 4, 6]]
    # batch_size=1: several batches, each continuing the prefix cache; 8: rows of different
    # lengths in one batch (packed, for first-token scoring). streams=2: two batches at a time,
    # in two threads.
    threads, attention = torch.get_num_threads(), model.config._attn_implementation
    engine = dispatch(model, Fast(eval_streams=streams), model.device)
    task = LabelWords(ANSWERS, ANSWERS, ["a", "b", "c", "d"], 2, first_token, engine.answers)
    out = predict(model, task, prompts, engine, batch_size=batch_size, autocast=False)
    assert torch.get_num_threads() == threads and model.config._attn_implementation == attention
    for i, p in enumerate(prompts):
        plain = torch.tensor([seq_logprob(model, p, a[:1] if first_token else a) for a in ANSWERS])
        assert torch.allclose(torch.tensor(out["extra"][i]), torch.softmax(plain, -1), atol=TOL)
        assert out["preds"][i] == int(plain.argmax())


def make_passes(model, prompts, answers, impl=None, threads=None, max_tokens=None) -> Passes:
    """Passes over (prompts, answers) through an answer component (the packed pass by default);
    `threads` collects the names of the threads that ran the loss."""
    impl = impl or next(i for name, i in candidates(model) if name != "packed pass (SDPA)")

    def loss_of(rows):
        if threads is not None:
            threads.add(threading.current_thread().name)
        return impl.loss(model, [prompts[j] for j in rows], [answers[j] for j in rows], 2)

    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    return Passes(loss_of, lengths, lambda rows: impl.shared_length(model, [prompts[j] for j in rows]), max_tokens)


def sgd_train(
    model, backward, steps: int, batch_size: int, max_grad_norm=None
) -> tuple[TrainingProgress, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    progress = train(model, backward, optimizer, scheduler, Plan(steps, batch_size, max_grad_norm=max_grad_norm))
    return progress, torch.cat([p.detach().flatten() for p in params])


def test_train_stops_on_a_nan_loss_before_any_checkpoint(tiny_model):
    """The loop reads losses only when a callback asks (a log, a checkpoint: no host sync inside
    a step); the first read after a NaN stops training, so no checkpoint holds broken weights."""
    model = lora_model(tiny_model).train()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a[0, 0] = float("nan")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved = []

    def save(progress, epoch):  # as Checkpointer.save: the state first, then the files
        progress.state_dict()
        saved.append(progress.step)

    checkpointer = SimpleNamespace(on_step=save, on_epoch_end=saved.append, close=lambda: 0, done=lambda p: False)
    backward = OnePass(make_passes(model, SHARED, ANSWERS[:3]))
    with pytest.raises(EmorecError, match=r"^loss is nan at step 1; lower optimizer.lr"):
        train(model, backward, optimizer, scheduler, Plan(3, 3, max_grad_norm=None), [checkpointer])
    assert saved == []


def test_a_batch_split_into_passes_gives_the_same_update(tiny_model):
    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13, 3, 4, 6]]
    answers = [ANSWERS[i % 3] for i in range(len(prompts))]
    results = []
    for budget in (None, 8):
        model = lora_model(tiny_model).train()
        progress, weights = sgd_train(model, OnePass(make_passes(model, prompts, answers, max_tokens=budget)), 2, 5)
        results.append((progress.losses, weights))
    assert len(passes(list(range(5)), 11, 8)) == 5  # 5 rows x 11 tokens > 8 each
    assert results[0][0] == pytest.approx(results[1][0], abs=TOL)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_training_progress_round_trips_through_its_state_dict():
    progress = TrainingProgress(step=3, epoch=1, batch=2, generator=torch.Generator().get_state(), losses=[1.0, 0.5])
    again = TrainingProgress()
    again.load_state_dict(progress.state_dict())
    assert again.step == 3 and again.losses == [1.0, 0.5] and torch.equal(again.generator, progress.generator)
    assert again.summary()["steps"] == 3


def test_streams_give_results_in_order_and_stop_on_an_error():
    threads = torch.get_num_threads()
    with streamed(lambda x: x * x, list(range(7)), 2) as results:
        assert list(results) == [x * x for x in range(7)]
    started = []

    def fail_on_one(x):
        started.append(x)
        time.sleep(0.05)
        if x == 1:
            raise ValueError("bad batch")
        return x

    with pytest.raises(ValueError, match="bad batch"), streamed(fail_on_one, list(range(40)), 2) as results:
        list(results)
    assert len(started) < 40  # the batches not started were dropped
    assert torch.get_num_threads() == threads


def test_head_positions_and_attention_choice_belong_to_one_thread_and_leave_no_trace(model):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from emorec.fast.lm_head import HeadAt

    head, ids, seen = HeadAt(model), torch.tensor([[5, 9, 30, 41, 7]], device=model.device), []
    with head.at(torch.ones(1, 1, dtype=torch.long, device=model.device)), torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == 1
        other = threading.Thread(target=lambda: seen.append(model(input_ids=ids).logits.shape[1]))
        other.start()
        other.join()
    assert seen == [5]  # another thread's forward keeps every position
    assert model(input_ids=ids).logits.shape[1] == 5  # and so does this one after the context
    assert not model.lm_head._forward_pre_hooks  # the hook is gone
    before, attention = model.config._attn_implementation, PackedAttention(model)
    with attention.packed(), attention.packed():
        assert model.config._attn_implementation == attention.name and attention.name in ALL_ATTENTION_FUNCTIONS
    assert model.config._attn_implementation == before and attention.name not in ALL_ATTENTION_FUNCTIONS


def train_lora(tiny_model, streams: int, **lora_kwargs) -> tuple[dict, torch.Tensor]:
    """Two SGD steps of batch 4 on prompts sharing a 3-token prefix, with the backward the
    dispatcher picks for `streams`: (train stats with the threads that ran the loss, weights)."""
    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13]]
    answers = [ANSWERS[i % 3] for i in range(len(prompts))]
    model = lora_model(tiny_model, **lora_kwargs).train()
    threads = set()
    engine = dispatch(model, Fast(train_streams=streams), torch.device("cpu"))
    backward = engine.backward(model, make_passes(model, prompts, answers, threads=threads))
    torch.manual_seed(1)  # dropout's masks, where there is dropout
    progress, weights = sgd_train(model, backward, 2, 4, max_grad_norm=1.0)
    stats = {"threads": threads, "backward": type(backward), "chosen": engine.chosen}
    return {**progress.summary(), **stats}, weights


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="streams need two intra-op threads")
def test_training_streams_give_the_update_of_one_pass_and_repeat_exactly(tiny_model):
    one, one_weights = train_lora(tiny_model, streams=1)
    two, two_weights = train_lora(tiny_model, streams=2)
    again, again_weights = train_lora(tiny_model, streams=2)
    assert one["backward"] is OnePass and two["backward"] is Streamed
    assert two["chosen"]["train streams"] == 2 and two["chosen"]["backward"] == "streams"
    assert two["losses"] == pytest.approx(one["losses"], abs=TOL)
    assert torch.allclose(two_weights, one_weights, atol=1e-5)
    start = torch.cat([p.detach().flatten() for p in lora_model(tiny_model).parameters() if p.requires_grad])
    assert (two_weights - start).abs().max() > 1e-3  # the steps did move the weights
    # Gradients are summed in piece order, whichever thread finishes first.
    assert again["losses"] == two["losses"] and torch.equal(again_weights, two_weights)
    assert two["tokens"] == one["tokens"]
    # Batches of 4 ran in the streams' threads (and the epoch's last row, a batch of 1, here).
    # Which of the two threads takes which piece is the OS's choice: one may take both.
    streams = two["threads"] - {threading.current_thread().name}
    assert streams and streams <= {"emorec-stream_0", "emorec-stream_1"}
    assert one["threads"] == {threading.current_thread().name}


def test_training_with_dropout_keeps_one_stream(tiny_model):
    assert draws_random(lora_model(tiny_model, lora_dropout=0.1).train())
    assert not draws_random(lora_model(tiny_model).train())
    one, one_weights = train_lora(tiny_model, streams=1, lora_dropout=0.1)
    two, two_weights = train_lora(tiny_model, streams=2, lora_dropout=0.1)
    # The same masks in the same order: the same pass, bit for bit.
    assert two["backward"] is OnePass
    assert two["chosen"]["train streams"] == 1 and two["chosen"]["backward"] == "one pass"  # what ran, recorded
    assert two["losses"] == one["losses"] and torch.equal(two_weights, one_weights)
    assert two["computed_tokens"] == one["computed_tokens"] and two["threads"] == one["threads"]


@pytest.mark.parametrize("bf16", [True, False])
def test_the_load_plan_follows_the_switches_and_fast_off_turns_it_all_off(tiny_model, bf16):
    """Under bf16 autocast the default plan stores a frozen base in bf16 and lets adapter inputs
    stay bf16; fast=off (every switch off) loads fp32 and keeps PEFT's casts; a base that trains
    stays fp32 whatever the switches."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from emorec.fast import apply_input_casts, plan_load

    off = Fast(**{f: False for f in ("share_prefix", "pack", "head_at", "bf16_base", "bf16_adapter_inputs")})
    auto = plan_load(Fast(), CPU, bf16, trains_base=False)
    assert auto.dtype == (torch.bfloat16 if bf16 else torch.float32) and auto.input_casts is not bf16
    plain = plan_load(off, CPU, bf16, trains_base=False)
    assert plain.dtype == torch.float32 and plain.input_casts
    assert plan_load(Fast(), CPU, bf16, trains_base=True).dtype == torch.float32
    for plan in (auto, plain):
        model = lora_model(tiny_model)
        apply_input_casts(model, plan)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled == plan.input_casts for m in layers)
