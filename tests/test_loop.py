"""The fast paths (left padding, logits only at answer positions, cached label scoring) against
plain one-sequence-at-a-time computations on the tiny model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from emorec.errors import EmorecError
from emorec.loop import answer_loss, parse_label, score_labels, train_batches
from tests.conftest import TINY_SIZES

TOL = 1e-4  # fp32; padding and batching only reorder floating-point sums


@pytest.fixture
def model(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def seq_logprob(model, prompt, answer):
    """log P(answer | prompt) from one unpadded full forward pass."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


PROMPTS = [[5, 9, 30, 41, 7], [12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
ANSWERS = [[20, 2], [21, 22, 2], [23, 24, 25, 2], [26]]


def test_score_labels_matches_plain_forward(model):
    scores = score_labels(model, PROMPTS, ANSWERS, pad_id=2)
    for i, p in enumerate(PROMPTS):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a), abs=TOL)


def test_answer_loss_matches_plain_forward(model):
    answers = [ANSWERS[0], ANSWERS[2], ANSWERS[3]]
    loss = answer_loss(model, PROMPTS, answers, pad_id=2)
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(PROMPTS, answers)) / len(PROMPTS)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_parse_label():
    labels = ["neutral", "joy", "sadness"]
    assert parse_label("Sadness", labels) == 2
    assert parse_label("The answer is joy, not neutral.", labels) == 1
    assert parse_label("joyful", labels) == -1
    assert parse_label("", labels) == -1


def test_train_batches_cover_every_example_once():
    lengths = [(i * 37) % 50 for i in range(103)]
    batches = train_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(103))
    again = train_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert batches == again


SHARED = [[5, 9, 30, 41, 7, 8], [5, 9, 30, 12, 13], [5, 9, 30, 41, 3, 4, 6, 10, 11]]


def test_shared_prefix_is_found_and_exact(model):
    from emorec.loop import common_prefix

    assert common_prefix(SHARED) == 3 and common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # keeps a last token
    assert common_prefix(PROMPTS) == 0
    answers = [ANSWERS[0], ANSWERS[1], ANSWERS[2]]
    shared = answer_loss(model, SHARED, answers, pad_id=2)
    assert shared.item() == pytest.approx(
        answer_loss(model, SHARED, answers, pad_id=2, share_prefix=False).item(), abs=TOL
    )
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(SHARED, answers)) / len(SHARED)
    assert shared.item() == pytest.approx(expected, abs=TOL)
    scores = score_labels(model, SHARED, ANSWERS, pad_id=2)
    for i, p in enumerate(SHARED):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a), abs=TOL)


def test_shared_prefix_gradients_equal_the_unshared_ones(model):
    model.train()
    grads = []
    for share in (True, False):
        model.zero_grad()
        answer_loss(model, SHARED, ANSWERS[:3], pad_id=2, share_prefix=share).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the calls of the packed attention, so a test knows the packed path ran."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from emorec.loop import PACKED, packed_attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["packed"])
        return packed_attention(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, PACKED, counted)
    return calls


# Rows of different lengths after the shared [5, 9, 30]; the last has one token before its
# answer, shorter than the longest answer (its unused positions reach into the row before).
PACKED_PROMPTS = SHARED + [[5, 9, 30, 7]]
PACKED_ANSWERS = [ANSWERS[0], ANSWERS[2], ANSWERS[1], ANSWERS[3]]


def test_packed_pass_gives_the_loss_and_gradients_of_the_batch_of_one_prefix_pass(tiny_model, packed_calls):
    from emorec.loop import can_pack

    model = lora_model(tiny_model).train()  # an adapter with nonzero B, and dropout off (as the default)
    assert can_pack(model)
    results = []
    for pack in (True, False):
        model.zero_grad()
        loss = answer_loss(model, PACKED_PROMPTS, PACKED_ANSWERS, pad_id=2, pack=pack)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), grads))
        if pack:
            assert len(packed_calls) == 2 and packed_calls[0].n == 3 and packed_calls[0].rows == 4  # one per layer
    assert results[0][0] == pytest.approx(results[1][0], abs=TOL)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5) and results[0][1].abs().sum() > 0
    expected = -sum(seq_logprob(model, p, a) for p, a in zip(PACKED_PROMPTS, PACKED_ANSWERS)) / 4
    assert results[0][0] == pytest.approx(expected, abs=TOL)


