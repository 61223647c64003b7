"""A Dataset of dict items, the form of a tokenised Hugging Face dataset (shared by the tests)."""

from __future__ import annotations

import torch


class DictDataset(torch.utils.data.Dataset):
    """Items ``{key: column[i]}``: the form of a tokenised Hugging Face dataset."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}

    def head(self, k: int) -> DictDataset:
        return DictDataset(**{key: v[:k] for key, v in self.columns.items()})
