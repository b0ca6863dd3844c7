"""The model spec: Pydantic v2 models that YAML files validate against.

Every model forbids unknown keys and documents every field; `docs/spec-reference.md` is
generated from these descriptions (`python tools/spec_reference.py`). Cross-field rules live in
`ModelSpec._cross_field_checks`, each reporting the key path it concerns.
"""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

HeadKind = Literal["local", "routing", "full"]
Implementation = Literal["xla", "pallas_tpu", "pallas_gpu", "cudnn"]
ImplementationList = Annotated[list[Implementation], Field(min_length=1)]
HEAD_KINDS: tuple[HeadKind, ...] = ("local", "full", "routing")  # order of heads inside a layer


# Upper bounds far beyond any model these specs describe (the paper's largest: 22 layers, width
# 1,032, 8k tokens, vocabulary 267,735), so that a typo fails validation with the key's name
# instead of an allocation that never returns.
MAX_HEADS = 1024
MAX_CLUSTERS = 1 << 16
MAX_WIDTH = 1 << 16
MAX_VOCAB = 1 << 24
MAX_SEQ_LEN = 1 << 22
MAX_LAYERS = 1 << 12
MAX_BATCH = 1 << 20


class Strict(BaseModel):
    """Base of every spec section: unknown keys are errors and sections are immutable."""

    # strict: `count: true` or `window: 16.5` are errors, not silently coerced; `.inf` and
    # `.nan` are errors too (no setting of a spec means infinity).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class LocalHeads(Strict):
    """Blocked local attention heads (ALGORITHM.md section 4)."""

    kind: Literal["local"] = Field(description="Head kind tag: `local`.")
    count: int = Field(ge=0, le=MAX_HEADS, description="Number of local heads in each layer.")
    window: int = Field(ge=1, le=MAX_SEQ_LEN,
        description="Block size B: queries attend within their block and "
                        "`look_back` previous blocks. The sequence length must be a multiple.")
    look_back: int = Field(1, ge=0, description="Previous blocks each query block also sees.")
    look_ahead: int | None = Field(None, ge=0, description="Next blocks each query block also "
                                   "sees (encoders only); default 0 for decoders, 1 for encoders.")


class RoutingHeads(Strict):
    """Routing heads: content-based sparse attention with online k-means (section 2)."""

    kind: Literal["routing"] = Field(description="Head kind tag: `routing`.")
    count: int = Field(ge=0, le=MAX_HEADS, description="Number of routing heads in each layer.")
    clusters: int = Field(ge=1, le=MAX_CLUSTERS, description="Number of centroids K per head.")
    window: int = Field(ge=1, le=MAX_SEQ_LEN,
        description="Cluster size W: tokens per cluster (balanced) or the "
                        "number of most recent same-cluster tokens a query sees (causal).")
    assignment: Literal["balanced", "causal"] = Field(
        "balanced", description="`balanced`: every centroid takes its top-W tokens (the paper). "
        "`causal`: nearest centroid, W most recent same-cluster tokens (strictly causal).")
    shared_qk: bool = Field(True, description="Keys equal queries (the paper's default); no key "
                            "projection for routing heads.")
    norm: Literal["layernorm", "l2"] = Field(
        "layernorm", description="Normalisation of q and k before routing and attention: "
        "LayerNorm without gain or bias (paper) or unit L2 (lucidrains).")
    logit_scale: Literal["rsqrt_dim", "none"] = Field(
        "rsqrt_dim", description="Scale of routing-head logits: 1/sqrt(head_dim), or none "
        "(the paper code).")
    self_mask: bool = Field(False, description="With shared QK, give a token's own key a "
                            "-5e4 logit (lucidrains).")
    rotary: bool = Field(False, description="Apply rotary positions to routing-head q and k "
                         "before normalisation (off: routing is purely by content).")


class FullHeads(Strict):
    """Dense heads: every query sees every (earlier, in a decoder) token. O(n^2)."""

    kind: Literal["full"] = Field(description="Head kind tag: `full`.")
    count: int = Field(ge=0, le=MAX_HEADS,
        description="Number of full-attention heads in each layer.")


HeadGroup = Annotated[LocalHeads | RoutingHeads | FullHeads, Field(discriminator="kind")]


class HeadCounts(Strict):
    """How many heads of each kind one layer has."""

    local: int = Field(0, ge=0, le=MAX_HEADS, description="Local heads in this layer.")
    routing: int = Field(0, ge=0, le=MAX_HEADS, description="Routing heads in this layer.")
    full: int = Field(0, ge=0, le=MAX_HEADS, description="Full heads in this layer.")

    @property
    def total(self) -> int:
        """Heads of every kind in the layer."""
        return self.local + self.routing + self.full


