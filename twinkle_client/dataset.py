"""The data is prepared where the client runs: twinkle's own ``Dataset`` (needs twinkle installed)."""
from twinkle.dataset import Dataset, DatasetMeta

__all__ = ['Dataset', 'DatasetMeta']
