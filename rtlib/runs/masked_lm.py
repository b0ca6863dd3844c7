"""Scoring an encoder on a split of a token store with its masked-LM objective: the split cut
into consecutive windows of seq_len tokens, each corrupted as in training (`train.mlm`, with a
seeded key per batch, so a split scores the same every time), and the chosen tokens predicted:
masked-token nll, bits and greedy accuracy."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.data.pipeline import eval_batches
from rtlib.data.store import TokenStore
from rtlib.nn.model import RoutingTransformer
from rtlib.objectives import masked_lm_nll
from rtlib.routing import RoutingState
from rtlib.runs.scoring import Placement, progress_bar
from rtlib.spec.schema import AxisRules, MaskedLMSpec


@eqx.filter_jit
def _masked_sums(model: RoutingTransformer, routing: RoutingState,
                 tokens: Int[Array, "batch seq"], mask: Bool[Array, "batch seq"],
                 key: PRNGKeyArray, mlm: MaskedLMSpec, layout: str) -> Float[Array, "3"]:
    """[nll sum, chosen tokens, correctly predicted chosen tokens]."""
    # layout: the active rules (static), see `rtlib.parallel.rules.rules_key`
    nll, chosen, logits, _ = masked_lm_nll(model, routing, tokens, mlm, corrupt_key=key,
                                           mask=mask, inference=True)
    weight = chosen.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32) * weight
    return jnp.stack([jnp.sum(nll * weight), jnp.sum(weight), jnp.sum(correct)])


def evaluate_masked(model: RoutingTransformer, routing: RoutingState, store: TokenStore,
                    split: str, *, batch_size: int, mlm: MaskedLMSpec,
                    max_tokens: int | None = None, mesh: Mesh | None = None,
                    rules: AxisRules | None = None, progress: bool = False,
                    seed: int = 0) -> dict:
    """Masked-token nll (nats), bits and accuracy over the split's (first `max_tokens`)
    tokens; `tokens` counts the chosen (scored) ones, `bits_per_byte` (or per token) is the
    bits per masked one, as the training lines log it. With a `mesh`, batches are split over
    its data axes; every process passes the same arguments."""
    n = model.seq_len
    sums = [0.0] * 3
    place = Placement(mesh, rules)
    with place:
        todo = min(store.num_tokens(split), max_tokens or math.inf)
        bar = progress_bar(todo, split, progress=progress)
        # windows of seq_len + 1 overlap by one token: their first seq_len cover each once
        for index, (tokens, mask, _) in enumerate(eval_batches(
                store, split, seq_len=n, batch_size=batch_size, max_tokens=max_tokens)):
            tokens, mask = tokens[:, :n], mask[:, :n]
            bar.update(int(mask.sum()))
            out = _masked_sums(model, routing, place.put(tokens), place.put(mask),
                               jax.random.fold_in(jax.random.key(seed), index), mlm,
                               place.layout)
            sums = [a + float(b) for a, b in zip(sums, out, strict=True)]
        bar.close()
    total_nll, chosen, correct = sums
    nll = total_nll / max(chosen, 1.0)
    # `bits_per_<unit>` as training logs it for this objective: per masked token
    return {"split": split, "tokens": int(chosen), "masked_nll": nll,
            "masked_bits": nll / math.log(2), "masked_accuracy": correct / max(chosen, 1.0),
            "masked_perplexity": math.exp(nll),
            f"bits_per_{store.tokenizer.unit}": nll / math.log(2)}
