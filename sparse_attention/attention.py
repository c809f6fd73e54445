"""`attention(q, k, v, pattern, impl=...)`: one entry point, one short dispatch over implementations.

  reference   dense masked softmax; the test oracle (O(S^2) memory)
  xla         blockwise over the layout's active tiles, plain JAX; every backend; CPU default
  triton      Pallas kernel lowered through Triton (sm80+), sparse_attention/kernels/triton.py
  mosaic_gpu  Pallas Mosaic GPU kernel (sm90+), sparse_attention/kernels/mosaic_gpu.py
  mosaic_tpu  Pallas Mosaic TPU kernel, sparse_attention/kernels/mosaic_tpu.py

An explicit `impl` that cannot run raises ValueError with the reason. `impl="auto"` takes the first
implementation that supports the case on the current backend, logs what ran and why, and
`resolve_impl` answers the same question without running anything.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp

from sparse_attention.patterns import Pattern, as_pattern
from sparse_attention.selection import select_blocks

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("reference", "xla", "triton", "mosaic_gpu", "mosaic_tpu")
VALID_IMPLS = ("auto",) + IMPLEMENTATIONS
# The Pallas kernels live in sparse_attention.kernels, named by their lowering and hardware.
KERNEL_IMPLS = ("triton", "mosaic_gpu", "mosaic_tpu")
# Names of earlier versions: refused with the new name rather than taken silently.
RENAMED_IMPLS = {"pallas_gpu": "triton", "pallas_tpu": "mosaic_tpu"}
# Preference order of `auto` per JAX backend. On GPUs mosaic_gpu comes first: validated on an H100 (CUDA 13.0)
# and faster than triton on dense and window there (docs/benchmarks.md). Its unsupported_reason declines
# float32, head_dims other than 64 and 128, GPUs older than Hopper (sm90) and CUDA runtimes whose ptxas
# miscompiles masked attention; auto then falls to triton (sm80+, float32 too) and logs why.
AUTO_ORDER = {
    "gpu": ("mosaic_gpu", "triton", "xla"),
    "tpu": ("mosaic_tpu", "xla"),
    "cpu": ("xla",),
}
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class ImplUnavailableError(ValueError):
    """No implementation that was asked for (or, with auto, none at all) can run this case here."""


def _module(impl: str):
    """The implementation's module, or None if this checkout does not have it."""
    name = f"sparse_attention.kernels.{impl}" if impl in KERNEL_IMPLS else f"sparse_attention.{impl}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            return None
        raise


def check_impl(field: str, impl: str) -> None:
    """ValueError naming `field` unless impl is one of VALID_IMPLS (a renamed one says its new name)."""
    if impl in RENAMED_IMPLS:
        raise ValueError(f"{field}: {impl!r} is now called {RENAMED_IMPLS[impl]!r}; valid: {', '.join(VALID_IMPLS)}")
    if impl not in VALID_IMPLS:
        raise ValueError(f"{field}: must be one of {', '.join(VALID_IMPLS)}; got {impl!r}")


def unsupported_reason(impl: str, q, k, v, pattern: Pattern, *, interpret: bool = False) -> str | None:
    """Why `impl` cannot run this case here, or None if it can."""
    module = _module(impl)
    if module is None:
        return f"{impl} is not implemented in this version"
    check = getattr(module, "unsupported_reason", None)
    return None if check is None else check(q, k, v, pattern, interpret=interpret)


def resolve_impl(impl: str, q, k, v, pattern: Pattern | str, *, interpret: bool = False) -> tuple[str, str]:
    """(implementation that would run, why). Raises ValueError for an explicit impl that cannot run."""
    check_impl("impl", impl)
    pattern = as_pattern(pattern)
    if impl != "auto":
        reason = unsupported_reason(impl, q, k, v, pattern, interpret=interpret)
        if reason is not None:
            raise ImplUnavailableError(f"impl={impl!r} cannot run here: {reason}")
        return impl, "requested"
    backend = jax.default_backend()
    skipped = []
    for candidate in AUTO_ORDER.get(backend, ("xla",)):
        reason = unsupported_reason(candidate, q, k, v, pattern, interpret=interpret)
        if reason is None:
            why = f"auto on {backend}" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
            return candidate, why
        skipped.append(f"{candidate}: {reason}")
    raise ImplUnavailableError(f"no implementation supports this case on {backend}: {'; '.join(skipped)}")


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str, why: str):
    log.info("attention impl=%s ran %s (%s)", requested, chosen, why)


def check_inputs(q, k, v):
    """Shapes [batch, seq, q_heads, d] and [batch, seq, kv_heads, d] with kv_heads dividing q_heads."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    if 0 in (*q.shape, *k.shape, *v.shape):
        raise ValueError(f"q, k, v must have no dimension of size 0; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} must share batch, seq and head_dim (self-attention over one sequence)"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} must divide q_heads={q.shape[2]} (GQA/MQA)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not any(q.dtype == d for d in FLOAT_DTYPES):
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {q.dtype}")


def attention(q, k, v, pattern: Pattern | str, *, impl: str = "auto", scale: float | None = None,
              interpret: bool = False):
    """Causal sparse attention of q [batch, seq, q_heads, d] over k, v [batch, seq, kv_heads, d].

    `pattern` is a Pattern or a spec string (a single layer's; pick a schedule's layer first).
    `scale` defaults to 1/sqrt(head_dim). `interpret=True` runs Pallas kernels in interpret mode (CPU tests).
    """
    q, k, v = (x if isinstance(x, jax.Array) else jnp.asarray(x) for x in (q, k, v))  # lists, NumPy arrays
    check_inputs(q, k, v)
    if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be a finite number > 0 (or None for 1/sqrt(head_dim)), got {scale!r}")
    pattern = as_pattern(pattern)
    chosen, why = resolve_impl(impl, q, k, v, pattern, interpret=interpret)
    _log_choice(impl, chosen, why)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    topk = pattern.block_selection()
    if topk is not None:
        selected = select_blocks(q, k, topk.size, topk.count)
        return _module(chosen).attention(q, k, v, pattern, scale=scale, interpret=interpret, selected=selected)
    return _module(chosen).attention(q, k, v, pattern, scale=scale, interpret=interpret)
