"""The JAX setting the bound relies on, put in place before JAX starts its CPU backend.

JAX dispatches CPU computations asynchronously by default, and a call's temporaries
are freed on XLA's side some time after its output is ready. A streaming loop that
starts the next unit at once then sometimes holds two units' temporaries: MiniLM at
batch 8 x 256 tokens observed up to 18 MiB above its plan in one request of three,
though each call alone stays inside it. With synchronous dispatch
(``jax_cpu_enable_async_dispatch=False``) a call has freed everything when it returns:
the same 36 requests stayed within 0.3 MiB of the plan. The executor waits for every
call before the next anyway, so nothing overlaps that could be lost.

The setting is read when the backend starts (the first computation), so importing
:mod:`edgemind` sets it unless ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` is set in the
environment: a user's explicit choice wins (and the runtime's guard then reports any
request that breaks the bound).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV_ASYNC_DISPATCH = "JAX_CPU_ENABLE_ASYNC_DISPATCH"


def apply_bound_settings(env: MutableMapping[str, str] | None = None) -> bool:
    """Ask JAX for synchronous CPU dispatch unless the user chose; True if this set it.

    >>> apply_bound_settings({ENV_ASYNC_DISPATCH: "true"})
    False
    """
    env = os.environ if env is None else env
    if ENV_ASYNC_DISPATCH in env:
        return False
    env[ENV_ASYNC_DISPATCH] = "false"  # read by jax's config when jax is imported
    jax = sys.modules.get("jax")
    if jax is not None and env is os.environ:  # imported already: its config read the env
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def synchronous_dispatch() -> bool:
    """Whether JAX dispatches CPU computations synchronously (the bound's assumption)."""
    import jax

    return not bool(jax.config.values.get("jax_cpu_enable_async_dispatch", True))


def backend_started() -> bool:
    """Whether JAX has already started a backend (and so fixed its dispatch mode)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))
