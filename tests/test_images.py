"""Images end to end: per-axis positions (their sum, their validation, cached decoding), the
`shapes` image store (the same store `rtlib data prepare` makes of its images), image-by-image
windows, bits per dim in training, evaluation and plots, and `rtlib generate --image`."""

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs
from PIL import Image

from rtlib import SpecError, load_spec
from rtlib.cli import main
from rtlib.data.images import START, check_axes, draw_shapes, image_tokens
from rtlib.data.pipeline import eval_batches, train_dataset
from rtlib.data.prepare import prepare
from rtlib.data.store import StoreError, TokenStore
from rtlib.data.synth import SynthOptions, synth
from rtlib.errors import BadArgument
from rtlib.nn.layers import AxisPositions
from rtlib.parallel.rules import param_info
from rtlib.runs.images import sample_images, store_image_shape
from rtlib.runs.plot import plot_unit
from rtlib.runs.sample import Sampling
from rtlib.train.loop import train
from rtlib.train.run_dir import load_run

ROOT = Path(__file__).resolve().parent.parent
TINY_CAUSAL = ROOT / "specs" / "tiny-causal.yaml"
SIDE = 8
SHAPE = (SIDE, SIDE, 3)
PIXELS = math.prod(SHAPE)  # 192 bytes an image
# tiny-causal over 8x8 RGB images: local heads of one image row, causal routing (so cached
# decoding is exact), per-axis positions; one spec, so the model's build compiles once
IMAGE_MODEL = [f"model.seq_len={PIXELS}", "model.embedding={positions: axes, axes: [8, 8, 3]}",
               "model.attention.heads.0.window=24", "model.attention.heads.1.window=48",
               "model.routing.init=random"]


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("images") / "shapes")
    synth("shapes", out, SynthOptions(size=SIDE, train=24, valid=4, test=4), progress=False)
    return out


@pytest.fixture(scope="module")
def image_run(shapes_store, tmp_path_factory) -> Path:
    """A tiny image model trained for a step (and evaluated)."""
    run_dir = tmp_path_factory.mktemp("runs") / "images"
    train(load_spec(TINY_CAUSAL, [*IMAGE_MODEL, f"data.path={shapes_store}",
                                  f"run.dir={run_dir}", "train.steps=1", "train.batch_size=4",
                                  "run.log_every=1", "run.eval_every=0", "run.sample_tokens=0",
                                  "data.eval_tokens=400", "mesh.data=1"]),
          progress=False, print_fn=lambda *_: None)
    return run_dir


def test_axis_positions_sum_one_table_per_axis_and_are_declared(getkey, image_run):
    positions = AxisPositions((2, 3, 4), 5, key=getkey(), axes=(None, "embed"))
    w = np.asarray(positions.weight)
    got = np.asarray(positions(jnp.arange(24)))
    for p in range(24):
        r, c, ch = np.unravel_index(p, (2, 3, 4))
        np.testing.assert_allclose(got[p], w[r] + w[2 + c] + w[5 + ch], rtol=1e-6)
    _, ts, _ = load_run(image_run)
    assert ts.model.positions.weight.shape == (8 + 8 + 3, 32)
    info = param_info(ts.model).positions.weight
    assert info.axes == (None, "embed") and not info.decay


@pytest.mark.parametrize(("embedding", "message"), [
    ("{positions: axes}", "needs the grid's axis sizes"),
    ("{positions: axes, axes: [8, 8, 2]}", "[8, 8, 2] hold 128 positions but seq_len is 192"),
    ("{positions: learned, axes: [8, 8, 3]}", "is set but embedding.positions is 'learned'"),
])
def test_axis_positions_are_validated_against_seq_len(embedding, message):
    with pytest.raises(SpecError) as info:
        load_spec(TINY_CAUSAL, [*IMAGE_MODEL, f"model.embedding={embedding}"])
    assert "model.embedding.axes" in str(info.value) and message in str(info.value)


def test_cached_decoding_equals_the_full_forward_with_axis_positions(getkey, image_run):
    _, ts, _ = load_run(image_run)
    model, state = ts.model, ts.routing
    tokens = jax.random.randint(getkey(), (2, PIXELS), 0, 256)
    full, _ = eqx.filter_jit(model)(tokens, state, inference=True)
    prompt = 29  # decoding starts mid-row, mid-pixel
    logits, cache = eqx.filter_jit(model.prefill)(tokens[:, :prompt], state, capacity=PIXELS)
    decode, steps = eqx.filter_jit(model.decode), [logits]
    for t in range(prompt, PIXELS):
        out, cache = decode(tokens[:, t], state, cache)
        steps.append(out[:, None])
    assert max_abs(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_shapes_store_is_an_image_store_as_prepare_writes_it(shapes_store, tmp_path):
    store = TokenStore.open(shapes_store)
    m = store.manifest
    assert m["source"]["kind"] == "images" and m["source"]["image_shape"] == list(SHAPE)
    assert {s: v["documents"] for s, v in m["splits"].items()} == \
        {"train": 24, "valid": 4, "test": 4}
    images = store.read("train", 0, 24 * PIXELS).reshape(24, *SHAPE).astype(np.uint8)
    np.testing.assert_array_equal(images, images[:, ::-1])  # mirrored about the centre line
    assert len({img.tobytes() for img in images}) == 24
    # the same images through `rtlib data prepare`: the same kind of store
    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "pngs" / f"{i:02d}.png")
    prepared = prepare(str(tmp_path / "pngs"), str(tmp_path / "store"), valid=0.0, test=0.0,
                       progress=False)
    for key in ("tokenizer", "dtype", "version", "format"):
        assert prepared[key] == m[key]
    assert {k: prepared["source"][k] for k in ("kind", "image_shape")} == \
        {k: m["source"][k] for k in ("kind", "image_shape")}
    assert prepared["splits"]["train"].keys() == m["splits"]["train"].keys()
    assert prepared["splits"]["train"]["boundaries"] == m["splits"]["train"]["boundaries"]
    # the same options again keep the store
    assert synth("shapes", shapes_store, SynthOptions(size=SIDE, train=24, valid=4, test=4),
                 progress=False) == m
    with pytest.raises(BadArgument, match="--size must be between 4 and 64"):
        synth("shapes", str(tmp_path / "x"), SynthOptions(size=2), progress=False)


