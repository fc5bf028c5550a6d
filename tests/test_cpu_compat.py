"""One test per patch in goku_megatron.cpu_compat: the patched megatron-core code runs on CPU.

When megatron-core is bumped, these tests are the checklist: every redirected module must still
need its redirect (it still mentions CUDA) and every patched code path must still run on CPU and
compute the same numbers as plain torch.

Tests share one process with the rest of the suite: anything that un-applies a patch or reseeds an
RNG does so through ``monkeypatch`` or a restoring fixture: cpu_compat is always left applied.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from numerics import EPS32, assert_close_to_scale
from torch.distributed.device_mesh import DeviceMesh

from goku_megatron import cpu_compat, patching
from goku_megatron.checkpoint.writer import install_in_process_results_queue
from goku_megatron.config import ConfigError

# A real CUDA dependency in a module's source: torch.cuda.<x>, device="cuda", or tensor.cuda().
# Plain "cuda" is not enough (names like cuda_graph_impl would keep a dead entry alive).
_CUDA_USE = re.compile(r"torch\.cuda\.\w|device\s*=\s*['\"]cuda['\"]|\.cuda\(")


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def patched(megatron_world):
    """The one-process megatron world with cpu_compat active (it is a no-op on a CUDA machine)."""
    if not cpu_compat._applied:
        pytest.skip("cpu_compat is inactive: CUDA is available, megatron-core runs unpatched")


@pytest.fixture
def restore_rng(patched):
    """Snapshot the CPU RNG and megatron's RNG tracker; put both back after the test."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    cpu_state = torch.get_rng_state()
    states = {name: state.clone() for name, state in tracker.get_states().items()}
    seeds = set(tracker.seeds_)
    yield tracker
    tracker.reset()
    tracker.set_states(states)
    tracker.seeds_ = seeds
    torch.set_rng_state(cpu_state)


def _redirected():
    return [importlib.import_module(name) for name in cpu_compat.REDIRECTED_MODULES]


class _FakeGroup:
    """A process group that reports more than one rank, so the gather/scatter helpers take their
    allocation path instead of the world-size-1 shortcut (the collective itself is faked)."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _tiny_transformer_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    return TransformerConfig(**{**kwargs, **overrides})


def _tiny_model(config, seed: int = 0):
    """The smallest thing megatron's schedules and DDP accept: a module with config, model_type and
    set_input_tensor (looked up through DDP's ``.module`` by get_attr_wrapped_model)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class Tiny(MegatronModule):
        model_type = ModelType.encoder_or_decoder

        def __init__(self):
            super().__init__(config)
            self.lin = torch.nn.Linear(8, 3)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            return self.lin(x)

    gen = torch.Generator().manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _ddp(module, config, **ddp_overrides):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False, **ddp_overrides)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)


def _torch_twin(model):
    twin = torch.nn.Linear(8, 3)
    twin.load_state_dict(model.lin.state_dict())
    return twin


# ----------------------------------------------------------------------------------------------
# (a) version pin (tests/test_patching.py checks the pin itself)


def test_apply_refuses_other_megatron_core_before_patching(monkeypatch):
    from megatron.core import package_info
    from megatron.core.tensor_parallel import mappings

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(mappings, "torch", torch)
    with pytest.raises(ConfigError, match="0.17.0"):
        cpu_compat.apply(force=True)
    assert mappings.torch is torch  # nothing was patched
    assert cpu_compat._applied is False


# ----------------------------------------------------------------------------------------------
# (a') megatron's JIT fuser, off on CPU before megatron-core is imported


