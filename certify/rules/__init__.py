"""Bounds for module types, one file per kind of layer; importing this package registers them.

* :mod:`~certify.rules.activations`: the one table of activation constants (modules and functional forms);
* :mod:`~certify.rules.linear`: ``nn.Linear`` (and ``nn.Bilinear``, refused);
* :mod:`~certify.rules.conv`: convolutions and transposed convolutions, with
  :mod:`~certify.rules.conv_symbol` (certified symbol maxima) and :mod:`~certify.rules.conv_gram`
  (the banded Gram certificate);
* :mod:`~certify.rules.pooling`: average, max, LP and adaptive pooling;
* :mod:`~certify.rules.folding`: BatchNorm (alone or folded into its layer) and input normalisation;
* :mod:`~certify.rules.shapes`: identities and permutations (flatten, pixel shuffles, eval dropout);
* :mod:`~certify.rules.third_party`: deel-torchlip and orthogonium layers, registered lazily. It
  bounds the modules those layers wrap through the dispatcher :mod:`certify.bounds`, which imports
  this package, so it is not imported here but by the ``certify`` package itself.
"""

from certify.rules import activations, conv, folding, linear, pooling, shapes

__all__ = ["activations", "conv", "folding", "linear", "pooling", "shapes"]
