"""Preprocessor and Filter: the ETL step from raw dataset rows to trajectories.

A Preprocessor maps each raw row to a ``Trajectory`` (``messages``, optional ``tools`` and
``user_data``). It declares the fields it needs; a row lacking one fails with the row's index
and the field's name, so a bad row in a million is found at once. Datasets call it in batched
form with row indices (``datasets.map(batched=True, with_indices=True)``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from twinkle.template import Trajectory, columns_of, rows_of


class Preprocessor:
    """Subclasses set ``required_fields`` and implement ``preprocess(row) -> Trajectory``."""

    required_fields: Tuple[str, ...] = ()

    def preprocess(self, row: Dict[str, Any]) -> Trajectory:
        raise NotImplementedError

    def __call__(self, batch: Dict[str, list], indices: Sequence[int]) -> Dict[str, list]:
        trajectories: List[Trajectory] = []
        for index, row in zip(indices, rows_of(batch)):
            for field in self.required_fields:
                if row.get(field) is None:
                    raise ValueError(f'row {index}: missing required field {field!r} '
                                     f'({type(self).__name__} needs {", ".join(self.required_fields)})')
            trajectories.append(self.preprocess(row))
        return columns_of(trajectories)


class Filter:
    """Keeps a row when ``__call__(row)`` is true (``Dataset.filter`` calls it per row)."""

    def __call__(self, row: Dict[str, Any]) -> bool:
        raise NotImplementedError
