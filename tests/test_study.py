"""The study tool (tools/study.py): generated specs in sync and equal in size, a seconds-long
smoke run end to end, and the causality audit it reports."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtlib import build, load_spec
from rtlib.costs import estimate_costs
from rtlib.data.store import TokenStore
from rtlib.data.synth import SynthOptions, synth
from rtlib.runs.evaluate import _prefix_scores, causality_audit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "tools" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_specs_are_generated_and_arms_are_the_same_size(study):
    for name in study.TASKS:
        params = set()
        for arm in study.ARMS:
            path = study.spec_path(name, arm)
            assert path.read_text() == study.spec_text(name, arm), (
                f"{path} is stale: run `python tools/study.py --write-specs`")
            spec = load_spec(path)
            params.add(estimate_costs(spec.model).parameters)
            assert spec.model.attention.heads[0].kind == "local"
            assert sum(h.count for h in spec.model.attention.heads) == study.HEADS
        assert max(params) <= 1.02 * min(params), (name, params)


def test_study_smoke_end_to_end(study, tmp_path, text_store):
    copy_store = str(tmp_path / "copy")
    synth("copy", copy_store, SynthOptions(length=65, span=8, min_gap=16, train=64, valid=8,
                                           test=8), progress=False)
    out, report = tmp_path / "out", tmp_path / "docs" / "study.md"
    argv = ["--smoke", "--out", str(out), "--report", str(report), "--arms",
            "local,routing-balanced", "--tasks", "text,copy", f"--store=text={text_store}",
            f"--store=copy={copy_store}",
            "--set", "mesh.data=1"]
    assert study.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    keys = {"task", "arm", "seed", "metric", "value", "step", "params", "flops_per_token",
            "wall_s"}
    assert all(keys <= r.keys() for r in rows)
    got = {(r["task"], r["arm"], r["metric"]) for r in rows}
    assert {("text", "local", "bits_per_byte"), ("copy", "routing-balanced", "answer_accuracy"),
            ("copy", "routing-balanced", "audit_nll_gap")} <= got
    assert all(r["step"] == 2 for r in rows)
    text = report.read_text()
    assert "| routing-balanced |" in text and "Causality audit" in text
    assert (report.parent / "study-copy.png").stat().st_size > 1000
    # a finished run is reused, not retrained
    assert study.main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == rows


def test_prefix_pass_is_strictly_causal_and_the_audit_sees_no_gap_for_causal_routing(
        tmp_path, getkey):
    store_path = str(tmp_path / "copy")
    synth("copy", store_path, SynthOptions(length=65, span=8, min_gap=16, train=8, valid=4,
                                           test=4), progress=False)
    store = TokenStore.open(store_path)
    common = ["model.vocab_size=130", "model.routing.init=random"]
    model, state = build(load_spec(ROOT / "specs" / "tiny.yaml", common).model, key=getkey())
    tokens = jnp.asarray(store.read("test", 0, 65)[None].repeat(4, 0))
    positions = jnp.asarray([5, 20, 40, 60], jnp.int32)
    # changing every token after the scored position leaves the strict pass unchanged
    noise = jax.random.randint(getkey(), tokens.shape, 0, 130)
    after = jnp.arange(65)[None, :] > positions[:, None] + 1
    strict, _ = _prefix_scores(model, state, tokens, positions)
    strict2, _ = _prefix_scores(model, state, jnp.where(after, noise, tokens), positions)
    np.testing.assert_allclose(np.asarray(strict), np.asarray(strict2), rtol=0, atol=1e-6)
    # causal assignment: the full pass is already strictly causal
    causal, cstate = build(load_spec(ROOT / "specs" / "tiny-causal.yaml", common).model,
                           key=getkey())
    out = causality_audit(causal, cstate, store, "test", windows=2, per_window=4, batch_size=4)
    assert out["targets"] == 8 and abs(out["nll_gap"]) < 1e-5
    answers = causality_audit(causal, cstate, store, "test", windows=1, per_window=50,
                              batch_size=4, answers_only=True)
    assert answers["targets"] == 7  # span - 1 answers in the one window
