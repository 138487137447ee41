"""The label convention of the whole package (Hugging Face's): one ignore value, one shift.
torch is imported by the function only, so the data layers (templates) can use the constant."""
from __future__ import annotations

IGNORE_INDEX = -100  # a label no loss counts: prompts, padding, the first token of a packed sample


def shifted_labels(labels: 'torch.Tensor') -> 'torch.Tensor':  # noqa: F821
    """Labels aligned with the logits that predict them (position t predicts token t + 1)."""
    import torch.nn.functional as F
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
