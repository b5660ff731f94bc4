"""A corpus of broken model directories, run through every command that reads one: each defect is one
message naming the file and what is wrong (a user error: exit 2, no traceback), and nothing is written.

The source models (a RecFormer recommender, an ID baseline, an expanded generative model and its export, a
RecFormer checkpoint, a training checkpoint, a run directory) are built once per module (seconds: tiny and
untrained — the files' layout is what is checked, not their quality); each case copies one and breaks it
in one way. The commands run in-process (typer's runner): a user error surfaces as the LmrecError the
console script prints as one line with exit 2 (two cases run the real console script to show that).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lmrec.errors import LmrecError
from tests.conftest import ITEM_TEXTS, run_cli


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name → directory of every intact source; ``data`` and ``sids`` are the dataset and semantic IDs."""
    import torch

    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.api import build_semantic_ids, expand_model
    from lmrec.generative.export import export_model
    from lmrec.idrec.models import IdRecConfig, IdSeqRec
    from lmrec.idrec.recommender import save_id_model
    from lmrec.recformer.backbones import build_default_backbone, build_recformer
    from lmrec.recformer.build import save_pretraining_model
    from lmrec.recformer.recommender import Recommender
    from tests.serve.test_serve import synthetic_dataset

    root = tmp_path_factory.mktemp("broken_src")
    texts = [" ".join(f"{k} {v}" for k, v in t) for t in ITEM_TEXTS] * 3
    backbone = build_default_backbone(texts, root / "backbone", hidden_size=32, layers=1, heads=2, vocab_size=200,
                                      max_positions=128, attention_window=8)
    data = synthetic_dataset(root / "data", users=20, items=12)
    ds = PreparedDataset(data)
    torch.manual_seed(0)
    model, tok, _ = build_recformer(backbone, max_token_num=64, max_item_embeddings=11)
    rec = Recommender(model, tok, ds.item_ids, ds.item_text)
    rec.encode_items(show_progress=False)
    rec.save_pretrained(root / "recformer")
    save_pretraining_model(model, tok, root / "recformer_ckpt")
    save_id_model(IdSeqRec(IdRecConfig(num_items=ds.num_items, hidden_size=16, heads=2, inner_size=32)),
                  ds.item_ids, ds.item_text, root / "idrec")
    build_semantic_ids(data, root / "sids", levels=2, codes=4, log=lambda m: None)
    expand_model(None, root / "sids", root / "gen", data=data, init="codebook", log=lambda m: None)
    export_model(root / "gen", root / "export")
    step = root / "run" / "checkpoints" / "finetune_stage1" / "step-00000001"  # what save_checkpoint leaves
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"tag": "finetune_stage1", "epoch": 0}) + "\n")
    shutil.copy(root / "recformer" / "model.safetensors", step / "model.safetensors")
    (root / "run" / "metrics.json").write_text(json.dumps({"test": {"ndcg@10": 0.1}}) + "\n")
    return {"recformer": root / "recformer", "recformer_ckpt": root / "recformer_ckpt", "idrec": root / "idrec",
            "gen": root / "gen", "export": root / "export", "run": root / "run", "checkpoint": step,
            "backbone": backbone, "data": data, "sids": root / "sids"}


