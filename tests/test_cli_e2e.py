"""End to end through the console script, as a user runs it: prepare → finetune → evaluate → recommend."""

import json

import numpy as np
import pytest

from lmrec.eval.metrics import ndcg_at_k
from tests.conftest import TINY, run_cli


def test_finetune_writes_model_metrics_and_logs(trained):
    run = trained / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for part in (metrics["test"], metrics["valid"], metrics["baselines"]["popularity"]):
        assert {"recall@10", "ndcg@10", "mrr@10", "mrr", "recall@50"} <= set(part)
        assert all(0.0 <= v <= 1.0 for k, v in part.items() if k != "users")
    assert metrics["test"]["users"] == 943
    assert abs(metrics["baselines"]["random"]["recall@10"] - 10 / 1682) < 1e-12  # expected, all items ranked
    assert "test_new_items" not in metrics  # a leave-one-out split: no new-item protocol
    ranks = np.load(run / "test_ranks.npz")  # each test user's rank: what `lmrec compare` pairs models with
    assert len(ranks["users"]) == 943 and ndcg_at_k(ranks["ranks"], 10) == pytest.approx(metrics["test"]["ndcg@10"])
    assert (run / "model" / "item_table.safetensors").exists() and (run / "run_config.yaml").exists()
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    console = (run / "train.log").read_text()  # the console output, kept in the run directory
    assert "stage 1: up to" in console and "valid ndcg@10" in console
    assert b"\r" not in (run / "train.log").read_bytes()  # bytes: read as text, a \r would read as a newline


def test_the_same_seed_in_a_fresh_process_gives_the_same_numbers(trained):
    """The embedded backbone (its tokenizer trained on the item text) and the training are reproducible
    across processes: a second run prints and saves exactly the same metrics."""
    res = run_cli("finetune", "--data", trained / "ml", f"output_dir={trained / 'again'}", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    first, again = (json.loads((trained / d / "metrics.json").read_text()) for d in ("run", "again"))
    assert first["test"] == again["test"] and first["valid"] == again["valid"]
    assert (trained / "run" / "model" / "tokenizer.json").read_bytes() == \
        (trained / "again" / "model" / "tokenizer.json").read_bytes()


def test_evaluate_reloaded_model_gives_identical_metrics(trained):
    res = run_cli("evaluate", "--model", trained / "run" / "model", "--data", trained / "ml")
    assert res.returncode == 0, res.stderr
    # stderr is not a terminal: no bar, transformers' own neither (its \r frames read as lines here)
    assert "Loading weights" not in res.stderr and "it/s]" not in res.stderr
    saved = json.loads((trained / "run" / "metrics.json").read_text())["test"]
    row = next(line for line in res.stdout.splitlines() if "RecFormer" in line)
    values = [float(x) for x in row.replace("│", " ").split()[1:5]]
    expected = [saved[k] for k in ("recall@10", "ndcg@10", "mrr@10", "mrr")]
    assert values == pytest.approx(expected, abs=5e-5)
    # next to the same popularity row the training run reported
    pop = next(line for line in res.stdout.splitlines() if "popularity" in line)
    popularity = json.loads((trained / "run" / "metrics.json").read_text())["baselines"]["popularity"]
    assert [float(x) for x in pop.replace("│", " ").split()[1:5]] == pytest.approx(
        [popularity[k] for k in ("recall@10", "ndcg@10", "mrr@10", "mrr")], abs=5e-5)


def test_recommend_and_unknown_ids(trained):
    model = trained / "run" / "model"
    res = run_cli("recommend", "--model", model, "--history", "50,181,258", "-k", "5")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "title:" in ln]
    assert len(lines) == 5
    assert not any(f"│ {h} " in ln for ln in lines for h in ("50", "181", "258"))  # history excluded
    res = run_cli("recommend", "--model", model, "--history", "50,no-such-item")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown item id 'no-such-item' at position 2" in res.stderr
    res = run_cli("recommend", "--model", model, "--history", " , ")
    assert res.returncode == 2 and "empty history" in res.stderr


def test_help_on_every_command():
    for cmd in ([], ["data", "prepare"], ["quickstart"], ["finetune"], ["evaluate"], ["recommend"],
                ["recommend-all"], ["pretrain"], ["gen", "evaluate"], ["gen", "train"], ["backbone", "pretrain-mlm"]):
        res = run_cli(*cmd, "--help")
        assert res.returncode == 0 and "Usage" in res.stdout, cmd
    from importlib.metadata import version

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lmrec {version('lmrec')}"


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_final_report_only_on_rank_zero(tmp_path, monkeypatch, capsys, rank, printed):
    from lmrec.cli.main import _report

    monkeypatch.setenv("RANK", rank)  # what torchrun sets in every process
    m = {"recall@10": 0.5, "ndcg@10": 0.25, "mrr@10": 0.2, "mrr": 0.3, "users": 7}
    _report({"test": m, "baselines": {"popularity": m}}, "t", tmp_path / "model", tmp_path)
    out = capsys.readouterr().out
    assert ("0.2500" in out and "popularity" in out and "model in" in out) == printed
    assert printed or out == ""


