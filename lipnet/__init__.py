"""lipnet: certifiably robust 1-Lipschitz networks in PyTorch."""

__version__ = "0.1.0"
