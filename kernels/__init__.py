"""Pallas kernels for rtlib: one op per folder (reference, one module per backend, dispatcher)."""
