"""bf16 training commands on CUDA as a user runs them: every generative stage (packed through varlen
attention, chosen by ``auto``), RecFormer finetuning and Longformer MLM pretraining; FSDP2 on one process over
NCCL with a distributed checkpoint and a resume that ends where the uninterrupted run ends."""

import json

import numpy as np
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.training.test_distributed import synthetic_dataset

STREAM = ["train.batch_size=2", "train.num_training_steps=6", "train.lr=3e-3", "train.log_every=2",
          "train.loss_chunk_tokens=256"]


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_every_generative_stage_trains_in_bf16_with_varlen_packing(corpus, tmp_path):
    s1 = tmp_path / "s1"
    res = run_cli("gen", "train", "--stage", "1", "--model", corpus / "model", "--data", corpus / "data", "--sids",
                  corpus / "sids", "--output-dir", s1, "train.epochs=1", "train.batch_size=16", "eval.beams=5",
                  "eval.ks=[5]", "eval.metric=ndcg@5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _metrics(s1)["attn_implementation"] == "sdpa"  # padded batches: sdpa
    for stage, src in (("2", s1 / "model"), ("sft", tmp_path / "s2" / "model")):
        run = tmp_path / ("s2" if stage == "2" else "sft")
        res = run_cli("gen", "train", "--stage", stage, "--model", src, "--data-config", corpus / "data_config.json",
                      "--data", corpus / "data", "--sids", corpus / "sids", "--output-dir", run, *STREAM,
                      "eval.beams=5", "eval.ks=[5]", "eval.metric=ndcg@5")
        assert res.returncode == 0, res.stderr[-3000:]
        m = _metrics(run)
        assert m["attn_implementation"] == "lmrec_varlen", m["attn_implementation"]
        assert all(np.isfinite(h["loss"]) for h in m["history"]) and m["steps"] >= 3
        assert "mixed precision" not in res.stderr or "bf16" in res.stderr


def test_fsdp_on_one_gpu_saves_and_resumes_to_the_same_model(corpus, tmp_path):
    args = ["gen", "train", "--stage", "2", "--model", corpus / "model", "--data-config", corpus / "data_config.json",
            *STREAM, "train.fsdp=true", "train.activation_checkpointing=true", "train.save_steps=2",
            "train.save_total_limit=5"]
    res = run_cli(*args, "--output-dir", tmp_path / "ref")
    assert res.returncode == 0, res.stderr[-3000:]
    first = tmp_path / "ref" / "checkpoints" / "stage2" / "step-00000002"
    assert (first / "sharded").is_dir()
    res = run_cli(*args, "--output-dir", tmp_path / "resumed", "--resume-from", first)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("ref", "resumed"))
    assert a.keys() == b.keys()
    for k in a:  # flash attention's backward is not bitwise deterministic: close, not identical
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-3 * max(1.0, a[k].float().abs().max().item()), k


def test_recformer_finetune_and_longformer_mlm_in_bf16(tmp_path):
    from tests.builders import build_longformer_zh, jieba_chars
    from tests.recformer.test_pretraining import chinese_corpus

    data = synthetic_dataset(tmp_path / "data", users=40, items=30)
    res = run_cli("finetune", "--data", data, f"output_dir={tmp_path / 'ft'}", "model.default_hidden_size=64",
                  "model.default_layers=2", "model.max_token_num=64", "train.stage1_epochs=2",
                  "train.stage2_epochs=1", "train.batch_size=16", "train.item_grad=batch")
    assert res.returncode == 0, res.stderr[-3000:]
    m = _metrics(tmp_path / "ft")
    assert np.isfinite(m["test"]["ndcg@10"]) and m["test"]["ndcg@10"] > 0
    backbone = build_longformer_zh(tmp_path / "zh", jieba_chars(3000), hidden=64, layers=2, max_positions=4096,
                                   window=512)
    for name, seed in (("train", 0), ("valid", 1)):
        short = chinese_corpus(tmp_path / f"{name}.short", 400, seed).read_text(encoding="utf-8")
        (tmp_path / f"{name}.txt").write_text(short.replace("\n", ""), encoding="utf-8")
    res = run_cli("backbone", "pretrain-mlm", backbone, "--train", tmp_path / "train.txt", "--valid",
                  tmp_path / "valid.txt", "--output-dir", tmp_path / "mlm", "train.max_length=4096",
                  "train.batch_size=2", "train.epochs=2", "train.lr=2e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "mlm" / "mlm_report.json").read_text())
    assert report["history"][-1]["valid_bpc"] < report["before"]["bpc"]


def test_inference_on_cuda_ranks_as_on_the_cpu_and_the_service_answers_as_the_cli(recformer_model):
    """--device cuda: evaluate gives the CPU's metrics (within float rounding); the service on the GPU returns
    the CPU CLI's lists."""
    import httpx

    import lmrec
    from lmrec.serve.app import build_app
    from tests.serve.test_serve import Server, _histories

    model, data = recformer_model
    cpu = lmrec.evaluate(model, data, ks=(10,), device="cpu")
    gpu = lmrec.evaluate(model, data, ks=(10,), device="cuda")
    assert all(abs(cpu[k] - gpu[k]) < 1e-3 for k in cpu if k != "users")
    hists = _histories(10)
    expected = [[it for it, _, _ in lmrec.recommend(model, h, k=5, device="cpu")] for h in hists]
    with Server(build_app(model=str(model), device="cuda", log=lambda m: None)) as srv:
        srv.wait_ready()
        got = [[hit["item_id"] for hit in httpx.post(srv.url + "/recommend", json={"history": h, "k": 5}).json()
                ["items"]] for h in hists]
    assert sum(a == b for a, b in zip(got, expected)) >= 9  # a near-tie may swap between devices
