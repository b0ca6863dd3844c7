"""Specs: every shipped YAML validates and builds; bad specs fail with the right message."""

import json
from pathlib import Path

import equinox as eqx
import jax
import pytest

from rtlib import SpecError, abstract_build, count_parameters, load_spec
from rtlib.cli import main
from rtlib.parallel import is_array_leaf
from rtlib.parallel.rules import param_info
from rtlib.spec import apply_overrides

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").rglob("*.yaml"))
TINY = ROOT / "specs" / "tiny.yaml"


def test_spec_folder_holds_the_required_configurations():
    names = {str(p.relative_to(ROOT / "specs")) for p in SPECS}
    required = {"tiny.yaml", "small.yaml"} | {
        f"paper/{n}.yaml" for n in ("wikitext103", "enwik8", "pg19", "cifar10", "imagenet64")}
    assert required <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_every_spec_validates_and_builds_abstractly(path):
    spec = load_spec(path)
    model, state = abstract_build(spec)
    assert count_parameters(model) > 0
    leaves = jax.tree.leaves(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves if is_array_leaf(x))
    routing_layers = sum(c.routing > 0 for stack in spec.model.stacks()  # encoder-decoder: 2
                         for c in stack.layer_plan())
    stacked = sum(s.centroids.shape[0] for s in state.stages if s is not None)
    assert stacked == routing_layers


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_every_parameter_declares_its_axes(path):
    """Nothing in a shipped model is replicated or left undecayed by omission: every parameter
    array has a declaration (`declare_params`) naming each of its axes."""
    params = eqx.filter(abstract_build(load_spec(path))[0], is_array_leaf)
    declared = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x, info: declared.setdefault(jax.tree_util.keystr(p), (x.ndim, info)),
        params, param_info(params))
    assert declared and len(declared) == len(jax.tree.leaves(params))
    bad = {k: info for k, (ndim, info) in declared.items()
           if info is None or len(info.axes) != ndim}
    assert not bad, bad


def test_paper_pg19_routes_only_in_its_last_layer():
    plan = load_spec(ROOT / "specs/paper/pg19.yaml").model.layer_plan()
    assert [c.routing for c in plan] == [0] * 21 + [2]
    assert all(c.local == 8 for c in plan[:21]) and plan[21].local == 6


def test_small_spec_is_cpu_sized():
    spec = load_spec(ROOT / "specs/small.yaml")
    params = count_parameters(abstract_build(spec)[0])
    assert 5e6 <= params <= 10e6
    assert 2048 <= spec.model.seq_len <= 4096


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


BASE = TINY.read_text()

# (overrides on tiny.yaml, substrings the error must contain)
BAD_OVERRIDES = [
    (["model.n_layrs=3"], ["model.n_layrs", "unknown key", "did you mean 'n_layers'"]),
    (["model.attention.heads.1.clustrs=8"],
     ["model.attention.heads.1.clustrs", "did you mean 'clusters'"]),
    (["model.d_model=-4"], ["model.d_model", "greater than or equal to 1"]),
    (["model.d_model=30"], ["model.attention.head_dim", "not divisible by 4 heads"]),
    (["model.attention.heads.0.window=7"],
     ["model.attention.heads.0.window", "not a multiple of the local window 7"]),
    (["model.attention.heads.1.window=65"],
     ["model.attention.heads.1.window", "exceeds seq_len=64"]),
    (["model.attention.heads.1.assignment=topk"],
     ["model.attention.heads.1.assignment", "'balanced' or 'causal'"]),
    (["model.attention.heads.1.kind=sparse"],
     ["model.attention.heads.1.kind", "unknown kind 'sparse'; expected one of local, routing"]),
    (["model.routing.skip_first=5"], ["model.routing.skip_first", "n_layers is 2"]),
    (["model.attention.heads.0.look_ahead=1"],
     ["model.attention.heads.0.look_ahead", "must be 0"]),
    (["model.attention.heads.1.self_mask=true", "model.attention.heads.1.shared_qk=false"],
     ["self_mask", "requires shared_qk"]),
    (["model.attention.layer_heads=[{local: 4}]"],
     ["model.attention.layer_heads", "has 1 entries but n_layers is 2"]),
    (["model.attention.layer_heads=[{local: 4}, {full: 4}]"],
     ["model.attention.layer_heads.1.full", "no `kind: full` entry"]),
    (["model.attention.layer_heads=[{local: 4}, {local: 2}]"], ["different head totals"]),
    (["model.routing.ema_decay=1.5"], ["model.routing.ema_decay", "less than 1"]),
    (["model.feed_forward.activation=swish"], ["model.feed_forward.activation"]),
    (["model.embedding.dim=64"], ["model.embedding.dim", "exceeds d_model=32"]),
    (["model.attention.heads=[{kind: local, count: 2, window: 16}, "
      "{kind: local, count: 2, window: 16}]"], ["heads.1.kind", "listed twice"]),
    (["model.vocab_size=many"], ["model.vocab_size", "valid integer", "'many'"]),
    (["model.attention.heads.1.kind=routng"],
     ["model.attention.heads.1.kind", "unknown kind 'routng'", "did you mean 'routing'"]),
    (["model.attention.heads.1.count=true"], ["model.attention.heads.1.count", "valid integer"]),
    (["model.attention.heads.0.window=16.5"], ["model.attention.heads.0.window"]),
    (["model.attention.heads.1.clusters=65"],
     ["model.attention.heads.1.clusters", "cannot be initialised by k-means"]),
    (["model.attention.heads=[{kind: routing, count: 4, clusters: 4, window: 16}]"],
     ["model.embedding.positions", "no layer has any"]),
]


