"""Pallas kernels for rtlib: one op per folder (reference, one module per backend, dispatcher)."""

# rtlib checks this marker on import: the name `kernels` is generic, and another installed
# package of that name (e.g. Hugging Face's) would otherwise surface as a confusing
# "No module named kernels.grouped_attention".
RTLIB_KERNELS = True
