"""Throughput and peak memory of `rtlib data prepare` on generated corpora of several sizes.

    nice -n 10 python tools/bench_prepare.py [--sizes 128M,1G] [--tokenizers bytes,bpe]
                                             [--vocab-size 8192] [--dir /tmp/rtlib-bench]
                                             [--keep]

For each size, writes a corpus of English-like text into `--dir` (a tree of text files of
about 256 KiB: Zipf-distributed words from a 50,000-word vocabulary, some with accents or CJK
characters, lines of 5 to 25 words), then prepares it once per tokenizer, each
run in its own process: `bytes`, and `bpe` (`--train-tokenizer bpe --vocab-size N`: training
on the training split included). A run reports its wall time, the time of each pass (read,
train, write), throughput over the corpus's bytes and its peak RSS (`resource.getrusage` of
that process: what the process held, not the page cache). Corpora and stores are deleted at
the end unless `--keep`. Prints one JSON object per run, then a Markdown table.
"""

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FILE_BYTES = 256 << 10
WORDS = 50_000


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else \
        int(text)


def vocabulary(rng: np.random.Generator) -> list[bytes]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    accents, cjk = "éèüöñçå", "的一是不了人我在有他这中大来上国"
    words = []
    for i in range(WORDS):
        word = "".join(rng.choice(letters, int(rng.integers(1, 12))))
        if i % 37 == 5:
            word += str(rng.choice(list(accents)))
        if i % 101 == 50:
            word = "".join(rng.choice(list(cjk), 2))
        words.append(word.encode())
    return words


def generate(root: Path, size: int, seed: int = 0) -> int:
    """Write about `size` bytes of text into files of `FILE_BYTES` under `root`; returns the
    bytes written. Vectorised: a block of words at a time."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    table = np.frombuffer(b"".join(w + b" " for w in words), np.uint8)
    lengths = np.array([len(w) + 1 for w in words])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ranks = np.arange(1, WORDS + 1, dtype=np.float64)
    cdf = np.cumsum(1 / ranks ** 1.1)
    cdf /= cdf[-1]
    written, index = 0, 0
    while written < size:
        ids = np.searchsorted(cdf, rng.random(FILE_BYTES // 5))
        lens = lengths[ids]
        ends = np.cumsum(lens)
        fits = ends <= FILE_BYTES
        ids, lens, ends = ids[fits], lens[fits], ends[fits]
        # each output byte: its word's start in the table plus its offset inside the word
        offset = np.arange(ends[-1]) - np.repeat(ends - lens, lens)
        text = table[np.repeat(starts[ids], lens) + offset]
        last_words = np.cumsum(rng.integers(5, 26, len(ends)))  # a line: 5 to 25 words
        text[ends[last_words[last_words <= len(ends)] - 1] - 1] = ord("\n")
        path = root / f"{index // 1000:03d}" / f"{index:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.tobytes())
        written += len(text)
        index += 1
    return written


CHILD = r"""
import json, resource, sys, time
from rtlib.data import prepare as p
times, peaks = {}, {}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[name] = times.get(name, 0) + time.perf_counter() - t
            peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return run
p._scan = timed("read", p._scan)
p.train_tokenizer_on = timed("train", p.train_tokenizer_on)
p._write = timed("write", p._write)
source, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
m = p.prepare(source, out, progress=False, **kw)
print(json.dumps({"seconds": time.perf_counter() - start, "passes": times,
                  "peak_rss_mb_after": peaks,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": sum(s["tokens"] for s in m["splits"].values()),
                  "bytes": sum(s["bytes"] for s in m["splits"].values()),
                  "documents": m["source"]["documents"]}))
"""


def run(source: Path, out: Path, kw: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), json.dumps(kw)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128M,1G")
    ap.add_argument("--tokenizers", default="bytes,bpe")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--dir", default="/tmp/rtlib-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    rows = []
    try:
        for size_text in args.sizes.split(","):
            corpus = root / f"corpus-{size_text}"
            shutil.rmtree(corpus, ignore_errors=True)
            t = time.perf_counter()
            size = generate(corpus, parse_size(size_text))
            print(f"generated {size / 1e6:,.0f} MB in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
            for tok in args.tokenizers.split(","):
                kw = {} if tok == "bytes" else {"train_tokenizer": tok,
                                                "vocab_size": args.vocab_size}
                out = run(corpus, root / f"store-{size_text}-{tok}", kw)
                row = {"corpus_mb": size / 1e6, "tokenizer": tok, **kw, **out,
                       "mb_per_s": size / 1e6 / out["seconds"],
                       "write_mb_per_s": size / 1e6 / out["passes"]["write"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(root / f"store-{size_text}-{tok}", ignore_errors=True)
            if not args.keep:
                shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| corpus | tokenizer | documents | tokens | wall | read / train / write pass | "
          "MB/s (all) | MB/s (write pass) | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["passes"]
        print(f"| {r['corpus_mb']:,.0f} MB | {r['tokenizer']} | {r['documents']:,} | "
              f"{r['tokens']:,} | {r['seconds']:,.0f} s | {p.get('read', 0):,.0f} / "
              f"{p.get('train', 0):,.0f} / {p.get('write', 0):,.0f} s | {r['mb_per_s']:,.1f} | "
              f"{r['write_mb_per_s']:,.1f} | {r['peak_rss_mb']:,.0f} MB |")


if __name__ == "__main__":
    main()
