"""RecFormer's input layout on hand-built examples, with a BERT WordPiece and a RoBERTa BPE tokenizer."""

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import BertTokenizer, RobertaTokenizer

from lmrec.recformer.tokenization_recformer import KEY, PAD, START, VALUE, RecformerTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "toy", "story", "year", "1995", "heat",
         "genre", "drama", "标", "题", "玩", "具"]


def wordpiece(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer.from_pretrained(str(tmp_path))  # the real loading path of a vocab.txt checkpoint


def ids(*tokens):
    return [VOCAB.index(t) for t in tokens]


def test_history_layout_wordpiece(tmp_path):
    tok = RecformerTokenizer(wordpiece(tmp_path), max_attr_num=2, max_attr_length=3, max_token_num=64,
                             max_item_embeddings=10)
    toy = [("title", "toy story"), ("year", "1995"), ("genre", "drama")]  # 3rd attribute dropped
    heat = [("title", "heat")]
    seq = tok.build_sequence(tok.encode_items([toy, heat]))  # oldest → newest
    # newest item first; "title toy story" is cut to max_attr_length=3 → "title toy story" (3 tokens)
    assert seq["input_ids"] == ids("[CLS]", "title", "heat", "title", "toy", "story", "year", "1995")
    assert seq["token_type_ids"] == [START, KEY, VALUE, KEY, VALUE, VALUE, KEY, VALUE]
    assert seq["item_position_ids"] == [0, 1, 1, 2, 2, 2, 2, 2]


def test_attribute_and_sequence_truncation(tmp_path):
    tok = RecformerTokenizer(wordpiece(tmp_path), max_attr_num=3, max_attr_length=2, max_token_num=5,
                             max_item_embeddings=10)
    toy = [("title", "toy story"), ("year", "1995")]
    items = tok.encode_items([toy])
    assert items[0][0] == ids("title", "toy", "year", "1995")  # "story" cut by max_attr_length=2
    seq = tok.build_sequence([items[0], items[0]])
    assert len(seq["input_ids"]) == 5  # [CLS] + 4 tokens of the newest item; the older one is cut
    assert seq["item_position_ids"] == [0, 1, 1, 1, 1]
    # at most max_item_embeddings - 1 items, the most recent ones
    tok2 = RecformerTokenizer(wordpiece(tmp_path), 1, 2, 100, max_item_embeddings=3)
    one = tok2.encode_items([[("title", "heat")], [("title", "toy")], [("title", "drama")]])
    seq = tok2.build_sequence(one)
    assert seq["input_ids"] == ids("[CLS]", "title", "drama", "title", "toy")


def test_padding_and_masks(tmp_path):
    tok = RecformerTokenizer(wordpiece(tmp_path), 2, 8, 64, 10)
    batch = tok([[[("title", "heat")]], [[("title", "toy story")], [("title", "heat")]]])
    assert batch["input_ids"].shape == (2, 6)  # [CLS] title heat title toy story
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["token_type_ids"][0, 3:].tolist() == [PAD] * 3
    assert batch["input_ids"][0, 3:].tolist() == [0] * 3  # [PAD]
    assert batch["global_attention_mask"].tolist() == [[1] + [0] * 5] * 2
    assert batch["position_ids"][1].tolist() == list(range(6))


def test_chinese_keys_and_values(tmp_path):
    tok = RecformerTokenizer(wordpiece(tmp_path), 2, 8, 64, 10)
    items = tok.encode_items([[("标题", "玩具，story")]])
    assert items[0][0] == ids("标", "题", "玩", "具") + [VOCAB.index("[UNK]"), VOCAB.index("story")]
    assert items[0][1] == [KEY, KEY, VALUE, VALUE, VALUE, VALUE]


def test_roberta_bpe_uses_its_own_start_and_pad(tmp_path):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" title Toy Story year 1995", " title Heat genre Drama"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    hf = RobertaTokenizer.from_pretrained(str(tmp_path))
    tok = RecformerTokenizer(hf, 2, 16, 64, 10)
    assert tok.start_token_id == hf.convert_tokens_to_ids("<s>") and tok.pad_token_id == hf.pad_token_id
    batch = tok([[[("title", "Heat")]], [[("title", "Toy Story"), ("year", "1995")]]])
    assert batch["input_ids"][0, 0] == tok.start_token_id
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == hf.pad_token_id).all()
    words = hf.convert_ids_to_tokens(batch["input_ids"][1][1:].tolist())
    assert words[:3] == ["Ġtitle", "ĠToy", "ĠStory"]  # word starts marked as in running text
    assert torch.equal(batch["token_type_ids"][1][:4], torch.tensor([START, KEY, VALUE, VALUE]))
