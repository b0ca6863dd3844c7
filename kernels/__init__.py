"""Pallas kernels for routing and local attention (see kernels/README.md; not written yet)."""
