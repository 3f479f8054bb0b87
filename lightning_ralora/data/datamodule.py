"""A small LightningDataModule over in-memory datasets: what every task hands to the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader


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
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.collate_fn, self.num_workers, self.shuffle = batch_size, collate_fn, num_workers, shuffle

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=len(self.train) >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate_fn, num_workers=self.num_workers)