def test_jit_fuser_is_off_in_a_fresh_process_that_imports_goku_first():
    """What every torchrun rank and CLI process does: import goku_megatron, then megatron-core.
    Its fused kernels stay plain functions, and torch.compile's machinery is never imported."""
    code = ("import sys, goku_megatron, megatron.core.models\n"
            "from megatron.core import jit\n"
            "from megatron.core.fusions import fused_bias_geglu\n"
            "y = __import__('torch').randn(3, 4)\n"
            "assert fused_bias_geglu.geglu(y).shape == (3, 2)\n"  # runs eagerly
            "print(jit.jit_fuser is jit.noop_decorator, 'torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "False"]


def test_jit_fuser_hook_leaves_cuda_machines_and_late_imports_alone(monkeypatch):
    from megatron.core import jit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.disable_jit_fuser_on_cpu() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # megatron.core.jit is imported in this process already: it reports, and installs nothing more
    finders = list(sys.meta_path)
    assert cpu_compat.disable_jit_fuser_on_cpu() is (jit.jit_fuser is jit.noop_decorator)
    assert sys.meta_path == finders


# ----------------------------------------------------------------------------------------------
# (b) the torch -> CPU_TORCH redirect


@pytest.mark.parametrize("module_name", list(cpu_compat.REDIRECTED_MODULES))
def test_module_is_redirected_and_still_needs_it(patched, module_name):
    module = importlib.import_module(module_name)
    assert module.torch is cpu_compat.CPU_TORCH
    source = inspect.getsource(module)
    assert _CUDA_USE.search(source), (
        f"{module_name} no longer uses CUDA "
        f"({cpu_compat.REDIRECTED_MODULES[module_name]!r} is gone in this megatron-core): "
        f"remove it from cpu_compat.REDIRECTED_MODULES"
    )


def test_redirect_refuses_a_module_that_renamed_torch(monkeypatch):
    """A megatron module that stops importing torch as 'torch' must fail apply(), not be skipped."""
    monkeypatch.setattr(cpu_compat, "_applied", False)
    for module in _redirected():
        monkeypatch.setattr(module, "torch", torch)
    last = _redirected()[-1]
    monkeypatch.setattr(last, "torch", object())
    with pytest.raises(RuntimeError, match="no longer imports torch"):
        cpu_compat.apply(force=True)


def test_patch_attr_refuses_a_vanished_function(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(cpu_compat, "_applied", False)
    for module in _redirected():
        monkeypatch.setattr(module, "torch", torch)
    monkeypatch.delattr(mrandom, "_get_cuda_rng_state")
    with pytest.raises(RuntimeError, match="_get_cuda_rng_state is gone"):
        cpu_compat.apply(force=True)


def test_cpu_torch_maps_cuda_placement_to_cpu():
    T = cpu_compat.CPU_TORCH
    cpu = torch.device("cpu")
    assert T.zeros(2, device="cuda").device == cpu
    assert T.ones(2, device="cuda:1").device == cpu
    assert T.empty(2, device=torch.device("cuda", 0)).device == cpu
    assert T.full((2,), 3.0, device=0).device == cpu  # an int device index means a GPU
    assert T.arange(3, device="cuda").tolist() == [0, 1, 2]
    t = T.tensor([1], device="cuda", pin_memory=True)
    assert t.device == cpu and t.tolist() == [1]
    assert T.zeros(2, device="cpu").device == cpu
    assert T.zeros(2, device="meta").device.type == "meta"  # non-CUDA devices pass through
    assert T.zeros(2, dtype=torch.int).dtype == torch.int

    assert T.cuda.current_device() == cpu
    assert T.cuda.synchronize() is None
    assert T.cuda.is_available() is False
    assert torch.equal(T.cuda.get_rng_state(), torch.get_rng_state())

    assert T.float32 is torch.float32
    assert T.nn is torch.nn
    assert T.distributed is torch.distributed
    assert T.cuda.FloatTensor is torch.cuda.FloatTensor  # the rest of torch.cuda forwards


def test_cpu_torch_cuda_rng_is_the_cpu_generator(restore_rng):
    T = cpu_compat.CPU_TORCH
    T.cuda.manual_seed(7)
    a = torch.rand(3)
    state = T.cuda.get_rng_state()
    b = torch.rand(3)
    T.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), b)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_without_the_redirect_megatron_needs_cuda(patched, monkeypatch):
    """The redirect is load-bearing: un-patched, a gather buffer asks for a CUDA device."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from megatron.core.tensor_parallel import mappings

    monkeypatch.setattr(mappings, "torch", torch)
    monkeypatch.setattr(mappings, "dist_all_gather_func", lambda out, inp, group: None)
    with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):
        mappings._gather_along_first_dim(torch.ones(2, 3), _FakeGroup(2))


# ----------------------------------------------------------------------------------------------
# Exercised megatron paths: tensor_parallel.mappings / layers / utils


def test_mappings_world_size_one_are_identities(patched):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mappings._gather_along_first_dim(x, group), x)
    assert torch.equal(mappings._gather_along_first_dim(x, group, use_global_buffer=True), x)
    assert torch.equal(mappings._gather_along_last_dim(x, group), x)
    assert torch.equal(mappings._reduce_scatter_along_first_dim(x, group), x)
    for fn in (mappings.gather_from_tensor_model_parallel_region,
               mappings.gather_from_sequence_parallel_region,
               mappings.scatter_to_sequence_parallel_region,
               mappings.reduce_scatter_to_sequence_parallel_region,
               mappings.all_gather_last_dim_from_tensor_parallel_region,
               mappings.reduce_scatter_last_dim_to_tensor_parallel_region,
               mappings.copy_to_tensor_model_parallel_region,
               mappings.reduce_from_tensor_model_parallel_region,
               mappings.scatter_to_tensor_model_parallel_region):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        assert torch.equal(y, x), fn.__name__
        assert torch.equal(xi.grad, g), fn.__name__


def test_mappings_allocate_gather_and_scatter_buffers_on_cpu(patched, monkeypatch):
    """Two fake ranks holding the same tensor: the helpers allocate their output buffers via
    torch.cuda.current_device() (the redirected line), then run the (faked) collective."""
    from megatron.core.tensor_parallel import mappings

    def all_gather(out, inp, group):
        out.copy_(torch.cat([inp] * group.size()))

    def reduce_scatter(out, inp, group):
        out.copy_(group.size() * inp.chunk(group.size())[group.rank()])

    monkeypatch.setattr(mappings, "dist_all_gather_func", all_gather)
    monkeypatch.setattr(mappings, "dist_reduce_scatter_func", reduce_scatter)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    two = _FakeGroup(2)

    for use_global_buffer in (False, True):
        y = mappings._gather_along_first_dim(x, two, use_global_buffer=use_global_buffer)
        assert y.device.type == "cpu" and torch.equal(y, torch.cat([x, x]))
    y = mappings._gather_along_last_dim(x, two)
    assert y.device.type == "cpu" and torch.equal(y, torch.cat([x, x], dim=-1))
    y = mappings._reduce_scatter_along_first_dim(x, _FakeGroup(2, rank=1))
    assert y.device.type == "cpu" and torch.equal(y, 2 * x[2:])


def test_tensor_parallel_utils_split_and_gather_1d_on_cpu(patched):
    from megatron.core.tensor_parallel import utils as tp_utils

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    chunk = tp_utils.split_tensor_into_1d_equal_chunks(x, new_buffer=True)
    assert chunk.device.type == "cpu" and chunk.data_ptr() != x.data_ptr()
    assert torch.equal(chunk, x.view(-1))
    gathered = tp_utils.gather_split_1d_tensor(chunk)
    assert gathered.device.type == "cpu" and torch.equal(gathered.view(3, 4), x)


def test_sequence_parallel_linear_runs_on_cpu(patched, restore_rng):
    """ColumnParallelLinear with GPU-style init (weights allocated on current_device() under the
    RNG tracker) and sequence parallelism forced on over the 1-rank TP group, so forward all-gathers
    into megatron's global buffer and backward reduce-scatters into a current_device() buffer."""
    from megatron.core.tensor_parallel import layers, model_parallel_cuda_manual_seed

    config = _tiny_transformer_config(use_cpu_initialization=False)
    config.sequence_parallel = True  # TransformerConfig refuses it for TP=1; the code path is fine
    model_parallel_cuda_manual_seed(5)
    lin = layers.ColumnParallelLinear(8, 6, config=config, init_method=torch.nn.init.normal_,
                                      bias=True, gather_output=False)
    assert lin.weight.device.type == "cpu" and lin.bias.device.type == "cpu"
    # GPU-style init draws the weight from the model-parallel stream: seed + 2718 + tp_rank.
    expected_w = torch.empty(6, 8)
    torch.nn.init.normal_(expected_w, generator=torch.Generator().manual_seed(5 + 2718))
    assert torch.equal(lin.weight.detach(), expected_w)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
    g = torch.randn(4, 2, 6, generator=gen)
    y, _ = lin(x)
    y.backward(g)

    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, w, b)
    yr.backward(g)
    for ours, ref in ((y, yr), (x.grad, xr.grad), (lin.weight.grad, w.grad), (lin.bias.grad, b.grad)):
        assert_close_to_scale(ours, ref, ulps=16)


