"""Streaming packed chat samples from parquet files, across ranks and dataloader workers, resumable exactly.

The corpus is never held in memory: per epoch the file list is shuffled with the seed (sources repeated by
their weight), file ``i`` of that list goes to rank ``i mod world``, and the ``j``-th file of a rank to its
dataloader worker ``j mod workers`` — so every file is read exactly once per epoch (per unit of weight)
across the whole job, and ranks get files first (a rank gets one as soon as there are as many files as
ranks; a rank without any would end every rank's run at its first step, which ``stream_plan`` refuses).
A reader reads its files one row group at a time, shuffles samples in a local buffer, tokenizes them
(``encode``, in the worker), and packs them into sequences of ``max_length`` tokens chosen from a small
buffer (best fit). All epochs form one finite stream: training ends when it ends.

Exact resume. What a reader has read but not yet emitted — the samples in the shuffle buffer and in the
packing buffer — is part of its state, as references ``[epoch, file position, row]`` that are re-read on
resume, next to the read position and the shuffle RNG. ``torchdata``'s ``StatefulDataLoader`` takes each
worker's state at the batch it hands over, so samples sitting in the prefetch queue are not lost either:
a resumed run continues with exactly the packs an uninterrupted one would have produced next.

Why not HF ``datasets`` streaming (``split_dataset_by_node``): measured on the same rows and tokenization
it reads about 1.3× faster per worker (bench/bench_stream.py), but its resumable state drops the content
of the shuffle buffer (it is refilled on resume, so the samples in it are lost), it has no packing whose
buffer survives a resume, and it splits by files only when the number of files is a multiple of the
number of ranks (otherwise every rank reads every file and keeps one row in world_size). Exact resume is
what this module exists for; the reading itself is pyarrow's.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmrec.data.chat_format import ChatRow, parquet_row_groups, parse_row, read_row_group
from lmrec.data.data_config import DataMixConfig
from lmrec.errors import ConfigError, DataError
from lmrec.training.attention import with_segments

# encode(row) → {"input_ids": [...], "labels": [...]} (labels -100 where not supervised)
Encode = Callable[[ChatRow], dict]


@dataclass
class Sample:
    ref: list[int]  # [epoch, position in this reader's file list, 1-based row]
    source: int  # index into the stream's source names
    input_ids: list[int]
    labels: list[int]


@dataclass
class Counts:
    """Per source: samples read, over-length samples dropped or truncated, bad rows skipped."""

    samples: Counter = field(default_factory=Counter)
    too_long: Counter = field(default_factory=Counter)
    bad_rows: Counter = field(default_factory=Counter)


def epoch_files(files: list[list[Path]], weights: list[float], seed: int, epoch: int) -> list[tuple[int, Path]]:
    """(source index, file) of one epoch: each source's files ``floor(weight)`` times plus a seeded
    share ``weight mod 1`` of them, all shuffled with (seed, epoch)."""
    out: list[tuple[int, Path]] = []
    for s, (fs, w) in enumerate(zip(files, weights)):
        whole, frac = int(w), w - int(w)
        out += [(s, f) for _ in range(whole) for f in fs]
        if frac > 0:
            pick = np.random.default_rng([seed, epoch, s, 1]).permutation(len(fs))[: round(frac * len(fs))]
            out += [(s, fs[i]) for i in sorted(pick)]
    order = np.random.default_rng([seed, epoch]).permutation(len(out))
    return [out[i] for i in order]


def reader_share(files: list, rank: int, world: int, worker: int, workers: int) -> list:
    """The files of one reader (``worker`` of ``rank``): ranks round-robin first, then a rank's workers."""
    return files[rank::world][worker::workers]


