# SHIM: removed after the issue-12 move
"""Old path of the convolution bounds, kept for lipnet's imports during the move: see certify.rules.conv."""

from certify.rules.conv import configured_conv_bound, conv_operator_bound

__all__ = ["configured_conv_bound", "conv_operator_bound"]
