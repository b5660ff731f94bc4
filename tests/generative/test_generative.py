"""The generative family on tiny models: semantic IDs, vocabulary expansion (Qwen3 and T5), constrained
beam search against brute-force scoring, stage-1 freezing under weight decay, LoRA merge."""

import contextlib

import numpy as np
import pytest
import torch

from lmrec.generative.beam import SidTrie, constrained_beam_search
from lmrec.generative.default_model import build_default_lm
from lmrec.generative.prompts import encode_training
from lmrec.generative.samples import pad_batch
from lmrec.generative.sid import assign_codes, build_sids, collision_rate, disambiguate
from lmrec.generative.vocab import expand_vocab, load_lm

TEXTS = ["title: Toy Story; year: 1995", "title: GoldenEye; genres: Action", "hello world"] * 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 16)).astype(np.float32)
    sids, books = build_sids([f"i{i}" for i in range(40)], emb, levels=2, codes=4)
    build_default_lm(TEXTS, root / "lm", hidden_size=32, layers=1, heads=2, kv_heads=1, head_dim=16, vocab_size=300)
    meta = expand_vocab(root / "lm", sids, root / "lm2", books=books, init="codebook", log=lambda m: None)
    return root, sids, books, meta


def test_semantic_ids_are_unique_and_reported(setup):
    _, sids, books, _ = setup
    assert collision_rate(sids.codes) == 0.0
    r = sids.report
    assert r["collision_rate_after"] == 0.0 and r["largest_bucket"] >= 1 and len(r["usage_per_level"]) == 2
    assert (r["extra_level"] > 0) == (r["collision_rate_before"] > 0)
    # a new item is encoded by the same codebooks: an existing embedding gets its own first-levels code
    emb = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    assert (assign_codes(emb, books) == sids.codes[:, :2]).all()


def test_disambiguation_numbers_items_within_buckets():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2]])
    out, extra = disambiguate(codes)
    assert extra == 3 and out[:, 2].tolist() == [0, 1, 0, 2]


def test_expand_vocab_pads_and_keeps_ties(setup):
    root, sids, _, meta = setup
    model, tok = load_lm(root / "lm2")
    assert model.get_input_embeddings().weight.shape[0] % 256 == 0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.convert_tokens_to_ids("<s_a_0>") == meta["level_token_ids"][0][0] >= meta["old_tokenizer_size"]
    assert tok.tokenize("<|sid_begin|><s_a_1><s_b_3><|sid_end|>") == ["<|sid_begin|>", "<s_a_1>", "<s_b_3>",
                                                                        "<|sid_end|>"]
    old, _ = load_lm(root / "lm")
    n = meta["old_tokenizer_size"]
    assert torch.equal(old.get_input_embeddings().weight[:n], model.get_input_embeddings().weight[:n])


def test_expand_vocab_t5(tmp_path, setup):
    """T5 (transformers 5 always ties its input and output embeddings)."""
    from transformers import T5Config, T5ForConditionalGeneration

    root, sids, _, _ = setup
    _, tok = load_lm(root / "lm")
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    meta = expand_vocab(tmp_path / "t5", sids, tmp_path / "t5x", init="mean", log=lambda m: None)
    model, _ = load_lm(tmp_path / "t5x")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] % 256 == 0 and meta["tied"] and head.data_ptr() == emb.data_ptr()
    n = meta["old_tokenizer_size"]
    assert torch.allclose(emb[meta["level_token_ids"][1][2]], emb[:n].mean(0), atol=1e-6)


def test_expand_vocab_untied_decoder(tmp_path, setup):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root, sids, _, _ = setup
    _, tok = load_lm(root / "lm")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    meta = expand_vocab(tmp_path / "q", sids, tmp_path / "qx", init="mean", log=lambda m: None)
    model, _ = load_lm(tmp_path / "qx")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not meta["tied"] and head.data_ptr() != emb.data_ptr() and emb.shape == head.shape
    new, n = meta["sid_end"], meta["old_tokenizer_size"]
    assert torch.allclose(emb[new], emb[:n].mean(0), atol=1e-6)
    assert torch.allclose(head[new], head[:n].mean(0), atol=1e-6)


def _prompt(tok, meta, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    return {"input_ids": ids + [meta["sid_begin"]]}


@contextlib.contextmanager
def _attention(model, name):
    from lmrec.training import attention

    before = attention.current(model)
    attention.apply(model, name)
    yield
    attention.apply(model, before)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "varlen"])
