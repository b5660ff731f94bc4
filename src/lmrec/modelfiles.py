"""Checks of the model files lmrec reads back, run before anything loads them, and the format version of
every directory lmrec writes.

A model directory a user hands to a command may be cut short (a copy interrupted, a disk filled), edited
by hand, from another model, of the other family, or written by a newer lmrec. Left to the libraries,
each of these ends in a traceback from deep inside safetensors, transformers or pyarrow — or, worse, in a
model that loads and answers wrongly. Here every file is opened cheaply and compared with what the
directory's other files say: a safetensors file's header (8-byte length + JSON, the format's own layout)
gives each tensor's dtype, shape and byte range without reading the data, so a file shorter than its
header promises is truncated; ``config.json`` must parse and agree with the weights' shapes (hidden size,
vocabulary, catalog size); tokenizer files must exist and parse; parquet files must open (their footer)
and hold the expected columns; the family (``model_type``, ``sid_vocab.json``) must be the one the command
takes, and the message names the command that takes it. Any failure is one :class:`ModelFileError` naming
the file and what was expected. What a check cannot foresee while loading is caught by :func:`loading`,
which turns the exceptions those libraries raise for bad files (not every exception: a bug keeps its
traceback) into the same error.

Format version: every directory lmrec writes carries ``lmrec.json`` (``{"lmrec_format": N, "kind": ...}``;
prepared datasets keep ``format_version`` in their manifest). A directory without it is format 1 (written
before the marker existed); one of a newer format is refused with "upgrade lmrec" rather than misread.
``config.json`` is left as Hugging Face writes it, so exports still load in transformers.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmrec.errors import LmrecError

FORMAT = 1  # the newest format this lmrec writes and reads
MARKER = "lmrec.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
ITEM_COLUMNS = ("item_index", "item_id", "attrs")
# where a command is told to go when it was given the other family's model
USE = {"recformer": "use `lmrec evaluate --model {p} --data DATA` or `lmrec recommend --model {p}`",
       "idrec": "use `lmrec evaluate --model {p} --data DATA` or `lmrec recommend --model {p}`",
       "generative": "use `lmrec gen evaluate --model {p} --data DATA --sids SIDS` (or `lmrec gen recommend`)"}


class ModelFileError(LmrecError):
    """A model, checkpoint, run or index file that cannot be used as it is; the message names the file."""


# ------------------------------------------------------------------------------------------------ format
def write_marker(directory: str | Path, kind: str) -> None:
    """``directory/lmrec.json``: the format this lmrec writes and what the directory holds."""
    (Path(directory) / MARKER).write_text(json.dumps({"lmrec_format": FORMAT, "kind": kind}) + "\n")


def check_format(directory: str | Path) -> int:
    """The directory's format (1 when it has no marker); a newer one than this lmrec reads is an error."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return 1
    version = read_json(marker).get("lmrec_format", 1)
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{marker}: lmrec_format {version!r} is not a format number")
    if version > FORMAT:
        raise ModelFileError(f"{marker}: written by a newer lmrec (format {version}; this lmrec reads ≤ {FORMAT}): "
                             "upgrade lmrec")
    return version


# ------------------------------------------------------------------------------------------------ files
def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``, or an error naming the file, the line and the column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: unreadable ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def safetensors_header(path: str | Path) -> dict[str, list[int]]:
    """Tensor name → shape from a safetensors file's header, without reading the data; the file must hold
    every byte its header places (else it is truncated)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > size - 8:
            raise ModelFileError(f"{path}: truncated safetensors ({size} bytes, shorter than its header)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        spans = {k: (v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
        end = max((int(o[1]) for _, o in spans.values()), default=0)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise ModelFileError(f"{path}: not a safetensors file (its header does not parse)") from None
    if 8 + n + end > size:
        raise ModelFileError(f"{path}: truncated safetensors ({size:,} bytes; its header places tensor data up to "
                             f"byte {8 + n + end:,}): copy or write it again")
    return {k: list(s) for k, (s, _) in spans.items()}


def weight_shapes(directory: Path) -> tuple[dict[str, list[int]], str]:
    """Tensor shapes of a model directory's safetensors weights (single file or index + shards) and the file
    name to cite; ({}, "") when its weights are in another format (``pytorch_model.bin``: checked on load)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return safetensors_header(single), single.name
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no weight_map (expected tensor name → shard file)")
        shapes: dict[str, list[int]] = {}
        for shard in sorted(set(weight_map.values())):
            shapes.update(safetensors_header(directory / str(shard)))
        return shapes, index.name
    return {}, ""


