"""Triton kernels. Submodules import triton; import them lazily (never from quantkern/__init__)."""
