"""The `rtlib` command line: data prepare, train, eval, generate, plot, validate, inspect."""

import argparse
import json
import os
import signal
import sys

from kernels.dispatch import KernelUnavailable
from rtlib import compile_cache
from rtlib.errors import EXIT_USAGE, BadArgument, RtlibError
from rtlib.spec.load import load_spec


def _cmd_validate(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    plan = spec.model.layer_plan()
    kinds = ", ".join(f"{c.local} local + {c.full} full + {c.routing} routing" for c in
                      dict.fromkeys(plan))
    mesh = ""
    if args.devices is not None:
        from rtlib.parallel.mesh import mesh_shape

        if args.devices < 1:
            raise BadArgument(f"--devices must be >= 1, got {args.devices}")
        sizes = mesh_shape(spec, args.devices)
        mesh = f"; mesh on {args.devices} devices: " + " x ".join(f"{a}={v}"
                                                                   for a, v in sizes.items())
    print(f"{args.spec}: OK ({spec.model.kind}, {spec.model.n_layers} layers; heads per layer: "
          f"{kinds}{mesh})")
    if spec.model.decoder is not None:
        d = spec.model.stack("decoder")
        print(f"decoder: {d.n_layers} layers; heads per layer: " + ", ".join(
            f"{c.local} local + {c.full} full + {c.routing} routing" for c in
            dict.fromkeys(d.layer_plan())) + f"; {spec.model.cross_attention_shape()[0]} "
            "cross-attention heads")
    print(f"objective: {spec.objective}")
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


def _cmd_prepare_pairs(args) -> int:
    from rtlib.data.paired import paired_manifest, prepare_pairs, summary

    if getattr(args, "tokenizer", "bytes") != "bytes" or getattr(args, "train_tokenizer", None):
        raise BadArgument("--paired stores are byte-level: drop --tokenizer/--train-tokenizer")
    before = paired_manifest(args.out)
    m = prepare_pairs(args.source, args.out, source_key=args.source_key,
                      target_key=args.target_key, valid=args.valid, test=args.test,
                      seed=args.seed, force=args.force)
    print(summary(args.out, m, kept=before == m))
    return 0


def _cmd_prepare(args) -> int:
    from rtlib.data.prepare import prepare
    from rtlib.data.store import existing_manifest

    if args.paired:
        return _cmd_prepare_pairs(args)
    before = existing_manifest(args.out)
    m = prepare(args.source, args.out, kind=args.kind, glob=args.glob, valid=args.valid,
                test=args.test, seed=args.seed, doc_bytes=args.doc_bytes, force=args.force,
                text_key=args.text_key, tokenizer=args.tokenizer,
                train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size, eos=args.eos)
    if before == m:
        print(f"{args.out}: already prepared from this source with these settings; kept")
    counts = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents"
                       for s, v in m["splits"].items())
    tok = m["tokenizer"]
    print(f"{args.out}: {counts}; tokenizer {tok.get('model') or tok['kind']} of "
          f"{tok['vocab_size']:,} ids; source sha256 {m['source']['sha256'][:16]}")
    return 0


def _cmd_synth(args) -> int:
    from dataclasses import fields

    from rtlib.data.paired import PAIRED_FORMAT, paired_manifest, summary
    from rtlib.data.store import existing_manifest
    from rtlib.data.synth import SynthOptions, synth

    options = SynthOptions(**{f.name: getattr(args, f.name) for f in fields(SynthOptions)
                              if getattr(args, f.name) is not None})
    before = existing_manifest(args.out) or paired_manifest(args.out)
    m = synth(args.task, args.out, options, force=args.force)
    if m.get("format") == PAIRED_FORMAT:  # (source, target) pairs: `reverse`
        print(summary(args.out, m, kept=before == m))
        return 0
    if before == m:
        print(f"{args.out}: already made with these settings; kept")
    if m["source"]["kind"] == "images":
        counts = ", ".join(f"{s} {v['documents']:,}" for s, v in m["splits"].items())
        print(f"{args.out}: {args.task}, images of {'x'.join(map(str, m['source']['image_shape']))}"
              f" (rows x cols x channels, one byte each); images: {counts}")
        return 0
    counts = ", ".join(f"{s} {v['documents']:,} examples / {v['answers']:,} answers"
                       for s, v in m["splits"].items())
    src = m["source"]
    print(f"{args.out}: {args.task}, {m['example_tokens']} tokens per example, vocabulary "
          f"{m['tokenizer']['vocab_size']}; {counts}; every answer at least "
          f"{src['min_distance']} tokens after what it recalls; chance accuracy "
          f"{src['chance_accuracy']:.3f}")
    return 0


