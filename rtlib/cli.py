"""The `rtlib` command line: validate, inspect, demo."""

import argparse
import json
import sys
from pathlib import Path

from rtlib.spec.load import SpecError, load_spec

EXIT_SPEC_ERROR = 2


def _default_spec() -> str:
    here = Path("specs/tiny.yaml")
    if here.exists():
        return str(here)
    return str(Path(__file__).resolve().parent.parent / "specs" / "tiny.yaml")


def _cmd_validate(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    plan = spec.model.layer_plan()
    kinds = ", ".join(f"{c.local} local + {c.full} full + {c.routing} routing" for c in
                      dict.fromkeys(plan))
    print(f"{args.spec}: OK ({spec.model.kind}, {spec.model.n_layers} layers; heads per layer: "
          f"{kinds})")
    return 0


def _cmd_inspect(args) -> int:
    from rtlib.costs import estimate_costs

    spec = load_spec(args.spec, args.overrides)
    costs = estimate_costs(spec.model)
    if args.json:
        print(json.dumps({"spec": args.spec, **costs.as_dict()}, indent=2))
        return 0
    f = costs.flops_per_token
    total = sum(f.values())
    print(f"{args.spec}")
    print(f"  parameters            {costs.parameters:,}")
    print(f"  forward FLOPs/token   {total / 1e6:,.1f} M")
    for part in ("attention", "routing", "rest"):
        print(f"    {part:<19} {f[part] / 1e6:,.2f} M ({f[part] / total:.1%})")
    print(f"  activations/sequence  {costs.activation_bytes_per_sequence / 2**20:,.1f} MiB "
          "(estimate, float32, no remat)")
    return 0


def _cmd_demo(args) -> int:
    from rtlib.demo import run_demo

    spec = load_spec(args.spec, args.overrides)
    run_demo(spec, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtlib", description="Routing Transformer in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p, default=None):
        if default is None:
            p.add_argument("spec", help="path to a YAML spec")
        else:
            p.add_argument("spec", nargs="?", default=default, help="path to a YAML spec")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. model.n_layers=4 (values parsed as YAML)")

    p = sub.add_parser("validate", help="check a spec; exit 2 with the reasons if it is invalid")
    spec_args(p)
    p.set_defaults(fn=_cmd_validate)
    p = sub.add_parser("inspect", help="parameters, FLOPs per token, activation memory")
    spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_inspect)
    p = sub.add_parser("demo", help="a short end-to-end run on the embedded default corpus")
    spec_args(p, default=_default_spec())
    p.add_argument("--steps", type=int, default=150, help="optimiser steps (default 150)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.set_defaults(fn=_cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC_ERROR


if __name__ == "__main__":
    sys.exit(main())
