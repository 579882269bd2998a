"""sandbox: an educational ablation sandbox for linear-attention update rules."""

from sandbox.rules import get_rule, list_rules

__version__ = "0.1.0"
__all__ = ["get_rule", "list_rules", "__version__"]
