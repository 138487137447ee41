"""Task processors: collate InputFeatures into model inputs (``InputProcessor``)."""
from .input_processor import PADDING_SIDES, InputProcessor

__all__ = ['InputProcessor', 'PADDING_SIDES']