class AttentionSpec(Strict):
    """The heads of every layer."""

    head_dim: int | None = Field(None, ge=1, le=MAX_WIDTH,
        description="Per-head dimension; default "
                                 "d_model / heads per layer (which must divide).")
    heads: list[HeadGroup] = Field(min_length=1, description="One entry per head kind used "
                                   "(`kind: local | routing | full`) with its settings and "
                                   "per-layer count.")
    layer_heads: list[HeadCounts] | None = Field(
        None, description="Optional per-layer head counts (one entry per layer), overriding the "
        "`count` of each group; every layer must have the same total.")
    implementation: Implementation | ImplementationList | None = Field(
        None, description="Who computes local and routing attention: `xla`, `pallas_tpu`, "
        "`pallas_gpu`, `cudnn`, or a preference list (the first that can take the shapes "
        "runs; skipped ones are logged). Default: the best for the backend (TPU: pallas_tpu; "
        "GPU: pallas_gpu, cudnn; CPU: xla), falling back to xla.")
    interpret: bool = Field(False, description="Run Pallas kernels in interpret mode (on CPU, "
                            "for tests and debugging; slow).")


class RoutingSpec(Strict):
    """The online k-means shared by all routing heads (section 3)."""

    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay of centroid statistics.")
    epsilon: float = Field(1e-5, gt=0, description="Laplace smoothing of cluster counts.")
    commitment: float = Field(1e-4, ge=0, description="Weight beta of the commitment loss "
                              "added to the training loss.")
    init: Literal["random", "kmeans"] = Field(
        "random", description="`random`: LayerNorm(N(0,1)) centroids (paper code), ready at "
        "once. `kmeans`: Lloyd iterations on the first training batch.")
    init_iters: int = Field(10, ge=1, description="Lloyd iterations for `init: kmeans`.")
    skip_first: int = Field(0, ge=0, description="The first N layers turn their routing heads "
                            "into local heads (paper `sparsity_skip_first`).")


class FeedForwardSpec(Strict):
    """The position-wise feed-forward block."""

    hidden: int = Field(ge=1, le=MAX_WIDTH, description="Hidden width.")
    activation: Literal["gelu", "geglu", "relu"] = Field(
        "gelu", description="GELU MLP, GEGLU (the paper's text models) or ReLU (its image models).")
    bias: bool = Field(True, description="Biases in the feed-forward projections (paper GEGLU: "
                       "none).")


class EmbeddingSpec(Strict):
    """Token embedding, positions and output projection."""

    dim: int | None = Field(None, ge=1, le=MAX_WIDTH,
        description="Factorised embedding width (then a dense "
                            "projection to d_model); default d_model (no factorisation).")
    positions: Literal["rotary", "learned", "axes", "none"] = Field(
        "rotary", description="Rotary on local/full-head q and k, learned absolute embeddings, "
        "learned per-axis embeddings summed (`axes`; the paper's image models), or none.")
    axes: list[Annotated[int, Field(ge=1, le=MAX_SEQ_LEN)]] | None = Field(
        None, min_length=1, description="With `positions: axes`: the sequence as a row-major "
        "grid, e.g. [rows, cols, channels] of an image ([32, 32, 3] for CIFAR-10); one learned "
        "table per axis, summed. Their product must equal seq_len.")
    tied: bool = Field(False, description="Reuse the token embedding as the output projection.")


class CrossAttentionSpec(Strict):
    """How each decoder layer of an encoder-decoder reads the encoder's output."""

    kind: Literal["full"] = Field("full", description="`full`: every target position sees every "
                                  "(non-padding) source position.")
    heads: int | None = Field(None, ge=1, le=MAX_HEADS, description="Cross-attention heads; "
                              "default the decoder layers' self-attention head count.")
    head_dim: int | None = Field(None, ge=1, le=MAX_WIDTH, description="Per-head dimension; "
                                 "default d_model / heads (which must divide).")


