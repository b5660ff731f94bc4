"""Whole-word masking: words are never split (English word pieces; Chinese jieba words mapped onto
characters), special tokens are never masked, 15 % of the words are chosen and 80/10/10 of them become
[MASK] / a random token / themselves."""

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmrec.recformer.masking import WholeWordMasker, jieba_word_spans, word_starts
from tests.builders import build_longformer_zh, jieba_chars

EN = ["Toy Story adventures dramas", "GoldenEye Copycat comedy dramas animations thriller",
      "Get Shorty animations 1995 rooms thrillers action"]  # in the tiny tokenizer's vocabulary, plurals split
ZH = ["小米手机 Redmi Note 12 红色 8GB 全网通", "华为笔记本电脑，轻薄便携！", "北京大学的图书馆很安静。"]


@pytest.fixture(scope="module")
def zh_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(build_longformer_zh(tmp_path_factory.mktemp("zh"), jieba_chars(3000))))


@pytest.fixture(scope="module")
def en_tok(tiny_backbone):
    return AutoTokenizer.from_pretrained(str(tiny_backbone))


def _encode(tok, texts):
    enc = tok(texts, return_offsets_mapping=True)  # with special tokens: they must never be masked
    SPECIAL.clear()
    SPECIAL.update(tok.all_special_ids)
    starts = word_starts(enc.encodings, texts)
    L = max(len(x) for x in enc["input_ids"])
    ids = np.full((len(texts), L), tok.pad_token_id)
    att = np.zeros_like(ids)
    st = np.ones((len(texts), L), dtype=bool)
    for b, x in enumerate(enc["input_ids"]):
        ids[b, : len(x)], att[b, : len(x)], st[b, : len(x)] = x, 1, starts[b]
    return enc, ids, att, st


SPECIAL: set = set()


def _words(enc, texts, b, chinese):
    """Reference words of sequence b: token positions grouped by the tokenizer's word (English) or by the
    jieba word containing the token's first character (Chinese); special tokens excluded."""
    groups: dict = {}
    spans = jieba_word_spans(texts[b]) if chinese else None
    e = enc.encodings[b]
    for pos, (w, (s, _), t) in enumerate(zip(e.word_ids, e.offsets, e.ids)):
        if w is None or t in SPECIAL:
            continue
        key = next(i for i, (a, z) in enumerate(spans) if a <= s < z) if chinese else w
        groups.setdefault(key, []).append(pos)
    return list(groups.values())


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_masking_never_splits_a_word_nor_touches_specials(lang, en_tok, zh_tok):
    tok, texts = (en_tok, EN) if lang == "en" else (zh_tok, ZH)
    enc, ids, att, st = _encode(tok, texts)
    masker = WholeWordMasker(tok, p=0.3)
    rng = np.random.default_rng(0)
    specials = set(tok.all_special_ids)
    some_multi_token = False
    for _ in range(200):
        masked, labels = (x.numpy() for x in masker(ids, att, st, rng))
        for b in range(len(texts)):
            words = _words(enc, texts, b, lang == "zh")
            some_multi_token |= any(len(w) > 1 for w in words)
            chosen = [w for w in words if (labels[b, w] >= 0).any()]
            assert all((labels[b, w] >= 0).all() for w in chosen)  # a word is labeled whole or not at all
            assert sum(len(w) for w in chosen) == int((labels[b] >= 0).sum())  # nothing outside words
            assert len(chosen) == max(1, round(0.3 * len(words)))
            assert not any(int(t) in specials for t in ids[b][labels[b] >= 0])
            assert (masked[b][att[b] == 0] == tok.pad_token_id).all()
            for w in chosen:  # one treatment per word: all [MASK], or none of it
                is_mask = masked[b, w] == tok.mask_token_id
                assert is_mask.all() or not is_mask.any()
    assert some_multi_token  # the test means something: words of several tokens exist


def test_80_10_10_proportions_on_a_large_sample(en_tok):
    enc, ids, att, st = _encode(en_tok, EN * 20)
    masker = WholeWordMasker(en_tok, p=0.15)
    rng = np.random.default_rng(1)
    counts = {"mask": 0, "random": 0, "keep": 0}
    for _ in range(300):
        masked, labels = (x.numpy() for x in masker(ids, att, st, rng))
        for b in range(len(ids)):
            for w in _words(enc, EN * 20, b, False):
                if (labels[b, w] < 0).all():
                    continue
                if (masked[b, w] == en_tok.mask_token_id).all():
                    counts["mask"] += 1
                elif (masked[b, w] == ids[b, w]).all():
                    counts["keep"] += 1  # (a random draw equal to the original counts here: rare)
                else:
                    counts["random"] += 1
    n = sum(counts.values())
    assert n > 5000
    assert abs(counts["mask"] / n - 0.8) < 0.02
    assert abs(counts["random"] / n - 0.1) < 0.02
    assert abs(counts["keep"] / n - 0.1) < 0.02


def test_chinese_words_come_from_jieba(zh_tok):
    texts = ["北京大学的图书馆"]
    enc = zh_tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert enc.encodings[0].tokens == list("北京大学的图书馆")  # one token per character
    flags = word_starts(enc.encodings, texts)[0]
    spans = jieba_word_spans(texts[0])
    assert [i for i, f in enumerate(flags) if f] == [s for s, _ in spans]
    assert len(spans) < len(texts[0])  # multi-character words exist


def test_recformer_item_tokens_carry_word_starts(tiny_backbone):
    from lmrec.recformer.backbones import build_recformer

    _, rtok, _ = build_recformer(Path(tiny_backbone), max_token_num=64)
    items = [[("title", "Toy Story unbelievable"), ("genres", "Animation")], [("title", "Copycat")]]
    plain = rtok.encode_items(items)
    with_words = rtok.encode_items(items, word_starts=True)
    assert [x[:2] for x in with_words] == plain  # same tokens
    seq = rtok.build_sequence(with_words)
    assert len(seq["word_starts"]) == len(seq["input_ids"]) and seq["word_starts"][0]
    batch = rtok.pad([seq, rtok.build_sequence(with_words[:1])])
    assert batch["word_starts"].shape == batch["input_ids"].shape