def test_beam_search_equals_brute_force_scoring(setup, backend):
    """Every item's beam score equals its teacher-forced log-probability, whatever attention the model was set
    to: eager adds the tree mask to the scores (a boolean mask would mask nothing there), and a model set to
    varlen for packed training decodes with sdpa meanwhile."""
    from lmrec.training import attention

    root, sids, _, meta = setup
    model, tok = load_lm(root / "lm2")
    model.eval()
    attention.apply(model, attention.VARLEN if backend == "varlen" else backend)
    trie = SidTrie(sids.codes, meta["level_token_ids"])
    prompts = [_prompt(tok, meta, "hello <|sid_begin|><s_a_1><s_b_2><|sid_end|>"), _prompt(tok, meta, "world")]
    batch = pad_batch(prompts, tok.pad_token_id, left=True)  # different lengths: left padding is exercised
    N = len(sids.codes)
    items, scores = constrained_beam_search(model, trie, batch, beams=N + 7)  # more beams than items
    assert (items[:, N:] == -1).all() and torch.isinf(scores[:, N:]).all()
    for b, p in enumerate(prompts):
        assert sorted(items[b, :N].tolist()) == list(range(N))  # every real item, once
        got = torch.tensor([dict(zip(items[b, :N].tolist(), scores[b, :N].tolist()))[i] for i in range(N)])
        codes = torch.tensor([[meta["level_token_ids"][lv][c] for lv, c in enumerate(row)] for row in sids.codes])
        seqs = torch.cat([torch.tensor(p["input_ids"]).expand(N, -1), codes], 1)  # every item, teacher-forced
        with torch.no_grad(), _attention(model, "sdpa"):
            lp = model(seqs).logits.log_softmax(-1)[:, len(p["input_ids"]) - 1: -1]
        ref = lp.gather(-1, codes[..., None])[..., 0].sum(-1)
        assert (got - ref).abs().max() < 1e-4
        assert all(np.diff(scores[b, :N].numpy()) <= 1e-6)  # best first
    assert attention.current(model) == (attention.VARLEN if backend == "varlen" else backend)  # restored
    few, fs = constrained_beam_search(model, trie, batch, beams=3)
    assert few.shape == (2, 3) and (few >= 0).all() and len(set(few[0].tolist())) == 3


def test_tokenize_chat_labels_only_the_assistant_turn(setup):
    root, _, _, _ = setup
    _, tok = load_lm(root / "lm2")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "<|sid_begin|><s_a_1><|sid_end|>"}]
    x = encode_training(tok, msgs, seq2seq=False)
    labelled = [t for t, lab in zip(x["input_ids"], x["labels"]) if lab != -100]
    assert tok.decode(labelled).startswith("<|sid_begin|><s_a_1><|sid_end|>")
    assert tok.decode(labelled).replace("<|sid_begin|><s_a_1><|sid_end|>", "").strip() == "<|im_end|>"


def test_residual_kmeans_reconstructs_better_at_each_level():
    from lmrec.generative.sid import residual_kmeans

    x = np.random.default_rng(1).normal(size=(300, 12)).astype(np.float32)
    codes, books = residual_kmeans(x, levels=4, codes=8)
    recon, errors = np.zeros_like(x), []
    for lv, book in enumerate(books):
        recon += book[codes[:, lv]]
        errors.append(float(((x - recon) ** 2).sum(1).mean()))
    assert all(b < a for a, b in zip([float((x ** 2).sum(1).mean())] + errors, errors)), errors


def test_expansion_keeps_old_token_ids(setup):
    root, _, _, meta = setup
    _, old = load_lm(root / "lm")
    _, new = load_lm(root / "lm2")
    text = "title: Toy Story; year: 1995 hello world"
    assert old(text)["input_ids"] == new(text)["input_ids"]
    assert all(new.convert_tokens_to_ids(t) == i for t, i in old.get_vocab().items())
    assert min(sum(meta["level_token_ids"], [])) >= len(old)


