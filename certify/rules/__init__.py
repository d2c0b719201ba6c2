"""Bounds for module types, one file per kind of layer; importing this package registers them.

* :mod:`~certify.rules.activations`: the one table of activation constants (modules and functional forms);
* :mod:`~certify.rules.linear`: ``nn.Linear`` (and ``nn.Bilinear``, refused);
* :mod:`~certify.rules.conv`: convolutions and transposed convolutions, with
  :mod:`~certify.rules.conv_symbol` (certified symbol maxima) and :mod:`~certify.rules.conv_gram`
  (the banded Gram certificate);
* :mod:`~certify.rules.pooling`: average, max, LP and adaptive pooling;
* :mod:`~certify.rules.folding`: BatchNorm (alone or folded into its layer) and input normalisation;
* :mod:`~certify.rules.shapes`: identities and permutations (flatten, pixel shuffles, eval dropout).

The deel-torchlip and orthogonium adapters are :mod:`certify.third_party`: they bound the modules
those layers wrap through the dispatcher :mod:`certify.bounds`, which imports this package, so they
sit above it.
"""

from certify.rules import activations, conv, folding, linear, pooling, shapes

__all__ = ["activations", "conv", "folding", "linear", "pooling", "shapes"]
