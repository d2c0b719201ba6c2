"""certify: sound Lipschitz bounds, certified radii and audits for any PyTorch model.

Depends only on torch (and numpy/tqdm); never on lipnet's training stack.
"""

from certify import conv_norm as conv_norm  # registers the convolution and pooling bounds
from certify.audit import audit
from certify.bounds import UnboundableModuleError, lipschitz_bound, register_bound
from certify.folding import Normalize
from certify.graph import analyze
from certify.radius import CertificationResult, certified_accuracy, certified_radius, certify, parse_eps
from certify.report import AuditReport

__all__ = [
    "AuditReport",
    "CertificationResult",
    "Normalize",
    "UnboundableModuleError",
    "analyze",
    "audit",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "lipschitz_bound",
    "parse_eps",
    "register_bound",
]
