"""CUDA fast paths. None yet beyond torch: returns None so the reference runs."""
from __future__ import annotations


def qlinear(x, w):
    return None
