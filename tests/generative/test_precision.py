"""Precision and export of the generative family on a tiny Qwen3 stored in bf16 (as real Qwen3 checkpoints
are): training keeps fp32 master weights (an update below bf16's resolution is not lost), expand-vocab
saves in the dtype its source is stored in and says so, the export defaults to fp32, a checkpoint without
an untied head is refused, and check-model compares the export's ranking metrics with the source's."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmrec.errors import LmrecError
from lmrec.generative.default_model import build_default_lm
from lmrec.generative.sid import build_sids
from lmrec.generative.vocab import expand_vocab, load_lm, read_meta
from tests.conftest import ONE_THREAD, run_cli
from tests.training.test_distributed import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
cli = partial(run_cli, env=ONE_THREAD)  # the commands on one thread too (conftest.ONE_THREAD)

TEXTS = ["title: thing 1 red; kind: kind 1", "title: thing 2 blue; kind: kind 2", "hello world"] * 10
NORM = "model.layers.0.input_layernorm.weight"  # all 1.0 at init: an update below 2**-8 vanishes in bf16
PROJ = "model.layers.0.mlp.up_proj.weight"


def _dtypes(model_dir) -> set[str]:
    out = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def _tiny_lm(out, *, tied: bool = True, dtype=torch.bfloat16):
    """The embedded tiny Qwen3, untied on request, saved in ``dtype``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    build_default_lm(TEXTS, out, hidden_size=32, layers=1, heads=2, kv_heads=1, head_dim=16, vocab_size=300)
    model, tok = load_lm(out)
    if not tied:
        torch.manual_seed(1)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=16, tie_word_embeddings=False, pad_token_id=tok.pad_token_id))
    model.to(dtype).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    synthetic_dataset(root / "data", users=40, items=30)
    emb = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    sids, books = build_sids([f"i{k}" for k in range(30)], emb, levels=2, codes=4)
    sids.save(root / "sids", books)
    _tiny_lm(root / "lm16")
    logs: list[str] = []
    expand_vocab(root / "lm16", sids, root / "x16", books=books, log=logs.append)
    return root, sids, books, logs


def test_expand_vocab_keeps_the_stored_dtype_and_says_so(setup, tmp_path):
    root, sids, books, logs = setup
    meta = read_meta(root / "x16")
    assert _dtypes(root / "lm16") == {"BF16"} and _dtypes(root / "x16") == {"BF16"}
    assert meta["dtype"] == "bfloat16" and "saved in bfloat16" in logs[-1]
    # the new rows: the mean of the old rows computed in fp32, rounded to bf16 once
    x = load_file(str(root / "x16" / "model.safetensors"))["model.embed_tokens.weight"]
    n = meta["old_tokenizer_size"]
    assert torch.equal(x[meta["sid_end"]], x[:n].float().mean(0).to(torch.bfloat16))
    _tiny_lm(tmp_path / "lm32", dtype=torch.float32)  # an fp32 source stays fp32
    meta32 = expand_vocab(tmp_path / "lm32", sids, tmp_path / "x32", init="mean", log=lambda m: None)
    assert meta32["dtype"] == "float32"
    assert _dtypes(tmp_path / "x32") == {"F32"}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_small_update_survives_training_from_a_bf16_checkpoint(setup, tmp_path, lora):
    """lr 1e-6: every step moves a weight by about 1e-6, far below bf16's spacing at 1.0 (2**-7); with bf16
    weights (no fp32 master copy) the saved model would equal the start. (Trained in this process: what
    `gen train` calls; the command runs in tests/generative/test_training.py.)"""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    root, *_ = setup
    run = tmp_path / "run"
    said: list[str] = []
    cfg = load_config(None, [f"output_dir={run}", f"train.stage={'sft' if lora else '2'}",
                             f"train.lora={str(lora).lower()}", "train.epochs=1", "train.batch_size=32",
                             "train.lr=1e-6", "train.warmup_ratio=0", "train.lr_schedule=constant", "eval.beams=4",
                             "eval.ks=[5,10]"], schema=GenRunConfig)
    train_generative(cfg, model_dir=root / "x16", data=root / "data", sids_dir=root / "sids", log=said.append)
    before = load_file(str(root / "x16" / "model.safetensors"))
    if lora:  # the frozen base is saved as it came (exact), the trained part in fp32
        assert _dtypes(run / "model" / "base_model") == {"BF16"}
        adapter = load_file(str(run / "model" / "adapter_model.safetensors"))
        assert {v.dtype for v in adapter.values()} == {torch.float32}
        delta = next(v for k, v in adapter.items() if "trainable_tokens" in k)  # the new token rows, in this order:
        new = json.loads((run / "model" / "adapter_config.json").read_text())["trainable_token_indices"]
        changed = delta != before["model.embed_tokens.weight"][new].float()
        from lmrec.generative.recommender import load_generative  # `gen merge`, `gen evaluate`, the service

        merged = load_generative(run / "model")[0].merge_and_unload()  # on the fp32 base it was trained on
        assert torch.equal(merged.get_input_embeddings().weight[new], delta)
    else:
        after = load_file(str(run / "model" / "model.safetensors"))
        assert {v.dtype for v in after.values()} == {torch.float32}
        norm = after[NORM]
        assert (before[NORM] == 1).all() and (norm != 1).all()  # every weight of the norm moved ...
        assert ((norm - 1).abs() < 2 ** -9).all() and (norm.to(torch.bfloat16) == 1).all()  # ... below bf16's step
        changed = after[PROJ] != before[PROJ].float()
    assert changed.float().mean() > 0.9
    assert any("float32 master weights" in m for m in said), said
    assert any(f"{root / 'x16'} stores bfloat16" in m for m in said), said


