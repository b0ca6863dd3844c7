"""Choosing an implementation: by name, by preference list, or by the current backend.

Every op offers the same names. `None` means "the best for `jax.default_backend()`", a name
means exactly that implementation, and a sequence means "the first of these that can take the
arguments". A skipped candidate is logged with its reason; when nothing fits, the error lists
every reason.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import jax

Implementation = Literal["xla", "pallas_tpu", "pallas_gpu", "cudnn"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas_tpu", "pallas_gpu", "cudnn")
# Preference when the caller says None. CPUs have no kernel backend: Pallas on CPU is an
# interpreter for tests, orders of magnitude slower than XLA.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "cudnn", "xla"),
    "cuda": ("pallas_gpu", "cudnn", "xla"),
}

log = logging.getLogger("rtlib.kernels")


def platform() -> str:
    """"tpu", "cuda", "rocm" or "cpu": what the default device is (ROCm reports itself as
    "gpu" like CUDA; its client's platform version says which)."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


def wrong_platform(kernel_platform: str, interpret: bool) -> str | None:
    """Why a kernel for `kernel_platform` ("tpu" or "cuda") cannot run here, or None.

    Interpret mode runs anywhere. A CPU is allowed too: there the kernels are exported for
    their platform ahead of time (a plain call on CPU fails in Pallas with "Only interpret
    mode is supported on CPU backend").
    """
    here = platform()
    if interpret or here in (kernel_platform, "cpu"):
        return None
    return f"its kernels are for {kernel_platform}, this is {here} (interpret=False)"


class KernelUnavailable(ValueError):
    """No requested implementation can take these arguments (the message says why)."""


def candidates(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ordered names to try; refuses unknown names."""
    if implementation is None:
        return DEFAULTS.get(jax.default_backend(), ("xla",))
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


def choose(
    op: str,
    implementation: str | Sequence[str] | None,
    unsupported: dict[str, Callable[[], str | None]],
) -> str:
    """The first candidate whose `unsupported()` returns no reason.

    `unsupported` maps each implementation this op has to a check returning why it cannot
    take the current arguments (or None when it can); names missing from it have no kernel
    for this op.
    """
    reasons = []
    for name in candidates(implementation):
        check = unsupported.get(name)
        reason = f"{op} has no {name} implementation" if check is None else check()
        if reason is None:
            for skipped in reasons:
                log.warning("%s: skipping %s", op, skipped)
            return name
        reasons.append(f"{name}: {reason}")
    raise KernelUnavailable(f"{op}: no requested implementation can run: " + "; ".join(reasons))
