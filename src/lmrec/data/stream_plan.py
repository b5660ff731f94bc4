"""What a stream will read, known before it starts: every source's files and their row groups, a sampled
tokenization, the check that every reader gets files, and the number of optimizer steps it will make.

One pass over the footers (:func:`scan`), on one process: each file is opened once, its row groups and
split read from the footer, and a few row groups of a few seeded files per source are read and tokenized
with the run's own ``encode``. Under ``torchrun`` rank 0 makes this pass and the other ranks receive it
(``lmrec.training.distributed.from_main_process``) — with thousands of files on many ranks, each rank
reading every footer is what start-up would cost otherwise.

The schedule's length. A pack holds as many samples as fit in ``max_length`` tokens, so the number of
rows is no estimate of the number of packs (it is off by the samples per pack). Packs are estimated from
the sampled token lengths instead: the stream's own best-fit packing (``stream.best_fit``) is run on
lengths drawn from the sample, which gives the tokens of a pack, and every reader's packs follow from its
tokens: the rows of the files it reads (known exactly from the footers, per epoch) × its sources' mean
sampled lengths. Why not a token-length column written by
``gen samples``: the lengths depend on the model's tokenizer and chat template (known only at training
time), and OpenOneRec's files and general text have no such column. Why not refuse a decaying schedule
without ``train.num_training_steps``: the estimate costs a second at start-up and is what a user would set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmrec.data.chat_format import open_parquet, parse_row, read_row_group
from lmrec.data.data_config import DataMixConfig, list_source
from lmrec.data.stream import Encode, best_fit, epoch_files, reader_share, refuse_other_split
from lmrec.errors import ConfigError, DataError

SAMPLE_FILES = 8  # files per source whose rows are tokenized for the estimate (one row group each)
SAMPLE_ROWS = 64  # rows tokenized per sampled file
SIMULATED = 4096  # samples the packing is simulated on (per-sample rates from it)


@dataclass
class StreamPlan:
    """The footers of every source's files (read once) and a sampled tokenization of each source."""

    files: list[list[Path]]  # per source, sorted
    row_groups: dict[str, list[int]]  # str(path) → rows per row group
    lengths: list[list[int]] = field(default_factory=list)  # per source: tokens of the sampled rows it keeps
    sampled: list[int] = field(default_factory=list)  # per source: rows sampled (kept or not)

    def rows(self, path: Path) -> int:
        return sum(self.row_groups[str(path)])


def scan(mix: DataMixConfig, encode: Encode) -> StreamPlan:
    """Open every file of every source once: its footer (row groups; a file of a split the data config does
    not train on is refused here, before any training) and, for a few seeded files, one row group's rows
    tokenized as the stream would (bad rows follow ``bad_rows``, long ones ``over_length``)."""
    plan = StreamPlan([list_source(s) for s in mix.sources], {})
    for s, files in enumerate(plan.files):
        rng = np.random.default_rng([mix.seed, s, 7])
        chosen = set(rng.permutation(len(files))[:SAMPLE_FILES].tolist())
        lengths, sampled = [], 0
        for i, path in enumerate(files):
            handle, footer = open_parquet(path)
            refuse_other_split(footer.split, mix, path)
            plan.row_groups[str(path)] = footer.row_groups
            if i in chosen:
                g = int(rng.integers(len(footer.row_groups)))
                first = sum(footer.row_groups[:g])
                raws = read_row_group(path, g, handle)
                picks = np.linspace(0, len(raws) - 1, min(SAMPLE_ROWS, len(raws))).round().astype(int)
                for j in sorted(set(picks.tolist())):
                    sampled += 1
                    n = _sample_length(raws[j], path, first + j + 1, mix, encode)
                    if n is not None:
                        lengths.append(n)
        plan.lengths.append(lengths)
        plan.sampled.append(sampled)
    return plan