@pytest.mark.parametrize("batch_p2p_comm", [False, True])
def test_p2p_communication_buffers_on_cpu(patched, monkeypatch, batch_p2p_comm):
    """P2PCommunicator allocates receive buffers on current_device() and (batched, synced) calls
    torch.cuda.synchronize. gloo cannot send to its own rank, so the transport is a loopback:
    this rank is its own previous and next pipeline stage."""
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.pipeline_parallel import p2p_communication

    def loopback(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                 group, prev_pipeline_rank, next_pipeline_rank):
        with torch.no_grad():
            if tensor_recv_prev is not None:
                tensor_recv_prev.copy_(tensor_send_next)
            if tensor_recv_next is not None:
                tensor_recv_next.copy_(tensor_send_prev)
        return [] if batch_p2p_comm else {}

    monkeypatch.setattr(p2p_communication, "_p2p_ops", loopback)
    monkeypatch.setattr(p2p_communication, "_batched_p2p_ops", loopback)
    config = ModelParallelConfig(pipeline_dtype=torch.float32, batch_p2p_comm=batch_p2p_comm,
                                 batch_p2p_sync=True)
    comm = p2p_communication.P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(),
                                             config)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    received = comm.send_forward_recv_forward(x, recv_prev=True, tensor_shape=(2, 3))
    assert received.device.type == "cpu" and received.requires_grad
    assert torch.equal(received.detach(), x)
    grad = comm.send_backward_recv_backward(2 * x, recv_next=True, tensor_shape=(2, 3))
    assert grad.device.type == "cpu" and torch.equal(grad.detach(), 2 * x)


