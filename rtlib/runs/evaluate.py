"""Scoring a model on a split of a token store: nll, bits per token and per byte (and per
dim, i.e. channel byte, for images), perplexity; for stores with an answer mask (synthetic
tasks) also the greedy accuracy and nll of answers."""

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from rtlib.data.images import image_shape
from rtlib.data.paired import PairedStore
from rtlib.data.pipeline import eval_batches
from rtlib.data.store import StoreError, TokenStore
from rtlib.nn.model import RoutingTransformer
from rtlib.nn.seq2seq import EncoderDecoder, Model
from rtlib.objectives import next_token_nll
from rtlib.routing import RoutingState
from rtlib.runs.masked_lm import evaluate_masked
from rtlib.runs.scoring import Placement, progress_bar
from rtlib.runs.seq2seq import evaluate_seq2seq
from rtlib.spec.schema import AxisRules, MaskedLMSpec


@eqx.filter_jit
def _nll_sum(model: RoutingTransformer, routing: RoutingState,
             tokens: Int[Array, "batch seq_plus_one"], mask: Bool[Array, "batch seq_plus_one"],
             answers: Bool[Array, "batch seq_plus_one"], layout: str
             ) -> Float[Array, "5"]:
    """[nll sum, scored targets, answer nll sum, correct answers, answers]."""
    # layout: the active rules (static), see `rtlib.parallel.rules.rules_key`
    ce, scored, logits, _ = next_token_nll(model, routing, tokens, mask=mask, inference=True)
    weight = scored.astype(jnp.float32)
    asked = (scored & answers[:, 1:]).astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == tokens[:, 1:]).astype(jnp.float32) * asked
    return jnp.stack([jnp.sum(ce * weight), jnp.sum(weight), jnp.sum(ce * asked),
                      jnp.sum(correct), jnp.sum(asked)])


def evaluate(model: Model, routing: RoutingState, store: TokenStore | PairedStore, split: str,
             *, batch_size: int, max_tokens: int | None = None, mesh: Mesh | None = None,
             rules: AxisRules | None = None, progress: bool = False,
             mlm: MaskedLMSpec | None = None) -> dict:
    """Every target token of the split (or its first `max_tokens`) scored once, in consecutive
    windows of the model's seq_len. Bits per byte: total nats over (the UTF-8 bytes of text
    the scored tokens stand for x ln 2); for byte-level tokens, bits per token.
    With a `mesh` (the model sharded on it), batches are split over its data axes; every
    process passes the same arguments. An encoder is scored on its masked tokens (corrupted as
    `mlm` says: `rtlib.runs.masked_lm`), an encoder-decoder on the targets of a paired store
    (`rtlib.runs.seq2seq`, with greedy `exact_match`)."""
    if isinstance(model, EncoderDecoder):
        return evaluate_seq2seq(model, routing, store, split, batch_size=batch_size,
                                max_tokens=max_tokens, mesh=mesh, rules=rules,
                                progress=progress)
    if not model.causal:
        return evaluate_masked(model, routing, store, split, batch_size=batch_size,
                               mlm=mlm or MaskedLMSpec(), max_tokens=max_tokens, mesh=mesh,
                               rules=rules, progress=progress)
    sums = [0.0] * 5
    place = Placement(mesh, rules)
    with place:
        # Targets to score, for the progress bar (tokens/s and ETA on stderr).
        todo = min(store.num_tokens(split), (max_tokens or math.inf) + 1) - 1
        bar = progress_bar(todo, split, progress=progress)
        for batch in eval_batches(store, split, seq_len=model.seq_len,
                                  batch_size=batch_size, max_tokens=max_tokens):
            bar.update(int(batch[1][:, 1:].sum()))
            out = _nll_sum(model, routing, *[place.put(x) for x in batch], place.layout)
            sums = [a + float(b) for a, b in zip(sums, out)]
        bar.close()
    total_nll, total, answer_nll, correct, asked = sums
    nll = total_nll / total
    out = {"split": split, "tokens": int(total), "nll": nll, "bits_per_token": nll / math.log(2)}
    if store.tokenizer.unit == "byte":  # one token is one byte
        out["bits_per_byte"] = nll / math.log(2)
    elif scored_bytes := store.text_bytes(split, 1, int(total) + 1):
        # over exactly the text bytes the scored targets (tokens 1..total) stand for, so that
        # models of one text under different tokenizers compare
        out["bits_per_byte"] = total_nll / (scored_bytes * math.log(2))
    if image_shape(store.manifest):  # the image modelling unit: bits per channel byte
        out["bits_per_dim"] = nll / math.log(2)
    out["perplexity"] = math.exp(nll)
    if store.has_answers(split):
        out.update(answers=int(asked), answer_accuracy=correct / max(asked, 1.0),
                   answer_nll=answer_nll / max(asked, 1.0))
    return out


