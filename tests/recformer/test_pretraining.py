"""Pretraining: BPC / perplexity against a hand computation; `lmrec pretrain` end to end (zero-shot
evaluation of the pretrained model on another dataset, finetuning from it, exact resume after SIGKILL);
`lmrec backbone pretrain-mlm` on Chinese text with a Longformer_ZH-layout backbone lowers validation BPC."""

import json
import math

import numpy as np
import pytest
import torch

from tests.builders import build_longformer_zh, jieba_chars
from tests.conftest import run_cli
from tests.training.resume_helpers import assert_same_weights, checkpoints, run_and_kill
from tests.training.test_distributed import synthetic_dataset
from tests.training.test_launch import torchrun


def chinese_corpus(path, n_docs: int, seed: int):
    """Generated Chinese documents (not real text): real words from jieba's dictionary in a few sentence
    patterns, so that there is something to learn."""
    import jieba

    with open(f"{jieba.__path__[0]}/dict.txt", encoding="utf-8") as f:
        words = [ln.split()[0] for ln in f]
    words = [w for w in words if 2 <= len(w) <= 3][:400]
    rng = np.random.default_rng(seed)
    patterns = ["{a}的{b}很{c}。", "我们在{a}看到了{b}和{c}。", "{a}{b}，{c}！"]

    def doc():
        return "".join(rng.choice(patterns).format(a=rng.choice(words[:200]), b=rng.choice(words[:200]),
                                                   c=rng.choice(words[:30])) for _ in range(rng.integers(2, 6)))

    path.write_text("\n".join(doc() for _ in range(n_docs)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    root = tmp_path_factory.mktemp("zh_mlm")
    return (build_longformer_zh(root / "backbone", jieba_chars(3000), max_positions=256, window=8),
            chinese_corpus(root / "train.txt", 300, 0), chinese_corpus(root / "valid.txt", 40, 1))


def test_bpc_and_perplexity_match_a_hand_computation(zh):
    from lmrec.recformer.backbones import build_recformer
    from lmrec.recformer.masking import WholeWordMasker
    from lmrec.recformer.modeling_recformer import RecformerForPretraining
    from lmrec.recformer.pretrain_mlm import chunk_corpus, mlm_batch, mlm_metrics, read_lines

    backbone, _, valid = zh
    model, rtok, _ = build_recformer(backbone, model_cls=RecformerForPretraining, max_token_num=48)
    tok = rtok.tokenizer
    lines = read_lines(valid)[:6] + ["iphone 小米 note"]  # Latin word pieces cover several characters
    chunks = chunk_corpus(tok, lines, 48)
    batch = mlm_batch(chunks, WholeWordMasker(tok, 0.3), tok.pad_token_id, np.random.default_rng(0))
    got = mlm_metrics(model, [batch])
    nll, n, chars = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for b in range(len(chunks)):
            for pos in range(len(chunks[b].ids)):
                label = int(batch["mlm_labels"][b, pos])
                if label < 0:
                    continue
                ids = batch["input_ids"][b : b + 1, : len(chunks[b].ids)]
                h = model.longformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, pos]
                logits = model.lm_head(h).double()
                nll += float(torch.logsumexp(logits, 0) - logits[label])
                n += 1
                chars += len(tok.convert_ids_to_tokens(label).removeprefix("##"))
    assert got["masked_tokens"] == n and got["masked_chars"] == chars and chars > n  # pieces of >1 char
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-4)


def test_chinese_pretrain_mlm_lowers_validation_bpc(zh, tmp_path):
    backbone, train, valid = zh
    res = run_cli("backbone", "pretrain-mlm", backbone, "--train", train, "--valid", valid, "--output-dir",
                  tmp_path / "run", "train.epochs=3", "train.max_length=64", "train.lr=2e-3", env={"LMREC_REPORT": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "mlm_report.json").read_text())
    bpcs = [report["before"]["bpc"]] + [h["valid_bpc"] for h in report["history"]]
    assert bpcs[-1] < bpcs[0] - 0.5, bpcs
    assert "BPC" in res.stdout and "perplexity" in res.stdout
    # like every training command, it writes its report (the loss, the learning rate, the validation BPC)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "MLM pretraining" in html and "best epoch 3" in html and html.count('<img alt="plot"') == 1
    # the result is a backbone lmrec reads: RecFormer layout, BertTokenizer kept
    res = run_cli("doctor", "--backbone", tmp_path / "run" / "model")
    assert res.returncode == 0, res.stdout + res.stderr


