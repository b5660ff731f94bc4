"""The loader of ``gen train --data-config``: a data config's streamed, packed chat parquet (OpenOneRec's
recipe) as the loop's ``make_loader``, and the checks a streamed stage needs before it starts.

The data config names the sources (our ``gen samples`` output, a user's OpenOneRec files, general text),
their weights, the pack length and the stream's workers; ``data.ChatStream`` reads them; the loop runs the
stream as one epoch of token-normalised steps and checkpoints the stream's state with the model. What such
a stage measures and reports is :mod:`lmrec.generative.train_metrics`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lmrec.data.data_config import DataMixConfig
from lmrec.data.stream import ChatStream, collate_packs
from lmrec.data.stream_plan import check_readers, scan
from lmrec.errors import ConfigError, LmrecError
from lmrec.generative.prompts import encode_chat
from lmrec.training.distributed import from_main_process

SNAPSHOT_EVERY = 16


def check_itemic_range(mix: DataMixConfig, meta: dict) -> list[int]:
    """[first, last] itemic token id, from the model's ``sid_vocab.json``; a typed ``itemic_id_range`` in
    the data config must agree with it."""
    ids = sum(meta["level_token_ids"], [])
    derived = [min(ids), max(ids)]
    if mix.itemic_id_range is not None and list(mix.itemic_id_range) != derived:
        raise ConfigError(f"itemic_id_range {mix.itemic_id_range} in the data config does not match the model's "
                          f"sid_vocab.json ({derived}); leave it out, it is derived from the model")
    return derived


def stream_loader_factory(mix: DataMixConfig, tok, run, batch_size: int, log=print, segments: bool = False):
    """``make_loader`` for the loop (one StatefulDataLoader over this rank's stream), the source names, and
    the stream's plan (every file's footer and a sampled tokenization, read once on rank 0 and sent to the
    other ranks; for the schedule's estimate)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    names = [s.name or Path(s.path.rstrip("/*")).stem or f"source{i}" for i, s in enumerate(mix.sources)]
    if len(set(names)) != len(names):
        raise ConfigError(f"data config sources need distinct names (got {names}); add \"name\" to each")
    encode = functools.partial(encode_chat, tok, think=mix.add_think_pattern)
    plan = from_main_process(run.acc, lambda: scan(mix, encode))
    weights = [s.weight for s in mix.sources]
    check_readers(plan, mix, weights, run.acc.num_processes, log)
    stream = ChatStream(plan.files, names, mix, encode, rank=run.acc.process_index, world=run.acc.num_processes,
                        weights=weights, row_groups=plan.row_groups)
    collate = functools.partial(collate_packs, pad_id=tok.pad_token_id, length=mix.max_length, segments=segments)
    log(f"streaming {sum(len(f) for f in plan.files)} parquet files of {len(names)} source(s) "
        f"({', '.join(names)}), packs of {mix.max_length} tokens, {mix.num_workers} worker(s) per rank")

    def make_loader(epoch: int):
        # a worker's state is taken every SNAPSHOT_EVERY packs; a resume replays the few packs since (exact)
        return StatefulDataLoader(stream, batch_size=batch_size, num_workers=mix.num_workers, collate_fn=collate,
                                  snapshot_every_n_steps=SNAPSHOT_EVERY)

    return make_loader, names, plan


def require_decoder_only(model) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise LmrecError("packed streaming trains decoder-only models (Qwen3-style); an encoder-decoder model "
                         "trains from a prepared dataset (--data, --sids)")