def test_an_image_model_reads_one_image_per_window_after_the_start_byte(shapes_store):
    store = TokenStore.open(shapes_store)
    assert image_tokens(store, PIXELS) == PIXELS and image_tokens(store, 64) is None
    images = store.read("valid", 0, 4 * PIXELS).reshape(4, PIXELS)
    batches = list(eval_batches(store, "valid", seq_len=PIXELS, batch_size=3, max_tokens=400))
    tokens, mask, _ = batches[0]
    assert (tokens[:, 0] == START).all()
    np.testing.assert_array_equal(tokens[:2, 1:], images[:2])
    # every byte is a target, the first of each image too: exactly max_tokens of them
    assert int((mask[:, 1:] & mask[:, :-1]).sum()) == 400
    np.testing.assert_array_equal(tokens[2, 1:17], images[2, :16])
    rows = train_dataset(store, "train", seq_len=PIXELS, batch_size=4, seed=0)[0]
    train_images = {img.tobytes() for img in
                    store.read("train", 0, 24 * PIXELS).reshape(24, PIXELS).astype(np.int32)}
    assert all(row[0] == START and row[1:].tobytes() in train_images for row in rows)
    with pytest.raises(StoreError, match=r"its images are \[8, 8, 3\] .*axes is \[4, 4, 3\]"):
        check_axes([4, 4, 3], store)


def test_image_runs_report_bits_per_dim_and_generate_png_grids(image_run, text_store, tmp_path,
                                                              capsys):
    records = [json.loads(line) for line in (image_run / "metrics.jsonl").read_text()
               .splitlines()]
    assert all("bits_per_dim" in r for r in records if r.get("split") in (None, "valid"))
    assert any(r.get("split") == "valid" for r in records) and plot_unit(records) == "dim"
    valid = next(r for r in records if r.get("split") == "valid")
    assert valid["tokens"] == 400 and math.isclose(valid["bits_per_dim"],
                                                    valid["nll"] / math.log(2))
    assert main(["plot", str(image_run)]) == 0

    given = draw_shapes(1, SIDE, np.random.default_rng(9))[0]
    Image.fromarray(given).save(tmp_path / "given.png")
    grid = tmp_path / "samples.png"
    assert main(["generate", str(image_run), "--image", str(grid), "--n", "3",
                 "--prompt-rows", "3", "--from", str(tmp_path / "given.png")]) == 0
    assert "3 completions of the top 3 rows" in capsys.readouterr().out
    with Image.open(grid) as img:  # 2 x 2 tiles of 8 px scaled 8x, 2 px gaps
        assert img.size == (2 * (64 + 2) + 2,) * 2 and img.mode == "RGB"
        first = np.asarray(img)[2:2 + 64, 2:2 + 64][::8, ::8]
    np.testing.assert_array_equal(first[:3], given[:3])  # the given rows are kept

    # unconditional samples: cached and recomputed greedy samples agree
    _, ts, _ = load_run(image_run)
    kw = dict(n=3, sampling=Sampling(temperature=0.0), key=jax.random.key(0))
    cached = sample_images(ts.model, ts.routing, SHAPE, **kw)
    assert cached.shape == (3, *SHAPE) and cached.dtype == np.uint8
    np.testing.assert_array_equal(cached, sample_images(ts.model, ts.routing, SHAPE,
                                                        use_cache=False, **kw))

    with pytest.raises(BadArgument, match="holds no images"):
        store_image_shape(text_store)
    Image.fromarray(given[:4]).save(tmp_path / "small.png")
    for args, message in [
            (["--from", str(tmp_path / "small.png"), "--prompt-rows", "2"],
             "the image is 4x8x3 (rows x cols x channels) but the run's images are 8x8x3"),
            (["--prompt-rows", "8", "--from", str(tmp_path / "given.png")],
             "--prompt-rows must be between 0 and 7"),
            (["--prompt-rows", "2"], "--prompt-rows K and --from FILE go together"),
            (["--prompt", "x"], "--prompt is text")]:
        assert main(["generate", str(image_run), "--image", str(tmp_path / "x.png"),
                     *args]) == 2
        assert message in capsys.readouterr().err
