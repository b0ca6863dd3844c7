"""What a training run measures and shows of its model: validation every `run.eval_every` steps
and at the end (each a metrics line), and one sampled continuation of `run.sample_prompt` at
the end (said, and kept as a `"split": "sample"` metrics line), so a finished run says how good
it is and what it writes. `missing_at_end` tells a rerun of a finished run which of the two a
kill prevented, so they are made then.
"""

import math

import jax

from rtlib import parallel
from rtlib.errors import RunError
from rtlib.nn.seq2seq import EncoderDecoder
from rtlib.runs.evaluate import evaluate
from rtlib.runs.sample import Sampling, generate
from rtlib.runs.seq2seq import translate
from rtlib.train.metrics_log import read_metrics
from rtlib.train.start import Session
from rtlib.train.train_log import TrainLog

SAMPLING = Sampling(temperature=0.8, top_p=0.95)  # a readable sample, not the greedy loop


def headline(out: dict, unit: str) -> str:
    """An evaluation in a few words: bits per unit (an encoder: per masked token, with its
    accuracy), and answer accuracy or exact match where there is one."""
    if "masked_bits" in out:
        line = (f"{out['masked_bits']:.3f} bits/masked {unit}, masked accuracy "
                f"{out['masked_accuracy']:.3f}")
    else:
        line = f"{out[f'bits_per_{unit}']:.3f} bits/{unit}"
        if unit == "token" and "bits_per_byte" in out:  # a text tokenizer's: comparable
            line += f" ({out['bits_per_byte']:.3f} bits/byte)"
    if "answer_accuracy" in out:
        line += f", answer accuracy {out['answer_accuracy']:.3f}"
    if "exact_match" in out:
        line += f", exact match {out['exact_match']:.3f}"
    return line


class Validation:
    """Evaluates the session's current model on the validation split (when the store has
    one): every `run.eval_every` steps and, unless that just happened, at the end."""

    def __init__(self, session: Session, log: TrainLog):
        self.session = session
        self.log = log
        self.enabled = session.can_eval
        self.every = session.spec.run.eval_every
        self.last: dict | None = None  # the latest evaluation of this invocation

    def after_step(self, step: int) -> None:
        if self.enabled and self.every and step % self.every == 0:
            out = self._evaluate(step)
            self.log.note(f"step {step}: valid {headline(out, self.log.unit)}")

    def at_end(self, step: int) -> dict | None:
        """The final evaluation (the one at `step` if already done), said; None without a
        validation split."""
        if self.enabled and (self.last is None or self.last["step"] != step):
            self._evaluate(step)
        last, unit = self.last, self.log.unit
        if last is not None:
            vocab = self.session.store.tokenizer.vocab_size
            self.log.say(f"step {step}: valid {headline(last, unit)} over {last['tokens']:,} "
                         f"tokens (uniform: {math.log2(vocab):.1f} bits/{unit})")
        return last

    def _evaluate(self, step: int) -> dict:
        s = self.session
        try:
            out = evaluate(s.ts.model, s.ts.routing, s.store, "valid",
                           batch_size=s.spec.train.batch_size,
                           max_tokens=s.spec.data.eval_tokens, mesh=s.mesh,
                           rules=s.spec.mesh.rules, mlm=s.spec.train.mlm)
        except Exception:
            s.check_store(step, collective=False)  # a store replaced under the run: say so
            raise
        self.last = {"step": step, **out}
        self.log.write(self.last)
        return self.last


def wants_sample(session: Session) -> bool:
    """Whether the run ends with a sample: `run.sample_tokens`, an encodable prompt, and a
    model that generates (an encoder does not)."""
    if not session.spec.run.sample_tokens or session.spec.model.kind == "encoder":
        return False
    try:
        session.store.tokenizer.encode(session.spec.run.sample_prompt)
    except ValueError:
        return False
    return True


def missing_at_end(session: Session) -> tuple[bool, bool]:
    """(evaluation, sample): which closing records of the run's step `session.start` are
    absent from metrics.jsonl (a kill after the last checkpoint); decided by process 0 and
    agreed by all."""
    eval_missing = sample_missing = False
    if session.primary:
        records = [r for r in read_metrics_or_none(session.run_dir)
                   if r.get("step") == session.start]
        eval_missing = session.can_eval and not any(r.get("split") == "valid" for r in records)
        sample_missing = wants_sample(session) and not any(r.get("split") == "sample"
                                                           for r in records)
    return parallel.any_process(eval_missing, sample_missing)


def read_metrics_or_none(run_dir) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except RunError:  # no metrics.jsonl (yet): nothing of the end was written
        return []


def final_sample(session: Session, log: TrainLog) -> str | None:
    """`run.sample_tokens` tokens sampled after `run.sample_prompt`, said and written as a
    `"split": "sample"` metrics line; None when the prompt cannot be encoded (a synthetic
    vocabulary) or on processes other than 0. Every process must call it: the parameters are
    gathered collectively."""
    spec, tok = session.spec, session.store.tokenizer
    if spec.model.kind == "encoder":
        return None  # nothing to generate with
    # One sequence: sampled on one device from a gathered copy, by process 0 only.
    model, routing = parallel.host_local((session.ts.model, session.ts.routing))
    try:
        prompt = tok.encode(spec.run.sample_prompt)
    except ValueError as e:  # a synthetic vocabulary has no text prompt
        log.say(f"no sample: run.sample_prompt cannot be encoded ({e})")
        return None
    if not session.primary:
        return None
    if isinstance(model, EncoderDecoder):  # the prompt as a source: its greedy target
        out = translate(model, routing, prompt[:model.source_len], sampling=Sampling(0.0),
                        key=jax.random.key(spec.run.seed), vocab_limit=tok.vocab_size,
                        max_new_tokens=min(spec.run.sample_tokens, model.seq_len - 1))
        text = tok.decode(out)
        log.say(f"sample (greedy target of {spec.run.sample_prompt!r}):\n{text}")
        log.write({"step": int(session.ts.step), "split": "sample",
                   "prompt": spec.run.sample_prompt, "temperature": 0.0, "text": text})
        return text
    out = generate(model, routing, prompt, max_new_tokens=spec.run.sample_tokens,
                   sampling=SAMPLING, vocab_limit=tok.vocab_size,
                   key=jax.random.key(spec.run.seed))
    text = tok.decode(out)
    log.say(f"sample (temperature {SAMPLING.temperature}, top-p {SAMPLING.top_p}):\n{text}")
    log.write({"step": int(session.ts.step), "split": "sample", "prompt": spec.run.sample_prompt,
               "temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p, "text": text})
    return text
