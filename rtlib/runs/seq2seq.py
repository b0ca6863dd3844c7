"""What an encoder-decoder does once trained: score a split of a paired store (target nll and
bits with teacher forcing; `exact_match` of greedy decoding) and turn a source into a target
(greedy, temperature, top-k, top-p), decoding with the cache: the source is encoded once and
every decoder layer's cross-attention keys and values come from that one pass."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.data.paired import PairedStore, pack_pairs, pair_batches
from rtlib.errors import BadArgument
from rtlib.nn.seq2seq import EncoderDecoder
from rtlib.objectives import seq2seq_nll, split_pairs
from rtlib.routing import RoutingState
from rtlib.runs.sample import Sampling, pick
from rtlib.runs.scoring import Placement, progress_bar
from rtlib.spec.schema import AxisRules


def allowed_logits(logits: Float[Array, "*batch vocab"], vocab_limit: int,
                   end_id: int) -> Float[Array, "*batch vocab"]:
    """Logits with every id the target cannot hold at -inf: only data tokens (below
    `vocab_limit`) and the end token are ever produced."""
    ids = jnp.arange(logits.shape[-1])
    keep = (ids < vocab_limit) | (ids == end_id)
    return jnp.where(keep, logits.astype(jnp.float32), -jnp.inf)


@eqx.filter_jit
def greedy_decode(model: EncoderDecoder, routing: RoutingState,
                  source: Int[Array, "batch source"], source_mask: Bool[Array, "batch source"],
                  vocab_limit: int, layout: str = "") -> Int[Array, "batch seq"]:
    """The greedy target of every source, `model.seq_len` tokens (the end token, then
    whatever follows it): one `start`, then `decode` steps in a `lax.scan`."""
    # layout: the active rules (static), see `rtlib.parallel.rules.rules_key`
    logits, cache = model.start(source, routing, capacity=model.seq_len,
                                source_mask=source_mask)
    first = jnp.argmax(allowed_logits(logits, vocab_limit, model.end_id), -1).astype(jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = model.decode(token, routing, cache)
        nxt = jnp.argmax(allowed_logits(logits, vocab_limit, model.end_id), -1)
        return (nxt.astype(jnp.int32), cache), token

    (last, _), out = jax.lax.scan(step, (first, cache), None, length=model.seq_len - 1)
    return jnp.concatenate([out.T, last[:, None]], axis=1)


@eqx.filter_jit
def _nll_sums(model: EncoderDecoder, routing: RoutingState, batch: Int[Array, "batch row"],
              layout: str) -> Float[Array, "3"]:
    """[target nll sum, target tokens, greedy-correct target tokens] (teacher forcing)."""
    nll, scored, logits, _ = seq2seq_nll(model, routing, batch, inference=True)
    target = split_pairs(batch, model.source_len)[2][:, 1:]
    weight = scored.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == target).astype(jnp.float32) * weight
    return jnp.stack([jnp.sum(nll * weight), jnp.sum(weight), jnp.sum(correct)])


def cut_at_end(tokens: np.ndarray, end_id: int) -> np.ndarray:
    """The tokens before the first end token (all of them when there is none)."""
    ends = np.flatnonzero(tokens == end_id)
    return tokens[:ends[0]] if len(ends) else tokens


def evaluate_seq2seq(model: EncoderDecoder, routing: RoutingState, store: PairedStore,
                     split: str, *, batch_size: int, max_tokens: int | None = None,
                     mesh: Mesh | None = None, rules: AxisRules | None = None,
                     progress: bool = False) -> dict:
    """Every example of the split (or the first ones holding `max_tokens` target tokens):
    target nll (nats) and bits per target token (the end token included), teacher-forced
    greedy token accuracy, and `exact_match`, the share of examples whose greedy decoding
    (with the cache) is exactly the target. With a `mesh`, batches are split over its data
    axes; every process passes the same arguments."""
    vocab_limit = store.tokenizer.vocab_size
    place = Placement(mesh, rules)
    sums, matches, examples = np.zeros(3), 0, 0
    with place:
        bar = progress_bar(store.examples(split), split, progress=progress, unit="example")
        for batch, targets in pair_batches(
                store, split, source_len=model.source_len, seq_len=model.seq_len,
                start_id=model.start_id, end_id=model.end_id, batch_size=batch_size,
                max_tokens=max_tokens):
            packed = place.put(batch)
            sums += np.asarray(_nll_sums(model, routing, packed, place.layout), np.float64)
            source, source_mask, _, _ = split_pairs(packed, model.source_len)
            decoded = np.asarray(greedy_decode(model, routing, source, source_mask,
                                               vocab_limit, place.layout))
            for row, target in zip(decoded, targets, strict=False):
                matches += np.array_equal(cut_at_end(row, model.end_id), target)
            examples += len(targets)
            bar.update(len(targets))
        bar.close()
    total_nll, tokens, correct = (float(x) for x in sums)
    nll = total_nll / max(tokens, 1.0)
    out = {"split": split, "examples": examples, "tokens": int(tokens), "nll": nll,
           "bits_per_token": nll / math.log(2)}
    if store.tokenizer.unit == "byte":
        out["bits_per_byte"] = nll / math.log(2)
    out.update(perplexity=math.exp(nll), token_accuracy=correct / max(tokens, 1.0),
               exact_match=matches / max(examples, 1))
    return out


# the source padded to the model's seq_len and masked, exactly as training and eval read it
_start = eqx.filter_jit(lambda model, routing, source, mask: model.start(
    source, routing, capacity=model.seq_len, source_mask=mask))
_decode = eqx.filter_jit(lambda model, routing, token, cache: model.decode(token, routing, cache))


def translate(model: EncoderDecoder, routing: RoutingState, source: np.ndarray, *,
              sampling: Sampling, key: PRNGKeyArray, vocab_limit: int,
              max_new_tokens: int | None = None, on_token=None) -> np.ndarray:
    """The target of one `source` (ids), drawn token by token until the end token or
    `max_new_tokens` (default and at most: the decoder's seq_len - 1 target tokens); the end
    token is not returned. `on_token(id)` is called as each target token is produced. Only ids
    below `vocab_limit` (the tokenizer's) and the end token are drawn."""
    if len(source) == 0:
        raise BadArgument("the source is empty: give at least one character")
    if len(source) > model.source_len:
        raise BadArgument(f"the source has {len(source)} tokens; the model reads at most "
                          f"model.seq_len={model.source_len}")
    limit = model.seq_len - 1
    if max_new_tokens is None:
        max_new_tokens = limit
    if not 0 <= max_new_tokens <= limit:
        raise BadArgument(f"max_new_tokens must be between 0 and decoder.seq_len - 1 = "
                          f"{limit}, got {max_new_tokens}")
    sampling.check(vocab_limit)
    vocab = model.decoder.embed.weight.shape[0]
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    choose = functools.partial(pick, temperature=temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, vocab_limit=vocab)
    packed = pack_pairs([(np.asarray(source, np.int32), np.zeros(0, np.int32))],
                        source_len=model.source_len, seq_len=model.seq_len,
                        start_id=model.start_id, end_id=model.end_id)
    src = jnp.asarray(packed[:, :model.source_len])
    logits, cache = _start(model, routing, jnp.maximum(src, 0), src >= 0)
    out = []
    for i in range(max_new_tokens):
        nxt = int(choose(allowed_logits(logits[0], vocab_limit, model.end_id),
                         jax.random.fold_in(key, i)))
        if nxt == model.end_id:
            break
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if i + 1 < max_new_tokens:
            logits, cache = _decode(model, routing, jnp.asarray([nxt], jnp.int32), cache)
    return np.asarray(out, np.int32)
