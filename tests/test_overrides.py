"""One override grammar on every command: ``--set KEY=VALUE`` for a command that trains one model,
``--set [MODEL:]KEY=VALUE`` for one that trains several (no prefix: every model whose configuration has KEY)."""

import pytest
from typer.testing import CliRunner

from lmrec.cli.common import _one_protocol_check, _overrides, _per_model, _split_override
from lmrec.cli.main import app
from lmrec.compare import schemas
from lmrec.config import GenRunConfig, IdRunConfig, RunConfig, has_key
from lmrec.errors import LmrecError


def test_the_model_prefix_is_read_before_the_equals_sign_only():
    assert _split_override("model.backbone=C:/models/x") == ("", "model.backbone", "C:/models/x")
    assert _split_override("sasrec:train.lr=1e-3") == ("sasrec", "train.lr", "1e-3")
    with pytest.raises(LmrecError, match="expected KEY=VALUE"):
        _split_override("train.lr")


def test_has_key_walks_the_sections():
    assert has_key(RunConfig, "model.backbone") and has_key(RunConfig, "output_dir")
    assert not has_key(IdRunConfig, "model.backbone") and has_key(IdRunConfig, "model.layers")
    assert not has_key(RunConfig, "train.lr.x") and not has_key(GenRunConfig, "nope")


def test_one_model_commands_take_set_and_plain_arguments_alike():
    assert _overrides(["train.lr=1e-4"], ["train.epochs=2"]) == ["train.lr=1e-4", "train.epochs=2"]
    with pytest.raises(LmrecError, match="trains one: --set train.lr=1"):
        _overrides(["sasrec:train.lr=1"])


def test_several_model_commands_route_each_override():
    per = _per_model(["train.lr=1e-3", "model.backbone=/b", "sasrec:train.patience=5", "eval.exclude_history=true"],
                     schemas(["recformer", "sasrec", "generative"]))
    assert per["recformer"] == ["train.lr=1e-3", "model.backbone=/b", "eval.exclude_history=true"]
    assert per["sasrec"] == ["train.lr=1e-3", "train.patience=5", "eval.exclude_history=true"]
    assert per["generative"] == ["train.lr=1e-3", "eval.exclude_history=true"]  # its model.* has no backbone
    with pytest.raises(LmrecError, match="'gru4rec' is not a model of this run"):
        _per_model(["gru4rec:train.lr=1"], schemas(["sasrec"]))
    with pytest.raises(LmrecError, match="no model of this run .* has the key 'train.lrr'"):
        _per_model(["train.lrr=1"], schemas(["sasrec", "recformer"]))


def test_a_table_holds_one_exclusion_protocol():
    _one_protocol_check({"a": ["eval.exclude_history=true"], "b": ["eval.exclude_history=true"]})
    _one_protocol_check({"a": [], "b": ["train.lr=1"]})
    with pytest.raises(LmrecError, match="same for every model"):
        _one_protocol_check({"a": ["eval.exclude_history=true"], "b": []})


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--data", "x", "--set", "sasrec:train.lr=1"], "trains one"),
    (["finetune", "--data", "x", "--set", "train.lrr=1"], "did you mean lr"),
    (["baseline", "sasrec", "--set", "train.lr"], "expected KEY=VALUE"),
    (["gen", "train", "--stage", "2", "--model", "m", "--output-dir", "o", "--set", "train.nope=1"], "unknown key"),
    (["compare", "--data", "x", "--models", "sasrec", "--set", "model.backbone=/b"], "no model of this run"),
    (["compare", "--data", "x", "--models", "sasrec,gru4rec", "--set", "sasrec:eval.exclude_history=true"],
     "same for every model"),
    (["quickstart", "--no-generative", "--set", "generative:train.lr=1"], "'generative' is not a model"),
    (["compare", "--data", "x", "--models", "sasrec,nope", "--set", "train.lr=1"], "--models: unknown ['nope']"),
])
def test_a_wrong_override_is_one_message_before_anything_runs(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, argv)
    assert isinstance(res.exception, LmrecError), res.output
    assert message in str(res.exception)
    assert not any(tmp_path.iterdir())  # nothing written
