"""Preprocessors (raw rows -> trajectories) and filters; ``PREPROCESSORS`` names them for ``Dataset.map``."""
from .base import Filter, Preprocessor
from .llm import AlpacaProcessor, CountdownProcessor, GSM8KProcessor, SelfCognitionProcessor

PREPROCESSORS = {cls.__name__: cls for cls in
                 (SelfCognitionProcessor, AlpacaProcessor, GSM8KProcessor, CountdownProcessor)}

__all__ = ['AlpacaProcessor', 'CountdownProcessor', 'Filter', 'GSM8KProcessor', 'PREPROCESSORS', 'Preprocessor',
           'SelfCognitionProcessor']
