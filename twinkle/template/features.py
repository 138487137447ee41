"""The two data formats of the pipeline, and moving rows between row and column form.

A ``Trajectory`` is what preprocessors produce and templates consume: a chat (``messages``),
optional ``tools``, and ``user_data`` that rewards read later. An ``InputFeature`` is what a
template produces: token ids and per-token fields of one sample, plain lists so that
``datasets`` stores them and any collator can turn them into tensors.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, TypedDict

from twinkle.utils.labels import IGNORE_INDEX


class Message(TypedDict, total=False):
    role: str         # 'system' | 'user' | 'assistant' | 'tool'
    content: str
    tool_calls: list  # assistant calls: [{'name': ..., 'arguments': {...}}]


class Trajectory(TypedDict, total=False):
    messages: List[Message]
    tools: Any        # JSON schemas (a list, or its JSON string as datasets columns store it)
    user_data: List[Dict[str, Any]]


class InputFeature(TypedDict):
    input_ids: List[int]
    labels: List[int]          # the token itself where the assistant wrote it, else -100
    attention_mask: List[int]
    position_ids: List[int]    # 0..length-1 (packing concatenates these, so they restart per sample)
    length: int


FEATURE_KEYS = ('input_ids', 'labels', 'attention_mask', 'position_ids', 'length')


def rows_of(batch: Dict[str, list]) -> List[Dict[str, Any]]:
    """Column form (``datasets`` batches) to a list of rows."""
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    return [{column: batch[column][i] for column in columns} for i in range(size)]


def columns_of(rows: Iterable[Dict[str, Any]], columns: Iterable[str] = ()) -> Dict[str, list]:
    """Rows to column form; a column missing from some rows is None there."""
    rows = list(rows)
    names = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    return {name: [row.get(name) for row in rows] for name in names}
