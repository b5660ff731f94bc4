"""The documentation site builds without a warning (mkdocs --strict: no broken link, no link to a heading
that is not there — `validation: anchors` in mkdocs.yml —, no missing page), and
its reference pages are generated from the code: every command, every configuration key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_cli_reference_names_every_command_and_option(site):
    import typer

    from lmrec.cli.main import app

    html = (site / "reference" / "cli" / "index.html").read_text()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="lmrec")
    seen = 0
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        subs = [(f"{name} {s}", cmd.get_command(ctx, s)) for s in cmd.list_commands(ctx)] \
            if hasattr(cmd, "list_commands") else [(name, cmd)]
        for full, sub in subs:
            assert f"lmrec {full}" in html, full
            for p in sub.params:
                if p.param_type_name == "option" and p.name != "help":
                    assert p.opts[0] in html, (full, p.opts[0])
            seen += 1
    assert seen >= 25
    assert "checkpoints/&lt;stage&gt;/step-N" in html  # a help text's <placeholder> is text, not a lost tag


def test_the_config_reference_has_every_key_with_its_default(site):
    from lmrec.config import GenRunConfig, IdRunConfig, RunConfig

    html = (site / "reference" / "config" / "index.html").read_text()
    for schema in (RunConfig, GenRunConfig, IdRunConfig):
        for section, field in schema.model_fields.items():
            sub = getattr(field.annotation, "model_fields", None)
            for key in (sub or {None: None}):
                assert (f"{section}.{key}" if key else section) in html
    assert "train.overwrite" in html and "≥ 1" in html  # bounds are shown


def test_every_configuration_key_says_what_it_means():
    """The reference's meaning column comes from the comment beside each field in lmrec/config.py."""
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    import hooks

    empty = [line.split("|")[1].strip() for line in hooks.config_reference().splitlines()
             if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert empty == []


def test_every_test_the_docs_cite_exists():
    """A claim backed by `tests/FILE.py::test_NAME` in the README, the docs, the benchmarks or the code names a
    test that is there (a renamed or moved test would leave the claim without its evidence)."""
    import re

    cite = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
    texts = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/**/*.py"), *ROOT.glob("src/**/*.py")]
    found, missing = 0, []
    for path in texts:
        text = re.sub(r"::\s*\n\s*", "::", path.read_text())  # a name wrapped after its "::"
        for file, name in cite.findall(text):
            found += 1
            test = ROOT / file
            if not test.is_file() or not re.search(rf"^\s*(?:async )?def {name}\(", test.read_text(), re.M):
                missing.append(f"{path.relative_to(ROOT)}: {file}::{name}")
    assert found > 50 and missing == []


def test_the_data_config_example_on_the_scale_page_is_the_shipped_file():
    """docs/scale.md says `configs/data-mix.json` is its example: the two must not drift apart."""
    import json
    import re

    page = (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
    shown = re.search(r"`configs/data-mix.json` is this example.*?```json\n(.*?)```", page, re.S)
    assert shown, "the scale page no longer shows the data-config example"
    assert json.loads(shown[1]) == json.loads((ROOT / "configs" / "data-mix.json").read_text())