# ----------------------------------------------------------------------------------------------
# (c) tensor_parallel.random: RNG tracker and activation recompute on the CPU generator


def test_rng_state_functions_are_replaced(patched):
    from megatron.core.tensor_parallel import random as mrandom

    assert mrandom._get_cuda_rng_state is cpu_compat._cpu_rng_state
    assert mrandom._set_cuda_rng_state is cpu_compat._set_cpu_rng_state
    source = inspect.getsource(mrandom)
    assert "torch.cuda.default_generators" in source or "_C._cuda_setRNGState" in source, (
        "megatron's _get/_set_cuda_rng_state no longer read the CUDA generators: "
        "drop the random patches in cpu_compat.apply()"
    )


def test_rng_tracker_fork_uses_its_own_stream_and_restores_default(restore_rng):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    tracker = get_cuda_rng_tracker()
    # The default ("data-parallel") stream is seeded with the seed itself.
    saved = torch.get_rng_state()
    default_draw = torch.rand(4)
    assert torch.equal(default_draw, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    torch.set_rng_state(saved)

    with tracker.fork():
        forked = torch.rand(4)
        forked_again = torch.rand(4)
    # The model-parallel stream: seed + 2718 + tp_rank, independent of the default stream.
    mp = torch.Generator().manual_seed(123 + 2718)
    assert torch.equal(forked, torch.rand(4, generator=mp))
    assert torch.equal(forked_again, torch.rand(4, generator=mp))
    assert not torch.equal(forked, default_draw)
    # Leaving the fork puts the default stream back exactly where it was.
    after = torch.rand(4)
    assert torch.equal(after, default_draw)
    # Re-entering the fork continues its stream where it stopped.
    with tracker.fork():
        assert torch.equal(torch.rand(4), torch.rand(4, generator=mp))
    default = torch.Generator().manual_seed(123)
    torch.rand(4, generator=default)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=default))  # default stream goes on


@pytest.mark.parametrize("distribute_saved_activations", [False, True])
def test_activation_recompute_matches_no_recompute(restore_rng, distribute_saved_activations):
    """CheckpointFunction re-runs the function in backward from the saved CPU + tracker RNG states;
    with dropout on both streams, outputs and gradients only match if both are restored."""
    from megatron.core.tensor_parallel import checkpoint, get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 8, generator=gen)
    x0 = torch.randn(4, 8, generator=gen)
    g = torch.randn(4, 8, generator=gen)

    def run(use_checkpoint: bool):
        w = w0.clone().requires_grad_()
        x = x0.clone().requires_grad_()

        def fn(inp):
            h = torch.nn.functional.dropout(inp @ w, p=0.5, training=True)  # default stream
            with tracker.fork():
                h = torch.nn.functional.dropout(h, p=0.5, training=True)  # model-parallel stream
            return torch.tanh(h)

        y = checkpoint(fn, distribute_saved_activations, x) if use_checkpoint else fn(x)
        y.backward(g)
        return y.detach(), x.grad, w.grad

    cpu_state = torch.get_rng_state()
    tracker_states = {k: v.clone() for k, v in tracker.get_states().items()}
    ref = run(use_checkpoint=False)
    after_ref = torch.get_rng_state()

    torch.set_rng_state(cpu_state)
    tracker.set_states({k: v.clone() for k, v in tracker_states.items()})
    got = run(use_checkpoint=True)

    assert (ref[0] == 0).any() and (ref[0] != 0).any()  # dropout really dropped something
    for r, o in zip(ref, got):
        assert torch.equal(r, o)
    # Recompute in backward leaves the default stream where the forward left it.
    assert torch.equal(torch.get_rng_state(), after_ref)


