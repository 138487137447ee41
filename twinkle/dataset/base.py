"""Dataset: load rows (local files, in-memory rows, or hub ids), preprocess, template, encode.

It wraps Hugging Face ``datasets`` (Arrow-backed, memory-mapped, streaming when asked). Several
sources can be added and then mixed. Every transform is in place and returns nothing, as in the
seeds' examples::

    dataset = Dataset(DatasetMeta('data.jsonl', data_slice=range(1000)))
    dataset.map(SelfCognitionProcessor('twinkle', 'ModelScope'))
    dataset.set_template('Template', model_id=assets.tiny_model_path('qwen3'), max_length=512)
    dataset.encode()
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Type, Union

import torch.utils.data

from twinkle import hub
from twinkle.utils.logger import get_logger
from twinkle.preprocessor import PREPROCESSORS, Preprocessor
from twinkle.template import TEMPLATES, Template

logger = get_logger(__name__)
_FILE_LOADERS = {'.json': 'json', '.jsonl': 'json', '.csv': 'csv', '.parquet': 'parquet', '.txt': 'text'}


@dataclass
class DatasetMeta:
    """Which rows to load: an id (local file or directory, ``ms://`` / ``hf://`` hub id), the hub
    subset and split, and optionally which row indices (indices past the end wrap around, so
    ``range(1000)`` over 300 rows repeats them, as the seeds' examples expect)."""
    dataset_id: str
    subset_name: str = 'default'
    split: str = 'train'
    data_slice: Optional[Iterable[int]] = None

    def __post_init__(self):
        if not isinstance(self.dataset_id, str) or not self.dataset_id:
            raise ValueError(f'dataset_id must be a non-empty string, got {self.dataset_id!r}')
        if self.data_slice is not None:
            if not isinstance(self.data_slice, Iterable) or isinstance(self.data_slice, (str, bytes)):
                raise ValueError(f'data_slice must be an iterable of row indices, got {self.data_slice!r}')
            self.data_slice = list(self.data_slice)
            if not all(isinstance(i, int) and i >= 0 for i in self.data_slice):
                raise ValueError('data_slice must hold non-negative ints')

    @property
    def key(self) -> str:
        return f'{self.dataset_id}:{self.subset_name}:{self.split}'


class Dataset(torch.utils.data.Dataset):
    """Rows from ``dataset_meta`` (a DatasetMeta or an id) or from in-memory ``rows``.

    ``streaming=True`` reads files lazily (an iterable dataset: no ``len``, no indexing).
    """

    def __init__(self, dataset_meta: Union[DatasetMeta, str, None] = None, *,
                 rows: Optional[List[Dict[str, Any]]] = None, streaming: bool = False):
        if (dataset_meta is None) == (rows is None):
            raise ValueError('pass exactly one of dataset_meta and rows')
        self.streaming = streaming
        self.template: Optional[Template] = None
        self.datasets: Dict[str, Any] = {}
        if rows is not None:
            import datasets
            if streaming:
                raise ValueError('streaming applies to files; in-memory rows are already loaded')
            self.datasets['rows'] = _table_of(list(rows))
        else:
            self.add_dataset(dataset_meta)

    # -- sources -------------------------------------------------------------------------------
    def add_dataset(self, dataset_meta: Union[DatasetMeta, str]) -> None:
        """Load another source; ``map``/``filter`` can target it, ``mix_dataset`` combines them."""
        meta = DatasetMeta(dataset_meta) if isinstance(dataset_meta, str) else dataset_meta
        if not isinstance(meta, DatasetMeta):
            raise ValueError(f'dataset_meta must be a DatasetMeta or an id, got {type(dataset_meta).__name__}')
        if meta.key in self.datasets:
            raise ValueError(f'dataset {meta.key!r} is already loaded')
        self.datasets[meta.key] = _load(meta, self.streaming)

    def mix_dataset(self, interleave: bool = True, probabilities: Optional[List[float]] = None,
                    seed: Optional[int] = None) -> None:
        """Combine the loaded sources into one: alternate rows (``interleave``, optionally sampled
        with ``probabilities``, until the shortest source ends) or concatenate them."""
        import datasets
        parts = [_aligned(part, next(iter(self.datasets.values()))) for part in self.datasets.values()]
        if interleave:
            mixed = datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed)
        elif probabilities is not None:
            raise ValueError('probabilities apply to interleave=True')
        else:
            mixed = datasets.concatenate_datasets(parts)
        self.datasets = {'+'.join(self.datasets): mixed}

    # -- transforms ----------------------------------------------------------------------------
    def map(self, preprocess: Union[Preprocessor, Type[Preprocessor], str, Callable],
            dataset_meta: Optional[DatasetMeta] = None, init_args: Optional[Dict[str, Any]] = None,
            **map_kwargs) -> None:
        """Apply a Preprocessor (instance, class or name) or any function to every source, or to
        ``dataset_meta``'s only. Both are called on columnar batches, as upstream Twinkle does
        (``batched=True`` unless ``map_kwargs`` says otherwise). A Preprocessor's output replaces the
        raw columns and may hold fewer rows; a plain function's output columns are merged into the rows
        (pass ``remove_columns=`` to drop the raw ones), as ``datasets.map`` does."""
        if callable(preprocess) and not isinstance(preprocess, (Preprocessor, type, str)):
            self._apply(dataset_meta, lambda ds: ds.map(preprocess, **{'batched': True, **_uncached(ds, map_kwargs)}))
            return
        preprocessor = _construct(preprocess, Preprocessor, PREPROCESSORS, 'preprocessor', init_args or {})
        self._apply(dataset_meta, lambda ds: ds.map(
            preprocessor, batched=True, with_indices=preprocessor.takes_indices(), remove_columns=ds.column_names,
            **_uncached(ds, map_kwargs)))

    def filter(self, keep: Callable[[Dict[str, Any]], bool], dataset_meta: Optional[DatasetMeta] = None,
               **filter_kwargs) -> None:
        """Keep the rows for which ``keep(row)`` (e.g. a ``Filter``) is true."""
        if not callable(keep):
            raise ValueError(f'keep must be callable, got {type(keep).__name__}')
        self._apply(dataset_meta, lambda ds: ds.filter(keep, **_uncached(ds, filter_kwargs)))

    def set_template(self, template: Union[Template, Type[Template], str], **template_kwargs) -> None:
        """The template ``encode`` uses: an instance, a class or a name in ``twinkle.template.TEMPLATES``,
        built with ``template_kwargs`` (``model_id=``, ``max_length=``, ``truncation_strategy=``)."""
        self.template = _construct(template, Template, TEMPLATES, 'template', template_kwargs)

    def encode(self, add_generation_prompt: bool = False, batched: bool = True, **map_kwargs) -> None:
        """Tokenize every trajectory into an InputFeature (columns ``input_ids``, ``labels``, ...).

        Rows keep their other columns (rewards read ``user_data``). ``batched=False`` hands rows
        over one at a time. Over-long samples follow the template's truncation strategy.
        """
        if self.template is None:
            raise ValueError('call set_template(...) before encode()')
        kwargs = dict(batched=True, with_indices=True, fn_kwargs={'add_generation_prompt': add_generation_prompt},
                      **({} if batched else {'batch_size': 1}), **map_kwargs)
        self.template.dropped.clear()
        sizes = {key: _length(ds) for key, ds in self.datasets.items()}
        self._apply(None, lambda ds: ds.map(self.template.batch_encode, remove_columns=ds.column_names,
                                            **_uncached(ds, kwargs)))
        self._report_dropped(sizes)

    # -- access --------------------------------------------------------------------------------
    @property
    def dataset(self):
        """The single underlying ``datasets`` object (after ``mix_dataset`` when several were added)."""
        if len(self.datasets) != 1:
            raise ValueError(f'{len(self.datasets)} datasets are loaded ({", ".join(self.datasets)}); '
                             f'call mix_dataset() first')
        return next(iter(self.datasets.values()))

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError('a streaming dataset has no length')
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.dataset[index]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.dataset)

    def _report_dropped(self, sizes: Dict[str, Optional[int]]) -> None:
        """Samples that encode dropped are counted and said; a source left empty is an error."""
        reasons = ', '.join(f'{count} {why}' for why, count in self.template.dropped.items())
        for key, before in sizes.items():
            after = _length(self.datasets[key])
            if before is None or after == before:
                continue
            if after == 0:
                raise ValueError(f'encode() dropped all {before} samples of {key!r} ({reasons}): nothing is left to '
                                 f'train on; raise max_length or use truncation_strategy="left"')
            logger.warning('encode() dropped %d of %d samples of %r: %s', before - after, before, key, reasons)

    def _apply(self, dataset_meta: Optional[DatasetMeta], transform: Callable) -> None:
        keys = list(self.datasets) if dataset_meta is None else [dataset_meta.key]
        for key in keys:
            if key not in self.datasets:
                raise ValueError(f'dataset {key!r} is not loaded; loaded: {", ".join(self.datasets)}')
            self.datasets[key] = transform(self.datasets[key])


