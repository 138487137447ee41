"""Datasets: loading, preprocessing, encoding (``Dataset``) and bin packing (``PackingDataset``)."""
from .base import Dataset, DatasetMeta
from .packing import IterablePackingDataset, PackingDataset, pack_lengths, pack_rows

__all__ = ['Dataset', 'DatasetMeta', 'IterablePackingDataset', 'PackingDataset', 'pack_lengths', 'pack_rows']