def _scores(model: RoutingTransformer, routing: RoutingState,
            tokens: Int[Array, "rows seq_plus_one"], mask: Bool[Array, "rows seq_plus_one"] | None
            ) -> tuple[Float[Array, "rows seq"], Bool[Array, "rows seq"]]:
    """Per target: nll and whether the greedy prediction is right."""
    nll, _, logits, _ = next_token_nll(model, routing, tokens, mask=mask, inference=True)
    return nll, jnp.argmax(logits, axis=-1) == tokens[:, 1:]


@eqx.filter_jit
def _full_scores(model: RoutingTransformer, routing: RoutingState,
                 tokens: Int[Array, "rows seq_plus_one"]
                 ) -> tuple[Float[Array, "rows seq"], Bool[Array, "rows seq"]]:
    return _scores(model, routing, tokens, None)


@eqx.filter_jit
def _prefix_scores(model: RoutingTransformer, routing: RoutingState,
                   tokens: Int[Array, "rows seq_plus_one"], positions: Int[Array, " rows"]
                   ) -> tuple[Float[Array, " rows"], Bool[Array, " rows"]]:
    """Per row: nll of the target after `positions` from a pass that sees only the prefix
    (every later token masked as padding), and whether the greedy prediction is right."""
    # one column wider than the inputs: `next_token_nll` takes a mask over the targets too
    prefix = jnp.arange(tokens.shape[1])[None, :] <= positions[:, None]
    nll, ok = _scores(model, routing, tokens, prefix)
    rows = jnp.arange(tokens.shape[0])
    return nll[rows, positions], ok[rows, positions]


def causality_audit(model: RoutingTransformer, routing: RoutingState, store: TokenStore,
                    split: str, *, windows: int = 4, per_window: int = 32, batch_size: int = 8,
                    answers_only: bool = False, seed: int = 0) -> dict:
    """How much a model's scores owe to seeing later tokens.

    Balanced routing picks each centroid's top-W tokens over the whole sequence, so which past
    keys a query sees depends on later tokens. For `per_window` target positions in each of the
    split's first `windows` evaluation windows (seeded; with `answers_only`, the store's answer
    positions), the target is scored twice: by the ordinary full pass (once per window), and by
    a strictly causal pass in which every token after the query is padding (equivalent to
    recomputing the prefix alone; one sequence per target). Returns both mean nlls (nats) and
    greedy accuracies over the same targets; for a strictly causal model they agree to
    rounding."""
    rng = np.random.default_rng(seed)
    rows_t, rows_p, full = [], [], np.zeros(2)
    for used, (tokens, mask, answers) in enumerate(eval_batches(
            store, split, seq_len=model.seq_len, batch_size=1)):
        if used >= windows:
            break
        scored = mask[0, 1:] & mask[0, :-1] & (answers[0, 1:] if answers_only else True)
        where = np.flatnonzero(scored)
        if answers_only:
            where = where[:per_window]
        elif len(where) > per_window:
            where = np.sort(rng.choice(where, per_window, replace=False))
        nll, ok = (np.asarray(x[0], np.float64) for x in _full_scores(
            model, routing, jnp.asarray(tokens)))
        full += [nll[where].sum(), ok[where].sum()]
        rows_t += [tokens[0]] * len(where)
        rows_p += list(where)
    if not rows_t:
        raise StoreError(f"{store.location}: split {split!r} has no target to audit")
    strict = np.zeros(2)
    for b in range(0, len(rows_t), batch_size):
        t = np.stack(rows_t[b:b + batch_size])
        p = np.asarray(rows_p[b:b + batch_size], np.int32)
        pad = batch_size - len(p)  # one compiled shape: repeat the last row, then drop it
        t, p = np.concatenate([t, t[-1:].repeat(pad, 0)]), np.concatenate([p, p[-1:].repeat(pad)])
        out = [np.asarray(x, np.float64)[:batch_size - pad]
               for x in _prefix_scores(model, routing, jnp.asarray(t), jnp.asarray(p))]
        strict += [x.sum() for x in out]
    n = len(rows_t)
    return {"split": split, "targets": n, "nll_full": full[0] / n, "nll_causal": strict[0] / n,
            "accuracy_full": full[1] / n, "accuracy_causal": strict[1] / n,
            "nll_gap": (strict[0] - full[0]) / n}
