"""ouzel: a local LLM inference engine in Python."""
from .api import LLM, load
from .errors import OuzelError

__version__ = "0.1.0"
__all__ = ["LLM", "OuzelError", "load", "__version__"]