# ----------------------------------------------------------------------------------------------
# Grad norms and clipping (megatron.core.utils, optimizer.clip_grads, (d) optimizer.optimizer)


def _grads(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in ((3, 4), (5,), (2, 2, 2))]


def test_local_multi_tensor_l2_norm_on_cpu(patched):
    from megatron.core.utils import local_multi_tensor_l2_norm

    grads = _grads()
    norm, per_tensor = local_multi_tensor_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int),
                                                  [grads], False)
    assert per_tensor is None
    assert norm.device.type == "cpu" and norm.shape == (1,) and norm.dtype == torch.float32
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert_close_to_scale(norm[0], expected, ulps=16)


@pytest.mark.parametrize("norm_type", [2, 1, float("inf")])
def test_get_grad_norm_fp32_on_cpu(patched, norm_type):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    grads = _grads()
    total = get_grad_norm_fp32(grads, norm_type=norm_type)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), ord=norm_type)
    assert isinstance(total, float)
    assert total == pytest.approx(expected.item(), rel=16 * EPS32)
    assert get_grad_norm_fp32([]) == 0.0


def _params_with_grads(seed: int = 0):
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in _grads(seed)]
    for p, g in zip(params, _grads(seed)):
        p.grad = g.clone()
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_by_total_norm_matches_torch(patched, max_norm):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    ours = _params_with_grads()
    ours.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: skipped, not an error
    ref = _params_with_grads()
    total = get_grad_norm_fp32([p.grad for p in ours if p.grad is not None])
    cpu_compat.clip_grad_by_total_norm(ours, max_norm, total)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert total == pytest.approx(ref_total.item(), rel=16 * EPS32)
    for o, r in zip(ours, ref):
        assert_close_to_scale(o.grad, r.grad, ulps=16)
    if max_norm > total:  # under the max: untouched, bit for bit
        for o, g in zip(ours, _grads()):
            assert torch.equal(o.grad, g)
    else:
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:3]]))
        assert clipped.item() == pytest.approx(max_norm, rel=64 * EPS32)


def test_clip_grad_by_total_norm_decoupled_grad(patched):
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in _grads()]
    for p, g in zip(params, _grads()):
        p.decoupled_grad = g.clone()
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads()])).item()
    cpu_compat.clip_grad_by_total_norm(params, 1.0, total, use_decoupled_grad=True)
    for p, g in zip(params, _grads()):
        assert p.grad is None
        assert_close_to_scale(p.decoupled_grad, g * (1.0 / (total + 1e-6)), ulps=4)


def test_optimizer_uses_cpu_clip(patched):
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is cpu_compat.clip_grad_by_total_norm
    source = inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32)
    assert "torch.cuda.FloatTensor" in source, (
        "megatron's clip_grad_by_total_norm_fp32 no longer asserts CUDA tensors: "
        "drop the clip patch in cpu_compat.apply()"
    )
    # The original still refuses CPU gradients, i.e. the patch is needed.
    params = _params_with_grads()
    with pytest.raises(AssertionError):
        clip_grads.clip_grad_by_total_norm_fp32(params, 0.1, 10.0)


# ----------------------------------------------------------------------------------------------
# Megatron DDP, the no-pipelining schedule and the megatron optimizer on CPU


