"""`gen train --data-config`: a stage on a packed stream of OpenOneRec-format parquet (our samples mixed
with general text), its metrics, exact resume after SIGKILL mid-stream, and 2 torchrun ranks reading
disjoint data."""

import json
import os
import re
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ONE_THREAD, run_cli
from tests.training.resume_helpers import assert_same_weights, checkpoints, run_and_kill
from tests.training.test_distributed import synthetic_dataset
from tests.training.test_launch import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
cli = partial(run_cli, env=ONE_THREAD)  # the commands on one thread too (conftest.ONE_THREAD)
STREAM = ["train.batch_size=2", "train.num_training_steps=12", "train.lr=3e-3", "train.log_every=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lmrec.data.chat_format import ChatRow, write_shards
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative import sid as sid_mod
    from lmrec.generative.api import expand_model, write_chat_samples

    root = tmp_path_factory.mktemp("stream")
    data = synthetic_dataset(root / "data", users=30, items=20)
    ds = PreparedDataset(data)
    vectors = np.random.default_rng(0).normal(size=(ds.num_items, 8)).astype(np.float32)
    sids, books = sid_mod.build_sids(ds.item_ids, vectors, levels=2, codes=4, seed=0)
    sids.save(root / "sids", books)
    expand_model(None, root / "sids", root / "model", data=data, log=lambda m: None)
    write_chat_samples(data, root / "sids", root / "samples", ["data.targets_per_user=4"], rows_per_file=25)
    text = [ChatRow(f"wiki-{i}", "wiki", None, [f"thing {i % 7} is {'red' if i % 2 else 'blue'} and kind {i % 5}"])
            for i in range(40)]
    write_shards(text, root / "wiki", rows_per_file=10)
    cfg = {"sources": [{"path": str(root / "samples" / "train"), "weight": 1.0, "name": "rec"},
                       {"path": str(root / "wiki"), "weight": 0.5, "name": "wiki"}],
           "max_length": 256, "num_epochs": 1, "num_workers": 1, "local_shuffle_buffer_size": 16,
           "pack_buffer_size": 8}
    (root / "data_config.json").write_text(json.dumps(cfg))
    return root


def train_in_process(corpus: Path, run: Path, *overrides: str, stage: str = "2"):
    """``gen train --stage STAGE --data-config`` in this process, where the command itself is not what a test
    is about: the function the command calls."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    cfg = load_config(None, [f"output_dir={run}", f"train.stage={stage}", *overrides], schema=GenRunConfig)
    return train_generative(cfg, model_dir=corpus / "model", data_config=corpus / "data_config.json",
                            log=lambda m: None)


def stream_args(corpus: Path) -> list:
    """`gen train --data-config` with validation and test on the prepared dataset, a checkpoint every 2 steps."""
    return ["gen", "train", "--stage", "2", "--model", corpus / "model", "--data-config", corpus / "data_config.json",
            "--data", corpus / "data", "--sids", corpus / "sids", *STREAM, "eval.beams=5", "eval.ks=[5]",
            "eval.metric=ndcg@5", "train.peak_tflops=1", "train.save_steps=2"]


@pytest.fixture(scope="module")
def stream_run(corpus, tmp_path_factory):
    """One uninterrupted stream stage through the command: its output is checked, and the killed-and-resumed
    run must equal it."""
    run = tmp_path_factory.mktemp("stream_run") / "run"
    return run, cli(*stream_args(corpus), "--output-dir", run)


def test_stream_stage_trains_validates_and_logs_its_metrics(corpus, stream_run):
    run, res = stream_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "streaming" in res.stderr and "generative" in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] > 3 and metrics["test"]["users"] == 30
    import pyarrow.parquet as pq

    rec_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (corpus / "samples" / "train").glob("*.parquet"))
    assert metrics["stream"]["samples"] == {"rec": rec_rows, "wiki": 20}  # every row once; weight 0.5: half
    assert "source wiki: 20 samples" in res.stderr and "loss_itemic" in res.stdout + res.stderr  # the console
    assert "loss_itemic" in (run / "train.log").read_text()
    events = b"".join(p.read_bytes() for p in (run / "logs").rglob("events.out.tfevents.*"))
    for tag in (b"loss_itemic", b"loss_text", b"loss_source/rec", b"loss_source/wiki", b"padding_share",
                b"real_tokens_per_s", b"peak_memory_mib", b"stage2/mfu", b"grad_norm"):
        assert tag in events, tag


def test_itemic_range_is_derived_and_a_wrong_one_is_an_error(corpus, tmp_path):
    cfg = json.loads((corpus / "data_config.json").read_text())
    cfg["itemic_id_range"] = [1, 2]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = cli("gen", "train", "--stage", "2", "--model", corpus / "model", "--data-config", tmp_path / "c.json",
              "--output-dir", tmp_path / "run", *STREAM)
    assert res.returncode == 2 and "does not match the model's sid_vocab.json" in res.stderr
    assert not (tmp_path / "run").exists()


def test_sigkill_mid_stream_then_resume_gives_identical_weights(corpus, stream_run, tmp_path):
    """Killed after a checkpoint in the middle of the stream and resumed: the weights, the step count, the
    history (the validation at the stream's end included), the stream's counts and the test metrics equal
    those of the uninterrupted run with the same arguments (`stream_run`)."""
    ref, res = stream_run
    assert res.returncode == 0, res.stderr[-3000:]
    args = stream_args(corpus)
    run = tmp_path / "killed"
    run_and_kill([*args, "--output-dir", run], lambda: len(checkpoints(run, "stage2")) >= 1, tmp_path / "k.log",
                 env=ONE_THREAD)
    assert not (run / "model").exists()
    saved = checkpoints(run, "stage2")[-1]
    assert (saved / "loader_state_rank0.json").exists()
    res = cli(*args, "--output-dir", run, "--resume-from", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    assert_same_weights(ref / "model" / "model.safetensors", run / "model" / "model.safetensors")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert a["steps"] == b["steps"] and a["history"] == b["history"] and a["stream"] == b["stream"]
    assert a["test"] == b["test"]


def test_two_torchrun_ranks_read_disjoint_data(corpus, tmp_path):
    worker = Path(__file__).with_name("stream_worker.py")
    cmd = [*torchrun(tmp_path / "logs"), str(worker), str(corpus / "data_config.json"), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(json.loads((tmp_path / "all.json").read_text()))


def gen_train_under_torchrun(run: Path, *args) -> subprocess.CompletedProcess:
    cmd = [*torchrun(run.parent / "logs"), "-m", "lmrec.cli.main", "gen", "train", "--output-dir", str(run),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_a_stream_stage_under_torchrun_on_two_processes_resumes_every_ranks_own_counts(corpus, tmp_path):
    """Both ranks step together until the first one's stream ends (the rest is dropped, never a hang), the
    step's token count is summed over the ranks, and rank 0 writes the model and the counts. The schedule's
    length (no train.num_training_steps) is the estimate from sampled token lengths, within one step of the
    steps run. Resumed on 2 processes from a checkpoint in the middle, every rank continues with its own
    counts and running loss: the counts, the loss and the weights equal the uninterrupted run's."""
    args = ["--stage", "2", "--model", corpus / "model", "--data-config", corpus / "data_config.json",
            "train.batch_size=2", "train.lr=3e-3", "train.log_every=2", "train.save_steps=2",
            "train.save_total_limit=10"]
    ref = tmp_path / "ref"
    res = gen_train_under_torchrun(ref, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["steps"] >= 4 and (ref / "model" / "model.safetensors").exists()
    assert 0 < metrics["stream"]["samples"]["rec"] and res.stdout.count("steps; model in") == 1
    estimate = int(re.search(r"learning-rate schedule over (\d+) steps", res.stdout + res.stderr).group(1))
    assert abs(estimate - metrics["steps"]) <= 1, (estimate, metrics["steps"])
    middle = checkpoints(ref, "stage2")[0]
    assert middle.name == "step-00000002"
    own = [json.loads((middle / f"extra_state_rank{r}.json").read_text())["counts"]["samples"] for r in range(2)]
    assert own[0] != own[1]  # the ranks read different files: one rank's counts cannot stand for both
    run = tmp_path / "resumed"
    res = gen_train_under_torchrun(run, *args, "--resume-from", middle)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    again = json.loads((run / "metrics.json").read_text())
    assert again["stream"] == metrics["stream"] and again["steps"] == metrics["steps"]
    assert again["history"] == metrics["history"]  # the epoch's loss from every rank's own running sum
    assert_same_weights(ref / "model" / "model.safetensors", run / "model" / "model.safetensors")


def stream_start_up(corpus: Path, mix):
    """What ``gen train --data-config`` does before training, in this process: the loader and the schedule."""
    from types import SimpleNamespace

    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import _stream_plan
    from lmrec.generative.vocab import load_lm, read_meta
    from lmrec.training.loop import make_accelerator

    model, tok = load_lm(corpus / "model")
    cfg = load_config(None, ["train.batch_size=2"], schema=GenRunConfig)
    run = SimpleNamespace(acc=make_accelerator("no", seed=0), is_main=True)
    return _stream_plan(cfg, mix, tok, read_meta(corpus / "model"), model, run, lambda m: None)


def test_start_up_reads_every_parquet_footer_once(corpus, monkeypatch):
    """The files of a stream and the schedule's estimate come from one pass over the footers (on rank 0,
    sent to the others under torchrun): each file is opened once."""
    from collections import Counter

    import pyarrow.parquet as pq

    from lmrec.data.data_config import load_data_config

    opened, real = Counter(), pq.ParquetFile

    def counted(path, *args, **kwargs):
        opened[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", counted)
    make_loader, stage, _ = stream_start_up(corpus, load_data_config(corpus / "data_config.json"))
    files = [*(corpus / "samples" / "train").glob("*.parquet"), *(corpus / "wiki").glob("*.parquet")]
    assert opened == Counter(str(f) for f in files)  # every file once, nothing else
    assert stage.num_training_steps >= 1


def test_a_glob_that_reaches_the_valid_and_test_samples_is_refused(corpus):
    """``gen samples`` writes valid/ and test/ (answers included) next to train/: a recursive glob over its
    output would train on them. Its files say their split in their footers: refused before training."""
    from lmrec.data.data_config import DataMixConfig
    from lmrec.errors import ConfigError

    cfg = json.loads((corpus / "data_config.json").read_text())
    cfg["sources"][0]["path"] = str(corpus / "samples" / "**" / "*.parquet")
    with pytest.raises(ConfigError, match=r"samples/(test|valid)/part-\d+-of-\d+\.parquet: holds '(test|valid)' "):
        stream_start_up(corpus, DataMixConfig.model_validate(cfg))


def test_a_stream_that_ends_before_its_first_step_is_an_error(corpus, tmp_path):
    """A rank with fewer packs than one step's would end the run at step 0 and save the unchanged model.
    Raised as an LmrecError, which the command prints as one message with exit status 2 (as for the wrong
    itemic range above)."""
    from lmrec.errors import LmrecError

    with pytest.raises(LmrecError, match="the stream ended before the first optimizer step"):
        train_in_process(corpus, tmp_path / "run", "train.grad_accum=100")
    assert not (tmp_path / "run" / "model").exists()


def test_stage1_on_a_stream_with_the_chunked_loss_keeps_every_old_row(corpus, tmp_path):
    from lmrec.generative.vocab import read_meta

    run = tmp_path / "run"
    train_in_process(corpus, run, *STREAM, "train.max_steps=4", "train.loss_chunk_tokens=32",
                     "train.weight_decay=0.1", stage="1")
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    meta = read_meta(corpus / "model")
    new = sorted(sum(meta["level_token_ids"], []) + [meta["sid_begin"], meta["sid_end"]])
    before = load_file(str(corpus / "model" / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(run / "model" / "model.safetensors"))["model.embed_tokens.weight"]
    old = torch.ones(len(before), dtype=torch.bool)
    old[new] = False
    assert torch.equal(before[old], after[old]) and not torch.equal(before[~old], after[~old])


def test_export_a_checkpoint_and_check_it(corpus, tmp_path):
    run = tmp_path / "run"
    train_in_process(corpus, run, *STREAM, "train.max_steps=3", "train.save_steps=3", "train.loss_chunk_tokens=64")
    ckpt = checkpoints(run, "stage2")[-1]
    out = tmp_path / "export-fp32"
    res = cli("gen", "export", ckpt, out, "--dtype", "fp32", "--max-shard-size", "500KB")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model.safetensors.index.json").exists() and (out / "sid_vocab.json").exists()
    res = cli("gen", "check-model", out, "--source", ckpt, "--data", corpus / "data", "--sids",
              corpus / "sids", "--beams", "5")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("PASS") == 4 and "FAIL" not in res.stdout and "export" in res.stdout
    from lmrec.generative.export import check_model, export_model  # what the two commands call

    out = export_model(ckpt, tmp_path / "export-bf16", dtype="bf16", max_shard_size="500KB")
    checks = check_model(out, source=ckpt, data=corpus / "data", sids=corpus / "sids", beams=5)
    assert [c.ok for c in checks[:3]] == [True] * 3, checks  # the ranking check (4th) says what bf16 changed
    assert checks[3].ok is not None and {"test", "source"} <= set(checks[3].metrics), checks
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export-fp32")
    weights = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(exported.model.layers[0].mlp.up_proj.weight, weights["lm.model.layers.0.mlp.up_proj.weight"])
    # a broken export (a shard missing) is bad input: one message naming the shard, exit 2
    shard = sorted((tmp_path / "export-fp32").glob("model-*.safetensors"))[0]
    shard.unlink()
    res = cli("gen", "check-model", tmp_path / "export-fp32", "--source", ckpt)
    assert res.returncode == 2 and f"{shard}: missing" in res.stderr and "Traceback" not in res.stderr


def test_stage1_sharded_under_torchrun_in_bf16_keeps_every_old_row(corpus, tmp_path):
    """train.fsdp through the command: built on the meta device, filled from rank 0, stage 1's hook on each
    process's shard of the embedding rows, bf16 compute over fp32 masters, activation checkpointing, the
    chunked loss; the gathered model is saved as a plain transformers directory."""
    from transformers import AutoConfig

    from lmrec.generative.vocab import read_meta

    run = tmp_path / "run"
    cmd = [*torchrun(tmp_path / "logs"), "-m", "lmrec.cli.main", "gen", "train", "--stage", "1", "--model",
           str(corpus / "model"), "--data-config", str(corpus / "data_config.json"), "--output-dir", str(run),
           *STREAM, "train.max_steps=3", "train.fsdp=true", "train.mixed_precision=bf16",
           "train.activation_checkpointing=true", "train.loss_chunk_tokens=32", "train.weight_decay=0.1",
           "train.save_steps=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "sharded over 2 processes" in out and "compute in torch.bfloat16" in out, out[-2000:]
    assert (run / "checkpoints" / "stage1" / "step-00000002" / "sharded").is_dir()
    assert AutoConfig.from_pretrained(run / "model").architectures == ["Qwen3ForCausalLM"]
    meta = read_meta(corpus / "model")
    new = sorted(sum(meta["level_token_ids"], []) + [meta["sid_begin"], meta["sid_end"]])
    before = load_file(str(corpus / "model" / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    old = torch.ones(len(before["model.embed_tokens.weight"]), dtype=torch.bool)
    old[new] = False
    emb_before, emb_after = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert torch.equal(emb_before[old], emb_after[old]) and not torch.equal(emb_before[~old], emb_after[~old])
    assert all(torch.equal(before[k], after[k]) for k in before if "embed_tokens" not in k and "lm_head" not in k)
    # the sharded checkpoint → one process's HF export, checked against the checkpoint (in this process: what
    # `gen export` and `gen check-model` call; test_export_a_checkpoint_and_check_it runs the commands)
    from lmrec.generative.export import check_model, export_model

    ckpt = run / "checkpoints" / "stage1" / "step-00000002"
    export_model(ckpt, tmp_path / "hf", dtype="fp32")
    checks = check_model(tmp_path / "hf", source=ckpt)
    assert all(c.ok is not False for c in checks), checks  # what the command's exit status says
    assert any(c.name == "logits equal the source's" and c.ok for c in checks), checks
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(exported[old], emb_before[old]) and not torch.equal(exported[~old], emb_before[~old])


def test_sharded_on_one_process_with_a_prepared_dataset_is_tested_at_the_end(corpus, tmp_path):
    run = tmp_path / "run"
    res = cli("gen", "train", "--stage", "2", "--model", corpus / "model", "--data", corpus / "data", "--sids",
              corpus / "sids", "--output-dir", run, "train.fsdp=true", "train.epochs=1", "train.batch_size=16",
              "eval.beams=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no beam-search validation during training" in res.stdout + res.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["users"] == 30 and "ndcg@10" in metrics["test"]
    from lmrec.config import GenRunConfig, load_config
    from lmrec.errors import ConfigError

    for bad, why in [("train.lora=true", "not supported"), ("train.mixed_precision=fp16", "use mixed_precision bf16")]:
        with pytest.raises(ConfigError, match=why):
            load_config(None, ["train.fsdp=true", bad], schema=GenRunConfig)


def test_a_stream_that_outlasts_its_schedule_says_which_length_to_set():
    """A stream longer than the estimated schedule trains on at the final learning rate: the run says so and
    names the value of train.num_training_steps that fits; a constant schedule has nothing to outlast."""
    from lmrec.config import GenRunConfig
    from lmrec.generative.train import _check_stream_end
    from lmrec.training.loop import StreamStage

    plan, lines = StreamStage("stage2", 1e-3, num_training_steps=100), []
    _check_stream_end(130, plan, GenRunConfig(), lines.append)
    assert lines == ["the stream ran 30 steps past the learning-rate schedule's 100 (at its final learning rate); "
                     "set train.num_training_steps to 130"]
    _check_stream_end(100, plan, GenRunConfig(), lines.append)
    _check_stream_end(130, plan, GenRunConfig(train={"lr_schedule": "constant"}), lines.append)
    assert len(lines) == 1
