"""Training objectives built on the model's pure forward pass: the next-token loss (decoders),
the masked-token loss with BERT's corruption (encoders) and the teacher-forced target loss
(encoder-decoders). Each has one `*_nll` function that training and evaluation share."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.errors import StoreError
from rtlib.nn.model import RoutingTransformer, Stats
from rtlib.nn.seq2seq import EncoderDecoder
from rtlib.routing import RoutingState
from rtlib.spec.schema import MaskedLMSpec, Spec

PAD = -1  # padding in a packed (source, target) batch row, see `split_pairs`


def check_special_ids(spec: Spec, data_vocab: int, location: str) -> None:
    """Refuse (StoreError) an objective's own token ids (the mask id; the decoder's start and
    end ids) that are also tokens of the data (ids below `data_vocab`): the model could not
    tell a masked token from a real one, or the end of a target from a letter."""
    m = spec.model
    if spec.objective == "mlm":
        ids = {"train.mlm.mask_id": spec.train.mlm.mask_token(m.vocab_size)}
    elif spec.objective == "seq2seq":
        ids = {"model.decoder.start_id": m.decoder.start_id,
               "model.decoder.end_id": m.decoder.end_id}
    else:
        return
    for key, value in ids.items():
        if value < data_vocab:
            raise StoreError(
                f"{location}: {key}={value} is a token of the data (its tokenizer has ids "
                f"0..{data_vocab - 1}); give it an id of its own: model.vocab_size="
                f"{data_vocab + len(ids)} with ids {data_vocab}"
                + ("" if len(ids) == 1 else f" and {data_vocab + 1}"))


def next_token_nll(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq_plus_one"],
    *,
    key: PRNGKeyArray | None = None,
    mask: Bool[Array, "batch seq_plus_one"] | None = None,
    inference: bool = False,
) -> tuple[Float[Array, "batch seq"], Bool[Array, "batch seq"], Float[Array, "batch seq vocab"],
           Stats]:
    """Per-target cross-entropy in nats of `tokens[:, :-1] -> tokens[:, 1:]`: the one copy of
    the loss math that training (`next_token_loss`) and evaluation (`rtlib.runs.evaluate`)
    share, so their figures cannot drift apart.

    Returns `(nll, scored, logits, stats)`: `scored` marks targets that are real and follow a
    real token (`mask` marks padding, which the model does not see either); `logits` are
    float32, for metrics beyond the nll (e.g. greedy accuracy)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_mask = None if mask is None else mask[:, :-1]
    scored = jnp.ones(targets.shape, bool) if mask is None else mask[:, 1:] & mask[:, :-1]
    logits, stats = model(inputs, state, key=key, mask=in_mask, inference=inference)
    # float32 whatever the compute dtype: the log-softmax of a bf16 vocabulary is too coarse
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), scored, logits, stats


def next_token_loss(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq_plus_one"],
    *,
    key: PRNGKeyArray | None = None,
    mask: Bool[Array, "batch seq_plus_one"] | None = None,
    targets_mask: Bool[Array, "batch seq_plus_one"] | None = None,
    inference: bool = False,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""], Stats]]:
    """Language-model loss on `tokens[:, :-1] -> tokens[:, 1:]`.

    Returns `(loss, (lm_loss, commit_loss, stats))` with `loss = lm_loss + commit_loss`, ready for
    `eqx.filter_value_and_grad(..., has_aux=True)`. `lm_loss` is the mean cross-entropy in nats
    over target positions where `mask` is True (`mask` marks padding: masked tokens are not
    seen either) and, if given, `targets_mask` is True (positions scored, still seen as
    context: e.g. a synthetic task's answers). `stats` feed `model.update_state`.
    """
    ce, scored, _, stats = next_token_nll(model, state, tokens, key=key, mask=mask,
                                          inference=inference)
    weight = scored.astype(jnp.float32)
    if targets_mask is not None:
        weight = weight * targets_mask[:, 1:].astype(jnp.float32)
    return _mean_loss(ce, weight, model, stats)


def _mean_loss(ce: Float[Array, "batch seq"], weight: Float[Array, "batch seq"], model,
               stats: Stats) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""],
                                                          Stats]]:
    lm_loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    commit = model.aux_loss(stats)
    return lm_loss + commit, (lm_loss, commit, jax.lax.stop_gradient(stats))


