"""lisa-hub: LiSA shared-attention backbones and per-task adapters.

Light on import: submodules pull in torch / transformers only when used.
"""

__version__ = "0.1.0"
