"""How goku_megatron patches megatron-core: the version pin and the two ways a patch is made.

Three modules patch megatron-core, each for its own reason: cpu_compat.py (device placement, CPU
only), checkpoint/writer.py (the writers' results queue) and optim.py (torch's AdamW under the
distributed optimizer). They share these rules:
- A patch is written for one megatron-core version; ``check_version`` refuses another in one line
  (exit 2), so that an upgrade fails at start-up instead of somewhere inside a training step.
- A patch either replaces one attribute of a megatron module (``patch_attr``) or wraps one method
  (``wrap_method``: the wrapper calls megatron's original, kept as its ``__wrapped__``). Both raise
  a one-line RuntimeError naming the goku module to update when what they patch is gone, and both
  may run any number of times.
- No megatron code is copied.

Nothing here imports megatron-core at import time: goku_megatron/__init__.py imports cpu_compat,
and with it this module, before megatron-core is imported (cpu_compat's JIT hook must come first).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from goku_megatron.config import ConfigError

MEGATRON_CORE_VERSION = "0.16.1"

# Marks a method wrapped by wrap_method, so that a wrapper is never wrapped again.
WRAPPED = "_goku_wrapped"


def check_version() -> None:
    """Refuse a megatron-core these patches were not written (and tested) for."""
    from megatron.core import package_info

    if package_info.__version__ != MEGATRON_CORE_VERSION:
        raise ConfigError(
            f"goku_megatron's megatron-core patches were written for megatron-core {MEGATRON_CORE_VERSION} but "
            f"{package_info.__version__} is installed: install megatron-core=={MEGATRON_CORE_VERSION} "
            f"or update the patches (goku_megatron/patching.py lists them) and run tests/test_cpu_compat.py, "
            f"tests/test_checkpoint_writer.py and tests/test_optim.py"
        )


def _source(patch: Any) -> str:
    """The file of the goku module that defines ``patch``, for the message asking to update it."""
    return patch.__module__.replace(".", "/") + ".py"


def patch_attr(module_name: str, attr: str, replacement: Any) -> None:
    """Set megatron's ``module_name.attr`` to ``replacement``."""
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(f"{module_name}.{attr} is gone; update {_source(replacement)} for this megatron-core")
    setattr(module, attr, replacement)


def wrap_method(owner: type, name: str, make_wrapper: Callable[[Callable[..., Any]], Any]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)``, once (a wrapper is never rewrapped)."""
    if name not in owner.__dict__:
        raise RuntimeError(f"{owner.__module__}.{owner.__name__}.{name} is gone; update "
                           f"{_source(make_wrapper)} for this megatron-core")
    current = owner.__dict__[name]
    function = current.__func__ if isinstance(current, classmethod) else current
    if getattr(function, WRAPPED, False):
        return
    wrapped = make_wrapper(function)
    wrapper = wrapped.__func__ if isinstance(wrapped, classmethod) else wrapped
    setattr(wrapper, WRAPPED, True)
    wrapper.__wrapped__ = function  # megatron's original, for the tests
    setattr(owner, name, wrapped)