def bert_corrupt(
    tokens: Int[Array, "batch seq"],
    key: PRNGKeyArray,
    mlm: MaskedLMSpec,
    vocab_size: int,
    *,
    mask: Bool[Array, "batch seq"] | None = None,
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """BERT's corruption: each real (non-padding) token is chosen with probability `mlm.rate`;
    a chosen token becomes the mask id with probability `mlm.replace`, a uniformly drawn id
    other than the mask id (below `vocab_size`) with probability `mlm.random`, else stays.
    Returns (corrupted tokens, chosen): the loss is on the chosen positions only."""
    mask_id = mlm.mask_token(vocab_size)
    k_choose, k_how, k_random = jax.random.split(key, 3)
    chosen = jax.random.bernoulli(k_choose, mlm.rate, tokens.shape)
    if mask is not None:
        chosen = chosen & mask
    how = jax.random.uniform(k_how, tokens.shape)
    # an id in [0, vocab - 1) shifted past the mask id: uniform over every other id
    drawn = jax.random.randint(k_random, tokens.shape, 0, vocab_size - 1, tokens.dtype)
    drawn = drawn + (drawn >= mask_id).astype(tokens.dtype)
    out = jnp.where(how < mlm.replace, jnp.asarray(mask_id, tokens.dtype),
                    jnp.where(how < mlm.replace + mlm.random, drawn, tokens))
    return jnp.where(chosen, out, tokens), chosen


def masked_lm_nll(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq"],
    mlm: MaskedLMSpec,
    *,
    corrupt_key: PRNGKeyArray,
    key: PRNGKeyArray | None = None,
    mask: Bool[Array, "batch seq"] | None = None,
    inference: bool = False,
) -> tuple[Float[Array, "batch seq"], Bool[Array, "batch seq"], Float[Array, "batch seq vocab"],
           Stats]:
    """Per-position cross-entropy (nats) of the original tokens given the corrupted sequence
    (`bert_corrupt` with `corrupt_key`), for an encoder: `(nll, chosen, logits, stats)`; only
    the chosen positions count. `mask` marks real tokens: padding is neither chosen nor seen."""
    if model.causal:
        raise ValueError("the masked-token objective needs an encoder (model.kind: encoder)")
    vocab = model.embed.weight.shape[0]
    corrupted, chosen = bert_corrupt(tokens, corrupt_key, mlm, vocab, mask=mask)
    logits, stats = model(corrupted, state, key=key, mask=mask, inference=inference)
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens), chosen, logits, stats


def masked_lm_loss(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq"],
    mlm: MaskedLMSpec,
    *,
    key: PRNGKeyArray,
    mask: Bool[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""], Stats]]:
    """Masked-LM loss: mean cross-entropy over the chosen positions (plus the commitment
    loss), as `next_token_loss` returns it. `key` draws the corruption and the dropout."""
    k_corrupt, k_model = jax.random.split(key)
    ce, chosen, _, stats = masked_lm_nll(model, state, tokens, mlm, corrupt_key=k_corrupt,
                                         key=k_model, mask=mask)
    return _mean_loss(ce, chosen.astype(jnp.float32), model, stats)


def split_pairs(batch: Int[Array, "batch row"], source_len: int
                ) -> tuple[Int[Array, "batch source"], Bool[Array, "batch source"],
                           Int[Array, "batch target_plus_one"],
                           Bool[Array, "batch target_plus_one"]]:
    """A packed batch of (source, target) pairs -> (source, source mask, target, target mask).

    A row is the source padded to `source_len`, then the decoder's sequence `[start, t_1 ..
    t_m, end]` padded to `seq_len + 1` (`rtlib.data.paired.pack_pairs`); padding is `PAD`
    (-1), so one int array carries both masks through the data pipeline and the mesh."""
    source, target = batch[:, :source_len], batch[:, source_len:]
    return (jnp.maximum(source, 0), source != PAD, jnp.maximum(target, 0), target != PAD)


def seq2seq_nll(
    model: EncoderDecoder,
    state: RoutingState,
    batch: Int[Array, "batch row"],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Float[Array, "batch seq"], Bool[Array, "batch seq"], Float[Array, "batch seq vocab"],
           Stats]:
    """Per-target cross-entropy (nats) of `target[1:]` given the source and `target[:-1]`
    (teacher forcing) for a packed batch (`split_pairs`): `(nll, scored, logits, stats)`;
    `scored` marks real target tokens (the end token included)."""
    source, source_mask, target, target_mask = split_pairs(batch, model.source_len)
    logits, stats = model(source, target[:, :-1], state, key=key, source_mask=source_mask,
                          target_mask=target_mask[:, :-1], inference=inference)
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, target[:, 1:])
    return nll, target_mask[:, 1:], logits, stats


def seq2seq_loss(
    model: EncoderDecoder,
    state: RoutingState,
    batch: Int[Array, "batch row"],
    *,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""], Stats]]:
    """Mean cross-entropy over the target tokens of a packed batch (plus the commitment loss),
    as `next_token_loss` returns it."""
    ce, scored, _, stats = seq2seq_nll(model, state, batch, key=key)
    return _mean_loss(ce, scored.astype(jnp.float32), model, stats)