def test_ddp_allocates_grad_buffers_on_cpu(patched):
    config = _tiny_transformer_config()
    model = _tiny_model(config)
    ddp = _ddp(model, config)
    (buffer,) = ddp.buffers
    n = sum(p.numel() for p in model.parameters())
    assert buffer.grad_data.device.type == "cpu"
    assert buffer.grad_data.dtype == torch.float32 and buffer.grad_data.numel() >= n
    storage = buffer.grad_data.untyped_storage().data_ptr()
    for p in model.parameters():
        assert p.main_grad.device.type == "cpu"
        assert p.main_grad.untyped_storage().data_ptr() == storage  # a view into the buffer

    ddp.zero_grad_buffer()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ddp(x).pow(2).sum().backward()
    ddp.finish_grad_sync()  # gloo all-reduce over the 1-rank DP group
    twin = _torch_twin(model)
    twin(x).pow(2).sum().backward()
    assert_close_to_scale(model.lin.weight.main_grad, twin.weight.grad, ulps=16)
    assert_close_to_scale(model.lin.bias.main_grad, twin.bias.grad, ulps=16)
    assert model.lin.weight.grad is None  # accumulated into main_grad by DDP's hook

    # Offload/restore (torch.cuda.synchronize in distributed_data_parallel) keeps the views valid.
    ddp.offload_grad_buffers()
    assert buffer.grad_data.untyped_storage().size() == 0
    ddp.restore_grad_buffers()
    assert model.lin.weight.main_grad.untyped_storage().data_ptr() == \
        buffer.grad_data.untyped_storage().data_ptr()
    assert not buffer.grad_data.any() and not model.lin.weight.main_grad.any()


def test_forward_backward_no_pipelining_on_cpu(patched):
    """Per-token loss: the schedule sums num_tokens into total_num_tokens (created on "cuda") and
    finalize_model_grads broadcasts/all-reduces it over gloo and divides the grads by it."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    config = _tiny_transformer_config(calculate_per_token_loss=True)
    model = _tiny_model(config)
    ddp = _ddp(model, config)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads

    gen = torch.Generator().manual_seed(2)
    micro = [torch.randn(2, 8, generator=gen), torch.randn(3, 8, generator=gen)]

    def forward_step(data_iterator, model_chunk):
        x = next(data_iterator)
        out = model_chunk(x)

        def loss_func(output):
            loss = output.pow(2).sum()
            return loss, torch.tensor(x.shape[0], dtype=torch.int), {"loss": loss.detach()}

        return out, loss_func

    ddp.zero_grad_buffer()
    store = forward_backward_no_pipelining(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=len(micro), seq_length=1, micro_batch_size=2, forward_only=False,
    )

    twin = _torch_twin(model)
    losses = [twin(x).pow(2).sum() for x in micro]
    (sum(losses) / sum(x.shape[0] for x in micro)).backward()
    assert [d["loss"].item() for d in store] == pytest.approx([l.item() for l in losses], rel=16 * EPS32)
    assert_close_to_scale(model.lin.weight.main_grad, twin.weight.grad, ulps=16)
    assert_close_to_scale(model.lin.bias.main_grad, twin.bias.grad, ulps=16)


def test_megatron_optimizer_step_clips_like_torch(patched):
    """get_megatron_optimizer's fp32 path on CPU: grad norm, clip (the patched
    clip_grad_by_total_norm_fp32) and Adam step equal torch's clip_grad_norm_ + AdamW."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = _tiny_transformer_config()
    model = _tiny_model(config)
    ddp = _ddp(model, config)
    twin = _torch_twin(model)
    clip, lr = 0.05, 0.1
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=clip, bf16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=False),
        [ddp],
    )
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999),
                                eps=1e-8)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).pow(2).sum().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()

    twin(x).pow(2).sum().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
    ref_opt.step()
    assert ok
    assert grad_norm == pytest.approx(ref_norm.item(), rel=16 * EPS32)
    assert grad_norm > clip  # the step really clipped
    for ours, ref in ((model.lin.weight, twin.weight), (model.lin.bias, twin.bias)):
        assert_close_to_scale(ours.detach(), ref.detach(), ulps=64)


# ----------------------------------------------------------------------------------------------
# dist_checkpointing (state_dict_saver, filesystem_async, async_utils)


def _sharded_state(values: dict[str, torch.Tensor], step: int):
    from megatron.core.dist_checkpointing import ShardedTensor

    state = {k: ShardedTensor.from_rank_offsets(k, v, replica_id=0) for k, v in values.items()}
    state["step"] = step
    return state


def _values(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen),
            "b": torch.randn(5, generator=gen).to(torch.bfloat16),
            "idx": torch.arange(6, dtype=torch.int64)}


def _load(path):
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(
        _sharded_state({k: torch.zeros_like(v) for k, v in _values(0).items()}, step=0), str(path))
    return loaded


@pytest.fixture
def results_in_process(patched):
    """megatron's writers report through goku's in-process queue, as in any goku save (a
    Checkpointer installs it; these tests call dist_checkpointing.save themselves)."""
    install_in_process_results_queue()