# ------------------------------------------------------------------------------------------------ defects
def _truncate(d: Path, name: str) -> Path:
    f = d / name
    os.truncate(f, f.stat().st_size // 2)
    return f


def _garbage(d: Path, name: str) -> Path:
    (d / name).write_bytes(b"this is not what it should be {\n")
    return d / name


def _json_key(d: Path, name: str, **values) -> Path:
    cfg = json.loads((d / name).read_text())
    cfg.update(values)
    (d / name).write_text(json.dumps(cfg))
    return d / name


def _no_tokenizer(d: Path, name: str = "") -> Path:
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    return d


def _no_attrs(d: Path, name: str) -> Path:
    t = pq.read_table(d / name)
    pq.write_table(t.drop(["attrs"]), d / name)
    return d / name


def _future(d: Path, name: str = "lmrec.json") -> Path:
    (d / name).write_text(json.dumps({"lmrec_format": 99, "kind": "model"}) + "\n")
    return d / name


# defect name → (source, function, file it breaks, what the message says); the function returns what the
# message must name: the file, or the directory when two of its files disagree
DEFECTS = {
    "truncated weights": ("recformer", _truncate, "model.safetensors", "truncated safetensors"),
    "truncated item table": ("recformer", _truncate, "item_table.safetensors", "truncated safetensors"),
    "config not JSON": ("recformer", _garbage, "config.json", "not JSON"),
    "config hidden size": ("recformer", lambda d, n: _json_key(d, n, hidden_size=64).parent, "config.json",
                           "hidden size 64 in config.json, 32 in model.safetensors"),
    "no tokenizer": ("recformer", _no_tokenizer, "", "no tokenizer files"),
    "garbage items": ("recformer", _garbage, "items.parquet", "not a readable parquet file"),
    "items without attrs": ("recformer", _no_attrs, "items.parquet", "missing column(s) attrs"),
    "from the future": ("recformer", _future, "lmrec.json", "written by a newer lmrec (format 99"),
    "generative given": ("gen", lambda d, n: d, "", "a generative model given to"),
    "ID truncated weights": ("idrec", _truncate, "model.safetensors", "truncated safetensors"),
    "ID catalog size": ("idrec", lambda d, n: _json_key(d, n, num_items=99).parent, "config.json",
                        "items (num_items) 99 in config.json, 12 in model.safetensors"),
    "ID garbage items": ("idrec", _garbage, "items.parquet", "not a readable parquet file"),
    "ID from the future": ("idrec", _future, "lmrec.json", "written by a newer lmrec"),
}
GEN_DEFECTS = {
    "truncated weights": ("gen", _truncate, "model.safetensors", "truncated safetensors"),
    "config not JSON": ("gen", _garbage, "config.json", "not JSON"),
    "config hidden size": ("gen", lambda d, n: _json_key(d, n, hidden_size=64).parent, "config.json",
                           "hidden size 64 in config.json, 128 in model.safetensors"),
    "no tokenizer": ("gen", _no_tokenizer, "", "no tokenizer files"),
    "sid_vocab not JSON": ("gen", _garbage, "sid_vocab.json", "not JSON"),
    "from the future": ("gen", _future, "lmrec.json", "written by a newer lmrec"),
    "RecFormer given": ("recformer", lambda d, n: d, "", "a RecFormer model given to"),
    "ID model given": ("idrec", lambda d, n: d, "", "an ID baseline model given to"),
}


def _broken(sources, tmp_path, spec) -> tuple[Path, Path]:
    """(the broken copy, the file to name in the message)."""
    src, defect, name, _ = spec
    d = tmp_path / f"broken_{src}"
    shutil.copytree(sources[src], d)
    return d, defect(d, name)


def lmrec(*args):
    """The CLI in-process: the result, whose ``exception`` is what the console script would have caught."""
    from lmrec.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def refused(r, file: Path, says: str) -> None:
    """A user error (the console script: one line, exit 2) naming ``file`` and saying ``says``."""
    assert isinstance(r.exception, LmrecError), (r.exception, r.output[-2000:])
    msg = str(r.exception)
    assert str(file) in msg and says in msg, msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1, msg


# ------------------------------------------------------------------------------------------------ recommenders
RANKING = {
    "evaluate": lambda m, s, out: ("evaluate", "--model", m, "--data", s["data"]),
    "recommend": lambda m, s, out: ("recommend", "--model", m, "--history", "i1,i2"),
    "recommend-all": lambda m, s, out: ("recommend-all", "--model", m, "--data", s["data"], "--out",
                                        out / "recs.parquet"),
    "sid build --from": lambda m, s, out: ("sid", "build", "--data", s["data"], "--out", out / "sids", "--from", m),
    "finetune --init": lambda m, s, out: ("finetune", "--data", s["data"], "--init", m, f"output_dir={out / 'run'}"),
}


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("command", RANKING)
def test_a_broken_recommender_is_one_message_naming_the_file(sources, tmp_path, command, defect):
    if command == "finetune --init" and defect.startswith("ID"):
        pytest.skip("an ID model as --init is its own case below")
    model, file = _broken(sources, tmp_path, DEFECTS[defect])
    out = tmp_path / "out"
    r = lmrec(*RANKING[command](model, sources, out))
    refused(r, file, DEFECTS[defect][3])
    assert not out.exists()


def test_an_id_model_given_to_finetune_init_names_the_command_to_use(sources, tmp_path):
    r = lmrec("finetune", "--data", sources["data"], "--init", sources["idrec"], f"output_dir={tmp_path / 'run'}")
    refused(r, sources["idrec"], "an ID model warm-starts an ID run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("defect", ["truncated weights", "config not JSON", "no tokenizer", "from the future",
                                    "generative given", "garbage added items"])