class DecoderSpec(Strict):
    """The decoder stack of an encoder-decoder (`model.kind: encoder_decoder`): causal
    self-attention of any head kinds, then cross-attention to the encoder's output, in every
    layer. Width, feed-forward, norms, embedding (shared by source and target) and the k-means
    settings are the model's."""

    seq_len: int = Field(ge=1, le=MAX_SEQ_LEN, description="Decoder positions: the start token "
                         "and up to seq_len - 1 target tokens (the end token is predicted after "
                         "the last).")
    n_layers: int = Field(ge=1, le=MAX_LAYERS, description="Decoder blocks.")
    attention: AttentionSpec = Field(description="Causal self-attention heads of the decoder "
                                       "layers (same keys as model.attention).")
    cross_attention: CrossAttentionSpec = Field(default_factory=CrossAttentionSpec,
                                                description="Cross-attention settings.")
    start_id: int = Field(ge=0, le=MAX_VOCAB, description="Token id that begins every decoder "
                          "input; below vocab_size and not a token of the data (a byte store: "
                          "vocab_size 258, start_id 256, end_id 257).")
    end_id: int = Field(ge=0, le=MAX_VOCAB, description="Token id the decoder predicts after the "
                        "target; generation stops there. Below vocab_size, not a data token.")


class ModelSpec(Strict):
    """A Routing Transformer language model (decoder), encoder, or encoder-decoder."""

    kind: Literal["decoder", "encoder", "encoder_decoder"] = Field(
        "decoder", description="`decoder`: causal LM; `encoder`: every token sees both sides "
        "(masked-LM training); `encoder_decoder`: an encoder stack (the keys below) and a "
        "causal decoder stack (`decoder`) that cross-attends to it.")
    vocab_size: int = Field(ge=2, le=MAX_VOCAB, description="Number of token ids. `auto` "
                            "(in a spec file or override) takes the vocabulary size of the "
                            "token store at `data.path` when the spec is loaded.")
    seq_len: int = Field(ge=1, le=MAX_SEQ_LEN, description="Training sequence length n (an "
                         "encoder-decoder: source tokens; the decoder's is decoder.seq_len).")
    d_model: int = Field(ge=1, le=MAX_WIDTH, description="Residual stream width.")
    n_layers: int = Field(ge=1, le=MAX_LAYERS, description="Number of transformer blocks (an "
                          "encoder-decoder: of the encoder).")
    norm: Literal["pre", "post"] = Field("pre", description="Pre-norm (modern) or post-norm "
                                         "(the paper's T2T default).")
    final_norm: bool = Field(True, description="LayerNorm before the output projection.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings and on every "
                           "residual branch (training only).")
    remat: bool = Field(False, description="Recompute each block in the backward pass "
                        "(saves activation memory). On CPU it takes effect only with "
                        "scan_unroll 1: XLA:CPU merges the recomputation of straight-line "
                        "code back into the forward pass (docs/performance.md).")
    scan_unroll: int = Field(1, ge=1, description="Layers per iteration of the `lax.scan` "
                             "that runs each group of identical layers. 1 keeps the traced "
                             "program the same size at any depth; n_layers gives straight-line "
                             "code, which on CPU saves copying every layer's saved activations "
                             "into stacked buffers (measured in docs/performance.md).")
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec,
                                     description="Embedding and output settings.")
    attention: AttentionSpec = Field(description="Head kinds and their settings.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec,
                                 description="Online k-means settings.")
    feed_forward: FeedForwardSpec = Field(description="Feed-forward settings.")
    decoder: DecoderSpec | None = Field(None, description="The decoder stack of "
                                        "`kind: encoder_decoder` (only there).")

    @property
    def causal(self) -> bool:
        """Whether attention is causal: decoders are, encoders (and the encoder stack of an
        encoder-decoder) see both directions."""
        return self.kind == "decoder"

    def stack(self, which: Literal["encoder", "decoder"]) -> "ModelSpec":
        """One stack of an encoder-decoder as a model spec of its own, which the layers are
        built from: the encoder (this spec as `kind: encoder`) or the decoder (`decoder`'s
        length, depth and heads, `kind: decoder`). Not validated again: `_first_problem`
        checks both when the spec loads."""
        if self.decoder is None:
            raise ValueError(f"model.kind {self.kind!r} has no {which} stack of its own")
        if which == "encoder":
            return self.model_copy(update={"kind": "encoder", "decoder": None})
        d = self.decoder
        return self.model_copy(update={"kind": "decoder", "decoder": None, "seq_len": d.seq_len,
                                       "n_layers": d.n_layers, "attention": d.attention})

    def cross_attention_shape(self) -> tuple[int, int]:
        """(heads, head_dim) of an encoder-decoder's cross-attention, defaults resolved."""
        if self.decoder is None:
            raise ValueError(f"model.kind {self.kind!r} has no cross-attention")
        cross = self.decoder.cross_attention
        heads = cross.heads or self.stack("decoder").layer_plan()[0].total
        return heads, cross.head_dim or self.d_model // heads

    def stacks(self) -> list["ModelSpec"]:
        """Every stack of layers: the model itself, or an encoder-decoder's two."""
        return [self] if self.decoder is None else [self.stack("encoder"), self.stack("decoder")]

    def group(self, kind: HeadKind) -> LocalHeads | RoutingHeads | FullHeads | None:
        """The settings of the heads of `kind`, or None when the spec has none."""
        return next((g for g in self.attention.heads if g.kind == kind), None)

    def layer_plan(self) -> list[HeadCounts]:
        """Head counts of every layer after `layer_heads` and `routing.skip_first`."""
        if self.attention.layer_heads is not None:
            plan = list(self.attention.layer_heads)
        else:
            counts = {g.kind: g.count for g in self.attention.heads}
            plan = [HeadCounts(**counts)] * self.n_layers
        skip = self.routing.skip_first
        return [
            HeadCounts(local=c.local + c.routing, full=c.full) if i < skip else c
            for i, c in enumerate(plan)
        ]

    @property
    def head_dim(self) -> int:
        """Per-head dimension: `attention.head_dim`, or d_model over the first layer's heads."""
        if self.attention.head_dim is not None:
            return self.attention.head_dim
        return self.d_model // self.layer_plan()[0].total

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "ModelSpec":
        problem = _first_problem(self)
        if problem is not None:
            path, message = problem
            raise PydanticCustomError("spec_conflict", "{path}: {message}",
                                      {"path": path, "message": message})
        return self


