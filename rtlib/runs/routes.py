"""`rtlib routes`: which tokens each routing head put together over a text, and where one query
looked.

The model is walked layer by layer on one sequence (no padding, no dropout); each layer's
routing heads are projected by the layer itself, and the memberships come from the same
`route_scores`, `balanced_members` and `nearest_cluster` the forward pass calls, so the clusters
shown are the ones the model used. A query's attention row is the softmax the routing head
computes: for balanced routing the mean of its softmax in each cluster it joined (the head's
output is the mean of those clusters' outputs), for causal routing the softmax over the W most
recent keys of its cluster. tests/test_routes.py checks that these rows times the values give
the layer's own routing output.
"""

import html
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jaxtyping import Array, Bool, Float, Int

from kernels.numerics import MASKED_LOGIT, SELF_LOGIT
from rtlib.data.tokenizer import ByteTokenizer
from rtlib.errors import BadArgument
from rtlib.nn.attention import MixedAttention
from rtlib.nn.block import Block
from rtlib.nn.model import RoutingTransformer
from rtlib.routing import RoutingState, balanced_members, nearest_cluster
from rtlib.routing.assign import Assignment, logit_scale_value, route_scores

FILES = ("routes.html", "routes.png", "routes.json")
NO_CLUSTER = "#d0d0d0"  # tokens a balanced head left out of every cluster (their output is 0)


class LayerInput(NamedTuple):
    """One layer as the forward pass meets it: its attention and what that attention reads."""

    layer: int  # index over the whole model
    attn: MixedAttention
    centroids: Float[Array, "rheads clusters hdim"] | None
    x: Float[Array, "1 seq dmodel"]  # the attention's input (after norm1 with pre-norm)


@dataclass(frozen=True)
class HeadRoutes:
    """Where one routing head sent the tokens of one sequence (numpy arrays)."""

    layer: int
    head: int  # among the layer's routing heads
    slot: int  # among all the layer's heads, ordered [local | full | routing]
    assignment: str
    clusters: int
    window: int  # the cluster size actually used: min(W, seq)
    shared_qk: bool
    nearest: np.ndarray  # [seq] int: each token's nearest centroid (as a query)
    members: np.ndarray  # [clusters, seq] bool: the queries of each cluster
    key_members: np.ndarray  # [clusters, seq] bool: its keys (the same with shared QK)
    queries: np.ndarray  # [q] int: positions whose attention rows follow
    weights: np.ndarray  # [q, seq] float32: attention of each of those queries over the keys
    visible: np.ndarray  # [q, seq] bool: the keys each of those queries could see


@eqx.filter_jit
def _step(block: Block, h, centroids):
    x = block.norm1(h) if block.pre_norm else h
    return x, block(h, centroids, mask=None, key=None, inference=True)[0]


def layer_inputs(
    model: RoutingTransformer, state: RoutingState, tokens: Int[Array, " seq"]
) -> tuple[list[LayerInput], Float[Array, "1 seq dmodel"]]:
    """Every layer's attention input over one sequence, and the last layer's output (which
    `model._logits` turns into the model's logits), running the blocks one at a time."""
    if len(state.stages) != len(model.stages):
        raise ValueError(f"routing state has {len(state.stages)} groups; the model has "
                         f"{len(model.stages)}: was it built from another spec?")
    # The model's own embedding and blocks (private, but the same code as its forward pass).
    h = model._embed(tokens[None], 0)
    layers = []
    for blocks, kstate in zip(model.stages, state.stages, strict=True):
        params, static = eqx.partition(blocks, eqx.is_array)
        for i in range(jax.tree.leaves(params)[0].shape[0]):
            block = eqx.combine(jax.tree.map(lambda p, i=i: p[i], params), static)
            centroids = None if kstate is None else kstate.centroids[i]
            x, h = _step(block, h, centroids)
            layers.append(LayerInput(len(layers), block.attn, centroids, x))
    return layers, h


