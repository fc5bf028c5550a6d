"""What this machine offers and how the processes find each other.

One function per question: which device, which distributed backend, which implementation of each
model part (so ``--dry-run`` and the first log lines can say which backend is in use), and the
setup of torch.distributed plus megatron's ``parallel_state``. GPU-only packages are imported lazily
here and nowhere else decides on their presence.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import optimizer as mcore_optimizer
from megatron.core import parallel_state, tensor_parallel

from goku_megatron.config import Config, ConfigError

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    """Whether this process runs on a GPU: the one device decision every module asks for."""
    return torch.cuda.is_available()


def local_rank() -> int:
    """This process's index on its node (torchrun / srun set LOCAL_RANK; a plain process is 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """The device this process computes on: its local rank's GPU, or the CPU. Named by index, not
    by the calling thread's current CUDA device, which a fresh thread has at 0 (data threads,
    checkpoint writers)."""
    return torch.device("cuda", local_rank()) if has_cuda() else torch.device("cpu")


def use_local_device() -> torch.device:
    """Makes ``local_device()`` the calling thread's CUDA device (a no-op on CPU) and returns it.
    CUDA's current device is per thread: a thread this process starts (the data pool's decoders)
    works on GPU 0, whatever the main thread chose, until it sets its own."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_transformer_engine() -> bool:
    """TE imports only with CUDA and cuDNN; finding the package is not enough on a CPU box."""
    if not has_cuda() or not _importable("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:
        log.warning("transformer_engine is installed but does not import (%s); using local layers", err)
        return False
    return True


def has_flash_attn() -> bool:
    """flash-attn 2's two kernels, the API model.attention.FlashAttention calls. flash-attn-4
    installs a ``flash_attn`` namespace package holding only ``flash_attn.cute``, so finding the
    package is not enough."""
    if not has_cuda() or not _importable("flash_attn"):
        return False
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:
        log.warning("flash_attn is installed but lacks flash-attn 2's kernels (%s); using torch SDPA", err)
        return False
    return True


@dataclass(frozen=True)
class Backends:
    """The implementation chosen for each part of a run."""

    device: str
    distributed: str
    linear: str
    attention: str
    optimizer: str
    data: str
    precision: str

    def torch_device(self) -> torch.device:
        """The torch device the run's model, packs and optimizer live on."""
        return local_device() if self.device == "cuda" else torch.device("cpu")

    def describe(self) -> str:
        """The one ``backends:`` log line. It restates the fallbacks megatron-core warns about at
        import (no Transformer Engine or apex: local linears, torch's AdamW), which
        goku_megatron/logs.py therefore folds away, and says when cpu_compat adapts megatron."""
        device = f"{self.device} (megatron-core adapted by cpu_compat)" if self.device == "cpu" else self.device
        linear = f"{self.linear} (megatron-core, no Transformer Engine)" if self.linear == "local" else self.linear
        return (f"device={device} distributed={self.distributed} linear={linear} "
                f"attention={self.attention} optimizer={self.optimizer} data={self.data} "
                f"precision={self.precision}")


def optimizer_backend() -> str:
    """Which Adam megatron-core picked at import: TE/apex fused kernels or the torch fallback."""
    if mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return "torch.optim.AdamW (megatron-core fallback)"
    return f"{mcore_optimizer.Adam.__module__}.{mcore_optimizer.Adam.__name__}"


# Compute capability that TE's FP8 GEMMs need: FP8 tensor cores arrived with Ada/Hopper (8.9/9.0);
# MXFP8's per-32-element block scales are a Blackwell (10.x) tensor-core format.
FP8_MIN_CAPABILITY = {"mxfp8": (10, 0)}
FP8_MIN_CAPABILITY_DEFAULT = (8, 9)


def check_fp8_recipe(recipe: str, capability: tuple[int, int], device_name: str) -> None:
    """Refuse, in one line, an FP8 recipe that this GPU cannot run (before TE fails in a GEMM)."""
    need = FP8_MIN_CAPABILITY.get(recipe, FP8_MIN_CAPABILITY_DEFAULT)
    if tuple(capability) < need:
        alternative = ("model.fp8_recipe=tensorwise (or blockwise, delayed)" if recipe == "mxfp8"
                       else "model.fp8='' (bf16)")
        raise ConfigError(f"model.fp8_recipe={recipe} needs compute capability >= {need[0]}.{need[1]} but "
                          f"{device_name} has {capability[0]}.{capability[1]}; use {alternative}")


def choose_backends(cfg: Config) -> Backends:
    cuda = has_cuda()
    te = has_transformer_engine()
    if cfg.model.linear_backend == "te" and not te:
        raise ConfigError("model.linear_backend=te but transformer_engine is not importable; "
                          "install it (NGC PyTorch container) or use model.linear_backend=auto")
    linear = "te" if cfg.model.linear_backend == "te" or (cfg.model.linear_backend == "auto" and te) else "local"
    if cfg.model.fp8:
        if linear != "te":
            raise ConfigError(f"model.fp8={cfg.model.fp8} runs in Transformer Engine's linears but "
                              "transformer_engine is not importable; install it (NGC PyTorch container) "
                              "or set model.fp8=''")
        check_fp8_recipe(cfg.model.fp8_recipe, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    attention = cfg.model.attention_backend
    if attention == "auto":  # context parallelism goes through TE's CP attention where TE exists
        attention = "te" if te and cfg.parallel.cp > 1 else "flash" if has_flash_attn() else "sdpa"
    elif attention == "flash" and not has_flash_attn():
        raise ConfigError("model.attention_backend=flash but flash_attn is not importable; "
                          "install flash-attn or use model.attention_backend=auto")
    elif attention == "te" and not te:
        raise ConfigError("model.attention_backend=te but transformer_engine is not importable; "
                          "use model.attention_backend=auto")
    dist = cfg.parallel.distributed_backend
    if dist == "auto":
        dist = "nccl" if cuda else "gloo"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return Backends(
        device="cuda" if cuda else "cpu",
        distributed=dist,
        linear=linear,
        attention=attention,
        optimizer=optimizer_backend(),
        data=data_backend(cfg, cuda),
        precision=precision,
    )


def data_backend(cfg: Config, cuda: bool) -> str:
    """What reads and decodes the data, for the log and --dry-run (decode.py routes per codec)."""
    d = cfg.data
    if d.kind == "latent":
        return f"latent: tar shards of VAE latents, text {d.text_encoder} (stored tokens when present)"
    if d.decoder == "pyav":
        video = "PyAV"
    elif importlib.util.find_spec("nvidia.dali") is None:
        video = "PyAV (nvidia-dali not installed)"
    else:
        video = "DALI mixed (GPU)" if cuda else "DALI CPU for VP8/VP9/MJPEG, PyAV for H.264/HEVC/AV1"
    vae = "pixels (identity VAE)" if d.kind == "toy" else "VAE online"
    return f"{d.kind}: tar shards, video {video}, images PIL, {vae}, text {d.text_encoder}"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_restart_store(timeout: datetime.timedelta) -> torch.distributed.Store | None:
    """torchrun's store with keys prefixed by the restart count, for workers that share the
    agent's store (``TORCHELASTIC_USE_AGENT_STORE``); None otherwise.

    torchrun (torch 2.13, c10d rendezvous) gives restarted workers the same store as the workers
    they replace, without a per-attempt prefix, so a restarted rank that creates a process group
    before its peers can read the addresses the killed ranks published there and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused").
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart is None:
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       is_master=False, timeout=timeout)
    return torch.distributed.PrefixStore(f"goku/restart_{restart}", store)


def cuda_device_max_connections(cfg: Config, current: str | None, capability: tuple[int, int] | None) -> str | None:
    """The CUDA_DEVICE_MAX_CONNECTIONS a run needs, or None to leave the environment as it is.

    The CUDA driver reads it when the process's context is created. Megatron-LM's own rules:
    - TP or CP > 1 without FSDP, before Blackwell (``capability`` major < 10; None on CPU): "1".
      With one hardware queue the GPU runs kernels in launch order, so the tensor-parallel
      all-gathers and reduce-scatters megatron's linears launch ahead of a GEMM start first and
      overlap it (megatron-core warns on every rank otherwise). A value the user exported stays.
    - FSDP: anything but "1", which would queue FSDP2's prefetching all-gathers behind the
      layer's compute; refused in one line.
    """
    p = cfg.parallel
    if p.fsdp:
        if current == "1":
            raise ConfigError("CUDA_DEVICE_MAX_CONNECTIONS=1 serializes FSDP's all-gathers with compute; "
                              "unset it (or set it > 1) for parallel.fsdp=true")
        return None
    needs_one = (p.tp > 1 or p.cp > 1) and (capability is None or capability[0] < 10)
    return "1" if needs_one and current is None else None


def init_distributed(cfg: Config, backends: Backends) -> None:
    """Start torch.distributed (torchrun env or a one-process group) and megatron's parallel state.

    A single process still gets a process group, so the exact same megatron code path runs on a
    laptop and on a cluster. CUDA_DEVICE_MAX_CONNECTIONS is settled first: set_device creates the
    CUDA context, which reads it.
    """
    if not torch.distributed.is_initialized():
        cuda = backends.device == "cuda"
        connections = cuda_device_max_connections(cfg, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
                                                  torch.cuda.get_device_capability(local_rank()) if cuda else None)
        if connections is not None:
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = connections
            if cuda:
                log.info("CUDA_DEVICE_MAX_CONNECTIONS=%s: tensor/context-parallel communication overlaps the "
                         "GEMMs it was launched before", connections)
        # Binding the GPU to the process group tells NCCL which device is this rank's (torch
        # otherwise guesses from the global rank, "This can cause a hang") and every barrier of
        # the group uses it; gloo groups are not bound to a device.
        device_id = None
        if cuda:
            device_id = use_local_device()
        timeout = datetime.timedelta(minutes=10)
        restart_store = torchrun_restart_store(timeout)
        if restart_store is not None:
            torch.distributed.init_process_group(backend=backends.distributed, timeout=timeout,
                                                 store=restart_store, rank=int(os.environ["RANK"]),
                                                 world_size=int(os.environ["WORLD_SIZE"]), device_id=device_id)
        elif "RANK" in os.environ:  # torchrun / srun: env:// rendezvous
            torch.distributed.init_process_group(backend=backends.distributed, timeout=timeout, device_id=device_id)
        else:  # a plain process; the environment is left alone for any child process
            torch.distributed.init_process_group(
                backend=backends.distributed, timeout=timeout, rank=0, world_size=1,
                init_method=f"tcp://127.0.0.1:{_free_port()}", device_id=device_id,
            )
        # Every way out of the process (return, exception, sys.exit) destroys the group, as NCCL
        # asks ("destroy_process_group() was not called before program exit").
        atexit.unregister(shutdown_distributed)  # once, however often a test starts a group
        atexit.register(shutdown_distributed)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tp,
            pipeline_model_parallel_size=cfg.parallel.pp,
            context_parallel_size=cfg.parallel.cp,
            # Hybrid FSDP: the shard groups are megatron's intra-instance DP x CP groups, the
            # replicas its inter-instance groups (model/fsdp.py).
            num_distributed_optimizer_instances=fsdp_replicas(cfg),
        )


def sharding(cfg: Config) -> str:
    """How the weights, gradients and Adam state are spread over the DP x CP ranks, for the log."""
    p = cfg.parallel
    if p.fsdp:
        shard = p.fsdp_shard_size or p.dp * p.cp
        return f"fsdp over {shard} ranks" + (f" x {p.dp * p.cp // shard} replicas" if shard < p.dp * p.cp else "")
    return "ddp, distributed optimizer" if cfg.optim.distributed_optimizer else "ddp"


def fsdp_replicas(cfg: Config) -> int:
    """How many replicas hybrid FSDP keeps (DP x CP / parallel.fsdp_shard_size); 1 otherwise."""
    p = cfg.parallel
    if not (p.fsdp and p.fsdp_shard_size):
        return 1
    return torch.distributed.get_world_size() // (p.tp * p.pp * p.fsdp_shard_size)


def barrier(group: torch.distributed.ProcessGroup | None = None) -> None:
    """torch.distributed.barrier naming this rank's GPU on NCCL ("barrier(): using the device under
    current context" otherwise); on gloo the same call without a device."""
    nccl = torch.distributed.get_backend(group) == "nccl"
    torch.distributed.barrier(group, device_ids=[local_device().index] if nccl else None)


def shutdown_distributed() -> None:
    """Destroy megatron's parallel state and the process group; idempotent, for every exit path."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed host RNGs identically everywhere (weights are seeded per parameter, see model.init)
    and megatron's model-parallel RNG tracker, which activation recompute restores."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def dp_sum(local: list[float], device: torch.device) -> list[int]:
    """Per-DP-rank counts summed over the data-parallel group (collective)."""
    total = torch.tensor(local, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return [int(v) for v in total.tolist()]