def _first_problem(m: ModelSpec) -> tuple[str, str] | None:
    """The first cross-field inconsistency as (key path relative to the model, message)."""
    if m.kind == "encoder_decoder" or m.decoder is not None:
        return _encoder_decoder_problem(m)
    kinds = [g.kind for g in m.attention.heads]
    for i, kind in enumerate(kinds):
        if kind in kinds[:i]:
            return f"attention.heads.{i}.kind", f"head kind {kind!r} is listed twice"
    layer_heads = m.attention.layer_heads
    if layer_heads is not None:
        if len(layer_heads) != m.n_layers:
            return ("attention.layer_heads",
                    f"has {len(layer_heads)} entries but n_layers is {m.n_layers}")
        for i, counts in enumerate(layer_heads):
            for kind in HEAD_KINDS:
                if getattr(counts, kind) and kind not in kinds:
                    return (f"attention.layer_heads.{i}.{kind}",
                            f"layer {i} uses {kind} heads but attention.heads has no "
                            f"`kind: {kind}` entry to configure them")
    if m.routing.skip_first > m.n_layers:
        return "routing.skip_first", f"is {m.routing.skip_first} but n_layers is {m.n_layers}"
    plan = m.layer_plan()
    if m.routing.skip_first and any(c.local for c in plan[: m.routing.skip_first]) \
            and "local" not in kinds:
        return ("routing.skip_first", "turns routing heads into local heads, but attention.heads "
                "has no `kind: local` entry giving their window")
    totals = {c.total for c in plan}
    if len(totals) != 1:
        return "attention.layer_heads", f"layers have different head totals {sorted(totals)}"
    total = totals.pop()
    if total == 0:
        return "attention.heads", "every layer needs at least one head"
    if m.attention.head_dim is None and m.d_model % total:
        return ("attention.head_dim", f"d_model={m.d_model} is not divisible by {total} heads "
                "per layer; set head_dim explicitly or change the head counts")
    local, routing = m.group("local"), m.group("routing")
    if local is not None and any(c.local for c in plan):
        i = kinds.index("local")
        if m.seq_len % local.window:
            return (f"attention.heads.{i}.window", f"seq_len={m.seq_len} is not a multiple of "
                    f"the local window {local.window}")
        if m.causal and local.look_ahead:
            return (f"attention.heads.{i}.look_ahead", "must be 0 (or unset) in a decoder: "
                    "looking ahead would see future tokens")
    if routing is not None and any(c.routing for c in plan):
        i = kinds.index("routing")
        if routing.window > m.seq_len:
            return (f"attention.heads.{i}.window", f"cluster window {routing.window} exceeds "
                    f"seq_len={m.seq_len}")
        if routing.self_mask and not routing.shared_qk:
            return f"attention.heads.{i}.self_mask", "requires shared_qk: true"
    if routing is not None and m.routing.init == "kmeans" and routing.clusters > m.seq_len:
        i = kinds.index("routing")
        return (f"attention.heads.{i}.clusters", f"{routing.clusters} clusters cannot be "
                f"initialised by k-means from sequences of {m.seq_len} tokens")
    if m.embedding.positions == "rotary" and not any(c.local or c.full for c in plan) and not (
            routing is not None and routing.rotary):
        return ("embedding.positions", "rotary positions apply to local and full heads, and "
                "no layer has any: the model would see no positions. Use `learned`, or set "
                "`rotary: true` on the routing heads, or `none` to mean it")
    if m.embedding.dim is not None and m.embedding.dim > m.d_model:
        return "embedding.dim", f"factorised width {m.embedding.dim} exceeds d_model={m.d_model}"
    axes = m.embedding.axes
    if m.embedding.positions == "axes" and axes is None:
        return ("embedding.axes", "`positions: axes` needs the grid's axis sizes, e.g. "
                "`axes: [32, 32, 3]` (rows, cols, channels) for 32x32 RGB images")
    if axes is not None and m.embedding.positions != "axes":
        return ("embedding.axes", f"is set but embedding.positions is "
                f"{m.embedding.positions!r}: set `positions: axes` to use it, or remove it")
    if axes is not None and math.prod(axes) != m.seq_len:
        return ("embedding.axes", f"{axes} hold {math.prod(axes):,} positions but seq_len is "
                f"{m.seq_len:,}: their product must equal seq_len")
    return None


