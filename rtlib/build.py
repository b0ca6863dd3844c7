"""spec -> (Equinox model, explicit routing state)."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from rtlib.nn.block import Block, CrossBlock
from rtlib.nn.layers import AxisPositions, Embedding, LayerNorm, Linear
from rtlib.nn.model import RoutingTransformer
from rtlib.nn.seq2seq import EncoderDecoder, Model
from rtlib.parallel.rules import is_array_leaf
from rtlib.routing import KMeansState, RoutingState, normalize
from rtlib.spec.schema import HeadCounts, ModelSpec, Spec


def layer_groups(spec: ModelSpec) -> list[tuple[HeadCounts, int]]:
    """Runs of consecutive layers with the same head mix: each becomes one scanned stage."""
    return [(counts, len(list(run))) for counts, run in itertools.groupby(spec.layer_plan())]


def build(spec: ModelSpec | Spec, *, key: PRNGKeyArray) -> tuple[Model, RoutingState]:
    """Build the model and its routing state from a spec: a `RoutingTransformer` (decoder or
    encoder) or an `EncoderDecoder`.

    Centroids start as LayerNorm(N(0, 1)) (the paper code; unit-L2 for `norm: l2`). With
    `routing.init: kmeans` the state is marked not initialised, and `model.init_routing` on the
    first batch must replace them; with `random` it is ready at once.
    """
    if isinstance(spec, Spec):
        spec = spec.model
    # One compiled program per spec (keyed by its JSON): far faster than running the
    # initialisers op by op, and rebuilding the same spec with another key reuses it.
    return _build_compiled(spec.model_dump_json(), key)


@eqx.filter_jit
def _build_compiled(spec_json: str, key: PRNGKeyArray) -> tuple[Model, RoutingState]:
    spec = ModelSpec.model_validate_json(spec_json)
    if spec.kind == "encoder_decoder":
        return _build_encoder_decoder(spec, key)
    return _build(spec, key)


def _stages(spec: ModelSpec, k_blocks: PRNGKeyArray, k_cent: PRNGKeyArray, *,
            cross: tuple[int, int] | None = None) -> tuple[list[Block], list[KMeansState | None]]:
    """The scanned stages of one stack of layers and their k-means states (None: no routing
    heads in the stage); `cross`: (heads, head_dim) of each block's cross-attention."""
    groups = layer_groups(spec)
    stages, kstates = [], []
    routing = spec.group("routing")
    for (counts, n_layers), k_stage, k_c in zip(
        groups, jax.random.split(k_blocks, len(groups)), jax.random.split(k_cent, len(groups)),
        strict=True,
    ):
        make = ((lambda k, c=counts: Block(spec, c, key=k)) if cross is None else  # noqa: E731
                (lambda k, c=counts: CrossBlock(spec, c, key=k, cross=cross)))
        stages.append(eqx.filter_vmap(make)(jax.random.split(k_stage, n_layers)))
        if counts.routing:
            shape = (n_layers, counts.routing, routing.clusters, spec.head_dim)
            centroids = normalize(jax.random.normal(k_c, shape, jnp.float32), routing.norm)
            kstates.append(KMeansState.from_centroids(centroids))
        else:
            kstates.append(None)
    return stages, kstates


def _build_encoder_decoder(spec: ModelSpec, key: PRNGKeyArray) -> tuple[Model, RoutingState]:
    """The decoder stack as a `RoutingTransformer` with cross-attending blocks, and the encoder
    stack beside it; one routing state, the encoder's stages first."""
    k_dec, k_blocks, k_cent, k_pos = jax.random.split(key, 4)
    decoder, dec_state = _build(spec.stack("decoder"), k_dec,
                                cross=spec.cross_attention_shape())
    stages, kstates = _stages(spec.stack("encoder"), k_blocks, k_cent)
    model = EncoderDecoder(
        encoder=tuple(stages),
        encoder_norm=LayerNorm(spec.d_model, axes=("embed",)) if spec.final_norm else None,
        source_positions=_positions(spec.stack("encoder"), k_pos),
        decoder=decoder, source_len=spec.seq_len, start_id=spec.decoder.start_id,
        end_id=spec.decoder.end_id)
    stages = (*kstates, *dec_state.stages)
    ready = spec.routing.init == "random" or all(s is None for s in stages)
    return model, RoutingState(stages, jnp.asarray(ready))


def _build(spec: ModelSpec, key: PRNGKeyArray, *,
           cross: tuple[int, int] | None = None) -> tuple[RoutingTransformer, RoutingState]:
    k_embed, k_proj, k_pos, k_out, k_blocks, k_cent = jax.random.split(key, 6)
    e_dim = spec.embedding.dim or spec.d_model
    factorised = e_dim != spec.d_model
    stages, kstates = _stages(spec, k_blocks, k_cent, cross=cross)
    model = RoutingTransformer(
        embed=Embedding(spec.vocab_size, e_dim, key=k_embed, axes=("vocab", "embed")),
        # the narrow factorised width has no logical axis of its own: it stays whole
        embed_proj=(Linear(e_dim, spec.d_model, bias=False, key=k_proj, axes=(None, "embed"))
                    if factorised else None),
        positions=_positions(spec, k_pos),
        stages=tuple(stages),
        final_norm=LayerNorm(spec.d_model, axes=("embed",)) if spec.final_norm else None,
        unembed=(None if spec.embedding.tied
                 else Linear(spec.d_model, spec.vocab_size, bias=False, key=k_out,
                             axes=("embed", "vocab"))),
        causal=spec.causal,
        seq_len=spec.seq_len,
        dropout=spec.dropout,
        remat=spec.remat,
        scan_unroll=spec.scan_unroll,
        commitment=spec.routing.commitment,
        ema_decay=spec.routing.ema_decay,
        epsilon=spec.routing.epsilon,
        init_iters=spec.routing.init_iters,
    )
    ready = spec.routing.init == "random" or all(s is None for s in kstates)
    return model, RoutingState(tuple(kstates), jnp.asarray(ready))


def _positions(spec: ModelSpec, key: PRNGKeyArray) -> jax.Array | AxisPositions | None:
    """Absolute position embeddings: a table over seq_len, per-axis tables, or none."""
    if spec.embedding.positions == "learned":
        return jax.random.normal(key, (spec.seq_len, spec.d_model)) * 0.02
    if spec.embedding.positions == "axes":
        return AxisPositions(tuple(spec.embedding.axes), spec.d_model, key=key,
                             axes=(None, "embed"))
    return None


def abstract_build(spec: ModelSpec | Spec) -> tuple[Model, RoutingState]:
    """Shapes and dtypes only (no allocation): for paper-sized specs on small machines."""
    return eqx.filter_eval_shape(build, spec, key=jax.random.key(0))


def count_parameters(model: Model) -> int:
    """Trainable parameters (the routing state is not a parameter); works on abstract models."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, is_array_leaf)))