def _sample_length(raw: dict, path: Path, row: int, mix: DataMixConfig, encode: Encode) -> int | None:
    """The tokens the stream would train on for one row; None when it would skip it."""
    try:
        parsed = parse_row(raw, path, row)
        refuse_other_split(parsed.metadata.get("split"), mix, path, row)
        try:
            n = len(encode(parsed)["input_ids"])
        except DataError as e:  # an encoder's error names no file: add where the row is
            if e.file is None:
                raise DataError(e.reason, file=path, row=row, column=e.column) from None
            raise
    except DataError:
        if mix.bad_rows == "error":
            raise
        return None
    if n > mix.sample_limit:
        return None if mix.over_length == "drop" else mix.sample_limit
    return n


def check_readers(plan: StreamPlan, mix: DataMixConfig, weights: list[float], world: int, log=print) -> None:
    """Every rank gets at least one file per epoch: a rank without one would end every rank's run at its
    first step (the ranks step together until the first stream ends). A dataloader worker without one only
    idles (said, not refused)."""
    workers = max(1, mix.num_workers)
    n = len(epoch_files(plan.files, weights, mix.seed, 0))  # the same number every epoch
    if n < world:
        raise ConfigError(
            f"the data config gives {n} parquet file(s) per epoch (after the sources' weights) to {world} ranks, and "
            "files are not split between ranks: a rank without a file would end every rank's run at its first step; "
            f"write the data in at least {world} files (`lmrec gen samples --rows-per-file`), or run on fewer ranks")
    if n < world * workers:
        log(f"{n} parquet file(s) per epoch for {world} rank(s) × {workers} dataloader worker(s): "
            f"{world * workers - n} worker(s) get no file and idle (lower num_workers in the data config)")


def tokens_per_pack(plan: StreamPlan, mix: DataMixConfig, share: list[float], samples: int) -> float:
    """Mean tokens of a pack when a reader packs ``samples`` samples: the stream's best fit (with the final
    flush) run on lengths drawn from the sampled ones, source ``s`` with probability ``share[s]``."""
    pools = [np.asarray(x) for x in plan.lengths]
    share = [w if len(x) else 0.0 for w, x in zip(share, pools)]
    if sum(share) == 0:
        return float(mix.max_length)
    rng = np.random.default_rng(mix.seed)
    n = max(1, min(samples, SIMULATED))
    drawn = [int(pools[s][rng.integers(len(pools[s]))]) for s in rng.choice(len(pools), size=n, p=np.divide(
        share, sum(share)))]
    buffer, packs = [], 0
    for i, length in enumerate(drawn):
        buffer.append(length)
        while buffer and (len(buffer) >= mix.pack_buffer_size or i == n - 1):
            for j in sorted(best_fit(buffer, mix.max_length), reverse=True):
                del buffer[j]
            packs += 1
    return sum(drawn) / packs


def estimated_steps(plan: StreamPlan, mix: DataMixConfig, weights: list[float], world: int, batch_size: int,
                    grad_accum: int) -> tuple[int, int]:
    """(steps of the run, steps of the rank with the most data). Per reader: its files' rows over all epochs
    × the share of sampled rows their source keeps × the source's mean sampled length = its tokens, over
    :func:`tokens_per_pack` = its packs; a rank's batches are its workers' (each batches its own packs);
    the ranks step together until the first one's data ends."""
    workers = max(1, mix.num_workers)
    keep = [len(x) / max(1, n) for x, n in zip(plan.lengths, plan.sampled)]
    mean = [float(np.mean(x)) if x else 0.0 for x in plan.lengths]
    samples = np.zeros((world, workers, len(plan.files)))  # kept samples of every reader and source
    for epoch in range(mix.num_epochs):
        files = epoch_files(plan.files, weights, mix.seed, epoch)
        for rank in range(world):
            for worker in range(workers):
                for s, path in reader_share(files, rank, world, worker, workers):
                    samples[rank, worker, s] += plan.rows(path) * keep[s]
    per_pack = tokens_per_pack(plan, mix, samples.sum(axis=(0, 1)).tolist(), int(samples.sum(axis=2).max()))
    tokens = samples @ np.asarray(mean)  # (world, workers)
    steps = [sum(math.ceil(math.ceil(t / per_pack) / batch_size) for t in row) // grad_accum for row in tokens]
    return min(steps), max(steps)