@pytest.mark.parametrize("seed", range(6))
def test_constrained_decoding_property_random_catalogs(setup, seed):
    """Random catalogs (levels, fan-outs, sizes) and beam widths below/above the catalog size: every
    returned item is real and distinct, -1 only after the real ones, scores sorted and equal to the
    teacher-forced log-probability of the returned item's code."""
    root, _, _, _ = setup
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(1, 4))
    sizes = [int(rng.integers(2, 6)) for _ in range(levels)]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, levels)
    n = int(rng.integers(1, len(grid) + 1))
    codes = grid[rng.choice(len(grid), n, replace=False)]
    model, tok = load_lm(root / "lm")
    model.eval()
    vocab = rng.choice(np.arange(10, len(tok)), size=sum(sizes), replace=False).tolist()
    level_ids, s = [], 0
    for size in sizes:
        level_ids.append(vocab[s : s + size])
        s += size
    trie = SidTrie(codes, level_ids)
    prompts = [{"input_ids": rng.integers(10, len(tok), size=int(rng.integers(2, 7))).tolist()} for _ in range(3)]
    batch = pad_batch(prompts, tok.pad_token_id, left=True)
    for beams in (1, max(1, n // 2), n + 3):
        items, scores = constrained_beam_search(model, trie, batch, beams)
        for b, p in enumerate(prompts):
            got = [i for i in items[b].tolist() if i >= 0]
            assert len(got) == min(beams, n) and len(set(got)) == len(got)
            assert items[b, len(got):].eq(-1).all()
            sc = scores[b, : len(got)].numpy()
            assert np.all(np.diff(sc) <= 1e-5)
            for i, score in zip(got[:3], sc[:3]):
                toks = [level_ids[lv][c] for lv, c in enumerate(codes[i])]
                with torch.no_grad():
                    lp = model(torch.tensor([p["input_ids"] + toks])).logits.log_softmax(-1)[0]
                ref = sum(lp[len(p["input_ids"]) - 1 + j, t].item() for j, t in enumerate(toks))
                assert abs(ref - score) < 1e-4


def test_new_items_get_unique_codes_in_the_nearest_bucket_with_room():
    """`codes_for` (POST /items of a generative service): an item whose nearest bucket is full goes to the
    nearest bucket with a free disambiguation number; the catalog's codes plus the new ones stay unique."""
    from lmrec.generative.recommender import GenerativeRecommender

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    sids, books = build_sids([f"i{i}" for i in range(60)], emb, levels=2, codes=4)
    extra = sids.config.extra_level
    assert extra > 1
    rec = GenerativeRecommender.__new__(GenerativeRecommender)  # only the codes and codebooks are needed
    rec.sids, rec.books = sids, books
    # the fullest bucket, and as many copies of one of its items as it has numbers
    full = max({tuple(r[:2]) for r in sids.codes.tolist()}, key=lambda k: (sids.codes[:, :2] == k).all(1).sum())
    member = int(np.flatnonzero((sids.codes[:, :2] == full).all(1))[0])
    new = rec.codes_for(np.repeat(emb[member : member + 1], extra, axis=0))
    together = np.concatenate([sids.codes, new])
    assert (new >= 0).all() and collision_rate(together) == 0.0
    assert (new[:, 0] == full[0]).all()  # the first level is the item's own
    inside = (new[:, :2] == full).all(1)
    assert inside.sum() == extra - (sids.codes[:, :2] == full).all(1).sum()  # the bucket's free numbers first
    assert (new[~inside, 2] < extra).all()  # then the nearest other buckets, with real tokens


def test_sequence_windows_train_every_target_once_with_context():
    from lmrec.generative.prompts import encode_sequence, sequence_windows

    items = list(range(100, 123))  # 23 items: 22 targets
    wins = sequence_windows(items, max_history=7, stride=4)
    targets = [t for w, first in wins for t in w[first:]]
    assert sorted(targets) == items[1:]  # every position after the first, once
    assert all(len(w) <= 8 for w, _ in wins) and wins[-1][0][-1] == items[-1]
    assert all(first >= 4 for _, first in wins[1:])  # later windows: at least window - stride items of context
    assert sequence_windows([5], 3, None) == [] and sequence_windows([5, 6], 3, None) == [([5, 6], 1)]
    enc = encode_sequence([[1, 2], [3, 4], [5, 6]], first_target=1)
    assert enc == {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]}


def test_excluding_the_history_takes_history_items_out_of_the_beams_before_ranking():
    from lmrec.generative.recommender import GenerativeRecommender

    rec = GenerativeRecommender.__new__(GenerativeRecommender)  # only rank_fn's arithmetic is under test
    beams = torch.tensor([[5, 3, 7, 9], [3, 9, 1, 2], [4, 6, 8, 0]])
    rec.beam_search = lambda histories, n: (beams, torch.zeros(beams.shape))
    histories = [np.array([3, 9]), np.array([3, 9]), np.array([1])]
    targets = np.array([7, 2, 5])  # found at 2 and 3 among the beams; the last one not at all
    ranks, bad = rec.rank_fn(4)(histories, targets)
    assert ranks.tolist() == [2, 3, np.inf] and not bad.any()
    ranks, _ = rec.rank_fn(4, exclude_history=True)(histories, targets)
    assert ranks.tolist() == [1, 1, np.inf]  # 3 (and 3, 9) ranked above the target were history items


def _paths(trie) -> dict[tuple[int, ...], int]:
    """Every token path of a trie → its item (what constrained decoding can emit)."""
    out, todo = {}, [(0, 0, ())]
    while todo:
        d, node, path = todo.pop()
        s, e = int(trie.start[d][node]), int(trie.end[d][node])
        for child in range(s, e):
            p = (*path, int(trie.token[d][child]))
            if d + 1 == trie.depth:
                out[p] = int(trie.leaf_item[child])
            else:
                todo.append((d + 1, child, p))
    return out


def test_items_inserted_into_the_trie_decode_as_in_a_rebuilt_one():
    """The service adds items by inserting them into the decoding trie (no rebuild): the paths, their items
    and the fan-outs equal a trie built from every item at once, in any insertion order."""
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 5, size=(300, 3)), axis=0)  # shared prefixes at every level
    codes = codes[rng.permutation(len(codes))]
    levels = [list(range(100 * i, 100 * i + 5)) for i in range(3)]
    full = SidTrie(codes, levels)
    part = SidTrie(codes[:40], levels)
    rest = rng.permutation(np.arange(40, len(codes)))
    for chunk in np.array_split(rest, 7):
        part.insert(codes[chunk], chunk)
    assert _paths(part) == _paths(full) and len(_paths(full)) == len(codes)
    assert part.fanout == full.fanout
    with pytest.raises(ValueError, match="not unique"):
        part.insert(codes[:1], np.array([0]))
