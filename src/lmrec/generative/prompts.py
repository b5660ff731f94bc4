"""The one prompt builder of the generative family, used by the training samples and by inference alike.

A next-item prompt shows the newest ``max_history`` items of a history as semantic IDs (optionally each
followed by its title) in one user turn; the answer is the next item's semantic ID in the assistant turn.
For a decoder-only model the conversation goes through the tokenizer's chat template and generation starts
after ``<|sid_begin|>``; for an encoder-decoder model (T5) the encoder reads the user turn as plain text
and the decoder generates the answer. How a model was prompted in training is saved with it
(``prompt_config.json``) so inference prompts it the same way; the defaults are the config's
(:class:`~lmrec.config.GenDataConfig`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lmrec.config import GenDataConfig
from lmrec.errors import DataError, LmrecError

NEXT_ITEM = GenDataConfig.model_fields["prompt"].default  # what models saved without a prompt were trained on
SID_TO_TITLE = "Title of {sid}?"
TITLE_TO_SID = "Item for: {title}"
PROMPT_CONFIG = "prompt_config.json"


@dataclass(frozen=True)
class PromptFormat:
    max_history: int = GenDataConfig.model_fields["max_history"].default
    with_titles: bool = GenDataConfig.model_fields["with_titles"].default
    template: str = NEXT_ITEM
    kind: str = "chat"  # or "sequence": the items' semantic IDs back to back, no chat template

    @classmethod
    def from_config(cls, dc: GenDataConfig) -> PromptFormat:
        if dc.format == "sequence" and dc.with_titles:
            raise LmrecError("data.format=sequence trains on the items' semantic IDs alone: it takes no "
                             "data.with_titles (use data.format=chat)")
        return cls(dc.max_history, dc.with_titles, dc.prompt, dc.format)

    @classmethod
    def load(cls, model_dir: str | Path) -> PromptFormat:
        """The format a model was trained with; the config's defaults for a model saved without one."""
        p = Path(model_dir) / PROMPT_CONFIG
        return cls(**json.loads(p.read_text())) if p.exists() else cls()

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / PROMPT_CONFIG).write_text(json.dumps(asdict(self)) + "\n")


def title(ds, i: int) -> str:
    """An item's first text attribute (its title), else its id."""
    return ds.item_text[i][0][1] if ds.item_text[i] else ds.item_ids[i]


def next_item_messages(ds, sids, history, target, fmt: PromptFormat) -> list[dict]:
    """The user turn for the newest ``fmt.max_history`` items of ``history`` (+ the answer when ``target``
    is given)."""
    shown = list(history)[-fmt.max_history:]
    parts = [sids.item_string(int(i)) + (f" {title(ds, int(i))}" if fmt.with_titles else "") for i in shown]
    msgs = [{"role": "user", "content": fmt.template.format(history=", ".join(parts))}]
    if target is not None:
        msgs.append({"role": "assistant", "content": sids.item_string(int(target))})
    return msgs


def alignment_messages(ds, sids, i: int) -> list[tuple[str, list[dict]]]:
    """Item ↔ text alignment samples of item ``i``: (task, messages) for sid→title and title→sid."""
    s, t = sids.item_string(int(i)), title(ds, int(i))
    return [("sid2title", [{"role": "user", "content": SID_TO_TITLE.format(sid=s)},
                           {"role": "assistant", "content": t}]),
            ("title2sid", [{"role": "user", "content": TITLE_TO_SID.format(title=t)},
                           {"role": "assistant", "content": s}])]


