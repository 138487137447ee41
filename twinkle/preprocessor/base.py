"""Preprocessor and Filter: the ETL step from raw dataset rows to trajectories.

Upstream Twinkle's contract: a Preprocessor is called on a columnar batch, ``__call__(rows: Dict[str,
List]) -> Dict[str, List]`` (``datasets.map(batched=True)``), and may return fewer rows than it got
(a row it cannot use is dropped). Subclasses either override ``__call__`` in that form (with
``map_col_to_row`` / ``map_row_to_col`` to work row by row), or, simpler, implement
``preprocess(row) -> Trajectory`` (None drops the row) and declare ``required_fields``: a row lacking
one fails with the row's index and the field's name, so a bad row in a million is found at once;
so does a row whose ``text_fields`` value is not a string (a number where the prompt should be).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from twinkle.template import Trajectory, columns_of, rows_of
from twinkle.utils.logger import get_logger

logger = get_logger(__name__)


class Preprocessor:
    """Subclasses set ``required_fields`` and implement ``preprocess(row)``, or override ``__call__``."""

    required_fields: Tuple[str, ...] = ()
    text_fields: Tuple[str, ...] = ()

    def preprocess(self, row: Dict[str, Any]) -> Optional[Trajectory]:
        raise NotImplementedError

    def __call__(self, rows: Dict[str, List[Any]], indices: Optional[Sequence[int]] = None) -> Dict[str, List[Any]]:
        trajectories: List[Trajectory] = []
        rows = self.map_col_to_row(rows)
        for index, row in zip(indices if indices is not None else range(len(rows)), rows):
            for field in self.required_fields:
                if row.get(field) is None:
                    raise ValueError(f'row {index}: missing required field {field!r} '
                                     f'({type(self).__name__} needs {", ".join(self.required_fields)})')
            for field in self.text_fields:
                if row.get(field) is not None and not isinstance(row[field], str):
                    raise ValueError(f'row {index}: field {field!r} must be a string, got '
                                     f'{type(row[field]).__name__} {row[field]!r}')
            trajectory = self.preprocess(row)
            if trajectory is not None:
                trajectories.append(trajectory)
        if len(trajectories) < len(rows):
            logger.info('%s dropped %d of %d rows (preprocess returned None)', type(self).__name__,
                        len(rows) - len(trajectories), len(rows))
        return self.map_row_to_col(trajectories)

    @classmethod
    def takes_indices(cls) -> bool:
        """Whether ``__call__`` is this base's (which names failing rows by index) or a subclass's own."""
        return cls.__call__ is Preprocessor.__call__

    @staticmethod
    def map_col_to_row(rows: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
        """A columnar batch as a list of rows."""
        return rows_of(rows)

    @staticmethod
    def map_row_to_col(rows: List[Dict[str, Any]], keys: Sequence[str] = ()) -> Dict[str, List[Any]]:
        """Rows back to a columnar batch (a key missing from some rows is None there)."""
        return columns_of(rows, keys)


class Filter:
    """Keeps a row when ``__call__(row)`` is true (``Dataset.filter`` calls it per row)."""

    def __call__(self, row: Dict[str, Any]) -> bool:
        raise NotImplementedError
