"""`rtlib data synth`: synthetic long-range tasks written as ordinary token stores.

Every example is one document of exactly `length` tokens, starting with `<bos>`; the store
records `example_tokens`, so training windows start on example boundaries and evaluation scores
each example in its own window. Each split also holds an **answer mask** (`SPLIT.answers.zarr`,
1 where the token is an answer the task asks for); `rtlib eval` and training evaluation report
`answer_accuracy` (greedy) and `answer_nll` over those positions.

- `recall`: multi-query associative recall (Zoology's MQAR). `pairs` key/value pairs, then
  distractor filler, then `queries` queries of keys drawn with replacement, each followed by
  its value (the answer). Every query is more than `length - 1 - 2 * (pairs + queries)`
  tokens after its pair.
- `copy`: induction copy. A span of distinct content tokens at a random position, filler, then
  `<copy>` and the span again; the answers are the copy's tokens after its first, predictable
  only by finding the previous occurrence of the current token (the distance varies, so no
  fixed offset does it).
- `reverse`: not a token task but (source, target) pairs for encoder-decoders, written as a
  paired store (`rtlib.data.paired`): a line of letters and the same line reversed.
- `shapes`: not a token task but an image set (`rtlib.data.images`): mirrored shapes, written as
  `rtlib data prepare` writes images (byte tokens, no answer mask, no `example_tokens`).

Ids: specials first, then named ranges (`k0..`, `v0..`, `c0..`, `f0..`); the vocabulary must fit
a uint8 store (256 ids). Seeded: each split has its own stream, so the validation and test
examples do not depend on how many training examples are asked for.
"""

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from rtlib.data.images import ShapesOptions, synth_shapes
from rtlib.data.store import (
    ANSWERS,
    FORMAT,
    SPLITS,
    VERSION,
    begin_write,
    check_target,
    finish_write,
    keep_existing,
    open_kvstore,
    split_array,
    wait,
)
from rtlib.data.tokenizer import SyntheticTokenizer
from rtlib.errors import BadArgument

TASKS = ("recall", "copy", "shapes", "reverse")


@dataclass(frozen=True)
class SynthOptions:
    """Sizes of a synthetic task's examples and splits (the flags of `rtlib data synth`);
    each field applies to the task named in its comment."""

    length: int = 513  # tokens per example, <bos> included (a model with seq_len 512)
    pairs: int = 16  # recall: key/value pairs per example
    queries: int | None = None  # recall: queries per example (default: pairs)
    keys: int = 64  # recall: key vocabulary
    values: int = 64  # recall: value vocabulary
    span: int = 32  # copy: tokens copied
    content: int = 64  # copy: content vocabulary (span tokens are distinct)
    min_gap: int = 128  # copy: filler tokens at least between the span and its copy
    filler: int = 64  # distractor vocabulary
    train: int = 4096  # examples per split
    valid: int = 256
    test: int = 256
    seed: int = 0
    size: int = 16  # shapes: image side in pixels
    chars: int = 12  # reverse: at most this many letters per line


def tokenizer_for(task: str, o: SynthOptions) -> SyntheticTokenizer:
    """The named vocabulary of `task` with the options' range sizes."""
    if task == "recall":
        return SyntheticTokenizer(["bos"], {"k": o.keys, "v": o.values, "f": o.filler})
    return SyntheticTokenizer(["bos", "copy"], {"c": o.content, "f": o.filler})


