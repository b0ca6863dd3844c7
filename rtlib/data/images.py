"""Image stores: what makes a token store one (`image_shape`), how a model reads it (one image
per window, after a start byte), and `shapes`, a procedurally generated image set that needs no
download (`rtlib data synth shapes OUT`).

An image store holds each image as one document of channel bytes, row-major (rows, columns,
channels), as `rtlib data prepare` writes a directory of PNG/JPEG files or an `.npy` array. A
model whose `seq_len` is exactly one image's bytes reads it image by image: each window is
`START` followed by the image, so every one of its bytes is a target (the paper's bits/dim
scores them all) and position i always holds the byte before channel byte i (a byte vocabulary
has no spare id for a start token; the model tells the start byte from a pixel by its
position, which is always 0). Any other `seq_len` reads the store as running bytes, like text.

`shapes`: on a background colour, one to three filled rectangles, discs and triangles and one
to six single-pixel dots in other colours of a small palette, with the lower half the mirror
image of the upper half (a reflection). Only the upper half is new information: a lower pixel
repeats the one as many rows above the centre line as it is below it, up to a whole image away
in the sequence, which no local window of a few rows sees (the long-range structure a routing
head can find; the dots can be predicted in no other way).
"""

import datetime
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from rtlib.data.store import (
    FORMAT,
    SPLITS,
    VERSION,
    TokenStore,
    begin_write,
    check_target,
    finish_write,
    keep_existing,
    open_kvstore,
    split_array,
    wait,
)
from rtlib.data.tokenizer import ByteTokenizer
from rtlib.errors import BadArgument, StoreError

START = 0  # the byte before each image in a model's window (position 0)

# Distinct, saturated colours: sharp edges, and a pixel's three bytes pin down its colour.
PALETTE = np.array([
    [0, 0, 0], [255, 255, 255], [220, 40, 40], [40, 170, 60], [40, 80, 220], [250, 210, 40],
    [40, 200, 210], [200, 60, 190], [250, 140, 30], [120, 120, 120]], np.uint8)
MAX_SIZE = 64  # sides above this make sequences no model in this repository trains on


def image_shape(manifest: dict) -> tuple[int, ...] | None:
    """(rows, cols, channels) of the images of a store's manifest; None for other stores."""
    source = manifest.get("source", {})
    if source.get("kind") != "images":
        return None
    return tuple(int(x) for x in source["image_shape"])


def image_tokens(store: TokenStore, seq_len: int) -> int | None:
    """Bytes per image when `store` holds images and a window of `seq_len` is exactly one of
    them (then windows are `START` + one image); None when it is read as running bytes."""
    shape = image_shape(store.manifest)
    if shape is None or math.prod(shape) != seq_len:
        return None
    return seq_len


def check_axes(axes: tuple[int, ...] | list[int] | None, store: TokenStore) -> None:
    """StoreError unless a model with per-axis positions `axes` (None: other positions) reads
    a store of images of exactly that shape: its positions would mean nothing otherwise."""
    if axes is None:
        return
    shape = image_shape(store.manifest)
    if shape is None:
        raise StoreError(f"{store.location}: model.embedding.axes {list(axes)} describe images, "
                         "but this store holds no images (`rtlib data prepare IMAGES OUT`, or "
                         "`rtlib data synth shapes OUT`, makes one)")
    if tuple(axes) != shape:
        raise StoreError(f"{store.location}: its images are {list(shape)} (rows, cols, "
                         f"channels) but model.embedding.axes is {list(axes)}: they must agree")


