"""Prompts and answers as token ids.

The prompt is the paper's instruction through the model's chat template, ending where the
assistant's answer starts; the answer of label i is what the template renders for an assistant
turn holding that label's word (e.g. "sadness<|im_end|>"). Training teaches the gold answer;
prediction ranks the label set by the likelihood of each answer.
"""

import logging
from dataclasses import dataclass

from emorec.data.records import Example
from emorec.errors import EmorecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """How the earlier turns of a dialogue reach the prompt (dataset.context_window > 0), as
    "Speaker: utterance" lines. layout before: the `before` block ({context}: the lines) goes
    ahead of the instruction; the prompts of a batch then share only the chat template's first
    tokens. layout after: the instruction and label list come first and `after` takes the
    utterance's place ({context}: the lines, each ending with a newline; {current}: "Speaker:
    utterance" of the one to classify), so the long shared prefix stays shared."""

    before: str = "{context}\n\n"
    layout: str = "before"
    after: str = "\nDialogue:\n{context}Sentence: {current}"

    def place(self, text: str, speaker: str | None, turns) -> tuple[str, str]:
        """(the block before the instruction, what fills the template's {text})."""
        if self.layout == "before":
            return render_context(turns, self.before), text
        lines = "".join(f"{line}\n" for line in _lines(turns))
        return "", self.after.format(context=lines, current=_lines([(speaker, text)])[0])


@dataclass(frozen=True)
class PromptFormat:
    """The prompt's wording (the `prompt` config group): the instruction `template` ({labels},
    {text}), the chat template's system turn (None: the template's default), the cue that ends a
    prompt without a chat template, and how dialogue context is laid out."""

    template: str
    system: str | None = None
    cue: str = "\nAnswer:"
    context: Context = Context()
    # Speaker-aware prompts: the instruction for an utterance whose speaker the dataset names
    # ({labels}, {speaker}, {text}); None, or an utterance without a speaker: `template`.
    speaker_template: str | None = None
    # Retrieved demonstrations (emorec.demonstrations): each a `demonstration` line ({text},
    # {label}), all in `demonstrations_layout` ({demonstrations}: the lines; {text}: what the
    # template's {text} holds without them: the utterance, or the dialogue).
    demonstration: str = "{text} => {label}"
    demonstrations_layout: str = "\nExamples:\n{demonstrations}\nNow: {text}"

    def instruction(self, speaker: str | None) -> str:
        return self.speaker_template if self.speaker_template and speaker else self.template

    def shown(self, demonstrations, labels: list[str], text: str) -> str:
        """What fills the template's {text}: `text`, after the demonstrations if there are any."""
        if not demonstrations:
            return text
        lines = "\n".join(self.demonstration.format(text=t, label=labels[y]) for t, y in demonstrations)
        return self.demonstrations_layout.format(demonstrations=lines, text=text)


def join_labels(labels: list[str]) -> str:
    """["a", "b", "c"] -> "a, b or c", the paper's "E1, E2, ... or Ek"."""
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def _messages(user: str, system: str | None) -> list[dict]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + [{"role": "user", "content": user}]


def render_context(turns, context_template: str) -> str:
    """Earlier turns as "Speaker: utterance" lines (just the utterance where the speaker is
    unknown), in context_template's {context} field; "" without turns."""
    return context_template.format(context="\n".join(_lines(turns))) if turns else ""


def _lines(turns) -> list[str]:
    return [f"{speaker}: {text}" if speaker else text for speaker, text in turns]