def _cmd_train(args) -> int:
    from rtlib.train.loop import train

    spec = load_spec(args.spec, args.overrides)
    result = train(spec, progress=not args.no_progress,
                   accept_store_change=args.accept_store_change)
    return 128 + signal.Signals[result.stopped_by] if result.stopped_by else 0


def _cmd_eval(args) -> int:
    from rtlib.costs import check_fits
    from rtlib.data.images import check_axes
    from rtlib.data.store import TokenStore
    from rtlib.runs.evaluate import evaluate
    from rtlib.train.run_dir import load_run

    for name in ("max_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadArgument(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    spec, ts, step = load_run(args.run_dir, args.step)
    batch = args.batch_size or spec.train.batch_size
    m = spec.model
    # float32 logits and their log-softmax for every row of a batch: a floor on eval's memory
    check_fits(8 * batch * m.seq_len * m.vocab_size,
               f"--batch-size {batch} ({m.seq_len:,} positions x {m.vocab_size:,} logits a row)",
               "--batch-size")
    if m.kind == "encoder_decoder":
        from rtlib.data.paired import PairedStore

        store = PairedStore.open(args.data or spec.data.path)
    else:
        store = TokenStore.open(args.data or spec.data.path)
        store.check_fits(m.vocab_size)
        check_axes(m.embedding.axes, store)  # axis positions need images of their shape
    out = evaluate(ts.model, ts.routing, store, args.split, batch_size=batch,
                   max_tokens=args.max_tokens, progress=not args.no_progress,
                   mlm=spec.train.mlm)
    print(json.dumps({"run_dir": str(args.run_dir), "step": step,
                      "data": args.data or spec.data.path, **out}))
    return 0


def _cmd_generate_image(args, sampling) -> int:
    import jax

    from rtlib.runs.images import read_image, sample_images, save_grid, store_image_shape
    from rtlib.train.run_dir import load_run

    if args.image is None:
        raise BadArgument("--prompt-rows and --from complete an image: give --image OUT.png")
    if args.prompt is not None:
        raise BadArgument("--prompt is text; an image run completes the top rows of an image: "
                          "--prompt-rows K --from FILE")
    if (args.from_image is None) != (not args.prompt_rows):
        raise BadArgument("--prompt-rows K and --from FILE go together: the top K rows of FILE "
                          "are what every sample completes")
    spec, ts, _ = load_run(args.run_dir, args.step)
    shape = store_image_shape(spec.data.path)
    given = None if args.from_image is None else read_image(args.from_image, shape)
    images = sample_images(ts.model, ts.routing, shape, n=args.n, sampling=sampling,
                           key=jax.random.key(args.seed), prompt_rows=args.prompt_rows,
                           image=given, use_cache=not args.no_cache)
    what = (f"completions of the top {args.prompt_rows} rows of {args.from_image}"
            if args.prompt_rows else "samples")
    print(f"{save_grid(images, args.image)}: {args.n} {what} "
          f"({'x'.join(map(str, shape))}, temperature {sampling.temperature})")
    return 0


def _cmd_generate(args) -> int:
    import jax

    from rtlib.data.tokenizer import ByteTokenizer
    from rtlib.runs.sample import Sampling, generate
    from rtlib.train.run_dir import load_run

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if not -(2**63) <= args.seed < 2**63:
        raise BadArgument(f"--seed must fit in 64 bits, got {args.seed}")
    if args.image is not None or args.prompt_rows or args.from_image is not None:
        return _cmd_generate_image(args, sampling)
    if args.source is not None:
        return _cmd_generate_target(args, sampling)
    if args.prompt is None:
        raise BadArgument("--prompt is required (or --image OUT.png: samples of an image run)")
    if args.max_new_tokens < 0:
        raise BadArgument(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt:
        raise BadArgument("--prompt is empty: give at least one character")

    spec, ts, _ = load_run(args.run_dir, args.step)
    if spec.model.kind != "decoder":
        raise BadArgument("an encoder-decoder run turns a source into a target: give --source "
                          "TEXT" if spec.model.kind == "encoder_decoder" else "an encoder "
                          "(masked-LM) run does not generate; `rtlib eval` scores it")
    tok = _run_tokenizer(spec)
    sampling.check(min(spec.model.vocab_size, tok.vocab_size))
    # The prompt's own bytes, even when they are not UTF-8 (argv keeps them as surrogates).
    raw = args.prompt.encode("utf-8", errors="surrogateescape")
    try:
        prompt = tok.encode(raw if isinstance(tok, ByteTokenizer) else
                            raw.decode("utf-8", errors="replace"))
    except ValueError as e:  # e.g. a word that is no name of a synthetic vocabulary
        raise BadArgument(f"--prompt: {e}") from None
    if not len(prompt):
        raise BadArgument(f"--prompt {args.prompt!r} encodes to no token with this tokenizer")
    sys.stdout.write(raw.decode("utf-8", errors="replace"))
    sys.stdout.flush()
    pending = bytearray()
    # A text tokenizer's tokens from the prompt on, and their text so far (a token's text can
    # depend on the one before, e.g. the space a unigram piece starts with).
    produced = [] if isinstance(tok, ByteTokenizer) else [int(t) for t in prompt]
    shown = [tok.decode(produced)]

    def stream(token: int) -> None:  # print whole UTF-8 characters as they complete
        if not isinstance(tok, ByteTokenizer):  # decoded whole: a token's text needs context
            produced.append(token)
            text = tok.decode(produced)
            if not text.endswith("\ufffd") and text.startswith(shown[0]):
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text
            return
        pending.append(token)
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) < 4:
                return
            text = pending.decode("utf-8", errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        pending.clear()

    generate(ts.model, ts.routing, prompt, max_new_tokens=args.max_new_tokens,
             sampling=sampling, vocab_limit=tok.vocab_size, use_cache=not args.no_cache,
             key=jax.random.key(args.seed), on_token=stream)
    if pending:
        sys.stdout.write(pending.decode("utf-8", errors="replace"))
    if produced[len(prompt):] and (text := tok.decode(produced)).startswith(shown[0]):
        sys.stdout.write(text[len(shown[0]):])
    sys.stdout.write("\n")
    return 0


def _cmd_generate_target(args, sampling) -> int:
    import jax

    from rtlib.data.tokenizer import ByteTokenizer
    from rtlib.runs.seq2seq import translate
    from rtlib.train.run_dir import load_run

    if args.prompt is not None:
        raise BadArgument("--prompt continues a text (decoder runs); --source is translated "
                          "(encoder-decoder runs): give one of them")
    if args.max_new_tokens < 0:
        raise BadArgument(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    spec, ts, _ = load_run(args.run_dir, args.step)
    if spec.model.kind != "encoder_decoder":
        raise BadArgument(f"--source needs an encoder-decoder run; {args.run_dir} is a "
                          f"{spec.model.kind}: give --prompt")
    tok = ByteTokenizer()  # paired stores are byte-level
    source = tok.encode(args.source.encode("utf-8", errors="surrogateescape"))
    out = translate(ts.model, ts.routing, source, sampling=sampling,
                    key=jax.random.key(args.seed), vocab_limit=tok.vocab_size,
                    max_new_tokens=min(args.max_new_tokens, ts.model.seq_len - 1))
    print(tok.decode(out))
    return 0


def _run_tokenizer(spec):
    """The tokenizer of a run's token store (`data.path`); a byte-level model whose store is
    gone decodes bytes, as every model did before stores had other tokenizers."""
    from rtlib.data.store import StoreError, store_tokenizer
    from rtlib.data.tokenizer import ByteTokenizer

    try:
        return store_tokenizer(spec.data.path)
    except StoreError as e:
        if spec.model.vocab_size > 256:
            raise StoreError(f"{e}: `generate` needs the tokenizer the run was trained with "
                             "(restore the store, or set data.path in the run's spec.yaml)"
                             ) from None
        print(f"note: {e}; decoding bytes", file=sys.stderr)
        return ByteTokenizer()


def _cmd_plot(args) -> int:
    from rtlib.runs.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _cmd_routes(args) -> int:
    from rtlib.runs.routes import write_routes

    write_routes(args.run_dir, args.text, args.out, step=args.step, query=args.query,
                 max_tokens=args.max_tokens)
    return 0


def _version() -> str:
    from importlib.metadata import version

    import rtlib

    return f"rtlib {rtlib.__version__} (jax {version('jax')}, jaxlib {version('jaxlib')})"


def _cmd_devices(args) -> int:
    import jax

    from rtlib.costs import available_memory_bytes

    devices = jax.devices()
    info = {"backend": jax.default_backend(), "process_count": jax.process_count(),
            "device_count": len(devices), "local_device_count": jax.local_device_count(),
            "kinds": sorted({d.device_kind for d in devices}),
            "memory_bytes": available_memory_bytes()}
    if args.json:
        print(json.dumps(info))
        return 0
    memory = info["memory_bytes"]
    print(f"{_version()}\n{info['device_count']} {info['backend']} device(s) "
          f"({', '.join(info['kinds'])}) in {info['process_count']} process(es); "
          f"memory for arrays: {'unknown' if memory is None else f'{memory / 2**30:,.1f} GiB'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtlib", description="Routing Transformer in JAX.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p):
        p.add_argument("spec", help="path to a YAML spec")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.steps=100 run.dir=runs/x (values "
                       "parsed as YAML)")

    p = sub.add_parser("data", help="token stores")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="tokenise a corpus into a token store")
    p.add_argument("source", help="`default` (the Python stdlib source of this interpreter), "
                   "a text file (.gz/.zst too), a .jsonl(.gz/.zst) or .parquet file, a "
                   "directory of such files, a directory of PNG/JPEG images or an .npy array")
    p.add_argument("out", help="output directory or tensorstore kvstore URL")
    p.add_argument("--glob", help="files to take from a directory (default: all, `**/*`)")
    p.add_argument("--kind", choices=["auto", "text", "images"], default="auto",
                   help="auto: images for .npy files and directories holding only images")
    p.add_argument("--valid", type=float, default=0.05, help="validation share of documents")
    p.add_argument("--test", type=float, default=0.05, help="test share of documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--doc-bytes", type=int, default=65536,
                   help="a single text file is cut at line breaks into documents of this size")
    p.add_argument("--text-key", default="text", help="the field (.jsonl) or column (.parquet) "
                   "holding each document's text")
    p.add_argument("--tokenizer", default="bytes", metavar="SPEC",
                   help="`bytes` (ids 0-255), a Hugging Face tokenizer.json (or a directory "
                   "holding one) or a sentencepiece .model; saved inside the store")
    p.add_argument("--train-tokenizer", choices=["bpe", "unigram", "word"],
                   help="train a tokenizer of --vocab-size ids on the training split (Hugging "
                   "Face tokenizers): byte-level BPE, unigram, or word-level")
    p.add_argument("--vocab-size", type=int, help="ids of the tokenizer to train")
    p.add_argument("--eos", help="the token ending each document, for a --tokenizer file "
                   "(default: the first of <eos>, </s>, <|endoftext|>, ... it has)")
    p.add_argument("--paired", action="store_true", help="(source, target) examples for "
                   "encoder-decoders: a .jsonl file (or a directory of them), one JSON object "
                   "a line, written as a paired store (byte-level)")
    p.add_argument("--source-key", default="source", help="--paired: the field of the source")
    p.add_argument("--target-key", default="target", help="--paired: the field of the target")
    p.add_argument("--force", action="store_true", help="replace an existing token store")
    p.set_defaults(fn=_cmd_prepare)
    p = data_sub.add_parser("synth", help="a synthetic long-range task as a token store with "
                            "an answer mask (recall: multi-query associative recall; copy: "
                            "induction copy; shapes: an image set of mirrored shapes; reverse: "
                            "(line, reversed line) pairs for encoder-decoders)")
    p.add_argument("task", choices=["recall", "copy", "shapes", "reverse"])
    p.add_argument("out", help="output directory or tensorstore kvstore URL")
    from rtlib.data.synth import SynthOptions

    defaults = SynthOptions()
    for flag, what in [
            ("length", "tokens per example, <bos> included"),
            ("pairs", "recall: key/value pairs per example"),
            ("queries", "recall: queries per example, keys drawn with replacement (default: "
                        "--pairs)"),
            ("keys", "recall: key vocabulary"),
            ("values", "recall: value vocabulary (chance accuracy 1/values)"),
            ("span", "copy: tokens in the copied span"),
            ("content", "copy: vocabulary of the span"),
            ("min-gap", "copy: filler tokens at least between the span and <copy>"),
            ("filler", "distractor vocabulary"),
            ("train", "training examples"),
            ("valid", "validation examples"),
            ("test", "test examples"),
            ("seed", "seed"),
            ("size", "shapes: image side in pixels"),
            ("chars", "reverse: at most this many letters per line")]:
        default = getattr(defaults, flag.replace("-", "_"))
        if default is not None:
            what += f" (default {default})"
        p.add_argument(f"--{flag}", type=int, help=what)
    p.add_argument("--force", action="store_true", help="replace an existing token store")
    p.set_defaults(fn=_cmd_synth)

    p = sub.add_parser("train", help="train (or resume) the run directory `run.dir` of a spec")
    spec_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--accept-store-change", action="store_true",
                   help="resume even though the token store differs from the one the latest "
                   "checkpoint was trained on (otherwise refused)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="score a trained run; prints one JSON object")
    p.add_argument("run_dir")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--data", help="another prepared token store to evaluate on")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (tokens/s and ETA on stderr)")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("generate", help="sample text (or, with --image, images) from a "
                       "trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="the text to continue (text runs; required without --image)")
    p.add_argument("--source", help="encoder-decoder runs: the source whose target is decoded "
                   "(the cache: the source encoded once)")
    p.add_argument("--image", metavar="OUT.png", help="image runs: write --n samples as a PNG "
                   "grid instead of text")
    p.add_argument("--n", type=int, default=16, help="--image: how many images (default 16)")
    p.add_argument("--prompt-rows", type=int, default=0, metavar="K",
                   help="--image: complete the top K rows of --from (every sample keeps them)")
    p.add_argument("--from", dest="from_image", metavar="FILE",
                   help="--image: a PNG/JPEG of the run's image size to complete")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (learned positions: "
                   "the last seq_len tokens) instead of decoding with the cache; for balanced "
                   "routing heads the cache is an approximation, see README")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("plot", help="PNG of the training and validation curves of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output file (default RUN_DIR/curves.png)")
    p.set_defaults(fn=_cmd_plot)

    p = sub.add_parser("routes", help="HTML, PNG and JSON of which tokens each routing head "
                       "clustered together over a text, and one query's attention")
    p.add_argument("run_dir")
    p.add_argument("--text", required=True, help="a text file (byte stores: any text; "
                   "synthetic stores: whitespace-separated token names)")
    p.add_argument("--out", required=True, help="output directory for routes.html, routes.png "
                   "and routes.json")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--query", type=int, help="position whose attention is shown (default: the "
                   "last token)")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text "
                   "(at most seq_len, the default)")
    p.set_defaults(fn=_cmd_routes)

    p = sub.add_parser("validate", help="check a spec; exit 2 with the reasons if it is invalid")
    spec_args(p)
    p.add_argument("--devices", type=int, help="also check the mesh on this many devices "
                   "(fills a -1 size; every array must split evenly)")
    p.set_defaults(fn=_cmd_validate)
    p = sub.add_parser("devices", help="which devices JAX sees (platform, kind, count, memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_devices)

    p = sub.add_parser("inspect", help="parameters, FLOPs per token, activation memory")
    spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`train spec --no-progress a.b=1`), which plain
    # argparse rejects for a positional list: take the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    compile_cache.enable()  # before anything compiles; RTLIB_COMPILE_CACHE=off turns it off
    try:
        code = args.fn(args)
        sys.stdout.flush()  # inside the try: a closed pipe must not surface at exit
        return code
    except RtlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KernelUnavailable as e:  # a spec naming a kernel this machine cannot run
        print(f"error: {e} (model.attention.implementation)", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # As Unix tools end when the reader stops (`rtlib inspect spec | head -3`): quietly,
        # with SIGPIPE's status. SIGPIPE itself stays ignored (Python's default): restoring its
        # default action would also kill the process on pipes libraries use internally.
        _silence_stdout()
        return 128 + 13


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (e.g. tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
