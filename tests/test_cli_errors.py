"""Every failure the outside world can cause is one line and the right exit code, never a
traceback: a sweep of bad specs, arguments and files through `rtlib.cli.main`, and the library's
own argument checks (issue 18, items 4, 7 and 8)."""

from pathlib import Path

import jax.numpy as jnp
import pytest

from rtlib import KMeansState, kmeans_update, load_spec
from rtlib.attention.core import check_inputs
from rtlib.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "specs" / "tiny.yaml")
SMALL = str(ROOT / "specs" / "small.yaml")


@pytest.fixture(scope="module")
def tiny_run(text_store, tmp_path_factory) -> str:
    """A run of two steps: enough for eval and generate to have a checkpoint."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", TINY, "train.steps=2", "train.batch_size=8", "run.eval_every=0",
                 "run.sample_tokens=0", "data.eval_tokens=256", f"data.path={text_store}",
                 f"run.dir={run_dir}", "--no-progress"])
    assert code == 0
    return str(run_dir)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of one command; an exception escaping main fails the test."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def binary_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("specs") / "binary.yaml"
    path.write_bytes(b"model:\x82\xff\x00 garbage")
    return str(path)


SPEC_CASES = [
    # (argv after the spec, exit code, words the message must contain)
    (["model.attention.heads.1.clusters=1000000000"], 2, "less than or equal to 65536"),
    (["model.n_layers=1000000"], 2, "model.n_layers"),
    (["model.seq_len=100000000"], 2, "model.seq_len"),
    (["train.lr=.inf"], 2, "train.lr: Input should be a finite number"),
    (["train.lr=.nan"], 2, "train.lr"),
    (["model.seq_len.x=3"], 2, "model.seq_len is a value (2048), not a section"),
]


@pytest.mark.parametrize("extra,code,words", SPEC_CASES)
def test_bad_specs_fail_validation_with_the_key(extra, code, words, capsys):
    got, err = run_cli(["validate", SMALL, *extra], capsys)
    assert got == code and words in err, err


def test_a_spec_that_is_not_text_or_not_a_file_is_a_spec_error(binary_spec, tmp_path, capsys):
    got, err = run_cli(["validate", binary_spec], capsys)
    assert got == 2 and "not a text (UTF-8) file" in err
    got, err = run_cli(["validate", str(tmp_path)], capsys)
    assert got == 2 and "cannot read spec file" in err


def test_an_encoder_needs_a_mask_id_of_its_own_and_validate_names_its_objective(
        tmp_path, capsys, text_store):
    # tiny.yaml's 256 ids are all bytes: the default mask id (the last) is a token of the data
    got, err = run_cli(["train", TINY, "model.kind=encoder", f"data.path={text_store}",
                        f"run.dir={tmp_path / 'r'}", "--no-progress"], capsys)
    assert got == 1 and "train.mlm.mask_id=255 is a token of the data" in err
    assert main(["validate", TINY, "model.kind=encoder"]) == 0
    assert "objective: mlm" in capsys.readouterr().out


def test_training_more_than_the_machine_holds_is_refused_before_allocating(tmp_path, capsys):
    # 4096 layers of width 4096: ~0.8 trillion parameters, ~12,000 GiB with optimiser state
    got, err = run_cli(["train", TINY, "model.n_layers=4096", "model.d_model=4096",
                        "model.feed_forward.hidden=16384", f"run.dir={tmp_path / 'r'}",
                        "--no-progress"], capsys)
    assert got == 2 and "GiB" in err and "this machine has" in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_generate_and_eval_arguments(tiny_run, capsys):
    got, _ = run_cli(["generate", tiny_run, "--prompt", "\udcff", "--max-new-tokens", "2"],
                     capsys)  # a non-UTF-8 byte on the command line: sent as that byte
    assert got == 0
    got, err = run_cli(["generate", tiny_run, "--prompt", "ab", "--seed", str(10**20)], capsys)
    assert got == 2 and "--seed must fit in 64 bits" in err
    got, err = run_cli(["generate", tiny_run, "--prompt", "ab", "--max-new-tokens",
                        str(10**9)], capsys)
    assert got == 2 and "Reduce --max-new-tokens" in err
    got, err = run_cli(["eval", tiny_run, "--batch-size", str(10**8)], capsys)
    assert got == 2 and "Reduce --batch-size" in err


# ---- the library checks its arguments up front ---------------------------------------------

Q = jnp.zeros((1, 8, 2, 4))
MU = jnp.ones((2, 2, 4))


@pytest.mark.parametrize("args,masks,words", [
    ((Q, Q[:, :4], Q), {}, "k has shape (1, 4, 2, 4); it must match q's (1, 8, 2, 4)"),
    ((Q, Q, Q.astype(jnp.int32)), {}, "v must be a floating-point array, got int32"),
    ((Q[0], None, Q), {}, "q must be [batch, seq, heads, dim], got shape (8, 2, 4)"),
    ((Q, None, Q[:, :, :1]), {}, "v has shape (1, 8, 1, 4)"),
    ((Q, Q, Q), {"q_mask": jnp.ones((1, 7), bool)}, "q_mask must be [batch, seq] = (1, 8)"),
])
def test_attention_inputs_are_checked_with_their_names(args, masks, words):
    """The check every attention entry point runs first (under the test suite's runtime type
    checker, jaxtyping catches most of these even earlier, at the annotations)."""
    with pytest.raises(ValueError) as e:
        check_inputs("local_attention", *args, **masks)
    assert str(e.value) == f"local_attention: {words}" or words in str(e.value)


@pytest.mark.parametrize("kw,words", [(dict(decay=2.0), "decay must be in (0, 1)"),
                                      (dict(epsilon=-1.0), "epsilon must be > 0")])
def test_kmeans_update_refuses_out_of_range_settings(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        kmeans_update(KMeansState.from_centroids(MU), jnp.ones((2, 2)), jnp.ones((2, 2, 4)), **kw)


def test_load_spec_refuses_a_string_of_overrides():
    with pytest.raises(TypeError, match="wrap it in a list"):
        load_spec(TINY, overrides="model.n_layers=1")


def test_a_closed_pipe_ends_quietly_like_a_unix_tool():
    """`rtlib inspect spec | head -1`: head stops reading; no BrokenPipeError traceback."""
    import subprocess

    # `true` exits at once without reading: every write of rtlib meets a closed pipe.
    proc = subprocess.run(f"rtlib inspect {SMALL} --json | true", shell=True,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_version_and_devices(capsys):
    import json

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("rtlib 0.")
    assert main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "cpu" and info["device_count"] >= 1 and info["memory_bytes"] > 0


def test_eval_shows_progress_unless_asked_not_to(tiny_run, capsys):
    import json

    assert main(["eval", tiny_run, "--max-tokens", "300", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == 300
    assert "eval valid" in captured.err and "tok" in captured.err
    assert main(["eval", tiny_run, "--max-tokens", "300", "--batch-size", "8",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
