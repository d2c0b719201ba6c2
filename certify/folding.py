# SHIM: removed after the issue-12 move
"""Old path of Normalize, kept for lipnet's imports during the move: see certify.rules.folding."""

from certify.rules.folding import Normalize

__all__ = ["Normalize"]
