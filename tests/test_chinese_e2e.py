"""Chinese item text end to end through the CLI: a generated shop dataset (Chinese keys/values, full-width
punctuation, mixed Chinese/Latin titles) → `data prepare` → a tiny Longformer_ZH-layout backbone (random
weights, vocabulary = characters of jieba's dictionary) → `doctor` → `finetune` (which must learn the users'
walk) → `evaluate`."""

import csv
import json
import random

import pytest

from tests.builders import build_longformer_zh, jieba_chars
from tests.conftest import run_cli

BRANDS = ["小米", "华为", "全聚德", "李宁", "三只松鼠", "Apple", "OPPO"]
KINDS = [("手机", "数码"), ("耳机", "数码"), ("烤鸭", "食品"), ("坚果", "食品"), ("跑鞋", "运动"), ("外套", "服饰")]


def generated_chinese_shop(root, n_users=120, n_items=60, seed=0):
    """A generated dataset: users walk through items of one category mostly in catalogue order."""
    rng = random.Random(seed)
    items = []
    for i in range(n_items):
        brand = BRANDS[i % len(BRANDS)]
        kind, cat = KINDS[i % len(KINDS)]
        items.append({"item_id": f"i{i}", "title": f"{brand}{kind} 第{i}号（{rng.choice(['新款', '经典', 'Pro'])}）！",
                      "brand": brand, "category": f"{cat}，{kind}"})
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "title", "brand", "category"])
        w.writeheader()
        w.writerows(items)
    with open(root / "inter.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            start = rng.randrange(n_items)
            for t in range(rng.randint(5, 12)):
                w.writerow([f"u{u}", f"i{(start + t * len(KINDS)) % n_items}", 1_600_000_000 + 100 * t])
    return root


@pytest.fixture(scope="module")
def zh_run(tmp_path_factory):
    root = generated_chinese_shop(tmp_path_factory.mktemp("zh_shop"))
    res = run_cli("data", "prepare", root / "inter.csv", root / "data", "--items", root / "items.csv",
                  "--text", "标题=title,品牌=brand,类目=category")
    assert res.returncode == 0, res.stderr
    backbone = build_longformer_zh(root / "longformer_zh", jieba_chars(3000), max_positions=512, window=16)
    return root, backbone


def test_chinese_items_are_prepared_and_tokenized_by_characters(zh_run):
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.backbones import build_recformer

    root, backbone = zh_run
    ds = PreparedDataset(root / "data")
    assert ds.item_text[0][0][0] == "标题" and "（" in ds.item_text[0][0][1]
    _, tok, _ = build_recformer(backbone, max_token_num=128, max_item_embeddings=11)
    b = tok([[ds.item_text[0]]])
    pieces = tok.tokenizer.convert_ids_to_tokens(b["input_ids"][0].tolist())
    assert pieces[0] == "[CLS]" and "标" in pieces and "题" in pieces  # char-level WordPiece
    assert pieces.count("[UNK]") == 0
    assert b["token_type_ids"][0, :3].tolist() == [0, 1, 1]  # start, key 标 题


def test_doctor_finetune_evaluate_on_chinese_data(zh_run):
    root, backbone = zh_run
    res = run_cli("doctor", "--backbone", backbone, "--pretrain-steps", "5", "--finetune-epochs", "1",
                  "--data", root / "data", "--max-token-num", "128")
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert res.stdout.count("PASS") == 4
    res = run_cli("finetune", "--data", root / "data", "--backbone", backbone, f"output_dir={root / 'run'}",
                  "model.max_token_num=128", "train.stage1_epochs=1", "train.stage2_epochs=1",
                  "train.batch_size=32", "train.item_grad=batch")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["test"]["users"] == 120
    assert all(0.0 <= v <= 1.0 for k, v in metrics["test"].items() if k != "users")
    # the walk is learned: well above popularity and the random expectation, where an untrained model ranks
    base = metrics["baselines"]
    best = max(base["popularity"]["ndcg@10"], base["random"]["ndcg@10"])
    assert metrics["test"]["ndcg@10"] >= 2 * best, (metrics["test"]["ndcg@10"], base)
    res = run_cli("evaluate", "--model", root / "run" / "model", "--data", root / "data")
    assert res.returncode == 0, res.stderr
    assert f"{metrics['test']['ndcg@10']:.4f}" in res.stdout
    res = run_cli("recommend", "--model", root / "run" / "model", "--history", "i0,i6", "-k", "3")
    assert res.returncode == 0 and "标题" in res.stdout


def test_finetune_from_backbone_init_checkpoint(zh_run):
    """`backbone init` → `finetune --init` (the path of RecFormer's save_longformer_ckpt.py)."""
    root, backbone = zh_run
    res = run_cli("backbone", "init", backbone, root / "init", "--max-token-num", "128")
    assert res.returncode == 0, res.stderr
    res = run_cli("finetune", "--data", root / "data", "--init", root / "init", f"output_dir={root / 'run_init'}",
                  "model.max_token_num=128", "train.stage1_epochs=1", "train.stage2_epochs=0",
                  "train.batch_size=32", "train.item_grad=batch")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "initialised from" in res.stderr and "missing" not in res.stderr.split("initialised from")[1][:200]
    assert json.loads((root / "run_init" / "metrics.json").read_text())["test"]["users"] == 120
