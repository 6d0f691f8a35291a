"""Triton kernels of the data plane; each has a torch reference used on CPU and by the tests."""