@dataclass(frozen=True)
class ShapesOptions:
    """The settings of a `shapes` image set."""

    size: int = 16  # image side in pixels (RGB: 3 x size^2 bytes per image)
    train: int = 4096  # images per split
    valid: int = 256
    test: int = 256
    seed: int = 0

    def check(self) -> None:
        """Every problem as one BadArgument naming the flags."""
        problems = []
        if not 4 <= self.size <= MAX_SIZE:
            problems.append(f"--size must be between 4 and {MAX_SIZE}, got {self.size}")
        if self.train < 1:
            problems.append(f"--train must be >= 1, got {self.train}")
        problems += [f"--{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("valid", "test") if getattr(self, name) < 0]
        if problems:
            raise BadArgument("; ".join(problems))


def draw_shapes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`n` images, uint8 [n, size, size, 3]: shapes and dots on a background, mirrored about
    the horizontal centre line."""
    rows, cols = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        colours = rng.permutation(len(PALETTE))  # background first; shapes differ from it
        canvas = np.full((size, size), colours[0])
        for colour in colours[1:1 + rng.integers(1, 4)]:
            cy, cx = rng.integers(0, size, 2)
            half = rng.integers(max(1, size // 8), max(2, size // 3) + 1, 2)
            kind = rng.integers(3)
            if kind == 0:  # rectangle
                inside = (abs(rows - cy) <= half[0]) & (abs(cols - cx) <= half[1])
            elif kind == 1:  # disc
                inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= half[0] ** 2
            else:  # triangle, apex up
                inside = (rows >= cy - half[0]) & (rows <= cy + half[0]) & \
                    (abs(cols - cx) <= (rows - cy + half[0]) * half[1] / (2 * half[0]))
            canvas[inside] = colour
        top = (size + 1) // 2
        for _ in range(rng.integers(1, 7)):  # single-pixel dots: guessable only from the mirror
            canvas[rng.integers(0, top), rng.integers(0, size)] = rng.choice(colours[1:])
        canvas[size - top:] = canvas[:top][::-1]  # the reflection
        images[i] = PALETTE[canvas]
    return images


def synth_shapes(out: str, options: ShapesOptions = ShapesOptions(), *, force: bool = False,
                 progress: bool = True) -> dict:
    """Write a `shapes` image store at `out`; returns its manifest, which is that of
    `rtlib data prepare` on a directory of such images (source kind `images`, `image_shape`,
    byte tokenizer, one document per image) apart from saying how the images were made. The
    same options again keep an existing store; another store is only replaced with `force`."""
    options.check()
    settings = {"generator": "shapes", "size": options.size, "train": options.train,
                "valid": options.valid, "test": options.test, "seed": options.seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    kv = open_kvstore(out)
    old = check_target(out, kv, force=force)
    same = old is not None and old.get("source", {}).get("sha256") == digest
    if (kept := keep_existing(out, old, same=same, force=force, what="source or settings")):
        return kept
    begin_write(out, kv)  # an interrupted write leaves no manifest
    tokenizer = ByteTokenizer()
    shape = [options.size, options.size, 3]
    n_bytes = math.prod(shape)
    counts = {"train": options.train, "valid": options.valid, "test": options.test}
    splits = {}
    with tqdm(total=sum(counts.values()), desc="synth shapes", unit="image",
              disable=not progress) as bar:
        for index, split in enumerate(SPLITS):
            n = counts[split]
            if n == 0:
                continue
            array = split_array(out, split, create_shape=n * n_bytes, dtype=tokenizer.dtype)
            rng = np.random.default_rng([options.seed, index])  # a split's own stream
            block = max(1, (1 << 20) // n_bytes)  # images per write: about 1 MiB
            for first in range(0, n, block):
                m = min(block, n - first)
                data = draw_shapes(m, options.size, rng).reshape(-1)
                wait(array[first * n_bytes:(first + m) * n_bytes].write(data), out,
                     "write the arrays")
                bar.update(m)
            splits[split] = {"tokens": n * n_bytes, "bytes": n * n_bytes, "documents": n,
                             "boundaries": list(range(0, n * n_bytes, n_bytes))}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokenizer": tokenizer.describe(), "dtype": np.dtype(tokenizer.dtype).name,
        "source": {"kind": "images", "generator": "shapes", "settings": settings,
                   "image_shape": shape, "documents": sum(counts.values()), "sha256": digest},
        "split": {"by": "generated", "seed": options.seed},
        "splits": splits,
    }
    finish_write(out, kv, manifest)
    return manifest
