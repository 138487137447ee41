"""Losses: ``loss(inputs, outputs) -> (summed loss, number of tokens it sums over)``.

Returning the *sum* and the count, not a mean, is what makes gradient accumulation and data
parallelism exact: the model adapter divides the accumulated gradients once by the total token
count of all micro-batches (and ranks), instead of averaging per-batch means.
"""
from .base import Loss, shifted_labels
from .cross_entropy import ChunkedCrossEntropyLoss, CrossEntropyLoss
from .policy_gradient import CISPOLoss, GRPOLoss, GSPOLoss
from .preference import DPOLoss

LOSSES = {cls.__name__: cls for cls in (CrossEntropyLoss, ChunkedCrossEntropyLoss, GRPOLoss, GSPOLoss, CISPOLoss,
                                        DPOLoss)}

__all__ = ['CISPOLoss', 'ChunkedCrossEntropyLoss', 'CrossEntropyLoss', 'DPOLoss', 'GRPOLoss', 'GSPOLoss', 'LOSSES', 'Loss', 'shifted_labels']