def test_packed_first_token_scores_on_the_prefix_cache_match_plain_forward(model, packed_calls):
    from emorec.loop import prefix_cache

    with torch.no_grad():  # as predict computes it
        prefix = (3, prefix_cache(model, PACKED_PROMPTS[0][:3]))
    scores = score_labels(model, PACKED_PROMPTS, ANSWERS, pad_id=2, first_token=True, prefix=prefix)
    assert packed_calls and packed_calls[0].prefix is not None and packed_calls[0].index.shape == (4, 6)
    unpacked = score_labels(model, PACKED_PROMPTS, ANSWERS, pad_id=2, first_token=True, prefix=prefix, pack=False)
    assert torch.allclose(scores, unpacked, atol=TOL)
    for i, p in enumerate(PACKED_PROMPTS):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a[:1]), abs=TOL)


def test_shared_rows_run_the_common_start_of_rows_once():
    from emorec.loop import shared_rows

    tokens, depth, last, layout = shared_rows([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]])
    assert tokens == [1, 2, 3, 4, 5] and depth == [0, 1, 2, 2, 0] and last == [2, 3, 2, 4]
    assert layout.index.tolist() == [[0, 1, 2], [0, 1, 3], [0, 1, 2], [4, 4, 4]]
    assert layout.keep.tolist() == [0, 1, 2, 5, 9]  # each token's first place in the 4 x 3 layout


def test_rows_that_start_alike_score_as_if_run_alone(model, packed_calls):
    from emorec.loop import prefix_cache

    # After the shared [5, 9, 30]: two identical rows, two that share a start, one of one token.
    prompts = [[5, 9, 30, 41, 7], [5, 9, 30, 41, 8, 12], [5, 9, 30, 41, 7], [5, 9, 30, 7], [5, 9, 30, 41, 8, 3]]
    with torch.no_grad():
        prefix = (3, prefix_cache(model, prompts[0][:3]))
    scores = score_labels(model, prompts, ANSWERS, pad_id=2, first_token=True, prefix=prefix)
    # 41, 41 7, 41 8, 41 8 12, 7, 41 8 3: 6 tokens run instead of 11.
    assert len(packed_calls[0].keep) == 6
    for i, p in enumerate(prompts):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a[:1]), abs=TOL)
    assert torch.equal(scores[0], scores[2])


def test_models_the_packed_attention_cannot_compute_keep_the_batch_of_one_pass(tiny_model):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, MistralConfig

    from emorec.loop import can_pack

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert can_pack(base)
    assert not can_pack(get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)))
    sizes = dict(vocab_size=64, **TINY_SIZES)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**sizes, sliding_window=4))
    assert not can_pack(windowed)
    loss = answer_loss(windowed, PACKED_PROMPTS, PACKED_ANSWERS, pad_id=2)
    assert loss.item() == pytest.approx(
        answer_loss(windowed, PACKED_PROMPTS, PACKED_ANSWERS, 2, share_prefix=False).item(), abs=TOL
    )
    assert can_pack(AutoModelForCausalLM.from_config(LlamaConfig(**sizes)))
    assert not can_pack(AutoModelForCausalLM.from_config(LlamaConfig(**sizes, attention_dropout=0.1)))


def test_first_token_scores_match_plain_forward(model):
    scores = score_labels(model, SHARED, ANSWERS, pad_id=2, first_token=True)
    for i, p in enumerate(SHARED):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(seq_logprob(model, p, a[:1]), abs=TOL)