def _encoder_decoder_problem(m: ModelSpec) -> tuple[str, str] | None:
    """`_first_problem` of an encoder-decoder: each stack as a model of its own (the decoder's
    paths under `decoder.`), then what joins them."""
    if m.kind != "encoder_decoder":
        return "decoder", f"only `kind: encoder_decoder` has a decoder stack; kind is {m.kind!r}"
    d = m.decoder
    if d is None:
        return "decoder", ("`kind: encoder_decoder` needs a `decoder` section (seq_len, "
                           "n_layers, attention, start_id, end_id)")
    if m.embedding.positions == "axes":
        return ("embedding.positions", "`axes` positions describe an image grid; an "
                "encoder-decoder takes rotary, learned or none")
    problem = _first_problem(m.stack("encoder"))
    if problem is not None:
        return problem
    problem = _first_problem(m.stack("decoder"))
    if problem is not None:
        path, message = problem
        own = path.split(".")[0] in ("attention", "seq_len", "n_layers")
        return (f"decoder.{path}" if own else path), (message if own else
                                                      f"{message} (in the decoder stack)")
    for name in ("start_id", "end_id"):
        if getattr(d, name) >= m.vocab_size:
            return (f"decoder.{name}", f"{getattr(d, name)} is not a token id of the model "
                    f"(vocab_size={m.vocab_size}); e.g. a byte store needs vocab_size 258 for "
                    "start_id 256 and end_id 257")
    if d.start_id == d.end_id:
        return "decoder.end_id", f"equals start_id={d.start_id}: they must be two ids"
    heads, head_dim = m.cross_attention_shape()
    if d.cross_attention.head_dim is None and m.d_model % heads:
        return ("decoder.cross_attention.heads", f"d_model={m.d_model} is not divisible by "
                f"{heads} heads; set head_dim explicitly or change the head count")
    return None


class MaskedLMSpec(Strict):
    """BERT's corruption for `train.objective: mlm`: a share of the tokens is chosen; of those,
    most become the mask token, some a random token, the rest stay; the loss is on the chosen."""

    rate: float = Field(0.15, gt=0, le=1, description="Share of the (non-padding) tokens "
                        "chosen, each independently; only they are scored.")
    replace: float = Field(0.8, ge=0, le=1, description="Share of the chosen tokens replaced "
                           "by `mask_id`.")
    random: float = Field(0.1, ge=0, le=1, description="Share of the chosen tokens replaced by "
                          "a uniformly drawn other id (any id below vocab_size but mask_id); "
                          "the rest (1 - replace - random) are kept as they are.")
    mask_id: int | None = Field(None, ge=0, le=MAX_VOCAB, description="Token id of the mask: "
                                "below model.vocab_size and not a token of the data (a byte "
                                "store: vocab_size 257, mask_id 256). Default: vocab_size - 1.")

    @model_validator(mode="after")
    def _shares(self) -> "MaskedLMSpec":
        if self.replace + self.random > 1:
            raise PydanticCustomError(
                "spec_conflict", "{path}: {message}",
                {"path": "random", "message": f"replace={self.replace} + random={self.random} "
                 "exceeds 1 (they are shares of the chosen tokens)"})
        return self

    def mask_token(self, vocab_size: int) -> int:
        """`mask_id`, defaulting to the last id of the vocabulary."""
        return vocab_size - 1 if self.mask_id is None else self.mask_id


