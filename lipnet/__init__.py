"""lipnet: certifiably robust 1-Lipschitz networks in PyTorch."""

from lipnet.export import export

__all__ = ["export"]

__version__ = "0.1.0"