def check_options(task: str, o: SynthOptions) -> None:
    """Every problem with the options, as one BadArgument naming the flags."""
    if task not in TASKS:
        raise BadArgument(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "shapes":
        return _shapes_options(o).check()
    if task == "reverse":
        return _reverse_options(o).check()
    problems = []
    positive = ["length", "filler", "train"] + (
        ["pairs", "keys", "values"] if task == "recall" else ["span", "content"])
    for name in positive:
        if getattr(o, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.queries is not None and o.queries < 1:
        problems.append(f"--queries must be >= 1, got {o.queries}")
    for name in ("valid", "test", "min_gap"):
        if getattr(o, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(o, name)}")
    if not problems:
        if task == "recall":
            if o.pairs > o.keys:
                problems.append(f"--pairs {o.pairs} needs at least as many --keys (distinct "
                                f"keys per example), got {o.keys}")
            need = 2 + 2 * (o.pairs + (o.queries or o.pairs))
            if need > o.length:
                problems.append(f"--length {o.length} leaves no filler between {o.pairs} pairs "
                                f"and their queries: need at least {need}")
        else:
            if o.span > o.content:
                problems.append(f"--span {o.span} needs at least as many --content tokens "
                                f"(distinct per span), got {o.content}")
            need = 2 + 2 * o.span + o.min_gap
            if need > o.length:
                problems.append(f"--length {o.length} cannot hold <bos>, a span of {o.span}, "
                                f"--min-gap {o.min_gap}, <copy> and the copy: need {need}")
        try:
            tokenizer_for(task, o)
        except ValueError as e:
            problems.append(f"{e}: lower --keys/--values/--content/--filler")
    if problems:
        raise BadArgument("; ".join(problems))


def generate(task: str, o: SynthOptions, n: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples: tokens int32 [n, length] and answers bool [n, length]."""
    tok = tokenizer_for(task, o)
    L = o.length
    tokens = (rng.integers(0, o.filler, (n, L)) + tok.first("f")).astype(np.int32)
    tokens[:, 0] = tok.first("bos")
    answers = np.zeros((n, L), bool)
    rows = np.arange(n)[:, None]
    if task == "recall":
        P = o.pairs
        keys = np.argsort(rng.random((n, o.keys)), axis=1)[:, :P] + tok.first("k")
        values = rng.integers(0, o.values, (n, P)) + tok.first("v")
        tokens[:, 1:1 + 2 * P:2], tokens[:, 2:2 + 2 * P:2] = keys, values
        # Queries draw keys with replacement: a permutation would let a model that has not
        # learnt recall eliminate the values already asked for (about H_P / P right by chance).
        Q = o.queries or P
        order = rng.integers(0, P, (n, Q))
        q = L - 2 * Q
        tokens[:, q::2], tokens[:, q + 1::2] = keys[rows, order], values[rows, order]
        answers[:, q + 1::2] = True
    else:
        S = o.span
        span = np.argsort(rng.random((n, o.content)), axis=1)[:, :S] + tok.first("c")
        copy_at = L - S  # the copy fills the last S tokens, after <copy>
        latest = copy_at - 1 - o.min_gap - S  # the last start that keeps the gap
        start = rng.integers(1, latest + 1, n)
        tokens[rows, start[:, None] + np.arange(S)] = span
        tokens[:, copy_at - 1] = tok.first("copy")
        tokens[:, copy_at:] = span
        answers[:, copy_at + 1:] = True
    return tokens, answers


def describe_task(task: str, o: SynthOptions) -> dict:
    """Facts about the task's geometry that a study needs (written into the manifest)."""
    if task == "recall":
        Q = o.queries or o.pairs
        gap = o.length - 1 - 2 * (o.pairs + Q)
        return {"answers_per_example": Q, "min_distance": gap + 2,
                "chance_accuracy": 1 / o.values}
    return {"answers_per_example": o.span - 1, "min_distance": o.min_gap + o.span + 1,
            "chance_accuracy": 1 / o.content}


def synth(task: str, out: str, options: SynthOptions = SynthOptions(), *, force: bool = False,
          progress: bool = True) -> dict:
    """Write the task's token store at `out`; returns the manifest. The same task and options
    again keep an existing store; another store is only replaced with `force`."""
    check_options(task, options)
    if task == "shapes":
        return synth_shapes(out, _shapes_options(options), force=force, progress=progress)
    if task == "reverse":  # a paired store, for encoder-decoders (`rtlib.data.paired`)
        from rtlib.data.paired import synth_reverse

        return synth_reverse(out, _reverse_options(options), force=force, progress=progress)
    tok = tokenizer_for(task, options)
    settings = {"task": task, **asdict(options)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    kv = open_kvstore(out)
    old = check_target(out, kv, force=force)
    same = old is not None and old.get("source", {}).get("sha256") == digest
    if (kept := keep_existing(out, old, same=same, force=force,
                              what="source or settings")):
        return kept
    begin_write(out, kv)  # an interrupted write leaves no manifest
    counts = {"train": options.train, "valid": options.valid, "test": options.test}
    L = options.length
    splits = {}
    with tqdm(total=sum(counts.values()), desc=f"synth {task}", unit="example",
              disable=not progress) as bar:
        for index, split in enumerate(SPLITS):
            n = counts[split]
            if n == 0:
                continue
            tokens_arr = split_array(out, split, create_shape=n * L, dtype=tok.dtype)
            answers_arr = split_array(out, f"{split}.{ANSWERS}", create_shape=n * L,
                                      dtype=np.uint8)
            rng = np.random.default_rng([options.seed, index])
            block = max(1, (1 << 20) // L)  # examples per write: about 1 M tokens
            total_answers = 0
            for first in range(0, n, block):
                m = min(block, n - first)
                tokens, answers = generate(task, options, m, rng)
                wait(tokens_arr[first * L:(first + m) * L].write(
                    tokens.reshape(-1).astype(tok.dtype)), out, "write the arrays")
                wait(answers_arr[first * L:(first + m) * L].write(
                    answers.reshape(-1).astype(np.uint8)), out, "write the arrays")
                total_answers += int(answers.sum())
                bar.update(m)
            splits[split] = {"tokens": n * L, "documents": n,
                             "boundaries": list(range(0, n * L, L)), "answers": total_answers}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokenizer": tok.describe(), "dtype": np.dtype(tok.dtype).name,
        "source": {"kind": "synthetic", "task": task, "settings": settings,
                   **describe_task(task, options), "sha256": digest},
        "split": {"by": "example", "seed": options.seed},
        "example_tokens": L,
        "splits": splits,
    }
    finish_write(out, kv, manifest)
    return manifest


def _shapes_options(o: SynthOptions) -> ShapesOptions:
    return ShapesOptions(size=o.size, train=o.train, valid=o.valid, test=o.test, seed=o.seed)


def _reverse_options(o: SynthOptions):
    from rtlib.data.paired import ReverseOptions

    return ReverseOptions(chars=o.chars, train=o.train, valid=o.valid, test=o.test, seed=o.seed)
