"""Images from a trained image model: unconditional samples, or completions of the top rows of a
given image, drawn as a batch and written as one PNG grid (`rtlib generate RUN --image OUT.png`).

A window of an image model is the start byte and one image (`rtlib.data.images`), so a sample
starts from the start byte (plus the given rows) and draws every remaining channel byte. The
whole loop, one token for every image of the batch per step, is one compiled program: with the
decoding cache (default) one `model.decode` per step, without it a full pass per step over a
buffer of the image's length, whose unwritten tail is masked out.
"""

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from rtlib.data.images import START, image_shape
from rtlib.data.store import existing_manifest
from rtlib.errors import BadArgument
from rtlib.nn.model import RoutingTransformer
from rtlib.routing import RoutingState
from rtlib.runs.sample import Sampling, pick


def store_image_shape(location: str) -> tuple[int, ...]:
    """The image shape of the store at `location` (a run's `data.path`); BadArgument for a
    store of anything but images."""
    manifest = existing_manifest(location)
    if manifest is None:
        raise BadArgument(f"--image: the run's token store {location} is missing, so the shape "
                          "of its images is unknown")
    shape = image_shape(manifest)
    if shape is None:
        kind = manifest.get("source", {}).get("kind", "unknown")
        raise BadArgument(f"--image: the run was trained on {location}, which holds no images "
                          f"(source kind {kind!r}); --image draws samples of image models only "
                          "(stores of `rtlib data prepare IMAGES` or `rtlib data synth shapes`)")
    return shape


def read_image(path: str | Path, shape: tuple[int, ...]) -> UInt8[np.ndarray, "..."]:
    """A PNG/JPEG file as uint8 of `shape` (rows, cols[, channels]); BadArgument when it cannot
    be read or has another shape (images are not resized: a model knows one size)."""
    from PIL import Image, UnidentifiedImageError

    channels = shape[2] if len(shape) == 3 else 1
    if channels not in (1, 3):
        raise BadArgument(f"--from: images of {channels} channels cannot be read from a file "
                          "(RGB or greyscale only)")
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB" if channels == 3 else "L"), np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise BadArgument(f"--from {path}: cannot read as an image: {e}") from None
    if len(shape) == 3 and channels == 1:  # greyscale stores of [N, H, W, 1] arrays
        pixels = pixels[..., None]
    if pixels.shape != tuple(shape):
        raise BadArgument(f"--from {path}: the image is {'x'.join(map(str, pixels.shape))} "
                          f"(rows x cols x channels) but the run's images are "
                          f"{'x'.join(map(str, shape))}")
    return pixels


def sample_images(model: RoutingTransformer, routing: RoutingState, shape: tuple[int, ...], *,
                  n: int, sampling: Sampling, key: PRNGKeyArray, prompt_rows: int = 0,
                  image: np.ndarray | None = None, use_cache: bool = True
                  ) -> UInt8[np.ndarray, "n ..."]:
    """`n` images of `shape`: unconditional, or (`prompt_rows` K > 0) completions of the top K
    rows of `image`, which every sample keeps. Sampling as `rtlib.runs.sample.generate`."""
    size = math.prod(shape)
    if not model.causal:
        raise BadArgument("image samples need a decoder (model.kind: decoder)")
    if model.seq_len != size:
        raise BadArgument(f"the model's seq_len {model.seq_len} is not one image of "
                          f"{'x'.join(map(str, shape))} = {size} bytes: it was trained on the "
                          "images as running bytes, not image by image")
    if n < 1:
        raise BadArgument(f"--n must be >= 1, got {n}")
    if not 0 <= prompt_rows < shape[0]:
        raise BadArgument(f"--prompt-rows must be between 0 and {shape[0] - 1} (the image has "
                          f"{shape[0]} rows), got {prompt_rows}")
    if prompt_rows and image is None:
        raise BadArgument("--prompt-rows needs an image to complete (--from FILE)")
    sampling.check(min(model.embed.weight.shape[0], 256))
    given = np.zeros(0, np.int32) if not prompt_rows else \
        np.asarray(image, np.int32)[:prompt_rows].reshape(-1)
    prompt = np.tile(np.concatenate([[START], given]).astype(np.int32), (n, 1))
    run = _sample_cached if use_cache else _sample_recomputed
    out = run(model, routing, jnp.asarray(prompt), key,
              jnp.asarray(sampling.temperature, jnp.float32), top_k=sampling.top_k,
              top_p=sampling.top_p)
    pixels = np.concatenate([given[None].repeat(n, 0), np.asarray(out)], axis=1)
    return pixels.astype(np.uint8).reshape((n, *shape))