def test_pretrain_mlm_at_4096_tokens_with_a_512_window(tmp_path):
    """The Chinese Longformer's setting: ``auto`` runs the linear-memory blocked kernel, says so, and the
    report has the throughput and the peak memory."""
    backbone = build_longformer_zh(tmp_path / "zh", jieba_chars(3000), hidden=16, layers=1, max_positions=4096,
                                   window=512)
    for name, seed in (("train", 0), ("valid", 1)):  # one ~17k-character document each: four 4k chunks
        short = chinese_corpus(tmp_path / f"{name}.short", 400, seed).read_text(encoding="utf-8")
        (tmp_path / f"{name}.txt").write_text(short.replace("\n", ""), encoding="utf-8")
    res = run_cli("backbone", "pretrain-mlm", backbone, "--train", tmp_path / "train.txt", "--valid",
                  tmp_path / "valid.txt", "--output-dir", tmp_path / "run", "train.max_length=4096",
                  "train.batch_size=2", "train.epochs=1", "train.lr=2e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attention_impl auto: blocked for 4096-token inputs (window 512" in res.stderr
    assert "tokens/s (this process" in res.stderr and "peak memory" in res.stderr
    report = json.loads((tmp_path / "run" / "mlm_report.json").read_text())
    assert report["train_tokens"] > 4 * 4000 and report["train_tokens_per_s"] > 0 and report["peak_memory_mib"] > 0
    assert report["best"]["bpc"] < report["before"]["bpc"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("pretrain")
    a = synthetic_dataset(root / "a", users=40, items=30, seed=0)
    b = synthetic_dataset(root / "b", users=30, items=20, seed=1)
    args = ["pretrain", "--data", a, "--valid", b, f"model.backbone={tiny_backbone}", "model.max_token_num=64",
            "train.epochs=3", "train.batch_size=8", "train.save_steps=2", "model.mlm_weight=0.5"]
    res = run_cli(*args, "--output-dir", root / "ref")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Removed shared tensor" not in res.stderr  # the MLM decoder is tied to the word embeddings: no alarm
    return root, a, b, args


def test_pretrain_logs_and_zero_shot_on_another_dataset(corpus):
    root, a, b, _ = corpus
    m = json.loads((root / "ref" / "metrics.json").read_text())
    assert m["zero_shot"]["dataset"] == str(b) and m["test"]["users"] == 30
    assert len(m["history"]) == 3 and all("valid_ndcg@10" in h for h in m["history"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(next((root / "ref" / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"pretrain/mlm_loss", "pretrain/contrastive_accuracy", "pretrain/valid_ndcg@10"} <= set(ev.Tags()["scalars"])
    res = run_cli("evaluate", "--model", root / "ref" / "model", "--data", b)  # items encoded on the fly
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{m['test']['ndcg@10']:.4f}" in res.stdout  # the same numbers as the pretraining run's zero-shot


def test_finetune_from_the_pretrained_checkpoint(corpus, tmp_path):
    root, a, b, _ = corpus
    res = run_cli("finetune", "--data", b, "--init", root / "ref" / "model", f"output_dir={tmp_path / 'ft'}",
                  "model.max_token_num=64", "train.stage1_epochs=1", "train.stage2_epochs=0", "train.batch_size=8",
                  "train.item_grad=batch")
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("initialised from"))
    assert "copied" in line and "new" not in line  # every encoder tensor comes from pretraining (the MLM head
    # is the only thing left unused)
    # pretraining's temperature (0.05) is replaced by finetuning's default (0.1), and the run says so
    assert "model.temperature=0.1 replaces the checkpoint's 0.05" in res.stdout + res.stderr
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["test"]["users"] == 30


def test_pretrain_killed_and_resumed_is_exact(corpus):
    root, a, b, args = corpus
    run = root / "killed"
    run_and_kill([*args, "--output-dir", run], lambda: len(checkpoints(run, "pretrain")) >= 2, root / "k.log")
    res = run_cli(*args, "--output-dir", run, "--resume-from", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(root / "ref" / "model" / "model.safetensors", run / "model" / "model.safetensors")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (root / "ref", run))
    assert ma["history"] == mb["history"] and ma["test"] == mb["test"]


def test_two_process_pretraining_trains_complete_distinct_batches(tmp_path, tiny_backbone):
    """40 pairs in batches of 6 on 2 processes: Accelerate's even_batches filled the last step with a batch
    from the start of the epoch next to the incomplete one (4 pairs against 6: the gathered contrastive batch
    mixed sizes, and pairs trained twice). Now each step is one complete batch per process, none twice."""
    import os
    import subprocess
    from pathlib import Path

    data = synthetic_dataset(tmp_path / "data")  # 40 users: 40 pairs per epoch
    out = tmp_path / "batches"
    out.mkdir()
    cmd = [*torchrun(tmp_path / "logs"), str(Path(__file__).with_name("pretrain_batches_worker.py")), str(data),
           str(out),
           f"output_dir={tmp_path / 'run'}", f"model.backbone={tiny_backbone}", "model.max_token_num=64",
           "train.batch_size=6", "train.epochs=1", "eval.batch_size=8", "data.valid_users=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 6 complete batches of the 7, over 2 processes
    steps = list(zip(*ranks))
    assert all(len(pairs) == 6 for step in steps for _, pairs in step)
    indices = [b for step in steps for b, _ in step]
    assert sorted(indices) == list(range(6))  # no batch twice: no pair is its own negative or trained twice
    for a, b in steps:  # within a step, the gathered batch holds 12 distinct pairs
        assert not {json.dumps(p) for p in a[1]} & {json.dumps(p) for p in b[1]}
    assert (tmp_path / "run" / "metrics.json").exists()


def test_contrastive_batches_are_complete_and_a_multiple_of_the_processes():
    from lmrec.errors import LmrecError
    from lmrec.recformer.pretrain import contrastive_batches

    pairs = list(range(40))
    assert [len(p) for _, p in contrastive_batches(pairs, 6)] == [6] * 6 + [4]  # one process: as before
    assert [len(p) for _, p in contrastive_batches(pairs[:37], 6)] == [6] * 6  # a last batch of 1: no negatives
    two = contrastive_batches(pairs, 6, processes=2)
    assert [b for b, _ in two] == list(range(6)) and sum((p for _, p in two), []) == pairs[:36]
    assert len(contrastive_batches(pairs, 6, processes=4)) == 4
    with pytest.raises(LmrecError, match="lower train.batch_size"):
        contrastive_batches(pairs[:11], 6, processes=2)