def head_routes(
    q_hat: Float[Array, "seq dim"],
    k_hat: Float[Array, "seq dim"],
    s_q: Float[Array, "seq clusters"],
    s_k: Float[Array, "seq clusters"],
    queries: Int[Array, " q"],
    *,
    window: int,
    assignment: Assignment,
    causal: bool,
    scale: float,
    self_mask: bool,
) -> tuple[Bool[Array, "clusters seq"], Bool[Array, "clusters seq"], Float[Array, "q seq"],
           Bool[Array, "q seq"]]:
    """(query members, key members, attention rows of `queries`, their visible keys) of one
    routing head over one unpadded sequence; `window` is already min(W, seq). The rows times
    the values are `routing_attention`'s output for those queries."""
    n, k = s_q.shape
    pos = jnp.arange(n, dtype=jnp.int32)
    valid = jnp.ones((n,), bool)
    ids = jnp.arange(k, dtype=jnp.int32)[:, None]
    if assignment == "balanced":
        members = jnp.zeros((k, n), bool).at[ids, balanced_members(s_q, valid, window)].set(True)
        key_members = jnp.zeros((k, n), bool).at[ids, balanced_members(s_k, valid, window)].set(
            True)
    else:
        q_cluster, k_cluster = nearest_cluster(s_q, valid), nearest_cluster(s_k, valid)
        members, key_members = q_cluster[None, :] == ids, k_cluster[None, :] == ids
        # Keys of each cluster at positions <= j: a key's 1-based rank in its cluster, and the
        # number of keys of a query's cluster up to the query, whose gap is the window.
        seen = jnp.cumsum(key_members.astype(jnp.int32), axis=1)
        rank, upto = seen[k_cluster, pos], seen[q_cluster, pos]

    def row(i):
        logits = jnp.einsum("d,kd->k", q_hat[i].astype(jnp.float32),
                            k_hat.astype(jnp.float32)) * scale
        if self_mask:
            logits = jnp.where(pos == i, SELF_LOGIT, logits)
        if assignment == "balanced":
            joined = members[:, i]  # every cluster the query sits in is one softmax
            seen_by = key_members & (pos[None, :] <= i if causal else True)
        else:
            joined = jnp.ones((1,), bool)
            gap = upto[i] - rank
            near = (gap >= 0) & (gap < window) if causal else jnp.abs(gap) < window
            seen_by = ((k_cluster == q_cluster[i]) & near)[None, :]
        masked = jnp.where(seen_by, logits[None, :], MASKED_LOGIT)
        e = jnp.where(seen_by, jnp.exp(masked - jnp.max(masked, -1, keepdims=True)), 0.0)
        total = jnp.sum(e, -1, keepdims=True)
        w = e / jnp.where(total > 0, total, 1.0)
        hits = jnp.sum(joined.astype(jnp.float32))
        weights = jnp.sum(jnp.where(joined[:, None], w, 0.0), 0) / jnp.maximum(hits, 1.0)
        return weights, jnp.any(seen_by & joined[:, None], 0)

    weights, visible = jax.vmap(row)(queries)
    return members, key_members, weights, visible


@eqx.filter_jit
def _layer_routes(attn: MixedAttention, centroids, x, queries):
    heads = attn.routing
    cfg = heads.config
    # The layer's own projections (rotary included).
    qr, kr, _ = attn.project(x)[attn.kinds.index(heads)]
    n = x.shape[1]

    def one(q, k, mu):
        q_hat, k_hat, s_q, s_k = route_scores(q, k, mu, norm=cfg.norm, shared_qk=cfg.shared_qk)
        nearest = nearest_cluster(s_q, jnp.ones((n,), bool))
        return nearest, *head_routes(
            q_hat, k_hat, s_q, s_k, queries, window=min(cfg.window, n),
            assignment=cfg.assignment, causal=heads.causal,
            scale=logit_scale_value(cfg.logit_scale, heads.head_dim), self_mask=cfg.self_mask)

    return jax.vmap(one, in_axes=(1, 1, 0))(qr[0], kr[0], centroids)


def trace_routes(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, " seq"],
    queries: Int[Array, " q"],
) -> list[HeadRoutes]:
    """The routes of every routing head of every layer over `tokens`, with the attention rows
    of the positions `queries`."""
    routes = []
    for layer in layer_inputs(model, state, tokens)[0]:
        attn = layer.attn
        if attn.routing is None:
            continue
        cfg = attn.routing.config
        out = [np.asarray(t) for t in _layer_routes(attn, layer.centroids, layer.x, queries)]
        for h in range(attn.counts.routing):
            nearest, members, key_members, weights, visible = (t[h] for t in out)
            routes.append(HeadRoutes(
                layer=layer.layer, head=h, slot=attn.counts.local + attn.counts.full + h,
                assignment=cfg.assignment, clusters=cfg.clusters,
                window=min(cfg.window, len(tokens)), shared_qk=cfg.shared_qk,
                nearest=nearest, members=members, key_members=key_members,
                queries=np.asarray(queries), weights=weights.astype(np.float32),
                visible=visible))
    return routes


