"""ClearAIR model library: restorers, the quality perceiver, guidance modules, losses, metrics, tiled inference.

Imports only torch (and transformers / open_clip where a part needs them): never Ray or MLflow.
"""

__version__ = "0.2.0.dev0"
