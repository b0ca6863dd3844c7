"""What a training run measures and shows of its model: validation every `run.eval_every` steps
and at the end (each a metrics line), and one sampled continuation of `run.sample_prompt` at
the end, so a finished run says how good it is and what it writes.
"""

import math

import jax

from rtlib import parallel
from rtlib.runs.evaluate import evaluate
from rtlib.runs.sample import Sampling, generate
from rtlib.train.start import Session
from rtlib.train.train_log import TrainLog

SAMPLING = Sampling(temperature=0.8, top_p=0.95)  # a readable sample, not the greedy loop


def headline(out: dict, unit: str) -> str:
    """An evaluation in a few words: bits per unit, and answer accuracy where there is one."""
    line = f"{out[f'bits_per_{unit}']:.3f} bits/{unit}"
    if "answer_accuracy" in out:
        line += f", answer accuracy {out['answer_accuracy']:.3f}"
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
        self.last = {"step": step, **evaluate(
            s.ts.model, s.ts.routing, s.store, "valid", batch_size=s.spec.train.batch_size,
            max_tokens=s.spec.data.eval_tokens, mesh=s.mesh, rules=s.spec.mesh.rules)}
        self.log.write(self.last)
        return self.last


def final_sample(session: Session, log: TrainLog) -> str | None:
    """`run.sample_tokens` tokens sampled after `run.sample_prompt` and said; None when the
    prompt cannot be encoded (a synthetic vocabulary) or on processes other than 0. Every
    process must call it: the parameters are gathered collectively."""
    spec, tok = session.spec, session.store.tokenizer
    # One sequence: sampled on one device from a gathered copy, by process 0 only.
    model, routing = parallel.host_local((session.ts.model, session.ts.routing))
    try:
        prompt = tok.encode(spec.run.sample_prompt)
    except ValueError as e:  # a synthetic vocabulary has no text prompt
        log.say(f"no sample: run.sample_prompt cannot be encoded ({e})")
        return None
    if not session.primary:
        return None
    out = generate(model, routing, prompt, max_new_tokens=spec.run.sample_tokens,
                   sampling=SAMPLING, vocab_limit=tok.vocab_size,
                   key=jax.random.key(spec.run.seed))
    text = tok.decode(out)
    log.say(f"sample (temperature {SAMPLING.temperature}, top-p {SAMPLING.top_p}):\n{text}")
    return text