def _checkpoint(root, model_dir, state: dict) -> object:
    """A training checkpoint as the loop writes it (weights under the chunked-loss wrapper's ``lm.``) in a
    run directory that records the model it started from."""
    ckpt = root / "run" / "checkpoints" / "stage2" / "step-00000001"
    ckpt.mkdir(parents=True)
    (root / "run" / "source_model.json").write_text(json.dumps({"model": str(model_dir)}))
    save_file({f"lm.{k}": v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    return ckpt


def test_export_refuses_a_checkpoint_without_its_untied_head(setup, tmp_path):
    from lmrec.generative.export import export_model

    root, sids, *_ = setup
    _tiny_lm(tmp_path / "untied", tied=False, dtype=torch.float32)
    expand_vocab(tmp_path / "untied", sids, tmp_path / "ux", init="mean", log=lambda m: None)
    model, _ = load_lm(tmp_path / "ux")
    state = {k: v + 0.01 for k, v in model.state_dict().items()}  # "trained" weights
    with_head = _checkpoint(tmp_path / "a", tmp_path / "ux", state)
    out = export_model(with_head, tmp_path / "export", dtype="fp32")
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"], state["lm_head.weight"])
    no_head = _checkpoint(tmp_path / "b", tmp_path / "ux", {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(LmrecError, match=r"missing \['lm_head.weight'\]"):
        export_model(no_head, tmp_path / "export2", dtype="fp32")
    assert not (tmp_path / "export2").exists()
    # a tied head is the embedding matrix: a checkpoint without it exports (the loop's writer drops it)
    model, _ = load_lm(root / "x16", dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out = export_model(_checkpoint(tmp_path / "c", root / "x16", state), tmp_path / "export3", dtype="fp32")
    exported, _ = load_lm(out)
    assert torch.equal(exported.lm_head.weight, state["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def fragile(setup):
    """An fp32 model whose item scores differ by less than bf16 can hold: every itemic row is a ±1 sign
    vector plus an offset below half of bf16's spacing there, so a bf16 copy has identical rows (ties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmrec.generative.recommender import save_generative

    root, *_ = setup
    model = AutoModelForCausalLM.from_pretrained(root / "x16", dtype=torch.float32)
    tok, meta = AutoTokenizer.from_pretrained(root / "x16"), read_meta(root / "x16")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for level in meta["level_token_ids"]:
            sign = torch.where(torch.rand(emb.shape[1], generator=g) < 0.5, -1.0, 1.0)
            for t in level:
                emb[t] = sign * (1 + 0.0035 * torch.rand(emb.shape[1], generator=g))
    assert emb[meta["level_token_ids"][0]].to(torch.bfloat16).unique(dim=0).shape[0] == 1
    return save_generative(model, tok, root / "x16", root / "fragile")


def test_export_is_fp32_by_default_and_check_model_compares_the_rankings(setup, fragile, tmp_path):
    from lmrec.generative.export import check_model, export_model

    root, *_ = setup
    res = cli("gen", "export", fragile, tmp_path / "fp32")
    assert res.returncode == 0 and "(fp32)" in res.stdout, res.stderr[-2000:]
    assert _dtypes(tmp_path / "fp32") == {"F32"}
    checks = check_model(tmp_path / "fp32", source=fragile, data=root / "data", sids=root / "sids", beams=10)
    ranking = checks[-1]
    assert [c.ok for c in checks] == [True] * 4, checks
    assert ranking.metrics["test"] == ranking.metrics["source"]  # the same ranks, not merely close
    assert "0 of 40 test users' target rank changed" in ranking.detail
    # bf16 on request: the rows the model tells items apart by collapse, and check-model says what changed
    export_model(fragile, tmp_path / "bf16", dtype="bf16")
    res = cli("gen", "check-model", tmp_path / "bf16", "--source", fragile, "--data", root / "data", "--sids",
              root / "sids", "--beams", "10")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "ranking metrics equal the source" in x)
    assert "FAIL" in line and "→" in line and "source (fp32)" in res.stdout and "Traceback" not in res.stderr
    # the same numbers in the check: a tolerance wide enough passes it; without --source they are shown, not compared
    wide = check_model(tmp_path / "bf16", source=fragile, data=root / "data", sids=root / "sids", beams=10,
                       metric_tolerance=10.0)[-1]
    src, got = wide.metrics["source"], wide.metrics["test"]
    worst = max((k for k in src if k != "users"), key=lambda k: abs(got[k] - src[k]) / max(src[k], 1e-12))
    assert wide.ok and abs(got[worst] - src[worst]) > 0.02 * src[worst]
    assert f"{worst} {src[worst]:.4f} → {got[worst]:.4f}" in line
    alone = check_model(tmp_path / "bf16", data=root / "data", sids=root / "sids")[-1]
    assert alone.ok is None and "source" not in alone.metrics and alone.metrics["test"] == got