def check_parquet(path: str | Path, columns: Iterable[str] = ()) -> int:
    """A parquet file that opens (its footer) and has ``columns``; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    try:
        meta = pq.ParquetFile(path).metadata
        names = set(meta.schema.to_arrow_schema().names)
    except (pa.ArrowException, OSError) as e:
        raise ModelFileError(f"{path}: not a readable parquet file ({str(e)[:200]})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise ModelFileError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)})")
    return meta.num_rows


def check_tokenizer(directory: Path) -> None:
    present = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if not present:
        raise ModelFileError(f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                             "copy the model directory again with its tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            read_json(directory / name)


@contextmanager
def loading(path: str | Path) -> Iterator[None]:
    """Turn what safetensors, transformers, tokenizers, pyarrow and torch raise for a bad file into one
    :class:`ModelFileError` naming ``path``. Only those exceptions: any other keeps its traceback."""
    import pyarrow as pa
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError, EOFError,
            pickle.UnpicklingError, OSError) as e:
        raise ModelFileError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


# ------------------------------------------------------------------------------------------------ models
def model_config(directory: Path) -> dict:
    """``config.json``, parsed, with its ``model_type``."""
    cfg = read_json(directory / "config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise ModelFileError(f"{directory / 'config.json'}: no model_type (not a model configuration)")
    return cfg


def family(directory: str | Path) -> str:
    """``generative`` (itemic tokens: ``sid_vocab.json``), ``recformer`` (a recommender with a catalog),
    ``recformer-checkpoint`` (no catalog: pretraining, ``backbone init``), ``idrec``, else the model_type."""
    d = Path(directory)
    if (d / "sid_vocab.json").is_file():
        return "generative"
    kind = model_config(d)["model_type"]
    if kind == "recformer":
        return "recformer" if (d / "items.parquet").exists() else "recformer-checkpoint"
    return "idrec" if kind == "lmrec-idrec" else kind


def _directory(path: str | Path, option: str) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise ModelFileError(f"{option} {d}: " + ("not a directory" if d.exists() else "no such directory"))
    if not (d / "config.json").is_file():
        raise ModelFileError(f"{option} {d}: not a model directory (no config.json)")
    check_format(d)
    return d


_EMBEDDINGS = ("word_embeddings.weight", "embed_tokens.weight", "shared.weight")


def check_weights(directory: Path, cfg: dict) -> dict[str, list[int]]:
    """The weights are whole and have the config's hidden size and vocabulary (their embedding matrix)."""
    shapes, name = weight_shapes(directory)
    hidden = cfg.get("hidden_size", cfg.get("d_model"))
    idrec = cfg.get("model_type") == "lmrec-idrec"
    rows = cfg.get("num_items") if idrec else cfg.get("vocab_size")
    what = "items (num_items)" if idrec else "vocabulary"
    for key, shape in shapes.items():
        if len(shape) != 2 or not (key.endswith(_EMBEDDINGS) or key == "item_embeddings.weight"):
            continue
        if isinstance(hidden, int) and shape[1] != hidden:
            raise ModelFileError(f"{directory}: hidden size {hidden} in config.json, {shape[1]} in {name} "
                                 f"({key}): the config and the weights are of different models")
        have = shape[0] - 1 if idrec else shape[0]  # an ID model's row 0 is padding
        if isinstance(rows, int) and have != rows:
            raise ModelFileError(f"{directory}: {what} {rows} in config.json, {have} in {name} ({key}): the "
                                 "config and the weights are of different models")
    return shapes


def _wrong_family(d: Path, fam: str, wanted: str, command: str) -> ModelFileError:
    hint = USE.get(fam.removesuffix("-checkpoint"), "").format(p=d)
    return ModelFileError(f"{d}: {_NAMES.get(fam, f'a {fam} model')} given to `{command}`, which takes "
                          f"{wanted}" + (f"; {hint}" if hint else ""))


GENERATIVE = "a generative model (a language model with itemic tokens and sid_vocab.json)"
_NAMES = {"recformer": "a RecFormer model", "recformer-checkpoint": "a RecFormer checkpoint",
          "idrec": "an ID baseline model", "generative": "a generative model"}


def check_recommender(path: str | Path, command: str = "lmrec evaluate", option: str = "--model") -> str:
    """A saved recommender of the ranking families (RecFormer with or without a catalog, an ID baseline),
    checked file by file; returns its family."""
    d = _directory(path, option)
    fam = family(d)
    if fam not in ("recformer", "recformer-checkpoint", "idrec"):
        raise _wrong_family(d, fam, "a RecFormer recommender or an ID baseline (…/model of a run)", command)
    cfg = model_config(d)
    check_weights(d, cfg)
    if fam == "idrec" or (d / "items.parquet").exists():
        n = check_parquet(d / "items.parquet", ITEM_COLUMNS)
        if fam == "idrec" and n != cfg.get("num_items"):
            raise ModelFileError(f"{d / 'items.parquet'}: {n} items for an ID model of {cfg.get('num_items')} "
                                 "items (config.json)")
    if fam != "idrec":
        check_tokenizer(d)
        _check_item_table(d, cfg)
    return fam


def _check_added(d: Path, column: str) -> None:
    """Items an older lmrec's service kept in the model directory (``added_items.parquet``), which ``serve``
    copies into its item store once; offline commands never read them."""
    if (d / "added_items.parquet").exists():
        check_parquet(d / "added_items.parquet", (*ITEM_COLUMNS, column))


