"""twinkle's own ``DataLoader``: global batches of encoded features, sent to the service as they are."""
from twinkle.dataloader import DataLoader

__all__ = ['DataLoader']
