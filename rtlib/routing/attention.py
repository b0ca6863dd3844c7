"""Routing attention (ALGORITHM.md section 2): attention only among tokens routed together."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels.dispatch import Backend, choose
from kernels.grouped_attention import CallShape, choose_backend, grouped_attention, splash_tpu
from rtlib.attention.core import check_inputs, masked_attention, valid_or_all, zero_padding
from rtlib.routing.assign import (
    Assignment,
    LogitScale,
    Norm,
    balanced_members,
    logit_scale_value,
    nearest_cluster,
    resolve_masks,
    resolve_shared_qk,
    route_scores,
)
from rtlib.routing.stats import RoutingStats, assignment_statistics

ASSIGNMENTS = ("balanced", "causal")
XLA = Backend("xla")
MIN_SPLIT_WINDOW = 64  # windows from this size up use blocks of W / 4 on XLA (_aligned_block)


def routing_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"] | None,
    v: Float[Array, "batch seq heads vdim"],
    centroids: Float[Array, "heads clusters dim"],
    *,
    window: int,
    assignment: Assignment = "balanced",
    causal: bool = True,
    norm: Norm = "layernorm",
    logit_scale: LogitScale = "rsqrt_dim",
    mask: Bool[Array, "batch seq"] | None = None,
    q_mask: Bool[Array, "batch seq"] | None = None,
    kv_mask: Bool[Array, "batch seq"] | None = None,
    shared_qk: bool | None = None,
    self_mask: bool = False,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "batch seq heads vdim"], RoutingStats]:
    """Routing attention over `[batch, seq, heads, dim]` inputs; returns `(out, stats)`.

    - `window`: the cluster size W (at most the sequence length: a larger value acts as the
      sequence length, so short sequences work). `assignment="balanced"` (the paper): each centroid takes its
      top-W tokens by score, a token may sit in 0, 1 or several clusters and gets the mean of its
      cluster outputs (zero if in none). `assignment="causal"`: each token joins its nearest
      centroid and attends to the W most recent same-cluster tokens at positions <= its own
      (with `causal=False`: the same-cluster tokens within W ranks on either side).
    - q and k are normalised (`norm`) for both routing and the attention logits, which are
      scaled by 1/sqrt(dim) (`logit_scale="rsqrt_dim"`) or not at all (`"none"`, paper code).
    - Causal masking is by original token position. Shared QK (`k=None` or `shared_qk=True`)
      uses the normalised queries as keys (any other `k` is ignored); `self_mask` then gives a
      token's own key a -5e4 logit.
    - Padding: `mask` is one padding mask for queries and keys (with shared QK they are then
      one routed set, clustered once: the fast path); `q_mask` / `kv_mask` give them separate
      masks. Padded queries output zeros and padded tokens are excluded from the statistics;
      padded keys are never attended to.
    - For code written before these arguments were explicit, `k is q` still means shared QK
      and `kv_mask is q_mask` one mask; under `jax.jit` two arguments are two tracers, so say
      `k=None` / `mask=` there.
    - `stats` (`RoutingStats`, summed over the batch) feeds `kmeans_update` and the commitment loss.

    - `implementation` (None, "xla", "pallas_tpu", "pallas_gpu", "cudnn", or a preference
      list; see `kernels.dispatch`) picks who computes the attention inside the clusters;
      `interpret=True` runs a Pallas kernel in interpret mode (on CPU). The kernels take the
      normalised q and k in v's dtype (their softmax statistics stay float32).

    All routing math and the softmax run in float32; the output has `v`'s dtype.
    """
    check_inputs("routing_attention", q, k, v, mask=mask, q_mask=q_mask, kv_mask=kv_mask)
    batch, n, heads, dim = q.shape
    if window < 1:
        raise ValueError(f"routing_attention: window must be >= 1, got {window}")
    k, shared_qk = resolve_shared_qk(q, k, shared_qk)
    q_mask, kv_mask, one_mask = resolve_masks(mask, q_mask, kv_mask)
    window = min(window, n)
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS}")
    if centroids.shape[0] != heads or centroids.shape[-1] != dim:
        raise ValueError(
            f"centroids have shape {centroids.shape}; expected (heads={heads}, clusters, dim={dim})"
        )
    if self_mask and not shared_qk:
        raise ValueError("self_mask is only meaningful with shared QK (k is q)")
    scale = logit_scale_value(logit_scale, dim)
    # Without padding, validity stays None all the way down: an all-True mask would put
    # full-size constants in the program (`where` against a broadcast -inf or zeros), which
    # `lax.scan` over layers hoists out of the loop and keeps alive for the whole forward pass
    # (1.9 GB at 64k tokens; docs/performance.md).
    padded = q_mask is not None or kv_mask is not None
    q_valid = valid_or_all(q_mask, batch, n) if padded else None
    k_valid = valid_or_all(kv_mask, batch, n) if padded else None
    if padded:  # padded rows may hold anything (even NaN): zero them so nothing leaks via 0 * x
        q, k, v = zero_padding(q, q_valid), zero_padding(k, k_valid), zero_padding(v, k_valid)
    if shared_qk:
        k = q
    # With shared QK and one mask, queries and keys are the same routed set: cluster once.
    same_routing = shared_qk and one_mask
    aligned = same_routing and kv_mask is None  # clusters hold their own keys, all valid
    backend = _backend(
        implementation, assignment=assignment, same_routing=same_routing, n=n, window=window,
        dim=dim, vdim=v.shape[-1], dtype=jnp.dtype(v.dtype), causal=causal, self_mask=self_mask,
        aligned=aligned, interpret=interpret)

    def head(qh, kh, vh, mu, qv, kv):
        q_hat, k_hat, s_q, s_k = route_scores(qh, kh, mu, norm=norm, shared_qk=shared_qk)
        args = (q_hat, k_hat, vh, s_q, s_k, qv, kv)
        kw = dict(window=window, causal=causal, scale=scale, self_mask=self_mask,
                  same_routing=same_routing, backend=backend)
        if assignment == "balanced":
            out, covered = _balanced(*args, **kw, aligned=aligned)
        else:
            out, covered = _causal(*args, **kw)
        counts, sums, err = assignment_statistics(q_hat, s_q, mu, qv)
        if not shared_qk:
            kc, ks, ke = assignment_statistics(k_hat, s_k, mu, kv)
            counts, sums, err = counts + kc, sums + ks, err + ke
        return out, counts, sums, err, jnp.sum(covered if qv is None else covered & qv)

    per_head = jax.vmap(head, in_axes=(1, 1, 1, 0, None, None), out_axes=(1, 0, 0, 0, 0))
    out, counts, sums, err, covered = jax.vmap(per_head, in_axes=(0, 0, 0, None, 0, 0))(
        q, k, v, centroids, q_valid, k_valid
    )
    stats = RoutingStats(
        counts=counts.sum(0),
        sums=sums.sum(0),
        sq_error=err.sum(),
        covered=covered.sum().astype(jnp.float32),
        queries=jnp.asarray((batch * n if q_valid is None else jnp.sum(q_valid)) * heads,
                            jnp.float32),
    )
    if q_valid is not None:
        out = jnp.where(q_valid[:, :, None, None], out, 0)
    return out.astype(v.dtype), stats


def _backend(implementation, *, assignment, same_routing, n, window, dim, vdim, dtype, causal,
             self_mask, aligned, interpret) -> Backend:
    """Who attends inside the clusters, chosen once per call: a backend of the
    grouped-attention op (kernels/grouped_attention; "xla" is its jnp reference), or splash
    attention for the cluster-sorted causal assignment on TPU."""
    if assignment == "causal" and not same_routing:
        why = ("the causal assignment with unshared QK (or different q/kv masks) gives every "
               "query its own key window; only the XLA path implements it")
        return Backend(choose("routing_attention", implementation,
                              {"xla": lambda: None, "pallas_tpu": lambda: why,
                               "pallas_gpu": lambda: why, "cudnn": lambda: why}), interpret)
    if assignment == "balanced":
        call = CallShape(block_q=window, block_k=window, dim=dim, vdim=vdim, dtype=dtype,
                         offsets=(0,), span=None, self_mask=self_mask, aligned=aligned,
                         interpret=interpret)
        return choose_backend(call, implementation)
    call = CallShape(block_q=window, block_k=window, dim=dim, vdim=vdim, dtype=dtype,
                     offsets=(-1, 0) if causal else (-1, 0, 1), span=window,
                     self_mask=self_mask, interpret=interpret, seq_len=n)
    return choose_backend(call, implementation,
                          {splash_tpu.NAME: lambda: splash_tpu.unsupported(call)})


def _operands(backend: Backend, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """q, k, v as the grouped op takes them: kernels take the normalised q and k in v's dtype;
    the XLA reference computes in float32 anyway, so it keeps float32 q and k and takes v in
    float32 too (its outputs are then float32, unrounded, as rtlib's XLA path always gave)."""
    dt = jnp.float32 if backend.name == "xla" else v.dtype
    return q.astype(dt), k.astype(dt), v.astype(dt)


def _balanced(q_hat, k_hat, v, s_q, s_k, q_valid, k_valid, *, window, causal, scale, self_mask,
              same_routing, backend, aligned):
    """Gather each cluster's W queries and W keys ([K, W, D], vmapped to [B, H, K, W, D]),
    attend inside each by the grouped-attention op, scatter-mean back."""
    n = q_hat.shape[0]
    qi = balanced_members(s_q, q_valid, window)  # [K, W] positions
    ki = qi if same_routing else balanced_members(s_k, k_valid, window)
    k_seg = jnp.zeros_like(ki) if k_valid is None else jnp.where(k_valid[ki], 0, -1)
    out_c = grouped_attention(
        *_operands(backend, q_hat[qi], k_hat[ki], v[ki]), qi, ki, jnp.zeros_like(qi), k_seg,
        causal=causal, self_mask=self_mask, scale=scale, aligned=aligned, implementation=backend,
    ).astype(jnp.float32)
    flat = qi.reshape(-1)
    total = jnp.zeros((n, v.shape[-1]), jnp.float32).at[flat].add(out_c.reshape(flat.size, -1))
    hits = jnp.zeros((n,), jnp.float32).at[flat].add(1.0)
    return total / jnp.maximum(hits, 1.0)[:, None], hits > 0


def _causal(q_hat, k_hat, v, s_q, s_k, q_valid, k_valid, *, window, causal, scale, self_mask,
            same_routing, backend):
    """Nearest-centroid assignment; local attention of width W in (cluster, position) order."""
    n, num_clusters = s_q.shape
    pos = jnp.arange(n, dtype=jnp.int32)
    q_cluster = nearest_cluster(s_q, q_valid)
    if backend.name == splash_tpu.NAME:
        # Sorted by (cluster, position): padded tokens (cluster K) sort last, among themselves.
        order = jnp.argsort(q_cluster * n + pos, stable=True)
        out = splash_tpu.sorted_local_attention(
            q_hat[order].astype(v.dtype), v[order], q_cluster[order], window=window,
            causal=causal, scale=scale, interpret=backend.interpret)
        return jnp.zeros_like(out).at[order].set(out), _all_if_none(q_valid, n)
    if same_routing:
        return _causal_aligned(q_hat, v, q_cluster, window=window, causal=causal, scale=scale,
                               self_mask=self_mask, num_clusters=num_clusters,
                               backend=backend), _all_if_none(q_valid, n)
    k_cluster = nearest_cluster(s_k, k_valid)
    # Keys in (cluster, position) order; for each query, `last` is the sorted index of the last
    # key of its cluster at a position <= its own, so its window is a contiguous sorted range.
    k_order_key = k_cluster * n + pos
    k_perm = jnp.argsort(k_order_key, stable=True).astype(jnp.int32)
    last = jnp.searchsorted(k_order_key[k_perm], q_cluster * n + pos, side="right") - 1
    offsets = jnp.arange(-(window - 1), 1 if causal else window, dtype=jnp.int32)
    j = last[:, None] + offsets[None, :]  # [n, window or 2W-1]
    in_range = (j >= 0) & (j < n)
    key_pos = k_perm[jnp.clip(j, 0, n - 1)]
    mask = in_range & (k_cluster[key_pos] == q_cluster[:, None]) & (q_cluster[:, None] < num_clusters)
    if causal:
        mask = mask & (key_pos <= pos[:, None])
    is_self = (key_pos == pos[:, None])[:, None, :] if self_mask else None
    out = masked_attention(
        q_hat[:, None, :], k_hat[key_pos], v[key_pos], mask[:, None, :], scale=scale,
        is_self=is_self,
    )[:, 0]
    return out, jnp.any(mask, axis=-1)


def _all_if_none(valid: Bool[Array, " seq"] | None, n: int) -> Bool[Array, " seq"]:
    return jnp.ones((n,), bool) if valid is None else valid


def _causal_aligned(
    x_hat: Float[Array, "seq dim"],
    v: Float[Array, "seq vdim"],
    cluster: Int[Array, " seq"],
    *,
    window: int,
    causal: bool,
    scale: float,
    self_mask: bool,
    num_clusters: int,
    backend: Backend = XLA,
    block: int | None = None,
) -> Float[Array, "seq vdim"]:
    """Shared-QK fast path: blocked attention over a cluster-aligned layout, O(n W d).

    Tokens are laid out by (cluster, position) with every cluster starting on a block boundary,
    so a block never mixes clusters and a token's place inside its block depends only on the
    earlier tokens of its cluster. That makes each output independent of later tokens *bit for
    bit* (the arithmetic of every (query, key) pair sits at the same tile position whatever
    comes later). The layout holds at most n + K (W - 1) slots.
    """
    n = x_hat.shape[0]
    block = _aligned_block(window, backend) if block is None else block
    pos = jnp.arange(n, dtype=jnp.int32)
    counts = jnp.zeros((num_clusters + 1,), jnp.int32).at[cluster].add(1)[:num_clusters]
    blocks = (counts + block - 1) // block
    slot_start = (jnp.cumsum(blocks) - blocks) * block
    first = jnp.cumsum(counts) - counts  # first index of each cluster in (cluster, pos) order
    order = jnp.argsort(cluster * n + pos, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(pos)  # index in (cluster, pos) order
    valid = cluster < num_clusters
    c = jnp.minimum(cluster, num_clusters - 1)
    length = -(-(n + num_clusters * (block - 1)) // block) * block
    slot = jnp.where(valid, slot_start[c] + rank - first[c], length)  # invalid: dropped

    def place(x, fill):
        return jnp.full((length, *x.shape[1:]), fill, x.dtype).at[slot].set(x, mode="drop")

    seg = place(cluster, num_clusters)
    out_l = _aligned_grouped(place(x_hat, 0), place(v, 0), seg, window=window, block=block,
                             causal=causal, scale=scale, self_mask=self_mask,
                             num_clusters=num_clusters, backend=backend)
    return jnp.where(valid[:, None], out_l[jnp.minimum(slot, length - 1)], 0.0)


def _aligned_block(window: int, backend: Backend) -> int:
    """Block size B of the cluster-aligned layout.

    Every cluster is padded to a block boundary, so the layout holds up to K (B - 1) empty
    slots, and each query block reads B + W slots of keys: with B = W (and K = n / W clusters)
    that is about 4 n W products against balanced routing's n W; blocks of W / 4 cut it to
    about 1.6 n W, and measured fwd + bwd time by 1.5x at 4k-16k tokens on CPU (see
    docs/performance.md). Kernels keep B = W: their tiles want wide blocks."""
    if backend.name == "xla" and window % 4 == 0 and window >= MIN_SPLIT_WINDOW:
        return window // 4
    return window


def _aligned_grouped(x_l, v_l, seg, *, window, block, causal, scale, self_mask, num_clusters,
                     backend):
    """`_causal_aligned`'s attention as grouped attention: blocks of W slots, each seeing its
    own and the previous block (and the next when not causal), same segment, within W slots."""
    nb = x_l.shape[0] // block
    pos = jnp.arange(nb * block, dtype=jnp.int32).reshape(nb, block)
    seg = seg.reshape(nb, block)
    x_b = x_l.reshape(nb, block, -1)
    q, k, v = _operands(backend, x_b, x_b, v_l.reshape(nb, block, -1))
    back = -(-(window - 1) // block)  # key blocks that can hold one of the W - 1 earlier slots
    offsets = tuple(range(-back, 1 if causal else back + 1))
    out = grouped_attention(
        q, k, v, pos, pos, seg, jnp.where(seg < num_clusters, seg, -1), offsets=offsets,
        causal=causal, span=window, self_mask=self_mask, scale=scale, implementation=backend,
    )
    return out.reshape(nb * block, -1).astype(jnp.float32)