def _load(meta: DatasetMeta, streaming: bool):
    import datasets
    location = hub.locate(meta.dataset_id)
    if location.hub != hub.LOCAL:
        loaded = hub.load_dataset(meta.dataset_id, meta.subset_name, meta.split, streaming=streaming)
    elif os.path.isdir(location.name):
        loaded = _read_local(location.name, _files_in(location.name), streaming,
                             lambda: datasets.load_dataset(location.name, split=meta.split, streaming=streaming))
    else:
        suffix = os.path.splitext(location.name)[1].lower()
        if suffix not in _FILE_LOADERS:
            raise ValueError(f'dataset_id {meta.dataset_id!r}: unsupported file type {suffix!r}; '
                             f'supported: {", ".join(_FILE_LOADERS)}')
        loaded = _read_local(location.name, [location.name], streaming, lambda: datasets.load_dataset(
            _FILE_LOADERS[suffix], data_files=location.name, split='train', streaming=streaming))
    if meta.data_slice is None:
        return loaded
    if streaming:
        raise ValueError('data_slice needs random access; it cannot apply to a streaming dataset')
    if len(loaded) == 0:
        raise ValueError(f'dataset {meta.dataset_id!r} is empty, so data_slice selects nothing')
    return loaded.select([i % len(loaded) for i in meta.data_slice])


