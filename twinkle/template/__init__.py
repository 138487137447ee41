"""Templates turn trajectories into token ids and labels; ``TEMPLATES`` names them for ``set_template``.

``'Qwen3Template'`` and ``'Qwen3_5Template'`` are the seeds' names for Qwen's ChatML format, which
the generic ``Template`` reads from the tokenizer's chat template, so they name the same class.
"""
from .base import TRUNCATION_STRATEGIES, Template, load_tokenizer
from .features import FEATURE_KEYS, IGNORE_INDEX, InputFeature, Message, Trajectory, columns_of, rows_of

TEMPLATES = {'Template': Template, 'Qwen3Template': Template, 'Qwen3_5Template': Template}


def build_template(template='Template', default_model_id=None, **kwargs):
    """What ``set_template(template, **kwargs)`` holds: a name from ``TEMPLATES``, a class (built for
    ``default_model_id`` unless kwargs name a model_id or tokenizer) or a ready instance."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f'unknown template {template!r}; valid: {", ".join(TEMPLATES)} (or a Template class)')
        template = TEMPLATES[template]
    if isinstance(template, type):
        if 'tokenizer' not in kwargs:
            kwargs.setdefault('model_id', default_model_id)
        template = template(**kwargs)
    return template

__all__ = ['FEATURE_KEYS', 'IGNORE_INDEX', 'InputFeature', 'Message', 'TEMPLATES', 'TRUNCATION_STRATEGIES',
           'Template', 'Trajectory', 'build_template', 'columns_of', 'load_tokenizer', 'rows_of']
