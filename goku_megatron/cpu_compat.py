"""The one place where megatron-core is adapted to run on CPU with gloo.

megatron-core targets CUDA: it allocates communication buffers on ``torch.cuda.current_device()``,
creates a few tensors with ``device="cuda"``, reads the CUDA RNG for its model-parallel RNG tracker
and asserts CUDA tensor types when clipping gradients. None of that is needed for correctness, so on
a machine without CUDA we redirect exactly those spots to the CPU and leave the algorithms alone:
the same schedules, DDP buffers, optimizer wrappers and tensor-parallel layers run on CPU as on GPU.

Rules that keep this module honest:
- ``apply()`` is a no-op when CUDA is available: GPU runs use megatron-core untouched.
- It refuses any megatron-core version but the one it was written for, so that an upgrade fails
  here, loudly, instead of somewhere inside a training step. tests/test_cpu_compat.py has one test
  per patch; re-run it and revisit each patch when bumping the pin in setup.py.
- No megatron code is copied: patches either swap the ``torch`` name a module sees (``_CpuTorch``)
  or replace one small function with a CPU equivalent written here.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any, Callable, Iterable

import torch

log = logging.getLogger(__name__)

MEGATRON_CORE_VERSION = "0.16.1"

# Modules whose CUDA-only tensor placement is redirected, and what in each needs it (0.16.1).
REDIRECTED_MODULES: dict[str, str] = {
    "megatron.core.tensor_parallel.mappings": "gather/scatter buffers on current_device()",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather buffers",
    "megatron.core.tensor_parallel.random": "RNG tracker seeding via torch.cuda RNG",
    "megatron.core.tensor_parallel.utils": "gather/split buffers on current_device()",
    "megatron.core.pipeline_parallel.schedules": 'total_num_tokens on device="cuda"',
    "megatron.core.pipeline_parallel.p2p_communication": "p2p receive buffers, cuda.synchronize",
    "megatron.core.optimizer.clip_grads": 'grad-norm tensors on device="cuda"',
    "megatron.core.optimizer.optimizer": 'found_inf / scale tensors on device="cuda"',
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel": "buffer allocation, cuda.synchronize",
    "megatron.core.utils": 'local multi-tensor l2 norm on device="cuda"',
    "megatron.core.dist_checkpointing.strategies.async_utils": "cuda.synchronize before async save",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize in tensor preload",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flag on current_device()",
}

_applied = False


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec to the CPU; leave anything else as given."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _CpuCuda:
    """What ``torch.cuda`` means inside a redirected module on a CPU-only machine."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """CPU ops are synchronous."""

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


class _CpuTorch(types.ModuleType):
    """A view of ``torch`` in which CUDA placement means CPU; everything else is torch itself."""

    cuda = _CpuCuda()
    tensor = staticmethod(_factory(torch.tensor))
    zeros = staticmethod(_factory(torch.zeros))
    ones = staticmethod(_factory(torch.ones))
    empty = staticmethod(_factory(torch.empty))
    full = staticmethod(_factory(torch.full))
    arange = staticmethod(_factory(torch.arange))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


CPU_TORCH = _CpuTorch("torch")


def _redirect_cuda(module_names: Iterable[str]) -> None:
    """Make each module see ``CPU_TORCH`` under the name ``torch``."""
    for name in module_names:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(
                f"cpu_compat: {name} no longer imports torch as 'torch'; "
                f"update goku_megatron/cpu_compat.py for this megatron-core version"
            )
        module.torch = CPU_TORCH


def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replacement for random._get_cuda_rng_state: the CPU generator is the device generator."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replacement for random._set_cuda_rng_state."""
    torch.set_rng_state(new_state)


def clip_grad_by_total_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale gradients in place so that their total norm is at most ``max_norm``.

    Same contract as megatron's ``clip_grad_by_total_norm_fp32``, whose only CPU obstacle is an
    assertion that gradients are ``torch.cuda.FloatTensor``.
    """
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if grads and clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_attr(module_name: str, attr: str, replacement: Any) -> None:
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(
            f"cpu_compat: {module_name}.{attr} is gone; update goku_megatron/cpu_compat.py"
        )
    setattr(module, attr, replacement)


def check_version() -> None:
    """Refuse a megatron-core these patches were not written (and tested) for."""
    from megatron.core import package_info

    if package_info.__version__ != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"goku_megatron.cpu_compat was written for megatron-core {MEGATRON_CORE_VERSION} but "
            f"{package_info.__version__} is installed: install megatron-core=={MEGATRON_CORE_VERSION} "
            f"or update the patches and run tests/test_cpu_compat.py"
        )


def apply(force: bool = False) -> bool:
    """Adapt megatron-core to CPU if there is no CUDA; returns whether patches are active.

    ``force`` applies the patches even when CUDA is present (tests only).
    """
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_version()
    _redirect_cuda(REDIRECTED_MODULES)
    _patch_attr("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_rng_state)
    _patch_attr("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_cpu_rng_state)
    _patch_attr("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm)
    _applied = True
    log.info("megatron-core %s adapted to CPU (goku_megatron.cpu_compat)", MEGATRON_CORE_VERSION)
    return True