class ChatStream(torch.utils.data.IterableDataset):
    """Packed samples for one rank; ``names[s]`` names source ``s``. Each item is a pack:
    ``{"input_ids", "labels", "position_ids", "sources"}`` (lists of equal length ≤ ``cfg.max_length``;
    positions restart at every sample, ``sources`` = the source index of every token)."""

    def __init__(self, files: list[list[Path]], names: list[str], cfg: DataMixConfig, encode: Encode, *,
                 rank: int = 0, world: int = 1, weights: list[float] | None = None,
                 row_groups: dict[str, list[int]] | None = None):
        self.files, self.names, self.cfg, self.encode = files, names, cfg, encode
        self.row_groups = row_groups or {}  # str(path) → rows per row group, when the footers were read already
        self.weights = weights or [1.0] * len(files)
        self.rank, self.world = rank, world
        self.counts = Counts()
        self._state: dict | None = None  # set by load_state_dict, consumed by the next __iter__
        self._live: dict | None = None  # the state after the last item handed out
        self._epoch_files: tuple[int, list] = (-1, [])
        self._skipped: Counter = Counter()  # "too_long/<source>", "bad_rows/<source>" since the last pack

    # ----------------------------------------------------------------------------------------- readers
    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def reader_files(self, epoch: int) -> list[tuple[int, Path]]:
        """This reader's files of ``epoch`` (file granularity: no file is split between readers)."""
        if self._epoch_files[0] != epoch:  # computed once per epoch, not once per file
            me, readers = self._reader()
            workers = readers // self.world
            files = epoch_files(self.files, self.weights, self.cfg.seed, epoch)
            self._epoch_files = (epoch, reader_share(files, self.rank, self.world, me % workers, workers))
        return self._epoch_files[1]

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where this reader is, as JSON values. StatefulDataLoader calls it in the worker right after an item
        was handed over (every ``snapshot_every_n_steps`` items), while the reading generator is suspended at
        that item: the live buffers are read as they are then, without copying them at every item."""
        if callable(self._live):
            return self._live()
        return copy.deepcopy(self._live if self._live is not None else self._state) or {}

    def load_state_dict(self, state: dict) -> None:
        self._state = copy.deepcopy(state) if state else None

    # ----------------------------------------------------------------------------------------- reading
    def _rows(self, epoch: int, pos: int, start_row: int) -> Iterator[tuple[int, int, dict]]:
        """(source, row number, raw row) of file ``pos`` of this reader's epoch, from row ``start_row + 1``."""
        source, path = self.reader_files(epoch)[pos]
        row = 0
        groups = self.row_groups.get(str(path)) or parquet_row_groups(path)
        for g, n in enumerate(groups):
            if row + n <= start_row:
                row += n
                continue
            for raw in read_row_group(path, g):
                row += 1
                if row > start_row:
                    yield source, row, raw

    def _sample(self, ref: list[int], source: int, raw: dict, path: Path, count: bool = True) -> Sample | None:
        """Parse + encode one row; None when the row is skipped (bad, or over-length and dropped). ``count``
        is off when a resumed reader re-reads its buffers (those rows were counted before)."""
        counts = self.counts if count else Counts()
        skipped = self._skipped if count else Counter()
        name = self.names[source]
        try:
            row = parse_row(raw, path, ref[2])
            refuse_other_split(row.metadata.get("split"), self.cfg, path, ref[2])  # never skipped as a bad row
            try:
                enc = self.encode(row)
            except DataError as e:  # an encoder's error names no file: add where the row is
                if e.file is None:
                    raise DataError(e.reason, file=path, row=ref[2], column=e.column) from None
                raise
        except DataError:
            if self.cfg.bad_rows == "error":
                raise
            counts.bad_rows[name] += 1
            skipped[f"bad_rows/{name}"] += 1
            return None
        ids, labels = enc["input_ids"], enc["labels"]
        if len(ids) > self.cfg.sample_limit:
            counts.too_long[name] += 1
            skipped[f"too_long/{name}"] += 1
            if self.cfg.over_length == "drop":
                return None
            ids, labels = ids[: self.cfg.sample_limit], labels[: self.cfg.sample_limit]
        counts.samples[name] += 1
        return Sample(list(ref), source, ids, labels)

    def _reread(self, refs: list[list[int]]) -> list[Sample]:
        """The samples behind saved references (buffers of a resumed reader), in the order given."""
        by_file: dict[tuple[int, int], set[int]] = defaultdict(set)
        for e, pos, row in refs:
            by_file[(e, pos)].add(row)
        got: dict[tuple[int, int, int], Sample] = {}
        for (e, pos), rows in by_file.items():
            path = self.reader_files(e)[pos][1]
            for source, row, raw in self._rows(e, pos, min(rows) - 1):
                if row in rows:
                    s = self._sample([e, pos, row], source, raw, path, count=False)
                    if s is not None:
                        got[(e, pos, row)] = s
                if row >= max(rows):
                    break
        return [got[tuple(r)] for r in refs if tuple(r) in got]

    # ----------------------------------------------------------------------------------------- iterating
    def __iter__(self) -> Iterator[dict]:
        st = self._state or {"epoch": 0, "pos": 0, "row": 0, "shuffle": [], "pack": [],
                             "rng": np.random.default_rng([self.cfg.seed, *self._reader()]).bit_generator.state}
        self._state, self._live = None, copy.deepcopy(st)
        self.counts = Counts(**{k: Counter(v) for k, v in st.get("counts", {}).items()})
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        shuffle, pack = self._reread(st["shuffle"]), self._reread(st["pack"])
        position = [st["epoch"], st["pos"], st["row"]]
        for sample in self._shuffled(self._read_from(position), shuffle, rng):
            pack.append(sample)
            if len(pack) >= self.cfg.pack_buffer_size:
                out = self._take_pack(pack)
                self._remember(position, shuffle, pack, rng)
                yield out
        while pack:  # the stream ended: flush the packing buffer
            out = self._take_pack(pack)
            self._remember(position, shuffle, pack, rng)
            yield out

    def _read_from(self, position: list[int]) -> Iterator[Sample]:
        """Samples from ``position`` ([epoch, file position, rows read]) on; ``position`` follows the reading."""
        first_epoch, first_pos, first_row = position
        for epoch in range(first_epoch, self.cfg.num_epochs):
            files = self.reader_files(epoch)
            for pos in range(first_pos if epoch == first_epoch else 0, len(files)):
                start = first_row if (epoch, pos) == (first_epoch, first_pos) else 0
                position[:] = [epoch, pos, start]
                for source, row, raw in self._rows(epoch, pos, start):
                    position[2] = row
                    s = self._sample([epoch, pos, row], source, raw, files[pos][1])
                    if s is not None:
                        yield s
            position[:] = [epoch + 1, 0, 0]

    def _shuffled(self, samples: Iterator[Sample], buffer: list[Sample], rng: np.random.Generator
                  ) -> Iterator[Sample]:
        """A local shuffle buffer: each new sample replaces a random one of the buffer, which is emitted."""
        size = self.cfg.local_shuffle_buffer_size
        for s in samples:
            if size == 0:
                yield s
                continue
            if len(buffer) < size:
                buffer.append(s)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], s = s, buffer[j]
            yield s
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _remember(self, position: list[int], shuffle: list[Sample], pack: list[Sample], rng) -> None:
        def snapshot() -> dict:
            return {"epoch": position[0], "pos": position[1], "row": position[2], "rng": rng.bit_generator.state,
                    "shuffle": [list(s.ref) for s in shuffle], "pack": [list(s.ref) for s in pack],
                    "counts": {k: dict(v) for k, v in vars(self.counts).items()}}

        self._live = snapshot

    def _take_pack(self, buffer: list[Sample]) -> dict:
        """One pack of the buffer's samples (:func:`best_fit`), with the rows skipped since the last pack."""
        chosen = best_fit([len(s.input_ids) for s in buffer], self.cfg.max_length)
        out = pack_samples([buffer[i] for i in chosen])
        for i in sorted(chosen, reverse=True):
            del buffer[i]
        # rows skipped since the last pack travel with this one, so whoever trains on the packs can count them
        # exactly (a worker's own counters reach the main process only with its state snapshots)
        out["skipped"], self._skipped = dict(self._skipped), Counter()
        return out