Objective = Literal["next_token", "mlm", "seq2seq"]
OBJECTIVE_OF_KIND: dict[str, Objective] = {"decoder": "next_token", "encoder": "mlm",
                                           "encoder_decoder": "seq2seq"}


class TrainSpec(Strict):
    """Optimisation: steps, batch, optimiser, schedule, precision (`rtlib train`)."""

    objective: Objective | None = Field(
        None, description="The loss: `next_token` (decoders), `mlm` (masked tokens, encoders; "
        "see `mlm`), `seq2seq` (target tokens given the source, teacher forcing; "
        "encoder-decoders). Default: the one model.kind trains with.")
    mlm: MaskedLMSpec = Field(default_factory=MaskedLMSpec, description="Corruption of "
                              "`objective: mlm`.")

    steps: int = Field(1000, ge=0, description="Optimiser steps in the whole run (a resumed run "
                       "continues up to this step).")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH,
        description="Sequences per optimiser step (global, over "
                            "all processes).")
    micro_batches: int = Field(1, ge=1, description="Split each batch into this many "
                               "micro-batches (gradient accumulation); routing statistics are "
                               "summed over them and the centroids take one EMA step per "
                               "optimiser step.")
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="optax optimiser.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    schedule: Literal["constant", "cosine", "rsqrt"] = Field(
        "rsqrt", description="After linear warm-up: lr x sqrt(warmup_steps / step) (the "
        "paper), constant, or cosine decay to `min_lr_ratio` x lr at step `decay_steps`.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps from 0 to lr.")
    decay_steps: int | None = Field(None, ge=1, description="Where the cosine schedule reaches "
                                    "its minimum; default `steps`. Set it when a run may be "
                                    "extended by raising `steps`, or the extension changes the "
                                    "learning rates of steps already planned.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine schedule, "
                                "as a fraction of lr.")
    b1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (Adafactor: momentum, 0 = "
                      "none).")
    b2: float = Field(0.99, gt=0, lt=1, description="AdamW beta2 (Adafactor: decay rate).")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay, applied to "
                                "projection and embedding matrices only (not to norms, biases "
                                "or learned positions).")
    clip_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this global norm; "
                                    "null: no clipping.")
    max_update_ratio: float | None = Field(
        1.0, gt=0, description="Divergence guard: a step whose update moves the parameters by "
        "more than this times their norm stops the run (exit 3) unsaved; healthy steps measure "
        "about 1e-3 to 0.5 (logged as `update_ratio`). null: only non-finite values stop it.")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of matmuls and activations; parameters, optimiser state "
        "and routing math stay float32.")
    loss_on: Literal["all", "answers"] = Field(
        "all", description="Targets of the next-token loss: every token, or only the answer "
        "positions of a synthetic task's store (`rtlib data synth`; Zoology trains MQAR this "
        "way: the random keys, values and filler are unpredictable noise).")


class DataSpec(Strict):
    """Where the prepared token store is and how it is read."""

    path: str = Field("data/stdlib", description="Token store made by `rtlib data prepare`: a "
                      "local directory or a tensorstore kvstore URL.")
    eval_tokens: int = Field(65536, ge=1, description="Tokens of the validation split scored by "
                             "each periodic evaluation (`rtlib eval` scores the whole split).")
    read_threads: int = Field(2, ge=1, description="grain reader threads.")
    prefetch: int = Field(4, ge=1, description="Batches grain reads ahead.")
    tokenizer: Literal["bytes", "bpe", "unigram", "word", "wordpiece", "sentencepiece",
                       "synthetic"] | None = Field(
        None, description="The kind of tokenizer the store must have been prepared with "
        "(`rtlib data prepare --tokenizer/--train-tokenizer`, see docs/data.md); training on a "
        "store of another kind is refused. null: any.")


class RunSpec(Strict):
    """The run directory, logging, evaluation, checkpoints."""

    dir: str | None = Field(None, description="Run directory (checkpoints, metrics.jsonl, "
                            "spec.yaml); default `runs/<name>`. An existing run is resumed.")
    seed: int = Field(0, description="Seed of initialisation, dropout and data order.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl lines.")
    eval_every: int = Field(100, ge=0, description="Steps between validation evaluations "
                            "(0: only at the end).")
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints (0: only "
                                  "by time, at the end, and on SIGTERM/SIGINT).")
    checkpoint_minutes: float | None = Field(10.0, gt=0, description="Also checkpoint when "
                                             "this many minutes passed since the last one.")
    keep: int = Field(3, ge=1, description="Checkpoints kept (the newest).")
    sample_tokens: int = Field(200, ge=0, description="Tokens sampled after training and "
                               "printed (0: none).")
    sample_prompt: str = Field("def ", description="Prompt of that sample.")
    tensorboard: bool = Field(False, description="Also write the training and evaluation "
                              "scalars as TensorBoard event files in the run directory "
                              "(tensorboardX; process 0). metrics.jsonl stays the record.")