def test_dist_checkpointing_save_load_round_trip(results_in_process, tmp_path):
    from megatron.core import dist_checkpointing

    values = _values(0)
    dist_checkpointing.save(_sharded_state({k: v.clone() for k, v in values.items()}, step=7),
                            str(tmp_path))
    loaded = _load(tmp_path)
    assert loaded["step"] == 7
    for k, v in values.items():
        assert loaded[k].device.type == "cpu"
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_dist_checkpointing_async_save_round_trip(results_in_process, tmp_path):
    """Async save as goku runs it: megatron's AsyncCallsQueue (async_utils, completion agreed over
    gloo with CPU tensors) with goku's writer thread, which reports through the in-process results
    queue (filesystem_async)."""
    from megatron.core import dist_checkpointing

    from goku_megatron.checkpoint.writer import WriterQueue, in_writer_thread

    values = _values(0)
    queue = WriterQueue(timeout_s=60)
    try:
        request = dist_checkpointing.save(
            _sharded_state({k: v.clone() for k, v in values.items()}, step=9), str(tmp_path),
            async_sharded_save=True)
        queue.schedule_async_request(in_writer_thread(request, after=lambda: None))
        finalized = queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        assert len(finalized) == 1
    finally:
        queue.close()
    loaded = _load(tmp_path)
    assert loaded["step"] == 9
    for k, v in values.items():
        assert torch.equal(loaded[k], v), k


# ----------------------------------------------------------------------------------------------
# The distributed optimizer (distrib_optimizer)


def _distributed(seed: int = 0):
    """A tiny model under megatron DDP with the distributed optimizer (one DP rank)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = _tiny_transformer_config()
    model = _tiny_model(config, seed)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.1, weight_decay=0.0, clip_grad=0.0, bf16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=True), [ddp])
    return model, ddp, optimizer


def _adam_step(ddp, optimizer, seed: int = 3):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).pow(2).sum().backward()
    ddp.finish_grad_sync()
    return optimizer.step()


def test_distributed_optimizer_on_cpu_steps_like_torch_adamw(patched):
    """_build_model_and_main_param_groups accepts CPU parameters (reported as CUDA types while it
    sorts them) and the update equals torch's AdamW."""
    model, ddp, optimizer = _distributed()
    for p in model.parameters():
        assert "type" not in p.__dict__  # the reported CUDA type is gone again
        assert p.type() == "torch.FloatTensor"
    twin = _torch_twin(model)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.0)
    ok, _, _ = _adam_step(ddp, optimizer)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    twin(x).pow(2).sum().backward()
    ref_opt.step()
    assert ok
    for ours, ref in ((model.lin.weight, twin.weight), (model.lin.bias, twin.bias)):
        assert_close_to_scale(ours.detach(), ref.detach(), ulps=16)


def test_distributed_optimizer_needs_the_type_patch(patched, monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrapper = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    monkeypatch.setattr(DistributedOptimizer, "_build_model_and_main_param_groups",
                        classmethod(wrapper.__wrapped__))
    with pytest.raises(TypeError, match="torch.cuda.FloatTensor"):
        _distributed()


def _bf16_ddp():
    """The tiny model in bf16 under megatron DDP without the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = _tiny_transformer_config()
    model = _tiny_model(config, 0).to(torch.bfloat16)
    return model, DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))


def _bf16_optimizer(ddp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.1, weight_decay=0.0, clip_grad=0.0, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=False), [ddp])


def test_megatrons_bf16_optimizer_keeps_fp32_main_weights_of_cpu_params(patched):
    """Float16OptimizerWithFloat16Params sorts CPU parameters as it sorts CUDA ones (their CUDA type
    names reported while it does): each bf16 parameter gets an fp32 main copy, which the optimizer
    steps, and the bf16 weight is that copy rounded."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    model, ddp = _bf16_ddp()
    optimizer = _bf16_optimizer(ddp)
    (inner,) = optimizer.chained_optimizers if hasattr(optimizer, "chained_optimizers") else (optimizer,)
    assert isinstance(inner, Float16OptimizerWithFloat16Params)
    for p in model.parameters():
        assert "type" not in p.__dict__ and p.type() == "torch.BFloat16Tensor"
    main = [m for group in inner.fp32_from_float16_groups for m in group]
    assert main and {m.dtype for m in main} == {torch.float32}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).float().pow(2).sum().backward()
    ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok
    for p, m in zip([p for group in inner.float16_groups for p in group], main):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


