"""ModuleSpecs for the Goku layer: Transformer Engine leaves on GPU, megatron's local ones on CPU.

The two specs name the same layer and differ only in the linear and attention leaf classes, as
megatron-core's GPT specs do. TE is imported only when its spec is asked for.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from goku_megatron.model.attention import FlashAttention, SDPAAttention
from goku_megatron.model.layer import GokuLayer, GokuLayerSubmodules

CORE_ATTENTION = {"sdpa": SDPAAttention, "flash": FlashAttention}


def local_layer_spec(attention: str = "sdpa") -> ModuleSpec:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ModuleSpec(
        module=GokuLayer,
        submodules=GokuLayerSubmodules(
            column_linear=ColumnParallelLinear,
            row_linear=RowParallelLinear,
            core_attention=CORE_ATTENTION[attention],
        ),
    )


def te_layer_spec(attention: str = "flash") -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return ModuleSpec(
        module=GokuLayer,
        submodules=GokuLayerSubmodules(
            column_linear=TEColumnParallelLinear,
            row_linear=TERowParallelLinear,
            core_attention=CORE_ATTENTION[attention],
        ),
    )


def layer_spec(linear: str, attention: str) -> ModuleSpec:
    """The spec for the chosen backends (see platform.choose_backends)."""
    return te_layer_spec(attention) if linear == "te" else local_layer_spec(attention)
