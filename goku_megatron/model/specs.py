"""ModuleSpecs for the Goku layer: Transformer Engine leaves on GPU, megatron's local ones on CPU.

The two specs name the same layer and differ only in the linear and attention leaf classes, as
megatron-core's GPT specs do. TE is imported only when its spec is asked for.

Self-attention is where context parallelism communicates: with the ``te`` attention backend TE's
own CP attention, otherwise Ulysses all-to-all around the local backend (a plain pass-through
when cp = 1). Cross-attention never communicates; with ``te`` it runs on torch SDPA.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from goku_megatron.model.attention import FlashAttention, SDPAAttention, TECoreAttention, UlyssesAttention
from goku_megatron.model.layer import GokuLayer, GokuLayerSubmodules

CORE_ATTENTION = {"sdpa": SDPAAttention, "flash": FlashAttention}


class LocalRowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear, handing its own TP group to its matmul: megatron-core 0.16
    hands None, whose fallback warns (a DeprecationWarning) on every call, and torch.compile cannot
    trace a warning, so a compiled layer would break its graph there."""

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args, tp_group=None, **kwargs):
        return super()._forward_impl(input, weight, *args, tp_group=self.tp_group, **kwargs)


def _goku_layer(column_linear: type, row_linear: type, attention: str) -> ModuleSpec:
    """The Goku layer with the given linear leaves and attention backend: with ``te``, TE's CP
    attention for self-attention and SDPA for cross-attention; otherwise Ulysses around the
    backend for self-attention and the backend itself for cross-attention."""
    if attention == "te":
        self_attention, cross_attention = TECoreAttention, SDPAAttention
    else:
        self_attention = ModuleSpec(module=UlyssesAttention, submodules=CORE_ATTENTION[attention])
        cross_attention = CORE_ATTENTION[attention]
    return ModuleSpec(module=GokuLayer, submodules=GokuLayerSubmodules(
        column_linear=column_linear, row_linear=row_linear, self_attention=self_attention,
        cross_attention=cross_attention))


def local_layer_spec(attention: str = "sdpa") -> ModuleSpec:
    """megatron's local linears: CPU, or a GPU without Transformer Engine."""
    return _goku_layer(ColumnParallelLinear, LocalRowParallelLinear, attention)


def te_layer_spec(attention: str = "flash") -> ModuleSpec:
    """Transformer Engine's linears (GPU); TE is imported only here."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return _goku_layer(TEColumnParallelLinear, TERowParallelLinear, attention)


def layer_spec(linear: str, attention: str) -> ModuleSpec:
    """The spec for the chosen backends (see platform.choose_backends)."""
    return te_layer_spec(attention) if linear == "te" else local_layer_spec(attention)


def cp_layout(spec: ModuleSpec) -> str:
    """The token layout across context-parallel ranks that the spec's self-attention needs."""
    core = spec.submodules.self_attention
    return (core.module if isinstance(core, ModuleSpec) else core).cp_layout
