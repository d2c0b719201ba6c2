"""certify: sound Lipschitz bounds, certified radii and audits for any PyTorch model.

Depends only on torch (and numpy/tqdm); never on lipnet's training stack.
"""

# The deel-torchlip / orthogonium adapters (loaded the first time one of their classes is looked up)
# bound the modules they wrap through the dispatcher, so they sit above it, not in certify.rules.
from certify import third_party as third_party
from certify.audit import audit
from certify.bounds import UnboundableModuleError, lipschitz_bound, register_bound
from certify.contract import LipschitzBounded
from certify.graph import analyze
from certify.radius import (
    DEFAULT_EPS,
    CertificationResult,
    binary_radius,
    certification_table,
    certified_accuracy,
    certified_radius,
    certify,
    format_eps,
    parse_eps,
)
from certify.report import AuditReport
from certify.rules.folding import Normalize

__all__ = [
    "DEFAULT_EPS",
    "AuditReport",
    "CertificationResult",
    "LipschitzBounded",
    "Normalize",
    "UnboundableModuleError",
    "analyze",
    "audit",
    "binary_radius",
    "certification_table",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "format_eps",
    "lipschitz_bound",
    "parse_eps",
    "register_bound",
]
