"""Triton kernels, each with a pure-torch reference. Empty until the kernels issue lands; nothing imports it yet."""