def _table_of(rows: List[Dict[str, Any]]):
    """In-memory rows as a ``datasets.Dataset``; a column of mixed types is named with two rows."""
    import datasets
    import pyarrow
    try:
        return datasets.Dataset.from_list(rows)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        first_seen: Dict[str, Any] = {}
        for index, row in enumerate(rows):
            for field, value in row.items():
                if value is None:
                    continue
                seen = first_seen.setdefault(field, (index, type(value)))
                if seen[1] is not type(value):
                    raise ValueError(f'rows: field {field!r} is {seen[1].__name__} in row {seen[0]} but '
                                     f'{type(value).__name__} in row {index}; a field holds one type') from error
        raise ValueError(f'rows could not be stored as a table: {error}') from error


def _files_in(directory: str) -> List[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
                  if os.path.splitext(name)[1].lower() in _FILE_LOADERS)


def _read_local(source: str, files: List[str], streaming: bool, read: Callable):
    """``read()`` of local ``files``, with errors that name the file, and the line of a bad jsonl record
    (``datasets`` reports a parser position inside its own chunking, or nothing useful, for both)."""
    if files and all(_holds_no_rows(path) for path in files):
        raise ValueError(f'dataset {source!r} is empty: {", ".join(files)} holds no rows')
    try:
        loaded = read()
    except Exception as error:  # datasets wraps the parser's error; find the line it means
        for path in files:
            if path.lower().endswith(('.jsonl', '.json')):
                _require_json_records(path)
        raise ValueError(f'dataset {source!r} could not be read: {error}') from error
    if not streaming and len(loaded) == 0:
        raise ValueError(f'dataset {source!r} is empty: it holds no rows')
    return loaded


def _holds_no_rows(path: str) -> bool:
    """Blank, or a csv with at most its header (parquet files are never treated as empty here)."""
    if path.lower().endswith('.parquet') or os.path.getsize(path) > 1 << 20:
        return os.path.getsize(path) == 0
    with open(path, encoding='utf-8', errors='replace') as stream:
        lines = [line for line in stream if line.strip()]
    return len(lines) <= (1 if path.lower().endswith('.csv') else 0)


def _require_json_records(path: str) -> None:
    """Raise naming the first line of a json-lines file that is not one JSON object."""
    with open(path, encoding='utf-8', errors='replace') as stream:
        text = stream.read()
    if path.lower().endswith('.json') and text.lstrip()[:1] == '[':
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f'{path}: line {error.lineno} is not valid JSON ({error.msg})') from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f'{path}: line {number} is not valid JSON ({error.msg}): {line[:80]!r}') from None
        if not isinstance(record, dict):
            raise ValueError(f'{path}: line {number} is a JSON {type(record).__name__}, not an object (one row '
                             f'per line)')


def _length(ds) -> Optional[int]:
    """Rows of a loaded source, None for a stream (it encodes lazily, so drops are not counted)."""
    try:
        return len(ds)
    except TypeError:
        return None


def _aligned(part, first):
    """``part`` cast to ``first``'s column types when only the types differ (e.g. json loads
    large_string where csv loads string), which datasets would otherwise refuse to combine."""
    import datasets
    same_columns = isinstance(part, datasets.Dataset) and isinstance(first, datasets.Dataset) \
        and set(part.column_names) == set(first.column_names)
    return part.cast(first.features) if same_columns and part.features != first.features else part


def _construct(spec, base: type, registry: Dict[str, type], kind: str, kwargs: Dict[str, Any]):
    """An instance of ``base`` from an instance (as is), a subclass, or a name in ``registry``."""
    if isinstance(spec, base):
        if kwargs:
            raise ValueError(f'{kind} is already built; got extra arguments {sorted(kwargs)}')
        return spec
    if isinstance(spec, str):
        if spec not in registry:
            raise ValueError(f'unknown {kind} {spec!r}; valid: {", ".join(registry)}')
        spec = registry[spec]
    if not (isinstance(spec, type) and issubclass(spec, base)):
        raise ValueError(f'{kind} must be a {base.__name__}, a subclass or a name, got {spec!r}')
    return spec(**kwargs)


def _uncached(ds, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Recompute by default: a cached result of an edited preprocessor is a classic silent bug.
    (Streaming datasets compute lazily and take no cache argument.)"""
    import datasets
    return {'load_from_cache_file': False, **kwargs} if isinstance(ds, datasets.Dataset) else kwargs