def _choose(logits: Float[Array, "n vocab"], key: PRNGKeyArray, temperature: Float[Array, ""],
            top_k: int | None, top_p: float | None) -> Int[Array, " n"]:
    keys = jax.random.split(key, logits.shape[0])
    return jax.vmap(lambda lg, k: pick(lg, k, temperature, top_k=top_k, top_p=top_p,
                                       vocab_limit=256))(logits, keys)


@eqx.filter_jit
def _sample_cached(model: RoutingTransformer, routing: RoutingState,
                   prompt: Int[Array, "n prompt"], key: PRNGKeyArray,
                   temperature: Float[Array, ""], *, top_k: int | None, top_p: float | None
                   ) -> Int[Array, "n new"]:
    """The bytes after the prompt up to a whole image: prefill, then one decode per byte (the
    last byte drawn is not fed back: its position would be past the image)."""
    new = model.seq_len + 1 - prompt.shape[1]
    logits, cache = model.prefill(prompt, routing, capacity=model.seq_len)
    keys = jax.random.split(key, new)

    def step(carry, k):
        logits, cache = carry
        token = _choose(logits, k, temperature, top_k, top_p)
        logits, cache = model.decode(token, routing, cache)
        return (logits, cache), token

    (logits, _), tokens = jax.lax.scan(step, (logits[:, -1], cache), keys[:-1])
    last = _choose(logits, keys[-1], temperature, top_k, top_p)
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


@eqx.filter_jit
def _sample_recomputed(model: RoutingTransformer, routing: RoutingState,
                       prompt: Int[Array, "n prompt"], key: PRNGKeyArray,
                       temperature: Float[Array, ""], *, top_k: int | None,
                       top_p: float | None) -> Int[Array, "n new"]:
    """As `_sample_cached`, recomputing the whole (masked) image for every byte: strictly
    causal for every head kind, balanced routing included."""
    n, p = prompt.shape
    length = model.seq_len
    buf = jnp.zeros((n, length + 1), jnp.int32).at[:, :p].set(prompt)
    keys = jax.random.split(key, length + 1 - p)

    def step(buf, xs):
        t, k = xs  # the logits at input t give byte t + 1
        seen = jnp.broadcast_to(jnp.arange(length)[None] <= t, (n, length))
        logits, _ = model(buf[:, :length], routing, mask=seen, inference=True)
        token = _choose(logits[:, t], k, temperature, top_k, top_p)
        return buf.at[:, t + 1].set(token), None

    buf, _ = jax.lax.scan(step, buf, (jnp.arange(p - 1, length), keys))
    return buf[:, p:]


def save_grid(images: UInt8[np.ndarray, "n ..."], path: str | Path, *, min_side: int = 64,
              gap: int = 2) -> Path:
    """The images as one PNG grid (as square as possible, `gap` white pixels between tiles),
    each scaled up by a whole factor (nearest neighbour: pixels stay sharp) to at least
    `min_side` pixels."""
    from PIL import Image

    images = np.asarray(images, np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n, h, w = images.shape[:3]
    scale = max(1, -(-min_side // max(h, w)))
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    th, tw = h * scale, w * scale
    grid = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, *images.shape[3:]), 255,
                   np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[gap + r * (th + gap):gap + r * (th + gap) + th,
             gap + c * (tw + gap):gap + c * (tw + gap) + tw] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