def test_serve_refuses_a_broken_model_before_the_server_starts(sources, tmp_path, monkeypatch, defect):
    """(and a legacy added_items.parquet it would copy into its item store: "garbage added items")"""
    import importlib

    def started(**kw):
        raise AssertionError("the server started with a broken model")

    monkeypatch.setattr(importlib.import_module("lmrec.serve.app"), "serve", started)
    spec = {"generative given": GEN_DEFECTS["truncated weights"],
            "garbage added items": ("recformer", _garbage, "added_items.parquet", "not a readable parquet file")
            }.get(defect) or DEFECTS[defect]
    model, file = _broken(sources, tmp_path, spec)
    r = lmrec("serve", "--model", model, "--data", sources["data"], "--sids", sources["sids"])
    refused(r, file, spec[3])


# ------------------------------------------------------------------------------------------------ generative
GENERATIVE = {
    "gen evaluate": lambda m, s, out: ("gen", "evaluate", "--model", m, "--data", s["data"], "--sids", s["sids"]),
    "gen recommend": lambda m, s, out: ("gen", "recommend", "--model", m, "--data", s["data"], "--sids", s["sids"],
                                        "--history", "i1,i2"),
    "gen export": lambda m, s, out: ("gen", "export", m, out / "export"),
    "gen check-model": lambda m, s, out: ("gen", "check-model", m),
    "gen train": lambda m, s, out: ("gen", "train", "--stage", "2", "--model", m, "--data", s["data"], "--sids",
                                    s["sids"], "--output-dir", out / "run"),
}


@pytest.mark.parametrize("defect", GEN_DEFECTS)
@pytest.mark.parametrize("command", GENERATIVE)
def test_a_broken_generative_model_is_one_message_naming_the_file(sources, tmp_path, command, defect):
    model, file = _broken(sources, tmp_path, GEN_DEFECTS[defect])
    out = tmp_path / "out"
    r = lmrec(*GENERATIVE[command](model, sources, out))
    refused(r, file, GEN_DEFECTS[defect][3])
    assert not out.exists()


def test_a_truncated_export_is_one_message_in_check_model(sources, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(sources["export"], export)
    file = _truncate(export, "model.safetensors")
    refused(lmrec("gen", "check-model", export), file, "truncated safetensors")


@pytest.mark.parametrize("model", ["recformer", "truncated"])
def test_expand_vocab_checks_the_language_model(sources, tmp_path, model):
    if model == "recformer":
        lm, file, says = sources["recformer"], sources["recformer"], "which takes a language model"
    else:
        lm, file = _broken(sources, tmp_path, GEN_DEFECTS["truncated weights"])
        says = "truncated safetensors"
    r = lmrec("gen", "expand-vocab", "--model", lm, "--sids", sources["sids"], "--out", tmp_path / "out")
    refused(r, file, says)
    assert not (tmp_path / "out").exists()


def test_sid_build_encoder_refuses_a_recommender_and_says_to_use_from(sources, tmp_path):
    r = lmrec("sid", "build", "--data", sources["data"], "--out", tmp_path / "sids", "--encoder",
              sources["recformer"])
    refused(r, sources["recformer"], "give it as --from DIR")
    assert not (tmp_path / "sids").exists()


def test_gen_merge_refuses_a_model_that_is_not_an_adapter(sources, tmp_path):
    r = lmrec("gen", "merge", sources["recformer"], tmp_path / "merged")
    refused(r, sources["recformer"], "not a LoRA adapter")
    assert not (tmp_path / "merged").exists()


def test_broken_semantic_ids_are_one_message(sources, tmp_path):
    sids = tmp_path / "sids"
    shutil.copytree(sources["sids"], sids)
    _garbage(sids, "sids.parquet")
    r = lmrec("gen", "evaluate", "--model", sources["gen"], "--data", sources["data"], "--sids", sids)
    refused(r, sids / "sids.parquet", "not a readable parquet file")


# ------------------------------------------------------------------------------------------------ checkpoints, runs
RESUME = {
    "finetune": lambda s, ck, out: ("finetune", "--data", s["data"], "--resume-from", ck, f"output_dir={out}"),
    "baseline": lambda s, ck, out: ("baseline", "sasrec", "--data", s["data"], "--output-dir", out,
                                    f"train.resume_from={ck}"),
    "gen train": lambda s, ck, out: ("gen", "train", "--stage", "2", "--model", s["gen"], "--data", s["data"],
                                     "--sids", s["sids"], "--output-dir", out, "--resume-from", ck),
}


@pytest.mark.parametrize("defect", ["truncated weights", "state not JSON", "from the future"])
@pytest.mark.parametrize("command", RESUME)
def test_resume_from_a_broken_checkpoint_is_refused_before_the_run_directory_exists(sources, tmp_path, command,
                                                                                     defect):
    ck = tmp_path / "ck" / "checkpoints" / "finetune_stage1" / "step-00000001"
    shutil.copytree(sources["checkpoint"], ck)
    file, says = {"truncated weights": (lambda: _truncate(ck, "model.safetensors"), "truncated safetensors"),
                  "state not JSON": (lambda: _garbage(ck, "trainer_state.json"), "not JSON"),
                  "from the future": (lambda: _future(ck), "written by a newer lmrec")}[defect]
    broken = file()
    r = lmrec(*RESUME[command](sources, ck, tmp_path / "out"))
    refused(r, broken, says)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["checkpoint retokenize", "doctor", "pretrain --init"])