def render_prompt(
    tokenizer,
    template: str,
    system: str | None,
    labels: list[str],
    text: str,
    context: str = "",
    cue: str = "\nAnswer:",
    speaker: str | None = None,
) -> str:
    """The prompt of one utterance; `context` (rendered earlier turns) goes before the
    instruction, whose {speaker} (a speaker-aware template) names the utterance's speaker.
    Without a chat template, `cue` ends the prompt where the answer follows."""
    user = context + template.format(labels=join_labels(labels), text=text, speaker=speaker)
    if tokenizer.chat_template is None:
        return user + cue
    return tokenizer.apply_chat_template(_messages(user, system), tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer, examples: list[Example], fmt: PromptFormat, labels: list[str], max_length: int, context_window: int = 0
) -> list[list[int]]:
    """Token ids of each example's prompt, at most max_length long.

    With context_window=k, the k previous turns of the dialogue join the prompt as `fmt.context`
    lays them out. A prompt that does not fit loses its oldest turns first, so the utterance to
    classify stays whole; only when no context is left does the utterance itself lose words
    from its end. The instruction and the template always stay whole.
    """
    special = tokenizer.chat_template is None  # the chat template writes its own special tokens
    system, cue, context = fmt.system, fmt.cue, fmt.context

    def render(ex: Example, text: str, turns, shown=()) -> str:
        template = fmt.instruction(ex.speaker)
        block = ""
        if context_window:
            block, text = context.place(text, ex.speaker, turns)
        text = fmt.shown(shown, labels, text)
        return render_prompt(tokenizer, template, system, labels, text, block, cue, ex.speaker)

    def encode(ex: Example, text: str, turns, shown=()) -> list[int]:
        return tokenizer(render(ex, text, turns, shown), add_special_tokens=special)["input_ids"]

    contexts = [ex.context[-context_window:] if context_window else () for ex in examples]
    prompts = [render(ex, ex.text, turns, ex.demonstrations) for ex, turns in zip(examples, contexts)]
    ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]  # one batched call for all
    cut = 0
    for i, ex in enumerate(examples):
        turns, text, shown = contexts[i], ex.text, ex.demonstrations
        # Too long: the oldest turns go first, then the least similar demonstrations.
        while len(ids[i]) > max_length and (turns or shown):
            turns, shown = (turns[1:], shown) if turns else (turns, shown[1:])
            ids[i] = encode(ex, ex.text, turns, shown)
        cut += len(ids[i]) > max_length
        while len(ids[i]) > max_length:
            if not text:
                raise EmorecError(
                    f"{ex.id}: the prompt without its utterance is longer than trainer.max_length={max_length}; "
                    "raise it, or shorten prompt.template and prompt.system"
                )
            text = shortened(text, len(ids[i]) - max_length)
            ids[i] = encode(ex, text, ())
    if cut:
        log.info("%d utterance(s) lost their end to fit trainer.max_length=%d", cut, max_length)
    return ids


def shortened(text: str, over: int) -> str:
    """`text` without its end, for a prompt `over` tokens too long: words while it has several
    (half the excess each time, as a word is often two tokens), else characters (a token holds
    one at least), so a word longer than the limit is cut too."""
    words = text.split()
    if len(words) > 1:
        return " ".join(words[: max(1, len(words) - max(1, over // 2))])
    return text[: max(0, len(text) - over)]


def encode_answers(tokenizer, template: str, system: str | None, labels: list[str]) -> list[list[int]]:
    """Token ids of the assistant's answer for each label, ending with the end-of-turn token
    so that a label which is a prefix of another ("joy", "joyful") is not favoured."""
    if tokenizer.chat_template is None:
        texts = [f" {label}{tokenizer.eos_token or ''}" for label in labels]
    else:
        texts = []
        prompt = render_prompt(tokenizer, template, system, labels, "x")
        for label in labels:
            user = _messages(template.format(labels=join_labels(labels), text="x"), system)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": label}], tokenize=False)
            if not full.startswith(prompt):
                raise EmorecError(
                    "the chat template renders the answer differently from the generation "
                    "prompt; use a model whose template supports add_generation_prompt"
                )
            texts.append(full[len(prompt) :].rstrip())
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if len(set(map(tuple, answers))) < len(labels):
        raise EmorecError(f"two labels of {labels} tokenise to the same answer; reword dataset.labels")
    return answers


def scoring_answers(answers: list[list[int]]) -> list[list[int]]:
    """The answers as scoring sees them: without the shared end-of-turn token when no answer's
    label tokens are a prefix of another's. The ranking then hardly depends on it, and it costs
    a forward position for every label of every example."""
    if len({a[-1] for a in answers}) != 1 or min(map(len, answers)) < 2:
        return answers
    words = [tuple(a[:-1]) for a in answers]
    if any(u != w and w[: len(u)] == u for u in words for w in words):
        return answers
    return [list(w) for w in words]
