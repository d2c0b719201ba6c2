"""certify: sound Lipschitz bounds, certified radii and audits for any PyTorch model.

Depends only on torch (and numpy/tqdm); never on lipnet's training stack.
"""

from certify import conv_norm as conv_norm  # registers the convolution and pooling bounds
from certify.bounds import UnboundableModuleError, lipschitz_bound, register_bound
from certify.radius import CertificationResult, certified_accuracy, certified_radius, certify, parse_eps

__all__ = [
    "CertificationResult",
    "UnboundableModuleError",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "lipschitz_bound",
    "parse_eps",
    "register_bound",
]
