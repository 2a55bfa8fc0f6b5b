"""Provisional: forwards to the pure-PyTorch reference until the C kernels land.

The Core issue replaces this file with the torch.library ops over qvit._C. The
public signature of :func:`fake_quant` is the contract and stays as it is.
"""
from .reference import fake_quant

__all__ = ["fake_quant"]
