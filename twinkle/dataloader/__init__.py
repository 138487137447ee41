"""Data loading: global batches sliced per data-parallel rank, resumable (``DataLoader``)."""
from .dataloader import DataLoader

__all__ = ['DataLoader']
