"""Choosing an implementation: by name, by preference list, or by the current backend.

Every op offers the same names. `None` means "the best for this platform" (the default
device's, or the one named by `target_platform` when compiling ahead of time), a name means
exactly that implementation, and a sequence means "the first of these that can take the
arguments". A skipped candidate is logged with its reason; when nothing fits, the error lists
every reason.
"""

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import jax

Implementation = Literal["xla", "pallas_tpu", "pallas_gpu", "cudnn"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas_tpu", "pallas_gpu", "cudnn")
# Preference when the caller says None. CPUs have no kernel backend: Pallas on CPU is an
# interpreter for tests, orders of magnitude slower than XLA.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "xla"),
    "cuda": ("pallas_gpu", "cudnn", "xla"),
}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)

log = logging.getLogger("rtlib.kernels")


@contextlib.contextmanager
def target_platform(name: Literal["tpu", "cuda"]) -> Iterator[None]:
    """Choose implementations for `name` rather than for this machine's devices: for
    compiling or exporting ahead of time, e.g. on a CPU host for a TPU job

        with kernels.dispatch.target_platform("tpu"):
            exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*args)
    """
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)


def targeted() -> bool:
    """Whether a `target_platform` block is active (no device of that kind need exist)."""
    return _TARGET.get() is not None


def platform() -> str:
    """"tpu", "cuda", "rocm" or "cpu": the `target_platform` if one is set, else the default
    device's (ROCm reports itself as "gpu" like CUDA; its client's platform version says
    which)."""
    if (target := _TARGET.get()) is not None:
        return target
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


def wrong_platform(kernel_platform: str, interpret: bool) -> str | None:
    """Why a kernel for `kernel_platform` ("tpu" or "cuda") cannot run here, or None.
    Interpret mode runs anywhere."""
    here = platform()
    if interpret or here == kernel_platform:
        return None
    if here == "cpu":
        return (f"its kernels are for {kernel_platform}; on a CPU they run only with "
                f"interpret=True (or are exported under target_platform({kernel_platform!r}))")
    return f"its kernels are for {kernel_platform}, this is {here} (interpret=False)"


class KernelUnavailable(ValueError):
    """No requested implementation can take these arguments (the message says why)."""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A fallback is logged as a warning the first time (every trace would repeat it)."""
    log.log(logging.DEBUG if message in _warned else logging.WARNING, message)
    _warned.add(message)


def candidates(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ordered names to try; refuses unknown names."""
    if implementation is None:
        return DEFAULTS.get(platform(), ("xla",))
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError("implementation: an empty sequence names no implementation")
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: unknown name {name!r}; expected one of {IMPLEMENTATIONS}, "
                "a sequence of them, or None"
            )
    return names


@dataclasses.dataclass(frozen=True)
class Backend:
    """An implementation chosen for one call: what callers pass down instead of re-choosing.

    `name` is a key of the op's backend table: an implementation name, or a variant of one
    written "name/variant" (e.g. "pallas_tpu/splash": the TPU implementation by splash
    attention, for the calls it can take). `interpret` runs a Pallas kernel in interpret mode.
    """

    name: str
    interpret: bool = False

    @property
    def implementation(self) -> str:
        """The user-facing implementation name (the part before any "/variant")."""
        return self.name.split("/")[0]


def choose(
    op: str,
    implementation: str | Sequence[str] | None,
    unsupported: dict[str, Callable[[], str | None]],
) -> str:
    """The first backend whose `unsupported()` returns no reason.

    `unsupported` maps each backend this op has to a check returning why it cannot take the
    current arguments (or None when it can). Keys are implementation names or variants
    "name/variant", tried in the table's order before the plain name when that name is a
    candidate; names missing from it have no kernel for this op.
    """
    skipped: list[tuple[str, str, str]] = []  # (implementation, key, reason)
    for name in candidates(implementation):
        keys = [k for k in unsupported if k.split("/")[0] == name] or [name]
        for key in keys:
            check = unsupported.get(key)
            reason = f"{op} has no {name} implementation" if check is None else check()
            if reason is None:
                for other, other_key, why in skipped:
                    if other == name:  # a variant of the implementation that runs: no fallback
                        log.info("%s: skipping %s: %s", op, other_key, why)
                    else:
                        _warn_once(f"{op}: skipping {other_key}: {why}")
                return key
            skipped.append((name, key, reason))
    raise KernelUnavailable(f"{op}: no requested implementation can run: "
                            + "; ".join(f"{key}: {why}" for _, key, why in skipped))