def best_fit(lengths: list[int], room: int) -> list[int]:
    """Which samples of a buffer (their lengths, oldest first) make the next pack, in pack order: the oldest
    (none waits for ever), then repeatedly the longest one that still fits (best fit keeps the padding small
    with long-tailed lengths)."""
    chosen = [0]
    room -= lengths[0]
    while True:
        fits = [i for i, n in enumerate(lengths) if n <= room and i not in chosen]
        if not fits:
            return chosen
        i = max(fits, key=lambda k: lengths[k])
        room -= lengths[i]
        chosen.append(i)


def refuse_other_split(split, cfg: DataMixConfig, path: Path, row: int | None = None) -> None:
    """A row (or a file's footer) naming a split the data config does not train on stops the run: ``gen
    samples`` writes the valid and test samples, answers included, next to the training ones."""
    if split is None or split in cfg.train_splits:
        return
    where = f"{path}, row {row}" if row is not None else str(path)
    raise ConfigError(f"{where}: holds {split!r} samples (metadata.split), not a training split of the data config "
                      f"(train_splits: {cfg.train_splits}); narrow the source's path to the training samples, or add "
                      f"{split!r} to train_splits to train on them on purpose")


def pack_samples(samples: list[Sample]) -> dict:
    """Concatenate samples into one packed sequence: positions restart at every sample (so attention stays
    inside each sample) and the first token of a sample is never a target (it would be predicted from the
    sample before it)."""
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "sources": []}
    for s in samples:
        n = len(s.input_ids)
        out["input_ids"] += s.input_ids
        out["labels"] += [-100] + s.labels[1:]
        out["position_ids"] += list(range(n))
        out["sources"] += [s.source] * n
    return out


def collate_packs(packs: list[dict], pad_id: int, length: int, segments: bool = False) -> dict[str, torch.Tensor]:
    """Packs → tensors of ``length`` columns; the padding is one more "sample" (positions from 0) that
    nothing attends into and nothing learns from. No ``attention_mask`` and ``use_cache=False``: transformers
    then derives the block-diagonal causal mask from the restarting ``position_ids`` (with a cache, or a 2-D
    mask, it would not, and samples would attend across their boundaries). ``sources`` (the source of every
    token, -1 on padding) and ``skipped`` (rows skipped while these packs were filled) are for the run's
    counts and metrics, not for the model. ``segments``: also the boundaries of every sample in the batch
    flattened to one row (``cu_seq_lens_q/k``, ``max_length_q/k``), for the attention backends that take them
    instead of a mask (``lmrec.training.attention``)."""
    b = len(packs)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    sources = torch.full((b, length), -1, dtype=torch.long)
    for i, p in enumerate(packs):
        n = len(p["input_ids"])
        ids[i, :n], labels[i, :n] = torch.as_tensor(p["input_ids"]), torch.as_tensor(p["labels"])
        pos[i, :n], sources[i, :n] = torch.as_tensor(p["position_ids"]), torch.as_tensor(p["sources"])
        pos[i, n:] = torch.arange(length - n)
    skipped: Counter = Counter()
    for p in packs:
        skipped.update(p.get("skipped", {}))
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "sources": sources, "skipped": dict(skipped),
           "use_cache": False}
    return with_segments(out) if segments else out