def test_the_new_items_table_shows_every_model_that_ranked_them(capsys):
    from lmrec.cli.main import _print_new_items

    def m(v):
        return {"recall@10": v, "ndcg@10": v, "mrr@10": v, "mrr": v, "users": 5}

    rec = {"test_new_items": {"test": m(0.5), "baselines": {"random": m(0.01)}, "candidates": 30}}
    _print_new_items(rec, others={"hybrid (SASRec + text)": {"test_new_items": {"test": m(0.25)}}, "SASRec": {}})
    out = capsys.readouterr().out
    assert "among the 30 new items" in out and "hybrid (SASRec + text)" in out and "0.2500" in out
    assert "SASRec " not in out.replace("SASRec + text", "")  # a model without the protocol has no row
    _print_new_items({"test": m(0.5)}, others={"hybrid": {"test_new_items": {"test": m(0.25)}}})
    assert capsys.readouterr().out == ""  # not a cold split: no table


def test_evaluate_among_new_items_on_a_cold_split(trained):
    """`--candidates new`: each cold target ranked among the items never seen before test time; the numbers
    equal a hand ranking of the model's own vectors, next to the exact random expectation."""
    import numpy as np
    import torch

    import lmrec
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.recommender import Recommender

    res = run_cli("evaluate", "--model", trained / "run" / "model", "--data", trained / "ml", "--candidates", "new")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "cold-start split" in res.stderr
    cold = trained / "cold"
    assert run_cli("data", "prepare", "ml-100k", cold, "--split", "cold").returncode == 0
    res = run_cli("evaluate", "--model", trained / "run" / "model", "--data", cold, "--candidates", "new")
    assert res.returncode == 0, res.stderr[-2000:]
    words = " ".join(res.stdout.split())  # the table's title folds where the data path makes it long
    assert "new items only" in words and "random (expected)" in words

    r = lmrec.evaluate(trained / "run" / "model", cold, candidates="new", with_baselines=True, ks=[10])
    ds = PreparedDataset(cold)
    new, ex = ds.new_items(), ds.examples("test")
    assert abs(r["baselines"]["random"]["recall@10"] - 10 / len(new)) < 1e-12 and r["test"]["users"] == len(ex)
    rec = Recommender.from_pretrained(trained / "run" / "model")
    items = torch.nn.functional.normalize(rec.model.item_embeddings.float(), dim=-1)[torch.as_tensor(new)]
    q = rec.encode_histories(ex.histories)
    s = q @ items.T
    pos = {int(c): i for i, c in enumerate(new)}
    t = torch.as_tensor([pos[int(x)] for x in ex.targets])
    ranks = (s > s[torch.arange(len(t)), t][:, None] + 1e-6).sum(-1).numpy()
    assert abs(r["test"]["recall@10"] - np.mean(ranks < 10)) < 2 / len(ex)  # ulp-level ties may flip a user

    # finetuning on a cold split reports the new-item protocol too, with the same numbers as `evaluate`
    res = run_cli("finetune", "--data", cold, f"output_dir={trained / 'cold_run'}", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"test targets among the {len(new)} new items only" in res.stdout
    m = json.loads((trained / "cold_run" / "metrics.json").read_text())["test_new_items"]
    again = lmrec.evaluate(trained / "cold_run" / "model", cold, candidates="new", with_baselines=True)
    assert m["test"] == pytest.approx(again["test"], abs=1e-6) and m["baselines"] == again["baselines"]
    assert m["test"]["users"] == len(ex) and m["candidates"] == len(new)


def test_recommend_all_users_to_parquet(trained):
    import pyarrow.parquet as pq

    import lmrec

    out = trained / "recs" / "top5.parquet"
    res = run_cli("recommend-all", "--model", trained / "run" / "model", "--data", trained / "ml", "--out", out,
                  "-k", "5")
    assert res.returncode == 0, res.stderr[-2000:]
    t = pq.read_table(out).to_pydict()
    assert len(t["user_id"]) == 943 * 5 and set(t["rank"]) == {1, 2, 3, 4, 5}
    assert not list(out.parent.glob(".*partial"))
    seqs = pq.read_table(trained / "ml" / "sequences.parquet").to_pydict()
    from lmrec.data.dataset import PreparedDataset

    ds = PreparedDataset(trained / "ml")
    for u in (0, 400, 942):  # the batch path equals the single-history path on the newest 50 items
        hist = [ds.item_ids[i] for i in seqs["items"][u][-50:]]
        single = lmrec.recommend(trained / "run" / "model", hist, 5)
        rows = [i for i, uid in enumerate(t["user_id"]) if uid == seqs["user_id"][u]]
        assert [t["item_id"][i] for i in rows] == [it for it, _, _ in single]
        assert [t["score"][i] for i in rows] == pytest.approx([s for _, _, s in single], abs=1e-3)
        assert not set(hist) & {t["item_id"][i] for i in rows}  # history excluded by default
    res = run_cli("recommend-all", "--model", trained / "run" / "model", "--data", trained / "ml", "--out",
                  trained / "recs" / "x.csv")
    assert res.returncode == 2 and "expected a .parquet file name" in res.stderr and "Traceback" not in res.stderr


def test_counts_out_of_range_are_one_clear_message(trained, tmp_path):
    model, data = trained / "run" / "model", trained / "ml"
    cases = [(["recommend", "--model", model, "--history", "50", "-k", "-3"], "-k must be at least 1, got -3"),
             (["recommend", "--model", model, "--history", "50", "-k", "0"], "-k must be at least 1, got 0"),
             (["recommend-all", "--model", model, "--data", data, "--out", tmp_path / "r.parquet", "-k", "-1"],
              "-k must be at least 1, got -1"),
             (["evaluate", "--model", model, "--data", data, "--ks", "0"], "every cut-off must be at least 1"),
             (["evaluate", "--model", model, "--data", data, "--ks", "10,x"], "expected positive integers")]
    for args, message in cases:
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr and message in res.stderr, (args, res.stderr)
        assert "nan" not in res.stdout and "┏" not in res.stdout  # no table at all
    assert not list(tmp_path.iterdir())  # recommend-all wrote nothing


def test_excluding_the_history_never_returns_history_items(trained):
    import lmrec
    from lmrec.data.dataset import PreparedDataset

    ds = PreparedDataset(trained / "ml")
    history = ds.item_ids[:-3]  # all but three items: only those three can be recommended
    got = lmrec.recommend(trained / "run" / "model", history, k=10)
    assert sorted(it for it, _, _ in got) == sorted(ds.item_ids[-3:])
    assert all(s > float("-inf") for _, _, s in got)
    every = lmrec.recommend(trained / "run" / "model", history, k=10, exclude_history=False)
    assert len(every) == 10


def test_a_failed_training_command_leaves_nothing_behind(trained, tmp_path):
    run = tmp_path / "run"
    res = run_cli("finetune", "--data", tmp_path / "nonexistent", f"output_dir={run}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nonexistent" in res.stderr
    assert not run.exists()
    (tmp_path / "not-a-model").mkdir()  # fails after the run directory was opened
    res = run_cli("finetune", "--data", trained / "ml", f"output_dir={run}",
                  f"model.backbone={tmp_path / 'not-a-model'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not-a-model" in res.stderr
    assert not run.exists()


def test_doctor_on_a_wrong_path_is_bad_input(tmp_path):
    res = run_cli("doctor", "--backbone", tmp_path / "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no such directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_cli("doctor", "--backbone", tmp_path / "empty")
    assert res.returncode == 2 and "not a model directory" in res.stderr


def test_a_device_that_is_not_there_is_one_clear_message(trained, tmp_path):
    """--device on every inference command: auto runs where the accelerator is (the CPU here); a device that is
    not there stops with one message (exit 2), never a silent fallback."""
    import torch

    import lmrec
    from lmrec.errors import LmrecError

    model, data = trained / "run" / "model", trained / "ml"
    wrong = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    res = run_cli("recommend", "--model", model, "--history", "50", "--device", wrong)
    assert res.returncode == 2 and "Traceback" not in res.stderr and f"--device {wrong}" in res.stderr, res.stderr
    with pytest.raises(LmrecError, match="--device"):
        lmrec.recommend_all(model, data, tmp_path / "r.parquet", device=wrong)
    with pytest.raises(LmrecError, match="expected auto, cpu, cuda or cuda:N"):
        lmrec.evaluate(model, data, device="banana")
    assert not list(tmp_path.iterdir())
    auto = lmrec.evaluate(model, data, ks=(10,), device="auto")
    assert auto == lmrec.evaluate(model, data, ks=(10,), device="cpu")
