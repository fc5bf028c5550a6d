"""What a region of code asks of torch, op by op: the aten ops it dispatches, counted per op, and
those among them that make the host wait for the GPU.

A training step should queue its kernels and let the host run ahead: an op whose result the host
must read (a tensor's value as a Python number, the size of a boolean-mask selection, a copy to
host memory, a pageable copy to the GPU) stalls the host until every kernel queued before it has
finished, and the GPU idles while the host catches up. ``OpTrace`` names such ops wherever they
run, on CPU too, where nothing waits: tests/test_host_sync.py checks that a step's forward and
backward dispatch none, and benchmarks/throughput.py counts the ops of a layer with it.

    with OpTrace() as trace:
        loss = model(pack).square().mean()
        loss.backward()
    assert not trace.syncs, trace.syncs
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output size or value the host reads from the device.
_SYNCING = {
    aten._local_scalar_dense: "a tensor's value read as a Python number (.item(), int(), float(), bool())",
    aten.nonzero: "nonzero: its output size depends on the values",
    aten.masked_select: "masked_select: its output size depends on the mask",
    aten.unique_consecutive: "unique_consecutive: its output size depends on the values",
    aten._unique: "unique: its output size depends on the values",
    aten._unique2: "unique: its output size depends on the values",
    aten.unique_dim: "unique: its output size depends on the values",
    aten.equal: "torch.equal returns a Python bool",
    aten.is_nonzero: "a one-element tensor read as a bool",
}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def host_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> str | None:
    """Why ``func`` called with ``args`` makes the host wait for the device, or None."""
    packet = func.overloadpacket
    if packet in _SYNCING:
        return _SYNCING[packet]
    if packet in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
        return "boolean-mask indexing: the selection's size depends on the mask"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size: the output size is the sum of the repeats"
    if packet in (aten._to_copy, aten.copy_):
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device") or source.device
        non_blocking = (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)) if packet is aten.copy_ \
            else kwargs.get("non_blocking", False)
        if source.device.type != "cpu" and torch.device(target).type == "cpu":
            return "a copy from the device to host memory"
        if source.device.type == "cpu" and torch.device(target).type != "cpu" and not (
                non_blocking and source.is_pinned()):
            return "a host-to-device copy from pageable memory or blocking"
    return None


class OpTrace(TorchDispatchMode):
    """Records every aten op dispatched while active (in the backward pass too: autograd runs its
    nodes with the dispatch modes of the thread that started it).

    ``counts``: how many times each op ran. ``syncs``: one line per op that makes the host wait
    for the device (``host_sync``). ``Tensor.tolist()`` reads a CPU tensor without dispatching an
    op (on a GPU it dispatches the copy to the host), so it is recorded on its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.syncs: list[str] = []
        self._tolist: Any = None

    @property
    def total(self) -> int:
        """All ops dispatched."""
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[str(func)] += 1
        if (reason := host_sync(func, args, kwargs)) is not None:
            self.syncs.append(f"{func}: {reason}")
        return func(*args, **kwargs)

    def __enter__(self) -> OpTrace:
        self._tolist = torch.Tensor.tolist
        original, syncs = self._tolist, self.syncs

        def tolist(tensor: torch.Tensor) -> Any:
            syncs.append("Tensor.tolist: the values read into Python")
            return original(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)