def test_a_truncated_recformer_checkpoint_or_backbone_is_one_message(sources, tmp_path, command):
    src = "backbone" if command == "doctor" else "recformer_ckpt"
    d = tmp_path / "ck"
    shutil.copytree(sources[src], d)
    file = _truncate(d, "model.safetensors")
    args = {"checkpoint retokenize": ("checkpoint", "retokenize", d, sources["backbone"], tmp_path / "out"),
            "doctor": ("doctor", "--backbone", d),
            "pretrain --init": ("pretrain", "--data", sources["data"], "--init", d, "--output-dir", tmp_path / "out")}
    refused(lmrec(*args[command]), file, "truncated safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defect", ["truncated state dict", "config not JSON"])
def test_checkpoint_convert_of_a_broken_input_is_one_message(sources, tmp_path, defect):
    f, config = tmp_path / "pretrained.safetensors", tmp_path / "config"
    shutil.copy(sources["recformer_ckpt"] / "model.safetensors", f)
    shutil.copytree(sources["recformer_ckpt"], config)
    broken = _truncate(tmp_path, f.name) if defect == "truncated state dict" else _garbage(config, "config.json")
    r = lmrec("checkpoint", "convert", f, tmp_path / "out", "--config", config)
    refused(r, broken, "truncated safetensors" if defect == "truncated state dict" else "not JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defect", ["metrics not JSON", "metrics a list", "from the future"])
def test_report_of_a_broken_run_directory_is_one_message(sources, tmp_path, defect):
    run = tmp_path / "run"
    shutil.copytree(sources["run"], run)
    file, says = {"metrics not JSON": (lambda: _garbage(run, "metrics.json"), "not JSON"),
                  "metrics a list": (lambda: (run / "metrics.json").write_text("[1, 2]") and run / "metrics.json",
                                     "expected a JSON object"),
                  "from the future": (lambda: _future(run), "written by a newer lmrec")}[defect]
    broken = file()
    r = lmrec("report", run, "--out", tmp_path / "report.html")
    refused(r, broken, says)
    assert not (tmp_path / "report.html").exists()


# ------------------------------------------------------------------------------------------------ the checks can pass
def test_every_directory_lmrec_writes_has_its_format_and_intact_copies_pass(sources, tmp_path):
    """The same commands on the intact sources succeed (the corpus fails for its defects, not for the
    checks); a directory without lmrec.json (written before the marker) is format 1 and still loads."""
    for name in ("recformer", "recformer_ckpt", "idrec", "gen", "export", "sids"):
        assert json.loads((sources[name] / "lmrec.json").read_text())["lmrec_format"] == 1, name
    old = tmp_path / "old"
    shutil.copytree(sources["recformer"], old)
    (old / "lmrec.json").unlink()
    r = lmrec("evaluate", "--model", old, "--data", sources["data"])
    assert r.exit_code == 0, r.output
    r = lmrec("recommend", "--model", sources["idrec"], "--history", "i1,i2")
    assert r.exit_code == 0, r.output
    r = lmrec("gen", "recommend", "--model", sources["gen"], "--data", sources["data"], "--sids", sources["sids"],
              "--history", "i1,i2", "-k", "2")
    assert r.exit_code == 0, r.output
    r = lmrec("gen", "check-model", sources["export"])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(sources["export"]))  # the export stays a Hugging Face directory


@pytest.mark.parametrize("case", ["evaluate truncated", "gen evaluate given RecFormer"])
def test_the_console_script_prints_one_line_and_exits_2(sources, tmp_path, case):
    if case == "evaluate truncated":
        model, file = _broken(sources, tmp_path, DEFECTS["truncated weights"])
        args = ("evaluate", "--model", model, "--data", sources["data"])
    else:
        model = file = sources["recformer"]
        args = ("gen", "evaluate", "--model", model, "--data", sources["data"], "--sids", sources["sids"])
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(file) in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [r.stderr.strip()]
    if case != "evaluate truncated":
        assert f"use `lmrec evaluate --model {model}" in r.stderr