@pytest.mark.parametrize("overrides,expected", BAD_OVERRIDES, ids=lambda x: str(x)[:40])
def test_bad_spec_messages(overrides, expected):
    with pytest.raises(SpecError) as info:
        load_spec(TINY, overrides)
    message = str(info.value)
    assert message.startswith(str(TINY) + ": ")
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model: [1, 2", ["invalid YAML"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("", ["model", "Field required"]),
        ("nmae: x\n" + BASE.split("name: tiny\n", 1)[1], ["nmae", "did you mean 'name'"]),
        ("!!python/object/apply:os.system ['true']\n", ["invalid YAML"]),
        ("name: a\nname: b\n", ["invalid YAML", "duplicate key 'name'"]),
    ],
)
def test_bad_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_index_lists():
    data = {"a": {"b": 1, "c": [{"d": 1}, {"d": 2}]}}
    applied = apply_overrides(data, ["a.b=2.5", "a.c.1.d=[1, 2]", "a.e.f=true", "a.g=x: 1"])
    assert data == {"a": {"b": 2.5, "c": [{"d": 1}, {"d": [1, 2]}], "e": {"f": True},
                          "g": {"x": 1}}}
    assert applied == ["a.b", "a.c.1.d", "a.e.f", "a.g"]
    with pytest.raises(SpecError, match="dotted.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(SpecError, match="not an index"):
        apply_overrides(data, ["a.c.5.d=1"])
    spec = load_spec(TINY, ["model.n_layers=3", "model.attention.heads.1.clusters=8"])
    assert spec.model.n_layers == 3 and spec.model.group("routing").clusters == 8


def test_cli_validate_exit_codes(capsys):
    assert main(["validate", str(TINY)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(TINY), "model.attention.heads.1.windw=4"]) == 2
    err = capsys.readouterr().err
    assert "model.attention.heads.1.windw" in err and "did you mean 'window'" in err


def test_cli_inspect_json(capsys):
    assert main(["inspect", str(TINY), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == count_parameters(abstract_build(load_spec(TINY))[0])
    assert set(report["flops_per_token"]) == {"attention", "routing", "rest"}
    assert all(v > 0 for v in report["flops_per_token"].values())
    assert report["activation_bytes_per_sequence"] > 0
    assert main(["inspect", str(TINY)]) == 0
    assert "parameters" in capsys.readouterr().out


def test_inspect_scales_attention_with_the_head_kinds():
    from rtlib.costs import estimate_costs

    base = estimate_costs(load_spec(TINY).model).flops_per_token
    more_clusters = estimate_costs(
        load_spec(TINY, ["model.attention.heads.1.window=32"]).model).flops_per_token
    assert more_clusters["attention"] > base["attention"]
    assert more_clusters["rest"] == base["rest"]
    full = estimate_costs(load_spec(TINY, [
        "model.attention.heads=[{kind: full, count: 4}]"]).model).flops_per_token
    assert full["routing"] == 0


def test_head_kind_order_is_the_same_in_the_spec_and_the_model():
    """The spec's order of head kinds (routes, layer plans) and the model's registry (where each
    kind's heads sit in a layer's projections) must agree."""
    from rtlib.nn.heads import HEAD_KINDS as MODEL_ORDER
    from rtlib.spec.schema import HEAD_KINDS as SPEC_ORDER

    assert tuple(MODEL_ORDER) == SPEC_ORDER