def test_megatrons_bf16_optimizer_needs_the_type_patch(patched, monkeypatch):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    _, ddp = _bf16_ddp()
    monkeypatch.setattr(Float16OptimizerWithFloat16Params, "__init__",
                        Float16OptimizerWithFloat16Params.__init__.__wrapped__)
    with pytest.raises(TypeError, match="Received torch.BFloat16Tensor"):
        _bf16_optimizer(ddp)


# ----------------------------------------------------------------------------------------------
# The no-op rule: GPU runs use megatron-core untouched


def _patch_targets():
    from megatron.core.distributed import torch_fully_sharded_data_parallel
    from megatron.core.optimizer import optimizer
    from megatron.core.tensor_parallel import random as mrandom

    return [(mrandom, "_get_cuda_rng_state"), (mrandom, "_set_cuda_rng_state"),
            (optimizer, "clip_grad_by_total_norm_fp32"), (torch_fully_sharded_data_parallel, "DeviceMesh")]


def _unpatch(monkeypatch):
    """Make megatron look un-patched for one test; monkeypatch puts the patches back."""
    monkeypatch.setattr(cpu_compat, "_applied", False)
    for module in _redirected():
        monkeypatch.setattr(module, "torch", torch)
    sentinels = {}
    for module, attr in _patch_targets():
        sentinels[(module.__name__, attr)] = sentinel = object()
        monkeypatch.setattr(module, attr, sentinel)
    return sentinels


def test_apply_is_a_no_op_when_cuda_is_available(patched, monkeypatch):
    sentinels = _unpatch(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply() is False
    assert cpu_compat._applied is False
    for module in _redirected():
        assert module.torch is torch, module.__name__
    for module, attr in _patch_targets():
        assert getattr(module, attr) is sentinels[(module.__name__, attr)]


def test_apply_force_patches_even_with_cuda(patched, monkeypatch):
    _unpatch(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply(force=True) is True
    assert cpu_compat._applied is True
    for module in _redirected():
        assert module.torch is cpu_compat.CPU_TORCH, module.__name__
    assert cpu_compat.apply() is True  # idempotent once applied


def test_patches_are_restored_after_the_no_op_tests(patched):
    """Guard for the rest of the suite (runs after the tests above in file order)."""
    assert cpu_compat._applied is True
    for module in _redirected():
        assert module.torch is cpu_compat.CPU_TORCH
    from megatron.core.optimizer import optimizer
    from megatron.core.tensor_parallel import random as mrandom

    assert mrandom._get_cuda_rng_state is cpu_compat._cpu_rng_state
    assert optimizer.clip_grad_by_total_norm_fp32 is cpu_compat.clip_grad_by_total_norm
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    method = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    assert getattr(method.__func__, patching.WRAPPED)
    assert getattr(Float16OptimizerWithFloat16Params.__init__, patching.WRAPPED)


# ----------------------------------------------------------------------------------------------
# megatron's FSDP2 wrapper (parallel.fsdp)


def test_torch_fsdp_wrapper_shards_on_a_cpu_mesh(patched, monkeypatch):
    """megatron's TorchFullyShardedDataParallel asks for a "cuda" device mesh; with the patch it
    gets the CPU mesh of its group, FSDP2 shards the weights over gloo and the gradients equal
    torch's. Without the patch the wrapper cannot be built on CPU."""
    from megatron.core.distributed import TorchFullyShardedDataParallel, TorchFullyShardedDataParallelConfig
    from megatron.core.distributed import torch_fully_sharded_data_parallel as wrapper
    from torch.distributed.tensor import DTensor

    config = _tiny_transformer_config()
    model = _tiny_model(config)
    twin = _torch_twin(model)
    fsdp = TorchFullyShardedDataParallel(config, TorchFullyShardedDataParallelConfig(), model)
    assert isinstance(model.lin.weight, DTensor) and model.lin.weight.device_mesh.device_type == "cpu"
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    fsdp(x).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    assert_close_to_scale(model.lin.weight.grad.full_tensor(), twin.weight.grad, ulps=16)
    assert_close_to_scale(model.lin.bias.grad.full_tensor(), twin.bias.grad, ulps=16)

    monkeypatch.setattr(wrapper, "DeviceMesh", DeviceMesh)
    with pytest.raises(AssertionError, match="CUDA"):
        TorchFullyShardedDataParallel(config, TorchFullyShardedDataParallelConfig(), _tiny_model(config))