def lora_model(tiny_model, dtype=torch.float32, **kwargs):
    """The tiny model with a LoRA adapter whose B is not zero, so the adapter changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_adapter_scores_the_same_and_restores_weights_bit_for_bit(tiny_model, dtype):
    from emorec.loop import merged_adapter

    model = lora_model(tiny_model, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = next(k for k in before if "q_proj.base_layer.weight" in k)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        unmerged = score_labels(model, SHARED, ANSWERS, pad_id=2)
        with merged_adapter(model):
            assert not torch.equal(model.state_dict()[q], before[q])  # the adapter is folded in
            merged = score_labels(model, SHARED, ANSWERS, pad_id=2)
        after = score_labels(model, SHARED, ANSWERS, pad_id=2)
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

    from emorec.loop import merged_adapter

    reference = lora_model(tiny_model)
    fast = lora_model(tiny_model, torch.bfloat16)  # bf16 base, fp32 adapter (as run() sets it up)
    for module in fast.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    answers = ANSWERS[:3]
    ref_loss = answer_loss(reference, SHARED, answers, pad_id=2, share_prefix=False)
    ref_scores = score_labels(reference, SHARED, ANSWERS, pad_id=2, share_prefix=False)
    with torch.autocast("cpu", torch.bfloat16):
        fast_loss = answer_loss(fast, SHARED, answers, pad_id=2)
        with merged_adapter(fast):
            fast_scores = score_labels(fast, SHARED, ANSWERS, pad_id=2)
    assert fast_loss.item() == pytest.approx(ref_loss.item(), abs=BF16_TOL)
    assert torch.allclose(fast_scores, ref_scores, atol=BF16_TOL)
    top2 = ref_scores.topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 2 * BF16_TOL  # rows whose winner no rounding can change
    assert clear.sum() >= 2
    assert torch.equal(fast_scores.argmax(-1)[clear], ref_scores.argmax(-1)[clear])


def test_head_positions_skip_virtual_tokens(tiny_model):
    """Prompt tuning puts virtual tokens before the input; positions counted from the end
    still pick each row's answer positions."""
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()

    def plain(prompt, answer):
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -ids.shape[1] :].float(), -1)
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))

    scores = score_labels(model, PROMPTS, ANSWERS, pad_id=2)
    for i, p in enumerate(PROMPTS):
        for j, a in enumerate(ANSWERS):
            assert scores[i, j].item() == pytest.approx(plain(p, a), abs=TOL)


@pytest.mark.parametrize(
    "first_token,batch_size,streams", [(False, 1, 1), (True, 1, 1), (True, 8, 1), (False, 1, 2), (True, 1, 2)]
)
def test_predict_reuses_one_prefix_cache_across_batches_exactly(model, first_token, batch_size, streams):
    from types import SimpleNamespace

    from emorec.loop import predict

    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13, 3, 4, 6]]
    tokenizer = SimpleNamespace(pad_token_id=2)
    # batch_size=1: several batches, each continuing the prefix cache; 8: rows of different
    # lengths in one batch (packed, for first-token scoring). streams=2: two batches at a time,
    # in two threads.
    threads, attention = torch.get_num_threads(), model.config._attn_implementation
    out = predict(
        model,
        tokenizer,
        prompts,
        ANSWERS,
        ["a", "b", "c", "d"],
        batch_size=batch_size,
        first_token=first_token,
        streams=streams,
    )
    assert torch.get_num_threads() == threads and model.config._attn_implementation == attention
    for i, p in enumerate(prompts):
        plain = torch.tensor([seq_logprob(model, p, a[:1] if first_token else a) for a in ANSWERS])
        assert torch.allclose(torch.tensor(out["extra"][i]), torch.softmax(plain, -1), atol=TOL)
        assert out["preds"][i] == int(plain.argmax())


def test_train_stops_on_a_nan_loss_before_the_update(tiny_model):
    from emorec.errors import EmorecError
    from emorec.loop import train

    model = lora_model(tiny_model).train()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved = []
    with pytest.raises(EmorecError, match=r"^loss is nan at step 1; lower optimizer.lr"):
        train(
            model, SHARED, ANSWERS[:3], 2, optimizer=optimizer, scheduler=scheduler, steps=3, batch_size=3,
            grad_accum=1, max_grad_norm=None, autocast=False, share_prefix=True, seed=0, log_every=1,
            log=lambda *a: None, on_epoch_end=lambda *a: None, checkpoint=saved.append, checkpoint_every=1,
        )  # fmt: skip
    assert saved == []  # nothing written, nothing updated
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) or torch.isnan(v).any() for n, v in before.items())


def test_a_batch_split_into_passes_gives_the_same_update(tiny_model):
    from emorec.loop import passes, train

    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13, 3, 4, 6]]
    answers = [ANSWERS[i % 3] for i in range(len(prompts))]
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    results = []
    for budget in (None, 8):
        model = lora_model(tiny_model).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        stats = train(
            model, prompts, answers, 2, optimizer=optimizer, scheduler=scheduler, steps=2, batch_size=5,
            grad_accum=1, max_grad_norm=None, autocast=False, share_prefix=True, seed=0, log_every=1,
            log=lambda *a: None, on_epoch_end=lambda *a: None, max_pass_tokens=budget,
        )  # fmt: skip
        results.append((stats["losses"], torch.cat([p.detach().flatten() for p in params])))
    assert len(passes(None, prompts, lengths, list(range(5)), False, 8)) == 5  # 5 rows x 11+ tokens > 8 each
    assert results[0][0] == pytest.approx(results[1][0], abs=TOL)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_streams_give_results_in_order_and_stop_on_an_error():
    import time

    from emorec.loop import streamed

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


