"""``--data-config FILE`` (JSON or YAML): which chat parquet files a generative run streams, and how.

OpenOneRec's dataset-config JSON is accepted as it is. Its ``sources`` is a JSON file listing parquet paths
(or directories); here a source may also be a directory, a glob, or one file, and ``sources`` may list
several, each with a sampling ``weight`` and a ``name``::

    {"sources": [{"path": "samples/ml-100k/train", "weight": 1.0},
                 {"path": "corpora/wiki/*.parquet", "weight": 0.3, "name": "general_text"}],
     "max_length": 4096, "num_epochs": 2, "num_workers": 2, "local_shuffle_buffer_size": 10000}

``weight`` repeats a source within an epoch: 2.0 reads each of its files twice, 0.3 a seeded 30 % of its
files — so the mix of recommendation samples and general text is weight × size, fixed per epoch, file
granular and exactly resumable. OpenOneRec's keys that lmrec reads otherwise or not at all are listed in
``IGNORED`` (accepted, never an error).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmrec.data.chat_format import FILE_LIST, parquet_row_groups
from lmrec.errors import ConfigError, DataError

IGNORED = {
    "name": "the loader's name (only 'chat_completion_parquet' exists)",
    "base_model_dir": "the model comes from --model",
    "model_class": "the model class comes from the model's config.json",
    "only_assistant_loss": "chat rows are always supervised on the assistant replies only",
    "local_shuffle_random_fetch": "the shuffle buffer always draws at random",
    "full_attention": "packed samples never attend to each other",
    "cut_to_pad": "packs are filled from a buffer of samples instead; over-length samples follow over_length",
}


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # a parquet file, a directory of them, a glob, or a JSON file listing files / directories
    weight: Annotated[float, Field(gt=0)] = 1.0  # reads of each file per epoch (fractions: a seeded share)
    name: str | None = None  # reported name (default: the rows' own `source` column)


class DataMixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SourceSpec]
    max_length: Annotated[int, Field(ge=8)] = 4096  # tokens per pack (one packed sequence)
    max_sample_length: Annotated[int, Field(ge=8)] | None = None  # longest sample (default: max_length)
    num_epochs: Annotated[int, Field(ge=1)] = 1
    num_workers: Annotated[int, Field(ge=0)] = 2
    local_shuffle_buffer_size: Annotated[int, Field(ge=0)] = 10000  # samples; 0 = no shuffling of rows
    pack_buffer_size: Annotated[int, Field(ge=1)] = 64  # samples a pack is chosen from (best fit)
    add_think_pattern: bool = False  # SFT: /think or /no_think on the user turn, empty think blocks
    over_length: Literal["drop", "truncate"] = "drop"  # a sample longer than max_sample_length
    bad_rows: Literal["error", "skip"] = "error"  # skip = count bad rows per source and go on
    seed: int = 0
    # rows (and files) that name their split (``gen samples`` writes metadata.split and the file's footer)
    # must name one of these: a glob that reaches the valid/test samples would train on the answers
    train_splits: list[str] = ["train"]
    itemic_id_range: list[int] | None = None  # checked against the model's sid_vocab.json when given
    # OpenOneRec's keys read otherwise or not at all (see IGNORED)
    name: str | None = None
    base_model_dir: str | None = None
    model_class: str | None = None
    only_assistant_loss: bool | None = None
    local_shuffle_random_fetch: bool | None = None
    full_attention: bool | None = None
    cut_to_pad: bool | None = None

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v):
        """OpenOneRec: a path (a JSON file list or a directory) or a list of paths; here also entries with
        a weight."""
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items:
            raise ValueError("expected a path or a non-empty list of paths / {path, weight, name} entries")
        return [{"path": x} if isinstance(x, str) else x for x in items]

    @property
    def sample_limit(self) -> int:
        return min(self.max_sample_length or self.max_length, self.max_length)


def load_data_config(path: str | Path) -> DataMixConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data-config {path}: no such file")
    try:
        tree = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = DataMixConfig.model_validate(tree)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: "
                 + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "))
                 for err in e.errors()]
        raise ConfigError(f"invalid data config {path}:\n" + "\n".join(lines)) from None
    base = path.parent
    for s in cfg.sources:  # relative source paths are relative to the config file
        if not Path(s.path).is_absolute() and not Path(s.path).exists() and (base / s.path).exists():
            s.path = str(base / s.path)
    return cfg


def list_source(spec: SourceSpec) -> list[Path]:
    """The parquet files of a source, sorted (a directory: its ``file_list.json`` when present, else every
    ``*.parquet`` in it; a glob; a JSON list of files or directories; one file); no file is opened."""
    p = Path(spec.path)
    if any(c in spec.path for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(spec.path, recursive=True))]
    elif p.is_dir():
        listed = p / FILE_LIST
        files = _listed(listed) if listed.exists() else sorted(p.glob("*.parquet"))
    elif p.suffix == ".json":
        files = _listed(p)
    elif p.exists():
        files = [p]
    else:
        raise DataError("no such file or directory (expected parquet files, a directory, a glob or a JSON file "
                        "list)", file=p)
    if not files:
        raise DataError("no parquet files found", file=p)
    return files


def source_files(spec: SourceSpec) -> list[Path]:
    """:func:`list_source`, with every file's footer checked (a damaged or empty file is named here)."""
    files = list_source(spec)
    for f in files:
        parquet_row_groups(f)
    return files


def _listed(path: Path) -> list[Path]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"not a readable JSON file list ({e})", file=path) from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataError("expected a JSON array of paths", file=path)
    out: list[Path] = []
    for e in entries:
        q = Path(e) if Path(e).is_absolute() else path.parent / e
        out += sorted(q.glob("*.parquet")) if q.is_dir() else [q]
    return out
