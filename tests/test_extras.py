"""`pip install lmrec` is the core; serving, Chinese word segmentation and the report's figures are extras,
and a feature whose extra is missing says which one to install."""

import json
import subprocess
import sys

import pytest

from lmrec.errors import LmrecError, optional

EXTRA_MODULES = {"serve": ["fastapi", "uvicorn", "swagger_ui_bundle"], "zh": ["jieba"], "report": ["matplotlib"]}


def test_the_extras_are_not_core_dependencies():
    """As installed (the package's metadata): each extra's packages are required under that extra only."""
    from importlib.metadata import requires

    listed = requires("lmrec")
    for extra, packages in {"serve": ["fastapi", "uvicorn", "swagger-ui-bundle"], "zh": ["jieba"],
                            "report": ["matplotlib"]}.items():
        for package in packages:
            lines = [r for r in listed if r.lower().startswith(package)]
            assert lines and all(f'extra == "{extra}"' in r for r in lines), (package, lines)


def test_the_core_imports_and_runs_without_any_extra():
    """Every command module, both families and the API import with the extras' modules made unimportable,
    and `lmrec --help` works."""
    hidden = [m for mods in EXTRA_MODULES.values() for m in mods]
    code = ("import sys\n"
            f"for m in {hidden!r}: sys.modules[m] = None\n"
            "import lmrec.api, lmrec.pipeline, lmrec.compare, lmrec.recformer.masking, lmrec.training.report\n"
            "import lmrec.generative.train, lmrec.recformer.finetune, lmrec.idrec.train\n"
            "from lmrec.cli.main import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0 and 'finetune' in r.output, r.output\n"
            "r = CliRunner().invoke(app, ['serve', '--model', 'm'])\n"
            "assert 'lmrec[serve]' in str(r.exception), r.exception\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_optional_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    with pytest.raises(LmrecError, match=r"Chinese .* needs jieba.*pip install 'lmrec\[zh\]'"):
        optional("jieba", "zh", "Chinese whole-word masking")
    assert optional("json", "x", "y") is json


def test_chinese_masking_without_jieba_names_the_extra(monkeypatch):
    from lmrec.recformer import masking

    masking._jieba.cache_clear()
    monkeypatch.setitem(sys.modules, "jieba", None)
    try:
        with pytest.raises(LmrecError, match=r"lmrec\[zh\]"):
            masking.jieba_word_spans("北京大学")
    finally:
        masking._jieba.cache_clear()


def test_the_service_without_its_extra_names_it(monkeypatch):
    import importlib.util

    import lmrec.serve as serve

    real = importlib.util.find_spec
    monkeypatch.setattr(serve, "find_spec", lambda m: None if m == "uvicorn" else real(m))
    with pytest.raises(LmrecError, match=r"needs uvicorn.*lmrec\[serve\]"):
        serve.require_serve_extra()


def test_a_report_without_matplotlib_keeps_its_tables_and_says_why(tmp_path, monkeypatch):
    from lmrec.training.report import NO_PLOTS, write_report

    run = tmp_path / "run"
    run.mkdir()
    row = {"recall@10": 0.1, "ndcg@10": 0.05, "users": 3}
    (run / "metrics.json").write_text(json.dumps({"test": row, "history": [{"epoch": 1, "loss": 1.0}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    html = write_report([run], tmp_path / "r.html").read_text()
    assert NO_PLOTS in html and "0.0500" in html and "<img" not in html
