"""Data valuation: how much each training example is worth to a validation set, in validation-loss units.

``value_i = sum_q score[q, i]`` over the validation examples ``q``: the estimated change of the *total*
validation loss if training example ``i`` were removed and the model retrained (first-order leave-one-out,
:meth:`datatrace.Scores.total`). **Positive = valuable**: removing ``i`` would raise the validation loss.
**Negative = harmful**: removing ``i`` would lower it. Values add up to first order: removing a set changes the
total validation loss by about the sum of its members' values (check large sets by retraining).

Example:
    >>> values = value_data(influence, (X_val, y_val))  # doctest: +SKIP
    >>> values.to_csv("values.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.apps.common import as_numpy, check_attributor
from datatrace.attributors.base import Attributor
from datatrace.data import DataLike
from datatrace.errors import bad_value, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["DataValues", "value_data"]

VALUE_MEANING = (
    "value[i] estimates the change of the TOTAL validation loss (sum over validation examples, in the loss's "
    "units, e.g. nats) if training example i were removed and the model retrained (first-order leave-one-out). "
    "Positive = valuable: removing i would raise the validation loss. Negative = harmful: removing i would lower "
    "it."
)


@dataclass
class DataValues:
    """One value per training example and what it means.

    Attributes:
        values: ``(n,)`` float64.
        meaning: the sign and units in words.
    """

    values: np.ndarray
    meaning: str = VALUE_MEANING

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1:
            raise bad_value(
                "values", self.values, "expected a 1-D array, one value per example", "flatten it"
            )
        self.values = values

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def most_valuable(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` highest values, highest first."""
        check_positive_int("k", k)
        return np.argsort(-self.values, kind="stable")[:k]

    def most_harmful(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` lowest values, lowest (most harmful) first."""
        check_positive_int("k", k)
        return np.argsort(self.values, kind="stable")[:k]

    def to_frame(self) -> Any:
        """A ``pandas.DataFrame`` with columns ``index`` and ``value`` (and the meaning in ``.attrs``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "DataValues.to_frame needs pandas, which is not installed. Fix: pip install pandas, or use "
                "to_csv(path) (no pandas needed) or the .values array directly."
            ) from None
        frame = pd.DataFrame({"index": np.arange(len(self), dtype=np.int64), "value": self.values})
        frame.attrs["meaning"] = self.meaning
        return frame

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``index,value`` rows (full float precision) with the :mod:`csv` module; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "value"])
            for i, v in enumerate(self.values.tolist()):
                writer.writerow([i, repr(float(v))])
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str], meaning: str = VALUE_MEANING) -> DataValues:
        """Read a file written by :meth:`to_csv`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist. Fix: pass the path given to DataValues.to_csv()."
            )
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header != ["index", "value"]:
                raise ValueError(
                    f"{path} has header {header}, expected ['index', 'value']. Fix: pass a file written by "
                    "DataValues.to_csv()."
                )
            rows = [(int(i), float(v)) for i, v in reader]
        values = np.empty(len(rows), dtype=np.float64)
        seen = np.zeros(len(rows), dtype=bool)
        for i, v in rows:
            if not 0 <= i < len(rows) or seen[i]:
                raise ValueError(f"{path} has a bad or repeated index {i}. Fix: rewrite it with to_csv().")
            values[i], seen[i] = v, True
        return cls(values, meaning)

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write columns ``index`` and ``value`` to a Parquet file (needs pyarrow, or fastparquet with pandas)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            pa = None
        if pa is not None:
            table = pa.table({"index": np.arange(len(self), dtype=np.int64), "value": self.values})
            table = table.replace_schema_metadata({"meaning": self.meaning})
            pq.write_table(table, str(path))
            return path
        try:
            import fastparquet  # noqa: F401
        except ImportError:
            raise ImportError(
                "DataValues.to_parquet needs pyarrow (or fastparquet with pandas), and neither is installed. "
                "Fix: pip install pyarrow, or use to_csv(path)."
            ) from None
        self.to_frame().to_parquet(path, engine="fastparquet")
        return path


def value_data(influence: Attributor, validation: DataLike) -> DataValues:
    """Value every training example by its estimated effect on the total validation loss.

    Args:
        influence: a fitted attributor with ``score(query) -> Scores`` whose measurement is the loss.
        validation: held-out data ``(X, y)``.

    Returns:
        :class:`DataValues` with ``values[i] = Scores.total()[i]`` (see :data:`VALUE_MEANING`).
    """
    if validation is None:
        raise bad_value(
            "validation", validation, "data valuation needs held-out data", "pass validation=(X_val, y_val)"
        )
    check_attributor(influence, "expected a fitted attributor with a score(query) method")
    scores = influence.score(validation)
    values = as_numpy(scores.total(), "scores of the validation data").reshape(-1)
    logger.info(
        "value_data: %d training examples valued on %d validation examples; %d negative (harmful)",
        values.size,
        scores.n_query,
        int((values < 0).sum()),
    )
    return DataValues(values, VALUE_MEANING)