MeshAxis = Literal["data", "fsdp", "model"]
MESH_AXES: tuple[MeshAxis, ...] = ("data", "fsdp", "model")
LogicalAxis = Literal["batch", "embed", "heads", "mlp", "vocab"]


class AxisRules(Strict):
    """Which mesh axes each logical array axis is split over (an empty list: replicated).
    Parameters use embed, heads, mlp and vocab; activations use batch and heads."""

    batch: list[MeshAxis] = Field(["data", "fsdp"], description="Batch axis of activations and "
                                  "data (data parallelism).")
    embed: list[MeshAxis] = Field(["fsdp"], description="d_model axis of parameters and "
                                  "optimiser state (FSDP / ZeRO-3 sharding).")
    heads: list[MeshAxis] = Field(["model"], description="Attention heads: q/k/v/output "
                                  "projections and the per-device attention (model parallelism).")
    mlp: list[MeshAxis] = Field(["model"], description="Feed-forward hidden units (model "
                                "parallelism).")
    vocab: list[MeshAxis] = Field([], description="Vocabulary axis of the embedding and output "
                                  "projection.")


class MeshSpec(Strict):
    """The device mesh: sizes of the named axes (their product is the device count; one size
    may be -1, filled from the devices present) and how array axes map onto them."""

    data: int = Field(-1, ge=-1, description="Data-parallel replicas (batch split, parameters "
                      "replicated). -1: the devices left over by the other axes.")
    fsdp: int = Field(1, ge=-1, description="Fully sharded data parallelism: the batch is split "
                      "and parameters and optimiser state are sharded along d_model.")
    model: int = Field(1, ge=-1, description="Model (tensor) parallelism: heads and feed-forward "
                       "hidden units split over devices.")
    rules: AxisRules = Field(default_factory=AxisRules, description="Logical-axis rules: array "
                             "axis name -> mesh axes.")


class DistributedSpec(Strict):
    """Multi-host start-up (`jax.distributed.initialize`)."""

    initialize: Literal["auto", "always", "never"] = Field(
        "auto", description="`auto`: initialise when the environment describes a multi-process "
        "job (JAX_COORDINATOR_ADDRESS, SLURM with several tasks, Open MPI, a multi-host TPU "
        "slice); `always`: always (cluster auto-detection fills what is not given); `never`: "
        "one process.")
    coordinator: str | None = Field(None, description="host:port of process 0's coordinator; "
                                    "default JAX_COORDINATOR_ADDRESS or cluster auto-detection. "
                                    "Process count and id come from JAX_NUM_PROCESSES and "
                                    "JAX_PROCESS_ID or the cluster.")
    heartbeat_timeout_s: int = Field(100, ge=1, description="A process silent this long is "
                                     "declared dead and every other process stops with an "
                                     "error.")
    init_timeout_s: int = Field(300, ge=1, description="How long to wait for every process "
                                "to join.")


