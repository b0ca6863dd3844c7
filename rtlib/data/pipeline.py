"""grain pipelines over a token store: random training windows, and ordered evaluation windows.

Training: an epoch is the split cut into windows of `seq_len + 1` tokens; each epoch visits them
in a seeded shuffled order (a new order every epoch) and shifts each window by a seeded random
jitter, so every offset can be seen. The global stream is cut into per-process blocks of rows:
global batch s is windows [s * B, (s + 1) * B), and data shard p of P reads rows
[p * B / P, (p + 1) * B / P) of it, so P processes together hold exactly the batch one process
would, row for row. The iterator's state (one integer, the same on every process) goes into
checkpoints.

Stores of fixed-length examples (synthetic tasks, `store.example_tokens`): training windows
start on an example boundary (the jittered start is rounded down to one), and evaluation scores
each example in its own window, so no answer is ever cut from the context that makes it
predictable. Image stores read by a model of one image's `seq_len` (`rtlib.data.images`): every
window is the start byte and one whole image, all of whose bytes are targets.
"""

from collections.abc import Iterator

import grain
import numpy as np

from rtlib.data.images import START, image_tokens
from rtlib.data.store import StoreError, TokenStore


def train_dataset(store: TokenStore, split: str, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  answers: bool = False) -> grain.MapDataset:
    """Batches of int32 [batch_size // process_count, seq_len + 1]: this data shard's rows of
    every global batch (`process_index` / `process_count` count data shards, see
    `rtlib.parallel.data_shard`). With `answers`, int32 [rows, 2, seq_len + 1]: the tokens and
    the store's answer mask (0/1)."""
    if answers and not store.has_answers(split):
        raise StoreError(f"{store.location}: split {split!r} has no answer mask (only "
                         "`rtlib data synth` stores do): train.loss_on: answers needs one")
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} is not divisible by {process_count} "
                         "processes")
    span = seq_len + 1
    total = store.num_tokens(split)
    image = image_tokens(store, seq_len)
    if total < (image or span):
        raise StoreError(f"{store.location}: split {split!r} has {total} tokens, fewer than "
                         f"seq_len + 1 = {span}: use a larger corpus or a shorter seq_len")
    windows = total // (image or span)
    last = total - span
    example = _example_tokens(store, seq_len)
    if example:
        last = last // example * example

    def read(window: int, rng: np.random.Generator) -> np.ndarray:
        if image:
            pixels = store.read(split, window * image, (window + 1) * image)
            return np.concatenate([np.asarray([START], np.int32), pixels])
        start = min(window * span + int(rng.integers(0, span)), last)
        if example:
            start = start // example * example
        tokens = store.read(split, start, start + span)
        if not answers:
            return tokens
        return np.stack([tokens, store.read_answers(split, start, start + span).astype(np.int32)])

    return (grain.MapDataset.range(windows)
            .shuffle(seed=seed)
            .repeat()
            .random_map(read, seed=seed + 1)  # before sharding: jitter keyed by global index
            .batch(batch_size // process_count, drop_remainder=True)
            [process_index::process_count])  # lazy: a shard reads only its own blocks


def train_iterator(dataset: grain.MapDataset, *, threads: int, prefetch: int):
    """A checkpointable iterator (`get_state` / `set_state`)."""
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                          prefetch_buffer_size=prefetch)))


def _example_tokens(store: TokenStore, seq_len: int) -> int | None:
    example = store.example_tokens
    if example and example > seq_len + 1:
        raise StoreError(f"{store.location}: its examples are {example} tokens long, more than "
                         f"model.seq_len + 1 = {seq_len + 1}: set model.seq_len >= "
                         f"{example - 1}")
    return example


def eval_batches(store: TokenStore, split: str, *, seq_len: int, batch_size: int,
                 max_tokens: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Consecutive windows scoring every target token of the split's first `max_tokens + 1`
    tokens exactly once: (tokens int32 [batch, seq_len + 1], mask bool [batch, seq_len + 1],
    answers bool [batch, seq_len + 1]: the store's answer mask, all False without one).
    The last window and the last batch are padded; padding is masked out. In a store of
    fixed-length examples each window is one example (its first token, `<bos>`, is never a
    target); in an image store read image by image, the start byte and one image (every byte
    of it a target)."""
    example = _example_tokens(store, seq_len)
    image = image_tokens(store, seq_len)
    lead = 1 if image else 0  # tokens in front of the store's: the start byte of an image
    total = store.num_tokens(split)
    if max_tokens is not None:
        total = min(total, max_tokens + 1 - lead)
    if total < 2 - lead:
        raise StoreError(f"{store.location}: split {split!r} has {total} tokens: nothing to "
                         "evaluate")
    step, length = ((image, image) if image else (example, example) if example else
                    (seq_len, seq_len + 1))
    starts = list(range(0, total - 1 + lead, step))
    for b in range(0, len(starts), batch_size):
        tokens = np.zeros((batch_size, seq_len + 1), np.int32)
        mask = np.zeros((batch_size, seq_len + 1), bool)
        answers = np.zeros((batch_size, seq_len + 1), bool)
        for row, start in enumerate(starts[b:b + batch_size]):
            stop = min(start + length, total)
            piece = store.read(split, start, stop)
            tokens[row, :lead] = START
            tokens[row, lead:lead + len(piece)] = piece
            mask[row, :lead + len(piece)] = True
            if store.has_answers(split):
                answers[row, lead:lead + len(piece)] = store.read_answers(split, start, stop)
        yield tokens, mask, answers
