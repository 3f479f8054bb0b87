"""A small LightningDataModule over in-memory datasets: what every task hands to the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


class ListDataModule(L.LightningDataModule):
    """Train/val datasets already built (seeded fixtures, or tokenized HF datasets) plus a collate function."""

    def __init__(
        self,
        train: Sequence[Any],
        val: Sequence[Any],
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.collate_fn, self.num_workers, self.shuffle = batch_size, collate_fn, num_workers, shuffle
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train), self.seed) if self.shuffle else None,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=len(self.train) >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val, batch_size=self.batch_size, collate_fn=self.collate_fn, num_workers=self.num_workers
        )
