"""A small LightningDataModule over built or prepared-once-per-node datasets: what every task hands to the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): the same order after a resume, in the GID warm-up and in
    a single-process reference. Lightning calls `set_epoch` at every epoch start (and wraps it for DDP)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class _SkipFirst:
    """The index batches of `batches` after the first `n`; its length stays the full epoch's (Lightning counts
    the batches already fetched before the checkpoint)."""

    def __init__(self, batches: Any, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.batches), self.n, None)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is checkpointed: Lightning saves `state_dict()` with the fit loop
    and calls `load_state_dict()` on resume, and the next epoch pass skips the consumed batches (indices only,
    nothing loaded) so a run interrupted mid-epoch sees the same batches as an uninterrupted one.

    Same constructor as DataLoader (Lightning re-creates it with a DistributedSamplerWrapper under DDP; skipping
    acts on this rank's batches, after sharding). The sampler's order must depend only on its epoch, as
    EpochShuffleSampler's does."""

    _consumed = 0  # batches of the current epoch pass handed out (skipped ones included)
    _pending_skip = 0  # batches the next epoch pass skips (set by load_state_dict)
    _skip_now = 0  # read by _index_sampler while the underlying iterator is being created

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._consumed = self._pending_skip  # a new pass: only the batches it will skip count as handed out
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # a generator: nothing (no worker, no sampler pass) starts before the first batch is requested, i.e.
        # after Lightning's set_epoch; the pending skip is taken then, once
        self._skip_now, self._pending_skip = self._pending_skip, 0
        self._consumed = self._skip_now
        try:
            batches = super().__iter__()
        finally:
            self._skip_now = 0
        for batch in batches:
            self._consumed += 1
            yield batch

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipFirst(base, self._skip_now) if self._skip_now else base

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch pass stands: the sampler's epoch and the batches handed out so far."""
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside the saved epoch: the next pass skips its consumed batches (none if it was finished)."""
        batches = int(state["batches"])
        self._pending_skip = batches if batches < len(self) else 0
        set_epoch = getattr(self.sampler, "set_epoch", None)  # (Lightning sets it again before the first batch)
        if self._pending_skip and callable(set_epoch):
            set_epoch(int(state["epoch"]))


class DataSource(Protocol):
    """Where a datamodule's examples come from when they are not given built: `prepare` runs on one process per
    node (downloads, encoding into cache files), `load` on every process (reads what `prepare` left)."""

    encoded_examples: int  # examples this process encoded itself (0 when it read them from the cache)

    def prepare(self) -> None: ...

    def load(self) -> tuple[Sequence[Any], Sequence[Any]]: ...


class BuiltInSetup:
    """A source with nothing to prepare: `build` makes (train, val) in memory on every process (synthetic data)."""

    encoded_examples = 0

    def __init__(self, build: Callable[[], tuple[Sequence[Any], Sequence[Any]]]) -> None:
        self.build = build

    def prepare(self) -> None:
        """Nothing to download or cache."""

    def load(self) -> tuple[Sequence[Any], Sequence[Any]]:
        return self.build()


class ListDataModule(L.LightningDataModule):
    """Train/val datasets plus a collate function: given built (seeded fixtures), or by a `source` that
    Lightning's `prepare_data` (local rank 0 of each node) prepares and `setup` (every rank) loads, so a node
    tokenizes its data once. The dataloaders prepare and set up by themselves when no Trainer did."""

    def __init__(
        self,
        train: Sequence[Any] | None,
        val: Sequence[Any] | None,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        source: DataSource | None = None,
    ) -> None:
        super().__init__()
        if source is None and (train is None or val is None):
            raise ValueError("ListDataModule needs train and val datasets, or a source to load them from")
        self._train, self._val, self.source, self._prepared = train, val, source, False
        self.batch_size, self.collate_fn, self.num_workers, self.shuffle = batch_size, collate_fn, num_workers, shuffle
        self.seed = seed

    @property
    def encoded_examples(self) -> int:
        """How many examples this process encoded itself (0 for a rank that read the node's cache)."""
        return int(getattr(self.source, "encoded_examples", 0))

    def prepare_data(self) -> None:
        """Once per node (Lightning calls it on local rank 0 only): the source's downloads and encoding cache."""
        if self.source is not None and not self._prepared:
            self.source.prepare()
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        """Every rank, every stage: load the prepared datasets (once per process)."""
        if self._train is None or self._val is None:
            assert self.source is not None
            self._train, self._val = self.source.load()

    def _ready(self) -> None:
        """Prepare and set up here when nobody did (a caller without a Trainer)."""
        if self._train is None or self._val is None:
            self.prepare_data()
            self.setup()

    @property
    def train(self) -> Sequence[Any]:
        self._ready()
        assert self._train is not None
        return self._train

    @property
    def val(self) -> Sequence[Any]:
        self._ready()
        assert self._val is not None
        return self._val

    def train_dataloader(self) -> DataLoader:
        train = self.train
        return ResumableDataLoader(
            train,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(train), self.seed) if self.shuffle else None,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=len(train) >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val, batch_size=self.batch_size, collate_fn=self.collate_fn, num_workers=self.num_workers
        )