def token_labels(tokenizer, ids: np.ndarray) -> list[str]:
    """A short display string per token. Bytes: a UTF-8 character is shown on its first byte
    and its continuation bytes are shown empty; control bytes and broken UTF-8 as escapes."""
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_labels(bytes(np.asarray(ids, np.uint8)))
    if hasattr(tokenizer, "names"):
        return [tokenizer.names[int(t)] for t in ids]
    return [tokenizer.decode([int(t)]) for t in ids]


_CONTROL = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def _byte_labels(data: bytes) -> list[str]:
    labels, i = [], 0
    while i < len(data):
        b = data[i]
        size = 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
        if size > 1:
            try:
                labels += [data[i: i + size].decode("utf-8")] + [""] * (size - 1)
                i += size
                continue
            except UnicodeDecodeError:
                pass
        c = chr(b)
        labels.append(_CONTROL.get(c, c if 0x20 <= b < 0x7F else f"\\x{b:02x}"))
        i += 1
    return labels


def _names(labels: list[str], ids: np.ndarray) -> list[str]:
    """Labels that are never empty (a continuation byte by its value), for counting."""
    return [label or f"\\x{int(t):02x}" for label, t in zip(labels, ids, strict=True)]


def _colours(k: int) -> list[str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "hsv"]
    rgb = [cmap(i / k if k > 20 else i)[:3] for i in range(k)]
    # Lightened towards white so black text stays readable on every colour.
    return [matplotlib.colors.to_hex([0.45 + 0.55 * c for c in col]) for col in rgb]


def _summary(r: HeadRoutes, names: list[str]) -> dict:
    near = np.bincount(r.nearest, minlength=r.clusters)
    largest = int(np.argmax(near))
    top = Counter(names[p] for p in np.flatnonzero(r.nearest == largest)).most_common(3)
    return {"nearest_counts": near.tolist(), "clusters_used": int(np.sum(near > 0)),
            "no_cluster": float(np.mean(~r.members.any(0))), "largest": largest,
            "largest_top": top}


def summary_line(r: HeadRoutes, names: list[str]) -> str:
    s = _summary(r, names)
    top = " ".join(f"{n!r}({c})" for n, c in s["largest_top"])
    return (f"layer {r.layer} head {r.head} ({r.assignment}, {r.clusters} clusters of "
            f"{r.window}): {s['clusters_used']}/{r.clusters} clusters are some token's nearest, "
            f"{s['no_cluster']:.0%} of tokens in no cluster; largest: cluster {s['largest']} "
            f"({s['nearest_counts'][s['largest']]} tokens: {top})")


_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 70em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd;
        padding: .5em; }
