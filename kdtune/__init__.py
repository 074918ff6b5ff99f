"""kdtune: hyperparameter search for knowledge distillation on PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"
