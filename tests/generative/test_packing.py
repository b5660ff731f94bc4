"""Packed training sequences on a tiny Qwen3: samples in a pack attend only to themselves (logits equal the
per-sample forward), a sample's loss does not depend on its neighbours, the supervised tokens are exactly
the assistant replies (first token and end-of-turn marker included) and plain text, and the think pattern."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmrec.data.chat_format import ChatRow
from lmrec.data.stream import Sample, collate_packs, pack_samples
from lmrec.errors import DataError
from lmrec.generative.prompts import apply_think_pattern, encode_chat


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.vocab import load_lm

    texts = ["hello there", "a red shoe", "the blue hat", "what next", "plain text about movies"] * 20
    path = build_default_lm(texts, tmp_path_factory.mktemp("lm") / "lm", vocab_size=400, hidden_size=64,
                            layers=2, heads=4, kv_heads=2, head_dim=16)
    model, tok = load_lm(path)
    return model.eval(), tok


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append(Sample([0, 0, i], 0, ids, list(ids)))
    return out


@torch.no_grad()
def test_packed_logits_equal_the_per_sample_forward(lm):
    model, _ = lm
    parts = samples([7, 12, 5])
    batch = collate_packs([pack_samples(parts)], pad_id=0, length=30)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=batch["use_cache"]).logits[0]
    start = 0
    for s in parts:
        alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        assert (packed[start: start + len(s.input_ids)] - alone).abs().max() < 1e-5
        start += len(s.input_ids)
    # without the restarting positions (one long sequence) the later samples would see the earlier ones
    leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert (leaky[7:19] - packed[7:19]).abs().max() > 1e-3


@torch.no_grad()
def test_a_samples_loss_does_not_depend_on_its_pack_neighbours(lm):
    model, _ = lm
    a, b, c, d = samples([9, 6, 11, 4], seed=1)

    def loss_of_a(pack, offset):
        batch = collate_packs([pack_samples(pack)], pad_id=0, length=40)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=batch["use_cache"]).logits[0]
        n = len(a.input_ids)
        return F.cross_entropy(logits[offset: offset + n - 1], batch["labels"][0, offset + 1: offset + n],
                               reduction="sum")

    first, middle = loss_of_a([a, b], 0), loss_of_a([c, a, d], len(c.input_ids))
    assert abs(first - middle) < 1e-4 * abs(first)


def test_supervised_tokens_are_the_assistant_replies_and_plain_text(lm):
    _, tok = lm
    row = ChatRow("u", "rec", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                               {"role": "assistant", "content": "a red shoe"}, {"role": "user", "content": "what next"},
                               {"role": "assistant", "content": "the blue hat"}])
    enc = encode_chat(tok, row)
    assert enc["input_ids"] == tok.apply_chat_template(row.messages, tokenize=True, return_dict=False)
    spans, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["a red shoe<|im_end|>\n", "the blue hat<|im_end|>\n"]
    text = encode_chat(tok, ChatRow("t", "wiki", None, ["plain text ", "about movies"]))
    assert text["labels"] == text["input_ids"] and tok.decode(text["input_ids"]) == "plain text about movies<|im_end|>"


def test_think_pattern():
    msgs = lambda reply: [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]  # noqa: E731
    none, full, empty = (apply_think_pattern(msgs(r)) for r in ("x", "<think>why</think>x", "<think>\n</think>\nx"))
    assert none == [{"role": "user", "content": "q /no_think"},
                    {"role": "assistant", "content": "<think>\n</think>\nx"}]
    assert full == [{"role": "user", "content": "q /think"}, {"role": "assistant", "content": "<think>why</think>x"}]
    assert empty == [{"role": "user", "content": "q /no_think"},
                     {"role": "assistant", "content": "<think>\n</think>\nx"}]
    assert msgs("x")[0]["content"] == "q"  # the input is not changed


QWEN3_LIKE = (  # drops the think block of replies before the last user turn, as Qwen3's template does
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.index0 < ns.last %}"
    "{{ m['content'].split('</think>')[-1].lstrip() }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# two turns whose replies think; Qwen3's template drops the first reply's think block
THINKING_ROW = ChatRow("u", "rec", [{"role": "user", "content": "hello"},
                                   {"role": "assistant", "content": "<think>why</think> a red shoe"},
                                   {"role": "user", "content": "what next"},
                                   {"role": "assistant", "content": "<think>because</think> the blue hat"}])


def test_replies_are_found_when_the_template_rewrites_earlier_turns(lm):
    """Qwen3's template drops the think block of replies before the last user turn, so the conversation
    rendered up to a reply is not a prefix of the whole: the replies are found by their markers."""
    _, tok = lm
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN3_LIKE
    row = THINKING_ROW
    enc = encode_chat(tok, row)
    assert tok.decode(enc["input_ids"]).count("<think>") == 1  # the first reply's thoughts were dropped
    assert [tok.decode(s) for s in supervised_spans(enc)] == [
        "a red shoe<|im_end|>", "<think>because</think> the blue hat<|im_end|>"]


def test_the_end_of_turn_marker_comes_from_the_template_when_eos_differs(lm):
    """Qwen3 base checkpoints end a turn with <|im_end|> but their eos_token is <|endoftext|>: the replies are
    found by what the template writes after a reply, supervised up to <|im_end|> — as with a tokenizer
    whose eos is the end of a turn."""
    _, tok = lm
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN3_LIKE
    row = THINKING_ROW
    same = encode_chat(tok, row)
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id != tok.convert_tokens_to_ids("<|im_end|>")
    enc = encode_chat(tok, row)
    assert enc == same
    assert [tok.decode(s) for s in supervised_spans(enc)] == [
        "a red shoe<|im_end|>", "<think>because</think> the blue hat<|im_end|>"]


def supervised_spans(enc: dict) -> list[list[int]]:
    spans, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    return spans + ([cur] if cur else [])


def test_a_template_whose_replies_cannot_be_found_is_reported(lm):
    _, tok = lm

    class Rewriting:  # renders earlier replies differently once a later turn exists, and has no markers
        eos_token = None

        def apply_chat_template(self, m, tokenize, add_generation_prompt):
            return "".join(f"[{len(m)}:{x['content']}]" for x in m) + ("[go]" if add_generation_prompt else "")

    row = ChatRow("u", "rec", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(DataError, match="turn 1: the chat template does not render"):
        encode_chat(Rewriting(), row)


def test_a_stream_step_normalises_by_the_supervised_tokens_of_all_its_micro_batches(lm, tmp_path):
    """Gradient accumulation over 2 packs with 4 and 23 supervised tokens: the step's gradient is that of
    (sum of the token losses) / 27 — not the mean of the two per-pack means."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lmrec.training.loop import Optim, StreamStage, fit, make_accelerator

    model, _ = lm
    model = copy.deepcopy(model)
    packs = [pack_samples(samples([4, 2], seed=3)), pack_samples(samples([9, 12, 5], seed=4))]
    batches = [collate_packs([p], pad_id=0, length=32) for p in packs]
    assert [int((b["labels"][:, 1:] != -100).sum()) for b in batches] == [4, 23]  # first tokens: no target

    class Two(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(packs)

    def reference_grad():
        model.zero_grad()
        total = sum(F.cross_entropy(model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
                                    .logits[0, :-1], b["labels"][0, 1:], reduction="sum") for b in batches)
        (total / 27).backward()
        return model.model.layers[0].mlp.up_proj.weight.grad.clone()

    expected = reference_grad()
    model.zero_grad()
    seen = {}

    def capture():
        seen["grad"] = model.model.layers[0].mlp.up_proj.weight.grad.clone()

    acc = make_accelerator("no", grad_accum=2, seed=0)
    loader = lambda epoch: StatefulDataLoader(Two(), batch_size=1, collate_fn=lambda b: collate_packs(b, 0, 32))  # noqa: E731
    fit(acc, model, loader, StreamStage("s", 1e-9, num_training_steps=1, after_step=capture),
        optim=Optim(grad_clip=None), log=lambda m: None)
    assert (seen["grad"] - expected).abs().max() < 1e-6 * expected.abs().max().clamp(min=1)
    assert expected.abs().max() > 0


def test_the_chunked_loss_model_equals_the_models_own_loss_on_a_packed_batch(lm):
    from lmrec.generative.stages import ChunkedLossLM, stage1_new_embeddings

    model, _ = lm
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    batch = collate_packs([pack_samples(samples([9, 14, 6], seed=5)), pack_samples(samples([20, 3], seed=6))], 0, 32)
    x = {k: v for k, v in batch.items() if k not in ("sources", "skipped")}
    torch.manual_seed(0)
    own = a(**x, num_items_in_batch=17.0)
    torch.manual_seed(0)
    chunked = ChunkedLossLM(b, chunk_tokens=5)(**x, num_items_in_batch=17.0)
    assert abs(own.loss.item() - chunked.loss.item()) <= 1e-5 * own.loss.item()
    own.loss.backward()
    chunked.loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max().clamp(min=1e-8), name
    # stage 1 (only the new rows train) on the chunked model: the gradient reaches the embedding rows
    c = copy.deepcopy(model)
    meta = {"level_token_ids": [[250, 251]], "sid_begin": 252, "sid_end": 253}
    setup = stage1_new_embeddings(c, meta)
    ChunkedLossLM(setup.model, 7)(**x).loss.backward()
    assert c.get_input_embeddings().weight.grad.abs().sum() > 0
    assert sum(p.grad is not None for p in c.parameters()) == 1  # tied: the one embedding matrix
