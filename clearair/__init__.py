"""ClearAIR model library: restorers, the quality perceiver, guidance modules, losses, metrics, tiled inference.

Imports only torch (and transformers / open_clip where a part needs them): never Ray or MLflow (MLflow only when a
``models:/`` source is loaded). ``clearair.load_restorer`` is the one way to load a trained restorer.
"""

from clearair.restorer import Restorer, RestorerLoadError, load_restorer
from clearair.version import __version__

__all__ = ["Restorer", "RestorerLoadError", "__version__", "load_restorer"]
