"""Constants every attention path shares, so the kernels and rtlib's XLA code mask alike."""

# A finite "minus infinity": exp() of it underflows to exactly 0, and a fully masked row stays
# NaN-free in both the forward and the backward pass (no inf - inf anywhere).
MASKED_LOGIT = -1e30
# Logit given to a token's own key when self-attention is masked with shared QK. It is a large
# negative value rather than a mask so that a query whose only candidate is itself still
# attends to something (lucidrains' TOKEN_SELF_ATTN_VALUE).
SELF_LOGIT = -5e4
