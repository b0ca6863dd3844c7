"""The encoder-decoder: an encoder stack of non-causal blocks (local, full or routing heads) and a
decoder, a causal `RoutingTransformer` whose blocks also cross-attend to the encoder's output.

Source and target share the token embedding (one vocabulary). The routing state is the
encoder's stages followed by the decoder's, one `RoutingState` threaded explicitly like a
decoder's (`split_state` gives each stack its part); statistics come back in the same order, so
`update_state` is one EMA step of both stacks. Generation encodes the source once: `start`
returns the decoder cache holding every layer's cross-attention keys and values, and each
`decode` step only extends the self-attention caches.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.block import Block
from rtlib.nn.cross_attention import EncoderOutput
from rtlib.nn.layers import LayerNorm, dropout
from rtlib.nn.model import DecodeCache, RoutingTransformer, Stats, scan_blocks
from rtlib.parallel.rules import Declarations, ParamInfo, Stacked
from rtlib.routing import KMeansState, RoutingState


class EncoderDecoder(eqx.Module):
    """`encoder[i]`: a group of identical encoder layers stacked for `lax.scan`; `decoder`: the
    causal decoder (embedding, cross-attending blocks, output projection)."""

    encoder: tuple[Block, ...]
    encoder_norm: LayerNorm | None
    source_positions: Float[Array, "source dmodel"] | None
    decoder: RoutingTransformer
    source_len: int = eqx.field(static=True)
    start_id: int = eqx.field(static=True)
    end_id: int = eqx.field(static=True)

    def declare_params(self) -> Declarations:
        """The source's learned position table (like the decoder's) and the layer axis of the
        encoder's stacked stages; the layers and the decoder declare the rest."""
        return {"source_positions": ParamInfo((None, "embed"), decay=False),
                "encoder": Stacked((None,))}

    @property
    def seq_len(self) -> int:
        """Decoder positions: the start token and up to seq_len - 1 target tokens."""
        return self.decoder.seq_len

    def split_state(self, state: RoutingState) -> tuple[RoutingState, RoutingState]:
        """(encoder's, decoder's) routing state."""
        n, total = len(self.encoder), len(self.encoder) + len(self.decoder.stages)
        if len(state.stages) != total:
            raise ValueError(f"routing state has {len(state.stages)} groups; the model has "
                             f"{total} ({n} encoder, {total - n} decoder): was it built from "
                             "another spec?")
        return (RoutingState(state.stages[:n], state.initialised),
                RoutingState(state.stages[n:], state.initialised))

    def __call__(
        self,
        source: Int[Array, "batch source"],
        target: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray | None = None,
        source_mask: Bool[Array, "batch source"] | None = None,
        target_mask: Bool[Array, "batch seq"] | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq vocab"], Stats]:
        """Logits of the next target token at every decoder position (teacher forcing: `target`
        is the decoder's input, starting with `start_id`), and routing statistics of the
        encoder's stages then the decoder's. Masks mark real (non-padding) tokens."""
        enc_state, dec_state = self.split_state(state)
        k_enc, k_dec = (None, None) if key is None else jax.random.split(key)
        memory, enc_stats, _ = self._encode(source, enc_state, mask=source_mask, key=k_enc,
                                            inference=inference)
        logits, dec_stats = self.decoder(target, dec_state, key=k_dec, mask=target_mask,
                                         inference=inference, memory=memory)
        return logits, enc_stats + dec_stats

    def encode(self, source: Int[Array, "batch source"], state: RoutingState, *,
               mask: Bool[Array, "batch source"] | None = None) -> EncoderOutput:
        """The encoder's output over `source` (inference), which the decoder attends to."""
        return self._encode(source, self.split_state(state)[0], mask=mask, key=None,
                            inference=True)[0]

    def aux_loss(self, stats: Stats) -> Float[Array, ""]:
        """Commitment loss of every routing layer of both stacks."""
        return self.decoder.aux_loss(stats)

    def update_state(self, state: RoutingState, stats: Stats) -> RoutingState:
        """One EMA step of every routing layer of both stacks."""
        return self.decoder.update_state(state, stats)

    def init_routing(
        self,
        source: Int[Array, "batch source"],
        target: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray,
        source_mask: Bool[Array, "batch source"] | None = None,
        target_mask: Bool[Array, "batch seq"] | None = None,
    ) -> RoutingState:
        """Data-dependent init of both stacks (see `RoutingTransformer.init_routing`): the
        encoder's layers first, then the decoder's, reading the initialised encoder's output."""
        enc_state, dec_state = self.split_state(state)
        k_enc, k_dec = jax.random.split(key)
        memory, _, used = self._encode(source, enc_state, mask=source_mask, key=None,
                                       inference=True, init_key=k_enc)
        dec = self.decoder.init_routing(target, dec_state, key=k_dec, mask=target_mask,
                                        memory=memory)
        enc = tuple(None if c is None else KMeansState.from_centroids(c) for c in used)
        return RoutingState(enc + dec.stages, jnp.asarray(True))

    def start(
        self,
        source: Int[Array, "batch source"],
        state: RoutingState,
        *,
        capacity: int,
        source_mask: Bool[Array, "batch source"] | None = None,
    ) -> tuple[Float[Array, "batch vocab"], DecodeCache]:
        """Encode the source and read the start token: the logits of the first target token and
        the cache `decode` continues from (cross-attention keys and values included, computed
        here once). `capacity`: decoder positions the cache must hold, start token included."""
        _, dec_state = self.split_state(state)
        memory = self.encode(source, state, mask=source_mask)
        first = jnp.full((source.shape[0], 1), self.start_id, jnp.int32)
        logits, cache = self.decoder.prefill(first, dec_state, capacity=capacity, memory=memory)
        return logits[:, -1], cache

    def decode(self, token: Int[Array, " batch"], state: RoutingState,
               cache: DecodeCache) -> tuple[Float[Array, "batch vocab"], DecodeCache]:
        """Logits of the next target token after one more, and the extended cache."""
        return self.decoder.decode(token, self.split_state(state)[1], cache)

    def _encode(self, source, state, *, mask, key, inference, init_key=None
                ) -> tuple[EncoderOutput, Stats, tuple[Array | None, ...]]:
        d = self.decoder
        n = source.shape[1]
        if n > self.source_len and self.source_positions is not None:
            raise ValueError(f"a source of {n} tokens exceeds the model's seq_len="
                             f"{self.source_len} (learned position embeddings end there)")
        if key is None and d.dropout > 0 and not inference:
            raise ValueError("dropout > 0 in training needs a `key` (or pass inference=True)")
        stages = len(self.encoder)
        keys = [None] * (stages + 1) if key is None else list(jax.random.split(key, stages + 1))
        init_keys = [None] * stages if init_key is None else \
            list(jax.random.split(init_key, stages))
        h = d.embed(source)
        if d.embed_proj is not None:
            h = d.embed_proj(h)
        if self.source_positions is not None:
            h = h + self.source_positions[None, :n]
        h = dropout(h, d.dropout, keys[-1], inference)
        stats, used = [], []
        for blocks, kstate, k, ik in zip(self.encoder, state.stages, keys, init_keys,
                                         strict=False):
            centroids = None if kstate is None else kstate.centroids
            h, s, c = scan_blocks(blocks, h, centroids, mask=mask, key=k, inference=inference,
                                  init_key=ik, init_iters=d.init_iters, remat=d.remat,
                                  unroll=d.scan_unroll)
            stats.append(s)
            used.append(c)
        if self.encoder_norm is not None:
            h = self.encoder_norm(h)
        valid = jnp.ones(source.shape, bool) if mask is None else mask
        return EncoderOutput(h, valid), tuple(stats), tuple(used)


Model = RoutingTransformer | EncoderDecoder  # what `rtlib.build.build` returns