.text span { padding: 1px 0; }
.text span.cont { display: inline-block; min-width: 3px; }
.text span.none { color: #666; }
.text span.multi { outline: 1px dotted #000; }
.text span.unseen { color: #aaa; }
.text span.query { outline: 2px solid #000; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td.tokens { text-align: left; font-family: monospace; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; }
"""


def _span(label: str, cls: list[str], style: str, title: str) -> str:
    if not label:
        cls = [*cls, "cont"]
    attr = f' class="{" ".join(cls)}"' if cls else ""
    text = html.escape(label) + ("\n" if label == "↵" else "")
    return (f'<span{attr} style="{style}" title="{html.escape(title, quote=True)}">{text}'
            "</span>")


def render_html(routes: list[HeadRoutes], labels: list[str], ids: np.ndarray, query: int,
                title: str, sep: str) -> str:
    """The page: per routing head, the text coloured by cluster, a table of the clusters, and
    the query's attention over the text. `sep` goes between tokens (a space for named
    tokens, nothing for bytes)."""
    names = _names(labels, ids)
    q_label = names[query]
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p>{len(ids)} tokens. Colour: the token's nearest centroid; grey with a coloured "
           "underline: in no cluster (a balanced head gives it output 0); dotted box: in "
           "several clusters. Hover a token for its position and clusters. The second copy "
           f"shows the attention of the query at position {query} ({html.escape(repr(q_label))}, "
           "boxed) over the keys it sees; faded tokens are not visible to it.</p>"]
    for r in routes:
        colours = _colours(r.clusters)
        s = _summary(r, names)
        row = int(np.flatnonzero(r.queries == query)[0])
        weights, visible = r.weights[row], r.visible[row]
        out += [f'<section id="l{r.layer}h{r.head}">',
                f"<h2>Layer {r.layer}, routing head {r.head} (head {r.slot} of the layer)</h2>",
                f"<p>{html.escape(summary_line(r, names))}</p>"]
        spans = []
        for p, label in enumerate(labels):
            joined = np.flatnonzero(r.members[:, p]).tolist()
            near = int(r.nearest[p])
            cls, style = [], f"background:{colours[near]}"
            if not joined:
                cls, style = ["none"], (f"background:{NO_CLUSTER};"
                                        f"border-bottom:3px solid {colours[near]}")
            elif len(joined) > 1:
                cls = ["multi"]
            where = (f"in clusters {joined}" if joined else "in no cluster")
            if not r.shared_qk:
                where += f"; as a key in {np.flatnonzero(r.key_members[:, p]).tolist()}"
            spans.append(_span(label, cls, style, f"position {p} {names[p]!r}: nearest "
                               f"cluster {near}, {where}"))
        out += ['<div class="text">' + sep.join(spans) + "</div>",
                "<table><tr><th>cluster</th><th>members</th>"
                + ("<th>keys</th>" if not r.shared_qk else "")
                + "<th>nearest of</th><th>most frequent members</th></tr>"]
        for c in range(r.clusters):
            member = np.flatnonzero(r.members[c])
            top = Counter(names[p] for p in member).most_common(6)
            keys = f"<td>{int(r.key_members[c].sum())}</td>" if not r.shared_qk else ""
            tokens = html.escape("  ".join(f"{n!r}({k})" for n, k in top))
            out.append(f'<tr><td><span class="swatch" style="background:{colours[c]}"></span> '
                       f"{c}</td><td>{len(member)}</td>{keys}<td>{s['nearest_counts'][c]}</td>"
                       f'<td class="tokens">{tokens}</td></tr>')
        out += ["</table>", f"<h3>Attention of position {query} ({html.escape(repr(q_label))})"
                f"</h3>"]
        top = max(float(weights.max()), 1e-12)
        spans = []
        for p, label in enumerate(labels):
            cls = (["query"] if p == query else []) + ([] if visible[p] else ["unseen"])
            alpha = float(weights[p]) / top if visible[p] else 0.0
            info = f"weight {weights[p]:.4f}" if visible[p] else "not visible"
            spans.append(_span(label, cls, f"background:rgba(220,40,20,{alpha:.3f})",
                               f"position {p} {names[p]!r}: {info}"))
        out += ['<div class="text">' + sep.join(spans) + "</div>", "</section>"]
    out.append("</body></html>")
    return "\n".join(out)


def render_png(routes: list[HeadRoutes], query: int, path: Path, title: str) -> None:
    """Per routing head: the sequence as a strip coloured by cluster (tokens in no cluster
    grey), and the query's attention row."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    n = len(routes[0].nearest)
    fig, axes = plt.subplots(2 * len(routes), 1, figsize=(10, 0.6 + 0.8 * len(routes)),
                             dpi=100, squeeze=False)
    for i, r in enumerate(routes):
        rgb = np.asarray([matplotlib.colors.to_rgb(c) for c in _colours(r.clusters)])
        strip = rgb[r.nearest]
        strip[~r.members.any(0)] = matplotlib.colors.to_rgb(NO_CLUSTER)
        row = int(np.flatnonzero(r.queries == query)[0])
        a, b = axes[2 * i, 0], axes[2 * i + 1, 0]
        a.imshow(strip[None], aspect="auto", interpolation="nearest", extent=(-0.5, n - 0.5, 0, 1))
        b.imshow(r.weights[row][None], aspect="auto", interpolation="nearest", cmap="Reds",
                 vmin=0, extent=(-0.5, n - 0.5, 0, 1))
        b.axvline(query, color="k", lw=0.8)
        a.set_ylabel(f"L{r.layer} H{r.head}", rotation=0, ha="right", va="center", fontsize=8)
        b.set_ylabel(f"attn @{query}", rotation=0, ha="right", va="center", fontsize=7)
        for ax in (a, b):
            ax.set_yticks([])
            if ax is not axes[-1, 0]:
                ax.set_xticks([])
    axes[-1, 0].set_xlabel("position")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def routes_json(routes: list[HeadRoutes], ids: np.ndarray, labels: list[str], query: int,
                meta: dict) -> dict:
    """The raw assignments: per head, each position's nearest cluster and memberships, and the
    query's attention row (zero where it sees nothing)."""
    heads = []
    for r in routes:
        row = int(np.flatnonzero(r.queries == query)[0])
        entry = {"layer": r.layer, "head": r.head, "slot": r.slot, "assignment": r.assignment,
                 "clusters": r.clusters, "window": r.window, "shared_qk": r.shared_qk,
                 "nearest": r.nearest.tolist(),
                 "members": [np.flatnonzero(r.members[:, p]).tolist()
                             for p in range(len(ids))],
                 "attention": [float(w) for w in r.weights[row]],
                 "visible": np.flatnonzero(r.visible[row]).tolist()}
        if not r.shared_qk:
            entry["key_members"] = [np.flatnonzero(r.key_members[:, p]).tolist()
                                    for p in range(len(ids))]
        heads.append(entry)
    return {**meta, "query": query, "tokens": [int(t) for t in ids], "labels": labels,
            "heads": heads}


def _tokenizer(spec):
    from rtlib.data.store import StoreError, TokenStore

    try:
        return TokenStore.open(spec.data.path).tokenizer
    except StoreError:  # the store moved or was never here: the model reads bytes by default
        return ByteTokenizer()


def _check_run(spec, run_dir: Path, max_tokens: int | None) -> None:
    if spec.model.kind == "encoder_decoder":
        raise BadArgument(f"{run_dir}: an encoder-decoder run; `rtlib routes` shows the routes "
                          "of a decoder or an encoder only")
    if not any(c.routing for c in spec.model.layer_plan()):
        raise BadArgument(f"{run_dir}: the model has no routing heads (every layer is local or "
                          "full attention), so there are no routes to show")
    seq_len = spec.model.seq_len
    if max_tokens is not None and max_tokens > seq_len:
        raise BadArgument(f"--max-tokens {max_tokens} exceeds the model's seq_len={seq_len}")


def write_routes(run_dir: str | Path, text: str | Path, out_dir: str | Path, *,
                 step: int | None = None, query: int | None = None,
                 max_tokens: int | None = None, print_fn=print) -> list[Path]:
    """`rtlib routes`: writes routes.html, routes.png and routes.json into `out_dir`, prints
    them and one summary line per routing head; returns the paths."""
    from rtlib.spec.load import SpecError, validate_spec
    from rtlib.train.run_dir import SPEC_FILE, load_run

    run_dir, text = Path(run_dir), Path(text)
    if max_tokens is not None and max_tokens < 1:
        raise BadArgument(f"--max-tokens must be >= 1, got {max_tokens}")
    if not text.is_file():
        raise BadArgument(f"--text {text}: no such file")
    # The head mix is in the spec: refuse a model without routing heads before restoring it.
    try:
        saved = validate_spec(yaml.safe_load((run_dir / SPEC_FILE).read_text()),
                              source=str(run_dir / SPEC_FILE))
    except (OSError, SpecError, yaml.YAMLError):
        saved = None  # load_run says what is wrong with the run directory
    if saved is not None:
        _check_run(saved, run_dir, max_tokens)
    spec, ts, step = load_run(run_dir, step)
    _check_run(spec, run_dir, max_tokens)
    limit = max_tokens or spec.model.seq_len
    tokenizer = _tokenizer(spec)
    named = hasattr(tokenizer, "names")
    try:
        ids = tokenizer.encode(text.read_text(encoding="utf-8") if named else text.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise BadArgument(f"--text {text}: {e}") from None
    if len(ids) == 0:
        raise BadArgument(f"--text {text}: the text is empty (no tokens)")
    if int(ids.max()) >= spec.model.vocab_size:
        raise BadArgument(f"--text {text}: token id {int(ids.max())} is outside the model's "
                          f"vocabulary of {spec.model.vocab_size}")
    total, ids = len(ids), np.asarray(ids[:limit], np.int32)
    n = len(ids)
    if query is None:
        query = n - 1
    if not 0 <= query < n:
        raise BadArgument(f"--query {query} is out of range: the text has {n} tokens "
                          f"(positions 0-{n - 1})")
    routes = trace_routes(ts.model, ts.routing, jnp.asarray(ids),
                          jnp.asarray([query], jnp.int32))
    labels = token_labels(tokenizer, ids)
    names = _names(labels, ids)
    title = f"Routes of {run_dir} (step {step}) over {text.name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f for f in FILES]
    paths[0].write_text(render_html(routes, labels, ids, query, title, " " if named else ""),
                        encoding="utf-8")
    render_png(routes, query, paths[1], title)
    meta = {"run_dir": str(run_dir), "step": step, "text": str(text),
            "tokenizer": tokenizer.describe(), "text_tokens": total}
    paths[2].write_text(json.dumps(routes_json(routes, ids, labels, query, meta)) + "\n")
    cut = f" (cut from {total})" if total > n else ""
    print_fn(f"{run_dir} (step {step}): {n} tokens of {text}{cut}; query at position {query} "
             f"{names[query]!r}")
    for r in routes:
        print_fn(summary_line(r, names))
    for p in paths:
        print_fn(f"wrote {p}")
    return paths