def mesh_problem(spec: "Spec", sizes: dict[str, int]) -> tuple[str, str] | None:
    """The first way `spec`'s arrays do not split over a mesh of these axis sizes (-1: not
    known yet, skipped), as (key path, message)."""
    rules = spec.mesh.rules

    def split(logical: str) -> int | None:
        n = 1
        for axis in getattr(rules, logical):
            if sizes[axis] == -1:
                return None
            n *= sizes[axis]
        return n

    def names(logical: str) -> str:
        return " x ".join(f"mesh.{a}={sizes[a]}" for a in getattr(rules, logical))

    for logical in ("batch", "embed", "heads", "mlp", "vocab"):
        axes = getattr(rules, logical)
        if len(set(axes)) != len(axes):
            return f"mesh.rules.{logical}", f"names a mesh axis twice: {axes}"
    for a, b in (("heads", "batch"), ("heads", "embed"), ("mlp", "embed"), ("vocab", "embed"),
                 ("heads", "vocab"), ("mlp", "vocab")):
        both = set(getattr(rules, a)) & set(getattr(rules, b))
        if both:
            return (f"mesh.rules.{a}", f"shares mesh axis {sorted(both)} with mesh.rules.{b}; "
                    "one array would be split twice over it")
    m, t = spec.model, spec.train
    per_micro = t.batch_size // t.micro_batches
    n = split("batch")
    if n and per_micro % n:
        what = f"batch_size={t.batch_size}" + (
            f" / micro_batches={t.micro_batches} = {per_micro}" if t.micro_batches > 1 else "")
        return "train.batch_size", f"{what} sequences do not split over {names('batch')}"
    n = split("heads")
    if n and n > 1:
        counts = [(getattr(c, kind), f"{kind} heads") for stack in m.stacks()
                  for c in stack.layer_plan() for kind in HEAD_KINDS]
        if m.decoder is not None:
            counts.append((m.cross_attention_shape()[0], "cross-attention heads"))
        for count, what in counts:
            if count % n:
                return ("mesh.model" if "model" in rules.heads else "mesh.rules.heads",
                        f"{count} {what} per layer do not split over {names('heads')}"
                        " (every head kind is split evenly across devices)")
    n = split("mlp")
    if n and m.feed_forward.hidden % n:
        return ("model.feed_forward.hidden", f"{m.feed_forward.hidden} hidden units do not "
                f"split over {names('mlp')}")
    n = split("embed")
    if n and m.d_model % n:
        return "model.d_model", f"{m.d_model} does not split over {names('embed')}"
    if n and m.embedding.dim and m.embedding.dim % n:
        return ("model.embedding.dim", f"{m.embedding.dim} (the factorised embedding width) "
                f"does not split over {names('embed')}")
    n = split("vocab")
    if n and m.vocab_size % n:
        return "model.vocab_size", f"{m.vocab_size} does not split over {names('vocab')}"
    return None


def _objective_problem(spec: "Spec") -> tuple[str, str] | None:
    """Whether the training objective fits the model (and its options the vocabulary)."""
    t, m = spec.train, spec.model
    needed = OBJECTIVE_OF_KIND[m.kind]
    if t.objective is not None and t.objective != needed:
        return ("train.objective", f"{t.objective!r} does not train a model.kind {m.kind!r}: "
                f"it needs {needed!r} (or leave train.objective unset)")
    if t.loss_on != "all" and needed != "next_token":
        return "train.loss_on", f"`answers` applies to the next-token loss, not to {needed!r}"
    if needed == "mlm" and t.mlm.mask_token(m.vocab_size) >= m.vocab_size:
        return ("train.mlm.mask_id", f"{t.mlm.mask_id} is not a token id of the model "
                f"(vocab_size={m.vocab_size}); e.g. a byte store needs vocab_size 257 for "
                "mask_id 256")
    return None


class Spec(Strict):
    """A whole spec file."""

    name: str | None = Field(None, description="Short name of this configuration.")
    description: str = Field("", description="What this configuration is for, and its source.")
    model: ModelSpec = Field(description="The network.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    run: RunSpec = Field(default_factory=RunSpec, description="Run directory, logging, "
                         "checkpoints.")
    mesh: MeshSpec = Field(default_factory=MeshSpec, description="Device mesh and sharding "
                           "rules (data, FSDP and model parallelism).")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec,
                                         description="Multi-host start-up.")

    @model_validator(mode="after")
    def _train_checks(self) -> "Spec":
        t = self.train
        if t.batch_size % t.micro_batches:
            raise PydanticCustomError(
                "spec_conflict", "{path}: {message}",
                {"path": "train.micro_batches", "message": f"batch_size={t.batch_size} is not "
                 f"divisible by micro_batches={t.micro_batches}"})
        sizes = {a: getattr(self.mesh, a) for a in MESH_AXES}
        if sum(v == -1 for v in sizes.values()) > 1:
            problem = ("mesh", "at most one axis size may be -1 (filled from the device count), "
                       f"got {sizes}")
        elif 0 in sizes.values():
            problem = ("mesh", f"axis sizes must be >= 1 or -1, got {sizes}")
        else:
            problem = mesh_problem(self, sizes) or _objective_problem(self)
        if problem is not None:
            raise PydanticCustomError("spec_conflict", "{path}: {message}",
                                      {"path": problem[0], "message": problem[1]})
        return self

    @property
    def objective(self) -> Objective:
        """`train.objective`, or the one `model.kind` trains with."""
        return self.train.objective or OBJECTIVE_OF_KIND[self.model.kind]

    @property
    def run_dir(self) -> str:
        """Where the run writes: `run.dir`, or runs/<name> (runs/run for a nameless spec)."""
        return self.run.dir or f"runs/{self.name or 'run'}"