def _check_item_table(d: Path, cfg: dict) -> None:
    table = d / "item_table.safetensors"
    if not table.exists():
        return
    shape = safetensors_header(table).get("item_embeddings")
    if shape is None or len(shape) != 2:
        raise ModelFileError(f"{table}: no item_embeddings matrix")
    n = check_parquet(d / "items.parquet", ITEM_COLUMNS) if (d / "items.parquet").exists() else shape[0]
    if shape[1] != cfg.get("hidden_size", shape[1]) or shape[0] != n:
        raise ModelFileError(f"{table}: {shape[0]} × {shape[1]} item vectors, expected {n} (items.parquet) × "
                             f"{cfg.get('hidden_size')} (hidden size in config.json)")


def check_language_model(path: str | Path, command: str, option: str = "--model",
                         wanted: str = "a language model (a causal LM or T5)") -> Path:
    """A Hugging Face language model directory (a generative model, or a base model to expand)."""
    d = _directory(path, option)
    fam = family(d)
    if fam in _NAMES and fam != "generative":
        raise _wrong_family(d, fam, wanted, command)
    check_weights(d, model_config(d))
    check_tokenizer(d)
    return d


def check_generative(path: str | Path, command: str, option: str = "--model") -> Path:
    """A trained (or expanded, or exported) generative model directory, or a LoRA adapter with its base."""
    d = Path(path)
    if (d / "adapter_config.json").is_file():
        check_format(d)
        read_json(d / "adapter_config.json")
        for f in d.glob("*.safetensors"):
            safetensors_header(f)
        base = d / "base_model"
        if not base.is_dir():
            raise ModelFileError(f"{d} is a LoRA adapter without its base_model/ directory")
        check_language_model(base, command, option, GENERATIVE)
    else:
        check_language_model(d, command, option, GENERATIVE)
    meta = d / "sid_vocab.json"
    if not meta.is_file():
        raise ModelFileError(f"{d}: no sid_vocab.json, so not a generative model: expand a model's vocabulary first "
                             "(`lmrec gen expand-vocab`)")
    read_json(meta)
    return d


def check_sids(path: str | Path, option: str = "--sids") -> Path:
    d = Path(path)
    if not (d / "sids.parquet").exists():
        raise ModelFileError(f"{option} {d}: not a semantic-ID directory (no sids.parquet); run `lmrec sid build`")
    check_format(d)
    check_parquet(d / "sids.parquet", ("item_id", "codes"))
    read_json(d / "sid_config.json")
    if (d / "codebooks.safetensors").exists():
        safetensors_header(d / "codebooks.safetensors")
    return d


def check_checkpoint(path: str | Path, resume: bool = True) -> Path:
    """A training checkpoint (``.../checkpoints/<stage>/step-N``): whole weight files, and the loop state a
    resume needs (an export reads only the weights)."""
    d = Path(path)
    check_format(d)
    if resume or (d / "trainer_state.json").exists():
        read_json(d / "trainer_state.json")
    for f in sorted(d.glob("*.safetensors")):
        safetensors_header(f)
    return d


def check_run_dir(path: str | Path) -> Path:
    """A run directory ``lmrec report`` reads: its format, and its metrics.json when there is one."""
    d = Path(path)
    if not d.is_dir():
        raise ModelFileError(f"{d}: no such run directory")
    check_format(d)
    if (d / "metrics.json").exists():
        read_json(d / "metrics.json")
    return d


def check_recformer(path: str | Path, command: str, option: str = "--init") -> str:
    """A RecFormer recommender or checkpoint (what ``--init`` and ``--backbone`` of a RecFormer run accept)."""
    fam = check_recommender(path, command, option)
    if fam == "idrec":
        raise _wrong_family(Path(path), fam, "a RecFormer model or checkpoint (an ID model warm-starts an ID run: "
                            "`lmrec baseline ... model.init_from=DIR`)", command)
    return fam


def check_encoder(path: str | Path, option: str = "--encoder") -> Path:
    """A Hugging Face text encoder for ``sid build --encoder`` (not one of lmrec's recommenders)."""
    d = _directory(path, option)
    fam = family(d)
    if fam in _NAMES:
        hint = "; give it as --from DIR (its item vectors)" if fam in ("recformer", "idrec") else ""
        raise ModelFileError(f"{d}: {_NAMES[fam]} given to `lmrec sid build {option}`, which takes a Hugging "
                             f"Face text encoder (e.g. a sentence-transformers directory){hint}")
    check_weights(d, model_config(d))
    check_tokenizer(d)
    return d


def check_served(model: str | Path, sids: str | Path | None = None) -> None:
    """``lmrec serve``'s model, checked before the server starts (it loads the model in the background); a
    fused model is checked by :func:`lmrec.fusion.check_fused`, above the families."""
    d = Path(model)
    if (d / "sid_vocab.json").is_file():
        check_generative(d, "lmrec serve")
        if sids is not None and (Path(sids) / "sids.parquet").exists():
            check_sids(sids)
        _check_added(d, "codes")
    elif (d / "config.json").is_file():
        check_recommender(d, "lmrec serve")
        _check_added(d, "vector")