def test_head_positions_and_attention_choice_belong_to_one_thread(model):
    import threading

    from emorec.loop import attention_implementation, head_at

    ids = torch.tensor([[5, 9, 30, 41, 7]])
    seen = []
    with head_at(model, torch.ones(1, 1, dtype=torch.long)), torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == 1
        other = threading.Thread(target=lambda: seen.append(model(input_ids=ids).logits.shape[1]))
        other.start()
        other.join()
    assert seen == [5]  # another thread's forward keeps every position
    assert model(input_ids=ids).logits.shape[1] == 5  # and so does this one after the context
    before = model.config._attn_implementation
    with attention_implementation(model, "sdpa"), attention_implementation(model, "sdpa"):
        with pytest.raises(EmorecError, match="cannot switch"), attention_implementation(model, "eager"):
            pass
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == before


def train_lora(tiny_model, streams: int, **lora_kwargs) -> tuple[dict, torch.Tensor]:
    """Two SGD steps of batch 4 on prompts sharing a 3-token prefix: (train stats with the
    threads that ran the loss, final weights)."""
    import threading

    from emorec.loop import train

    threads = set()

    def loss_fn(*args):
        threads.add(threading.current_thread().name)
        return answer_loss(*args)

    prompts = SHARED + [[5, 9, 30, 7], [5, 9, 30, 41, 7, 8, 12, 13]]
    answers = [ANSWERS[i % 3] for i in range(len(prompts))]
    model = lora_model(tiny_model, **lora_kwargs).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(1)  # dropout's masks, where there is dropout
    stats = train(
        model, prompts, answers, 2, optimizer=optimizer, scheduler=scheduler, steps=2, batch_size=4,
        grad_accum=1, max_grad_norm=1.0, autocast=False, share_prefix=True, seed=0, log_every=1,
        log=lambda *a: None, on_epoch_end=lambda *a: None, streams=streams, loss_fn=loss_fn,
    )  # fmt: skip
    return {**stats, "threads": threads}, torch.cat([p.detach().flatten() for p in params])


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="streams need two intra-op threads")
def test_training_streams_give_the_update_of_one_pass_and_repeat_exactly(tiny_model):
    import threading

    one, one_weights = train_lora(tiny_model, streams=1)
    two, two_weights = train_lora(tiny_model, streams=2)
    again, again_weights = train_lora(tiny_model, streams=2)
    assert two["losses"] == pytest.approx(one["losses"], abs=TOL)
    assert torch.allclose(two_weights, one_weights, atol=1e-5)
    start = torch.cat([p.detach().flatten() for p in lora_model(tiny_model).parameters() if p.requires_grad])
    assert (two_weights - start).abs().max() > 1e-3  # the steps did move the weights
    # Gradients are summed in piece order, whichever thread finishes first.
    assert again["losses"] == two["losses"] and torch.equal(again_weights, two_weights)
    assert two["tokens"] == one["tokens"]
    # Batches of 4 ran in two threads of their own (and the epoch's last row, a batch of 1, here).
    assert two["threads"] == {"emorec-stream_0", "emorec-stream_1", threading.current_thread().name}
    assert one["threads"] == {threading.current_thread().name}


def test_training_with_dropout_keeps_one_stream(tiny_model):
    from emorec.loop import draws_random

    assert draws_random(lora_model(tiny_model, lora_dropout=0.1).train())
    assert not draws_random(lora_model(tiny_model).train())
    one, one_weights = train_lora(tiny_model, streams=1, lora_dropout=0.1)
    two, two_weights = train_lora(tiny_model, streams=2, lora_dropout=0.1)
    # The same masks in the same order: the same pass, bit for bit.
    assert two["losses"] == one["losses"] and torch.equal(two_weights, one_weights)
    assert two["computed_tokens"] == one["computed_tokens"] and two["threads"] == one["threads"]
