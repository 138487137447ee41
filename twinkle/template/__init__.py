"""Templates turn trajectories into token ids and labels; ``TEMPLATES`` names them for ``set_template``.

``'Qwen3Template'`` and ``'Qwen3_5Template'`` are the seeds' names for Qwen's ChatML format, which
the generic ``Template`` reads from the tokenizer's chat template, so they name the same class.
"""
from .base import TRUNCATION_STRATEGIES, Template, load_tokenizer
from .features import FEATURE_KEYS, IGNORE_INDEX, InputFeature, Message, Trajectory, columns_of, rows_of

TEMPLATES = {'Template': Template, 'Qwen3Template': Template, 'Qwen3_5Template': Template}

__all__ = ['FEATURE_KEYS', 'IGNORE_INDEX', 'InputFeature', 'Message', 'TEMPLATES', 'TRUNCATION_STRATEGIES',
           'Template', 'Trajectory', 'columns_of', 'load_tokenizer', 'rows_of']
