"""A run never writes into a directory that holds something else, unless it resumes or is told to replace it."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from lmrec.config import IdRunConfig, RunConfig
from lmrec.errors import LmrecError
from lmrec.training.run import check_output_dir
from tests.conftest import run_cli
from tests.serve.test_serve import synthetic_dataset


def test_check_output_dir_refuses_what_a_run_would_mix_with(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(output_dir=str(out))
    assert check_output_dir(cfg) == []  # missing
    out.mkdir()
    assert check_output_dir(cfg) == []  # empty
    (out / "data").mkdir()
    (out / "data" / "x").write_text("")
    assert check_output_dir(cfg, inputs=(out / "data",)) == []  # only the run's own input
    assert check_output_dir(RunConfig(output_dir=str(out), data={"path": str(out / "data" / "x")})) == []
    (out / "sasrec").mkdir()
    with pytest.raises(LmrecError, match=r"run is not empty \(it holds sasrec/\): pass --overwrite"):
        check_output_dir(cfg, inputs=(out / "data",))
    with pytest.raises(LmrecError, match="data/, sasrec/"):  # data is not this run's input here
        check_output_dir(cfg)
    resume = RunConfig(output_dir=str(out), train={"resume_from": "auto"})
    assert check_output_dir(resume) == []
    over = RunConfig(output_dir=str(out), train={"overwrite": True})
    assert check_output_dir(over, inputs=(out / "data",)) == [out / "sasrec"]


def test_a_baseline_refuses_a_used_directory_and_replaces_it_with_overwrite(tmp_path):
    out = tmp_path / "run"
    data = synthetic_dataset(out / "data", users=20, items=12)  # the quickstart's layout: the data inside
    (out / "generative").mkdir()
    (out / "generative" / "old.txt").write_text("another dataset's model")
    args = ["baseline", "sasrec", "--data", data, "--output-dir", out, "train.epochs=1", "model.hidden_size=16"]
    res = run_cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{out} is not empty (it holds generative/): pass --overwrite" in " ".join(res.stderr.split())
    assert (out / "generative" / "old.txt").exists() and not (out / "run_config.yaml").exists()

    res = run_cli(*args, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / "generative").exists() and (data / "manifest.json").exists()
    assert json.loads((out / "metrics.json").read_text())["test"]["users"] == 20
    # every file it wrote is readable like any file the user creates (safetensors writes 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {str(f.relative_to(out)): f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()
             and "data" not in f.parts}
    assert "model/model.safetensors" in modes and any(k.startswith("checkpoints/") for k in modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["train"]["overwrite"] is False  # re-running run_config.yaml asks again
    assert IdRunConfig(**saved).output_dir == str(out)

    res = run_cli(*args)  # its own earlier run is something else too
    assert res.returncode == 2 and "metrics.json" in res.stderr


def test_finetune_and_the_quickstart_refuse_an_earlier_run(tmp_path):
    data = synthetic_dataset(tmp_path / "data", users=10, items=12)
    out = tmp_path / "q"
    (out / "model").mkdir(parents=True)
    res = run_cli("finetune", "--data", data, "--output-dir", out)
    assert res.returncode == 2 and "not empty (it holds model/)" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("quickstart", "--output-dir", out)
    assert res.returncode == 2 and "holds an earlier run (model): pass --overwrite" in " ".join(res.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # nothing prepared, nothing written
