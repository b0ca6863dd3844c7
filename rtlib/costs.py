"""What a spec costs: parameters, FLOPs per token and activation memory (`rtlib inspect`).

FLOPs are those the XLA implementation performs in the forward pass (a multiply-add counts 2),
including the masked-out parts of the tiles it computes. Memory is an estimate of the float32
activations kept for the backward pass of one sequence, not a measurement.
"""

import os
from dataclasses import asdict, dataclass

from rtlib.build import abstract_build, count_parameters
from rtlib.errors import BadArgument
from rtlib.spec.schema import HeadCounts, ModelSpec


@dataclass(frozen=True)
class Costs:
    """What one spec costs, as `rtlib inspect` prints it: trainable parameters, forward FLOPs
    per token by part (attention, routing, rest), activation bytes of one sequence, and notes
    saying how each figure was counted."""

    parameters: int
    flops_per_token: dict[str, float]
    activation_bytes_per_sequence: int
    notes: list[str]

    def as_dict(self) -> dict:
        """The fields as plain JSON-ready values (`rtlib inspect --json`)."""
        return asdict(self)


def _attention_keys_per_query(spec: ModelSpec, counts: HeadCounts) -> dict[str, float]:
    """Keys each query's logits are computed against, per head kind (summed over heads)."""
    n = spec.seq_len
    keys = {"local": 0.0, "full": 0.0, "routing": 0.0}
    local, routing = spec.group("local"), spec.group("routing")
    if counts.local:
        ahead = local.look_ahead if local.look_ahead is not None else (0 if spec.causal else 1)
        keys["local"] = float(counts.local * (local.look_back + 1 + ahead) * local.window)
    if counts.full:
        keys["full"] = float(counts.full * n)
    if counts.routing:
        w = routing.window
        if routing.assignment == "balanced":
            per = routing.clusters * w * w / n
        elif routing.shared_qk:
            # blocked windows over the cluster-aligned layout of at most n + K (W - 1) slots
            slots = (n + routing.clusters * (w - 1)) // w * w
            per = (2 if spec.causal else 3) * w * slots / n
        else:
            per = w if spec.causal else 2 * w - 1
        keys["routing"] = float(counts.routing * per)
    return keys


def estimate_costs(spec: ModelSpec) -> Costs:
    """Parameters, forward FLOPs per token and activation memory of `spec`, computed from the
    spec alone (an abstract build: nothing is allocated, so paper-sized specs fit anywhere)."""
    d, dh, n, v = spec.d_model, spec.head_dim, spec.seq_len, spec.vocab_size
    ff = spec.feed_forward
    ff_in = 2 * ff.hidden if ff.activation == "geglu" else ff.hidden
    routing = spec.group("routing")
    flops = {"attention": 0.0, "routing": 0.0, "rest": 0.0}
    act = 0.0
    for counts in spec.layer_plan():
        h = counts.total
        shared = routing is not None and routing.shared_qk and counts.routing
        k_heads = h - (counts.routing if shared else 0)
        flops["rest"] += 2 * d * dh * (2 * h + k_heads) + 2 * h * dh * d
        flops["rest"] += 2 * d * ff_in + 2 * ff.hidden * d
        keys = _attention_keys_per_query(spec, counts)
        flops["attention"] += 4 * dh * sum(keys.values())
        if counts.routing:
            vectors = 1 if routing.shared_qk else 2
            # centroid scores, plus the one-hot sums and assigned centroids of the statistics
            flops["routing"] += counts.routing * vectors * 6 * routing.clusters * dh
        act += n * (3 * d + (3 * h + h) * dh + ff_in + ff.hidden)  # inputs, norms, qkv, ffn
        act += n * sum(keys.values())  # attention probabilities
        if counts.routing and routing.assignment == "balanced":
            act += 3 * routing.clusters * routing.window * dh * counts.routing  # gathered q,k,v
    e = spec.embedding.dim or d
    flops["rest"] += 2 * d * v + (2 * e * d if e != d else 0)
    act += 2 * n * v  # logits and their softmax
    model, _ = abstract_build(spec)
    notes = [
        "FLOPs: forward pass per token, as the XLA path computes them (masked tile entries "
        "included); training costs about 3x.",
        "Memory: float32 activations kept for the backward pass of one sequence, without remat.",
    ]
    return Costs(count_parameters(model), flops, int(act * 4), notes)


def available_memory_bytes() -> int | None:
    """Memory the arrays of one job can use: the accelerators' (summed over local devices)
    or, on a CPU, this machine's physical memory; None when it cannot be read."""
    import jax

    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        return sum(limits) if all(limits) else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def training_bytes(spec: ModelSpec) -> int:
    """A floor on training memory: float32 parameters, gradients and two optimiser moments,
    16 bytes a parameter. Activations are left out: their size depends on remat, the compute
    dtype and the kernels, so counting them could refuse a spec that fits."""
    return 16 * count_parameters(abstract_build(spec)[0])


def check_fits(need: int, what: str, keys: str) -> None:
    """Refuse (BadArgument, exit 2) work whose estimated memory exceeds what this machine
    has, before an allocation fails (or, dispatched asynchronously, never returns)."""
    have = available_memory_bytes()
    if have is not None and need > have:
        raise BadArgument(f"{what} needs about {need / 2**30:,.1f} GiB; this machine has "
                          f"{have / 2**30:,.1f} GiB. Reduce {keys}.")
