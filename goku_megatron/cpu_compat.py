"""The one place where megatron-core is adapted to run on CPU with gloo: device placement only.

megatron-core targets CUDA: it allocates communication buffers on ``torch.cuda.current_device()``,
creates a few tensors with ``device="cuda"``, reads the CUDA RNG for its model-parallel RNG tracker
and asserts CUDA tensor types when clipping gradients. None of that is needed for correctness, so on
a machine without CUDA we redirect exactly those spots to the CPU and leave the algorithms alone:
the same schedules, DDP buffers, optimizer wrappers and tensor-parallel layers run on CPU as on GPU.

Rules that keep this module honest:
- ``apply()`` is a no-op when CUDA is available: GPU runs use megatron-core untouched.
- Device placement only: where tensors live, what a CUDA-only call (RNG state, synchronize) means
  on the CPU, the device of FSDP2's mesh and the CUDA tensor types megatron asserts. What a GPU run
  needs as well is not here but with the code it serves, installed on every device (the checkpoint
  writers' results queue in checkpoint/writer.py, torch AdamW's step under the distributed
  optimizer in optim.py). Besides, before megatron-core is imported, ``disable_jit_fuser_on_cpu``
  turns megatron's JIT fuser off on CPU: start-up time, not behaviour.
- It refuses any megatron-core version but the one it was written for (``patching.check_version``),
  so that an upgrade fails here, loudly, instead of somewhere inside a training step.
  tests/test_cpu_compat.py has one test per patch; re-run it and revisit each patch when bumping
  the pin in setup.py.
- No megatron code is copied: patches either swap the ``torch`` name a module sees (``_CpuTorch``),
  replace one small function with a CPU equivalent written here (``patching.patch_attr``), or wrap
  one method so that it gets what it expects (``patching.wrap_method``; the wrapper calls
  megatron's original).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh

from goku_megatron.patching import MEGATRON_CORE_VERSION, check_version, patch_attr, wrap_method

log = logging.getLogger(__name__)

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
    "megatron.core.optimizer.distrib_optimizer": "dummy Adam state on current_device() when loading",
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


class CpuDeviceMesh:
    """What ``DeviceMesh`` means to megatron's FSDP2 wrapper on CPU: the mesh of its process group
    on the CPU (the wrapper asks for a "cuda" mesh; FSDP2 itself runs on gloo)."""

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        return DeviceMesh.from_group(group, "cpu", *args, **kwargs)


def _reported_type(name: str, tensor: torch.Tensor, dtype: Any = None, non_blocking: bool = False,
                   **kwargs: Any) -> Any:
    """``tensor.type()`` answering ``name``; with a dtype it converts, as Tensor.type does."""
    if dtype is None and not kwargs:
        return name
    return torch.Tensor.type(tensor, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _report_cuda_types(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """While inside, each CPU tensor of ``params`` answers ``type()`` with the CUDA name of its
    dtype ('torch.cuda.BFloat16Tensor'; an instance attribute shadowing Tensor.type, removed on
    exit). megatron's optimizers sort parameters by these names and refuse any other."""
    cpu_params = [p for p in params if p.device.type == "cpu"]
    for param in cpu_params:
        cuda_name = torch.Tensor.type(param).replace("torch.", "torch.cuda.", 1)
        param.type = functools.partial(_reported_type, cuda_name, param)
    try:
        yield
    finally:
        for param in cpu_params:
            del param.type


def cpu_params_report_cuda_types(build: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for DistributedOptimizer._build_model_and_main_param_groups (a classmethod).

    It sorts parameters by ``param.type()`` into 'torch.cuda.FloatTensor' (main params are the
    parameter shards themselves) and 'torch.cuda.HalfTensor'/'BFloat16Tensor' (fp32 main copies),
    and raises TypeError for anything else, CPU tensors included; the CPU parameters report CUDA
    names for the duration of the call.
    """

    def build_groups(cls: type, gbuf_ranges: Any, param_gbuf_map: dict, opt_group_ranges: Any,
                     config: Any) -> Any:
        with _report_cuda_types(param_gbuf_map):
            return build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)

    return classmethod(build_groups)


def cpu_float16_params_report_cuda_types(init: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for Float16OptimizerWithFloat16Params.__init__, megatron's bf16 optimizer without
    the distributed optimizer: it gives each 'torch.cuda.BFloat16Tensor' parameter an fp32 main
    copy, keeps 'torch.cuda.FloatTensor' ones as they are and refuses CPU tensors with TypeError.
    The CPU parameters report CUDA names while it sorts them; nothing else changes."""

    def float16_optimizer_init(self: Any, optimizer: torch.optim.Optimizer | None, *args: Any, **kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []
        with _report_cuda_types(params):
            init(self, optimizer, *args, **kwargs)

    return float16_optimizer_init


# ----------------------------------------------------------------------------------------------
# Before megatron-core is imported: its JIT fuser


JIT_MODULE = "megatron.core.jit"


class _JitFuserOffLoader(importlib.abc.Loader):
    """Runs megatron.core.jit as usual, then its own ``disable_jit_fuser()``."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        module.disable_jit_fuser()


class _JitFuserOffFinder(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit with the other finders and hands it to ``_JitFuserOffLoader``."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != JIT_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _JitFuserOffLoader(spec.loader)
                return spec
        return None


def disable_jit_fuser_on_cpu() -> bool:
    """Without CUDA, have megatron.core.jit turn its fuser off the moment it is imported.

    megatron-core decorates its fused kernels (bias-GELU, GEGLU, SwiGLU, bias-dropout-add, ...)
    with ``jit_fuser = torch.compile`` while ``import megatron.core`` runs, which imports
    torch._dynamo and inductor: about 4 s of every process start on a 2-core machine, paid again by
    each torchrun rank. goku's CPU path calls none of those kernels, and on CPU inductor would only
    compile them into C++; megatron's own ``disable_jit_fuser()`` makes them plain eager functions
    (``noop_decorator``). It has to run before ``megatron.core`` is imported, so goku_megatron's
    package __init__ calls this; it returns whether the fuser will be off (False with CUDA, or when
    megatron-core was imported already and it is too late).
    """
    if torch.cuda.is_available():
        return False
    if JIT_MODULE in sys.modules:
        return sys.modules[JIT_MODULE].jit_fuser is sys.modules[JIT_MODULE].noop_decorator
    if not any(isinstance(finder, _JitFuserOffFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserOffFinder())
    return True


# ----------------------------------------------------------------------------------------------
# After megatron-core is imported: the patches


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
    patch_attr("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_rng_state)
    patch_attr("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_cpu_rng_state)
    patch_attr("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm)
    patch_attr("megatron.core.distributed.torch_fully_sharded_data_parallel", "DeviceMesh", CpuDeviceMesh)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    wrap_method(DistributedOptimizer, "_build_model_and_main_param_groups", cpu_params_report_cuda_types)
    wrap_method(Float16OptimizerWithFloat16Params, "__init__", cpu_float16_params_report_cuda_types)
    _applied = True
    log.debug("megatron-core %s adapted to CPU (the backends: line says so too)", MEGATRON_CORE_VERSION)
    return True
