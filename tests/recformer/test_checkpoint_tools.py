"""`lmrec backbone init`, `checkpoint convert`, `checkpoint retokenize` and `doctor` through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.builders import build_longformer_zh, jieba_chars, minilm_dir
from tests.conftest import run_cli

GLOBAL_KEY = "bert.encoder.layer.1.attention.self.query_global.weight"


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    return build_longformer_zh(tmp_path_factory.mktemp("zh") / "longformer_zh", jieba_chars(400))


@pytest.fixture(scope="module")
def init_dir(zh, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "recformer-init"
    res = run_cli("backbone", "init", zh, out, "--max-token-num", "128", "--max-item-embeddings", "11")
    assert res.returncode == 0, res.stderr
    assert "item_position_embeddings" in res.stdout and "derived" in res.stdout
    return out


def test_backbone_init_writes_checkpoint_and_report(init_dir):
    report = json.loads((init_dir / "init_report.json").read_text())
    assert report["counts"]["missing"] == 0 and report["counts"]["wrong_size"] == 0
    state = load_file(str(init_dir / "model.safetensors"))
    assert "lm_head.dense.weight" in state and "longformer.encoder.layer.0.attention.self.key_global.weight" in state
    assert (init_dir / "vocab.txt").exists() or (init_dir / "tokenizer.json").exists()


def test_backbone_init_fails_on_missing_global_projection(zh, tmp_path):
    broken = build_longformer_zh(tmp_path / "broken", jieba_chars(100), drop=(GLOBAL_KEY,))
    res = run_cli("backbone", "init", broken, tmp_path / "out", "--max-token-num", "64")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "query_global" in res.stderr and "global projection missing" in res.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli("backbone", "init", broken, tmp_path / "out", "--max-token-num", "64", "--allow-partial")
    assert res.returncode == 0 and (tmp_path / "out" / "model.safetensors").exists()
    assert "missing" in res.stdout


def test_doctor_passes_on_three_layouts(zh, tiny_backbone, tmp_path):
    layouts = [zh, tiny_backbone]
    src = minilm_dir()
    if src is not None:
        long = tmp_path / "minilm-long"
        res = run_cli("backbone", "convert-to-long", src, long, "--max-positions", "1024", "--attention-window", "64")
        assert res.returncode == 0, res.stderr
        layouts.append(long)
    res = run_cli("doctor", "--backbone", zh, "--pretrain-steps", "8")  # as a user runs it
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stdout.count("PASS") == 3 and "FAIL" not in res.stdout
    from lmrec.recformer.doctor import run_doctor  # what the command calls, without a process per layout

    for path in layouts[1:]:
        checks = run_doctor(path, pretrain_steps=8, log=lambda m: None)
        assert [c.ok for c in checks] == [True] * 3 + [None], (path, checks)  # the finetune run: skipped


def test_doctor_fails_clearly(zh, tmp_path):
    broken = build_longformer_zh(tmp_path / "broken", jieba_chars(100), drop=(GLOBAL_KEY,))
    res = run_cli("doctor", "--backbone", broken)
    assert res.returncode == 1 and "FAIL" in res.stdout and "global projection missing" in res.stdout
    odd = build_longformer_zh(tmp_path / "odd", jieba_chars(100), window=7)
    res = run_cli("doctor", "--backbone", odd)
    assert res.returncode == 1 and "FAIL" in res.stdout and "even" in res.stdout
    assert "Traceback" not in res.stderr


def test_checkpoint_convert_from_lightning_checkpoint(init_dir, zh, tmp_path):
    """A Lightning-style checkpoint (prefix 'model.', word embeddings not saved) → encoder + recommender."""
    state = load_file(str(init_dir / "model.safetensors"))
    word = state.pop("longformer.embeddings.word_embeddings.weight")
    state.pop("lm_head.decoder.weight", None)
    ckpt = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, ckpt)
    res = run_cli("checkpoint", "convert", ckpt, tmp_path / "out", "--backbone", zh, "--config", init_dir)
    assert res.returncode == 0, res.stderr
    assert "'model.'" in res.stdout and "restored from" in res.stdout
    rec = load_file(str(tmp_path / "out" / "recommender" / "model.safetensors"))
    enc = load_file(str(tmp_path / "out" / "encoder" / "model.safetensors"))
    assert torch.equal(rec["longformer.embeddings.word_embeddings.weight"], word)  # the backbone's = the init's
    for k, v in state.items():
        if k.startswith("longformer."):
            assert torch.equal(rec[k], v) and torch.equal(enc[k.removeprefix("longformer.")], v)
    assert not any(k.startswith("lm_head") for k in rec)
    # strict: a missing encoder tensor is an error naming it, and nothing is written
    del state["longformer.encoder.layer.0.output.dense.weight"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    res = run_cli("checkpoint", "convert", ckpt, tmp_path / "out2", "--backbone", zh, "--config", init_dir)
    assert res.returncode == 2 and "missing: longformer.encoder.layer.0.output.dense.weight" in res.stderr
    assert not (tmp_path / "out2").exists()
    # the converted encoder is itself a backbone (layout "recformer")
    res = run_cli("doctor", "--backbone", tmp_path / "out" / "recommender")
    assert res.returncode == 0, res.stdout


def test_retokenize_resizes_vocabulary_and_copies_shared_rows(init_dir, tmp_path):
    from transformers import AutoTokenizer

    new_dir = tmp_path / "newtok"
    chars = jieba_chars(600)[200:]  # overlaps the old vocabulary in part
    build_longformer_zh(new_dir, chars)
    res = run_cli("checkpoint", "retokenize", init_dir, new_dir, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "retokenize_report.json").read_text())
    old_tok, new_tok = AutoTokenizer.from_pretrained(str(init_dir)), AutoTokenizer.from_pretrained(str(new_dir))
    assert report["new_vocab"] == len(new_tok) and 0 < report["rows_copied"] < len(new_tok)
    assert "longformer.embeddings.word_embeddings.weight" in report["resized"] and "lm_head.bias" in report["resized"]
    old = load_file(str(init_dir / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "longformer.embeddings.word_embeddings.weight"
    W_old, W_new = old[key], new[key]
    assert W_new.shape[0] == len(new_tok)
    tok = chars[0]
    assert torch.equal(W_new[new_tok.convert_tokens_to_ids(tok)], W_old[old_tok.convert_tokens_to_ids(tok)])
    assert torch.equal(new["longformer.encoder.layer.1.output.dense.weight"],
                       old["longformer.encoder.layer.1.output.dense.weight"])


def test_backbone_init_writes_the_same_checkpoint_twice(zh, tmp_path):
    """The tensors a backbone lacks come from a seeded generator of their own: the same command, the same
    checkpoint (and the caller's random state is untouched)."""
    from lmrec.recformer.checkpoints import init_checkpoint

    before = torch.random.get_rng_state()
    for name in ("a", "b"):
        init_checkpoint(zh, tmp_path / name, max_token_num=128, max_item_embeddings=11)
    assert torch.equal(before, torch.random.get_rng_state())
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
