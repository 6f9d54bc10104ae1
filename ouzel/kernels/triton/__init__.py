"""Triton kernels for CUDA. Each one's torch reference is named in its module's docstring."""
