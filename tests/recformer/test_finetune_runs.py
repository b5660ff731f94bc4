"""What a new user met running `finetune` (issue 21, point 11): a run of one optimizer step per stage trains;
the same command re-run into the same directory gives the same model and metrics; a backbone keeps its own
attention window; `run_config.yaml` re-runs the run (finetune, baseline, pretrain); `train.max_steps` gets a
clear answer."""

import json

import pytest
import yaml
from safetensors.torch import load_file

import lmrec
from tests.conftest import TINY, run_cli
from tests.training.test_distributed import synthetic_dataset

# 40 users × 2 samples per user in batches of 128: one optimizer step per epoch
ONE_STEP = [*TINY, "train.batch_size=128"]
WORDS = "longformer.embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("data") / "walk")


@pytest.fixture(scope="module")
def first(data, tmp_path_factory):
    """One finetuning run (stage 1 and stage 2 one epoch of one step each), its outputs read into memory."""
    out = tmp_path_factory.mktemp("ft") / "run"
    logged = []
    r = lmrec.finetune(data, output_dir=out, overrides=ONE_STEP, log=logged.append)
    return {"dir": out, "metrics": r.metrics, "log": logged,
            "model": load_file(str(out / "model" / "model.safetensors")),
            "backbone": load_file(str(out / "backbone" / "model.safetensors"))}


def test_one_optimizer_step_per_stage_trains_and_is_warned(first):
    """The warmup started at lr 0: one step per stage left the model exactly as built (the untrained model's
    metrics were printed as the finetuned ones)."""
    assert not first["model"][WORDS].equal(first["backbone"][WORDS])
    assert sum("only 1 optimizer step(s)" in line for line in first["log"]) == 2  # stage 1 and stage 2


def test_the_same_command_into_the_same_directory_gives_the_same_model(first, data):
    """The first run builds the embedded backbone, the re-run (--overwrite) builds it again: the build drew
    from the global RNG after the seed was set, so every later dropout mask differed (other weights, other
    metrics)."""
    again = lmrec.finetune(data, output_dir=first["dir"], overrides=[*ONE_STEP, "train.overwrite=true"],
                           log=lambda m: None)
    weights = load_file(str(first["dir"] / "model" / "model.safetensors"))
    assert weights.keys() == first["model"].keys() and all(weights[k].equal(first["model"][k]) for k in weights)
    assert again.metrics["test"] == first["metrics"]["test"] and again.metrics["valid"] == first["metrics"]["valid"]


def test_a_backbone_keeps_its_own_attention_window(data, tmp_path, tiny_backbone):
    """tiny_backbone's window is 8 (as 512 after `convert-to-long --attention-window 512`): finetuning
    replaced it by the finetune default 64, silently. A window set in the config replaces it, and says so."""
    from lmrec.recformer.build import build_checked

    r = lmrec.finetune(data, output_dir=tmp_path / "run", log=lambda m: None, overrides=[
        f"model.backbone={tiny_backbone}", "model.max_token_num=64", "train.stage1_epochs=1", "train.stage2_epochs=0",
        "train.item_grad=batch", "train.batch_size=32"])
    assert json.loads((r.model_dir / "config.json").read_text())["attention_window"] == [8, 8]
    assert yaml.safe_load((r.run_dir / "run_config.yaml").read_text())["model"]["attention_window"] is None
    said = []
    model, _ = build_checked(tiny_backbone, said.append, max_token_num=64, attention_window=16)
    assert model.config.attention_window == [16, 16]
    assert any("model.attention_window=16 replaces the backbone's attention window 8" in s for s in said)
    said.clear()
    build_checked(tiny_backbone, said.append, max_token_num=64, attention_window=8)
    assert not any("replaces" in s for s in said)  # the backbone's own value: nothing to say


def test_run_config_yaml_reruns_the_run(data, tmp_path):
    """`run_config.yaml` recorded `data.path: null` (the dataset came from --data): `lmrec finetune -c
    RUN/run_config.yaml` stopped with "no dataset". Now it re-runs (with --overwrite: the directory holds that
    run), with the same metrics; the same for `lmrec baseline`."""
    run = tmp_path / "run"
    res = run_cli("finetune", "--data", data, f"output_dir={run}", *ONE_STEP)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = yaml.safe_load((run / "run_config.yaml").read_text())
    assert saved["data"]["path"] == str(data.resolve())
    before = json.loads((run / "metrics.json").read_text())
    res = run_cli("finetune", "-c", run / "run_config.yaml", "--overwrite")  # (without: refused, test_output_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((run / "metrics.json").read_text())
    assert after["test"] == before["test"] and after["valid"] == before["valid"]
    from lmrec.config import IdRunConfig
    from lmrec.idrec.train import train_baseline

    base = tmp_path / "sasrec"
    first = train_baseline(IdRunConfig(output_dir=str(base), train={"epochs": 2}), data, log=lambda m: None)
    assert yaml.safe_load((base / "run_config.yaml").read_text())["data"]["path"] == str(data.resolve())
    res = run_cli("baseline", "sasrec", "-c", base / "run_config.yaml", "--overwrite")  # no --data: the config's
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((base / "metrics.json").read_text())["test"] == first.metrics["test"]


def test_pretraining_run_config_reruns_without_data_options(data, tmp_path, tiny_backbone):
    """`lmrec pretrain` required --data even with a run's own config, which names the corpus."""
    from lmrec.config import PretrainRunConfig, load_config
    from lmrec.recformer.pretrain import pretrain

    run = tmp_path / "pre"
    cfg = load_config(None, [f"data.paths=[{data}]", f"output_dir={run}", f"model.backbone={tiny_backbone}",
                             "model.max_token_num=64", "train.batch_size=8", "train.epochs=1"],
                      schema=PretrainRunConfig)
    first = pretrain(cfg, log=lambda m: None)
    saved = yaml.safe_load((run / "run_config.yaml").read_text())["data"]
    assert saved["paths"] == [str(data.resolve())]
    res = run_cli("pretrain", "-c", run / "run_config.yaml", "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["test"] == first.metrics["test"]


def test_finetune_says_why_max_steps_is_not_supported():
    from lmrec.config import load_config
    from lmrec.errors import ConfigError

    with pytest.raises(ConfigError, match="train.stage1_epochs and train.stage2_epochs"):
        load_config(None, ["train.max_steps=5"])