def encode_training(tokenizer, messages: list[dict], *, seq2seq: bool, max_length: int = 1024) -> dict:
    """A conversation → token ids with labels on the assistant answer only.

    Decoder-only: ``input_ids`` of the whole conversation, ``labels`` = the ids of the last assistant turn
    (-100 elsewhere). Encoder-decoder: ``input_ids`` = the user turn, ``decoder_labels`` = the answer."""
    if seq2seq:
        enc = tokenizer(messages[0]["content"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": enc, "decoder_labels": tokenizer(messages[-1]["content"])["input_ids"]}
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    if full[: len(prompt)] != prompt:
        raise LmrecError("the chat template does not render the prompt as a prefix of the conversation")
    full, n = full[-max_length:], len(prompt) - max(0, len(full) - max_length)
    return {"input_ids": full, "labels": [-100] * max(0, n) + full[max(0, n):]}


def sequence_windows(items, max_history: int, stride: int | None) -> list[tuple[list[int], int]]:
    """A training sequence → (window of at most ``max_history + 1`` items, index of its first target): windows
    ``stride`` items apart (default half a window); every target after the first item is trained once, with
    at least ``window − stride`` items of context after the first window (as the ID baselines' windows)."""
    items = [int(i) for i in items]
    w = max_history + 1
    stride = stride or max(1, w // 2)
    if len(items) < 2:
        return []
    out, done, end = [], 1, min(len(items), w)
    while True:
        lo = max(0, end - w)
        out.append((items[lo:end], done - lo))
        if end == len(items):
            return out
        done, end = end, min(len(items), end + stride)


def sid_token_ids(codes, meta: dict) -> list[int]:
    """One item's token ids: ``<|sid_begin|>``, one token per level, ``<|sid_end|>`` (``meta``: sid_vocab.json)."""
    lv = meta["level_token_ids"]
    return [meta["sid_begin"], *(lv[j][int(c)] for j, c in enumerate(codes)), meta["sid_end"]]


def encode_sequence(item_ids: list[list[int]], first_target: int) -> dict:
    """Token ids of a window of items (each item's semantic-ID tokens, ``<|sid_begin|>`` … ``<|sid_end|>``),
    labels on the items from ``first_target`` on (-100 before)."""
    ids, labels = [], []
    for j, toks in enumerate(item_ids):
        ids += toks
        labels += toks if j >= first_target else [-100] * len(toks)
    return {"input_ids": ids, "labels": labels}


def sequence_generation(item_ids: list[list[int]], sid_begin: int) -> dict:
    """The ids generation starts from in the sequence format: the history's semantic IDs, then ``<|sid_begin|>``."""
    return {"input_ids": [t for toks in item_ids for t in toks] + [sid_begin]}


def encode_generation(tokenizer, messages: list[dict], sid_begin: int, *, seq2seq: bool) -> dict:
    """A prompt (no answer) → the ids generation starts from: the user turn for an encoder (the decoder
    starts with ``<|sid_begin|>``), else the chat template's generation prompt + ``<|sid_begin|>``."""
    if seq2seq:
        return {"input_ids": tokenizer(messages[0]["content"])["input_ids"]}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    return {"input_ids": ids + [sid_begin]}


# ------------------------------------------------------------------------------------------- chat parquet rows
THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
EMPTY_THINK = "<think>\n</think>\n"


def apply_think_pattern(messages: list[dict]) -> list[dict]:
    """OpenOneRec's ``add_think_pattern`` (SFT): a reply with a non-empty think block gets ``/think`` on the
    user turn before it; a reply with an empty block, or none, gets ``/no_think`` — and an empty think
    block is put in front of a reply that has none."""
    out = [dict(m) for m in messages]
    for i, m in enumerate(out):
        if m["role"] != "assistant":
            continue
        found = THINK.match(m["content"])
        if found is None:
            m["content"] = EMPTY_THINK + m["content"]
        flag = "/think" if found is not None and found.group(1).strip() else "/no_think"
        user = next((u for u in reversed(out[:i]) if u["role"] == "user"), None)
        if user is not None:
            user["content"] = f"{user['content']} {flag}"
    return out


def encode_chat(tokenizer, row, *, think: bool = False) -> dict:
    """A chat parquet row (:class:`lmrec.data.chat_format.ChatRow`) → ``input_ids`` and ``labels``.

    Conversations go through the tokenizer's chat template; every assistant turn is supervised, from its
    first token to its end-of-turn marker (the span between the generation prompt before the turn and the
    conversation rendered up to it). Plain text (``segments``) is supervised on every token and ends with
    the end-of-sequence token."""
    if row.segments is not None and row.messages is None:
        ids = tokenizer("".join(row.segments), add_special_tokens=False)["input_ids"]
        ids = ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return {"input_ids": ids, "labels": list(ids)}
    msgs = apply_think_pattern(row.messages) if think else row.messages

    def render(m: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    # the conversation is rendered as text once per assistant turn but tokenized once: tokenizing is what
    # costs, so a sample makes one tokenizer call, not one per turn (bench/bench_stream.py measures the stream)
    full = render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, upto = render(msgs[:i], gen=True), render(msgs[: i + 1])
        if not (full.startswith(upto) and upto.startswith(start)):
            # a template that renders earlier replies differently once the conversation goes on (Qwen3's drops
            # their think blocks): find the replies in the whole conversation by their markers instead
            spans = _marked_spans(full, msgs, render, end_of_turn(render, tokenizer.eos_token), i)
            break
        spans.append((len(start), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(a <= off[0] < b for a, b in spans) else -100 for t, off in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "labels": labels}


REPLY_PROBE = "lmrec-reply-probe"  # a reply no template rewrites, to see what the template puts after a reply


def end_of_turn(render, eos: str | None) -> str | None:
    """The first line the chat template writes after an assistant reply, without whitespace (``<|im_end|>``
    for Qwen3, whose base checkpoints' ``eos_token`` is ``<|endoftext|>``, not the end of a
    turn): found by rendering a known conversation; the tokenizer's ``eos_token`` when that finds nothing."""
    text = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": REPLY_PROBE}])
    at = text.rfind(REPLY_PROBE)
    after = text[at + len(REPLY_PROBE):].strip() if at >= 0 else ""
    return after.splitlines()[0].strip() if after else eos


def _marked_spans(full: str, msgs: list[dict], render, eos: str | None, turn: int) -> list[tuple[int, int]]:
    """Character spans of the assistant replies in ``full``: each from the end of the generation prompt
    (what ``add_generation_prompt`` adds, e.g. ``<|im_start|>assistant\\n``) to the end of the next
    end-of-turn marker ``eos`` (:func:`end_of_turn`)."""
    before, prompted = render(msgs[:turn]), render(msgs[:turn], gen=True)
    header = prompted[len(before):] if prompted.startswith(before) else ""
    unfound = DataError(f"turn {turn}: the chat template does not render the conversation up to this reply as a "
                        f"prefix of the whole, and its replies cannot be found by their markers ({header!r} … "
                        f"{eos!r})", column="messages")
    if not header or not eos:
        raise unfound
    spans, cursor = [], 0
    for m in msgs:
        if m["role"] != "assistant":
            continue
        a = full.find(header, cursor)
        b = full.find(eos, a + len(header)) if a >= 0 else -1
        if b < 0:
            raise unfound
        spans.append((a + len(header), b + len(eos)))
        cursor = b + len(eos)
    return spans
