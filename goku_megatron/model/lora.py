"""LoRA adapters on the Goku model's linear layers (docs/recipes.md, "LoRA finetuning").

An adapted linear computes ``base(x) + scale * B(A(dropout(x)))`` with A: in -> rank,
B: rank -> out, scale = lora.alpha / lora.rank, and is sharded like the layer it adapts. The
adapter's half on the base's sharded side is a megatron-core parallel linear; its low-rank side is
the same on every tensor-parallel rank:

- column-parallel base (input whole, output split over TP: Q/K/V, fc1, adaLN; local or Transformer
  Engine): A replicated [rank, in]; B a ColumnParallelLinear(rank, out), gathering its output when
  the base does. B all-reduces its input gradient over TP (megatron's dgrad all-reduce), so every
  rank computes the same gradient for A.
- row-parallel base (input split, output all-reduced: O, fc2): A a RowParallelLinear(in, rank) on
  the split input, its output all-reduced; B replicated [out, rank].
- a replicated torch Linear (the final layer): A and B replicated.

Each rank's ``B @ A`` is then exactly its shard of the full ``B @ A``, so ``merge`` folds the
adapters into the base weight shard without communication, and the rank need not divide by TP.
(Megatron-Bridge's ParallelLinearAdapter splits the rank dimension instead: rank % tp == 0 and one
more all-gather per adapter.) The adapters are megatron's local linears in the run's parameter
dtype (bf16 in a bf16 run) whatever the base is: they never run in FP8.

The adapters live inside the layer they adapt: ``apply_lora`` makes the layer's class a subclass
that adds the children ``lora_A`` and ``lora_B`` (as torch's FSDP2 ``fully_shard`` turns a module
into an FSDPModule), so the base keeps its parameter and checkpoint names
(``layers.3.attn1.q_proj.weight``: a base checkpoint loads by name) and the adapters sit beside it
(``layers.3.attn1.q_proj.lora_A.weight``, the names peft and diffusers use).

Initial values (GokuModel.init_weights, by global parameter name like every weight): B = 0 and A
uniform in +-1/sqrt(in) (peft's default, so learning rates and alphas from peft recipes carry
over). At init an adapted model's output is therefore bitwise the base model's, and every parallel
layout starts from the same adapters.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from goku_megatron.config import LoraConfig, ModelConfig
from goku_megatron.model.specs import LocalRowParallelLinear

COLUMN, ROW, REPLICATED = "column", "row", "replicated"

# lora.targets (config.LORA_TARGETS) -> the modules each name adapts (patterns over the stage's
# module names) and how the base is sharded.
TARGET_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    **{f"{attn}.{p}": ((f"layers.*.{module}.{p}_proj", ROW if p == "o" else COLUMN),)
       for attn, module in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qkvo"},
    "mlp.fc1": (("layers.*.mlp.fc1", COLUMN),),
    "mlp.fc2": (("layers.*.mlp.fc2", ROW),),
    "adaln": (("layers.*.norm1.linear", COLUMN),),
    "final": (("final_layer.adaln", REPLICATED), ("final_layer.linear", REPLICATED)),
}
ADAPTER_NAMES = (".lora_A.", ".lora_B.")


def base_features(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of the whole (unsharded) linear that each TARGET_MODULES pattern names:
    what goku-plan counts the adapters from, without building the model (tests/test_planner.py
    checks them against a built one)."""
    d, f, patch = model.hidden_size, model.ffn_hidden_size, model.in_channels * model.patch_volume
    return {**{f"layers.*.{module}.{p}_proj": (d, d) for module in ("attn1", "attn2") for p in "qkvo"},
            "layers.*.mlp.fc1": (d, f), "layers.*.mlp.fc2": (f, d), "layers.*.norm1.linear": (d, 6 * d),
            "final_layer.adaln": (d, 2 * d), "final_layer.linear": (d, patch)}


def adapter_params(model: ModelConfig, lora: LoraConfig, tp: int) -> tuple[int, int]:
    """(adapter parameters of one Goku layer, of the final layer) on one TP rank, as ``_adapt``
    shards them (module docstring): rank x (in + out / TP) for a column-parallel base (A
    replicated, B split), rank x (in / TP + out) for a row-parallel one (A split, B replicated),
    rank x (in + out) for a replicated one."""
    features, per_layer, final = base_features(model), 0, 0
    for target in lora.targets:
        for pattern, kind in TARGET_MODULES[target]:
            n_in, n_out = features[pattern]
            count = lora.rank * ((n_in // tp if kind == ROW else n_in) + (n_out // tp if kind == COLUMN else n_out))
            if pattern.startswith("layers.*."):
                per_layer += count
            else:
                final += count
    return per_layer, final


def is_adapter(name: str) -> bool:
    """Whether a parameter name (local or global) is a LoRA adapter's."""
    return any(part in name for part in ADAPTER_NAMES)


def initial_value(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """An adapter's initial (full, unsharded) value: B zero, A uniform in +-1/sqrt(in)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(shape[1])


class ReplicatedLinear(torch.nn.Module):
    """The low-rank side of an adapter: one bias-free weight, the same on every TP rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _output(result: torch.Tensor | tuple) -> torch.Tensor:
    """A layer's output: megatron's linears return (output, bias), torch's the output."""
    return result[0] if isinstance(result, tuple) else result


class LoraLinear(torch.nn.Module):
    """What ``apply_lora`` mixes into the class of an adapted linear: its forward adds the adapter's
    output to the base's; ``merge`` folds the adapter into the base weight."""

    lora_A: torch.nn.Module
    lora_B: torch.nn.Module
    lora_kind: str
    lora_scale: float
    lora_dropout: float
    lora_base_class: type

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        delta = self.lora_delta(x)
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B(A(dropout(x))), shaped and sharded like the base's output."""
        if self.lora_dropout and self.training:
            x = self._dropout(x)
        return _output(self.lora_B(_output(self.lora_A(x)))) * self.lora_scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout of the adapter's input, the mask drawn at full width from the default generator
        (the same state on every TP rank) and, for a row-parallel base's split input, sliced to
        this rank's features: the ranks' masks are slices of one full-width mask, as at TP=1,
        without megatron's model-parallel RNG tracker (on CPU its fork warns at every call).
        Activation recompute restores the default generator, so the recomputed mask is the same."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        split = self.lora_kind == ROW and tp > 1
        shape = (*x.shape[:-1], x.shape[-1] * tp) if split else x.shape
        keep = torch.empty(shape, device=x.device).bernoulli_(1 - self.lora_dropout)
        if split:
            keep = keep.chunk(tp, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
        return x * (keep / (1 - self.lora_dropout)).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += scale * B @ A on this rank's shard (in fp32, rounded once to the weight's dtype);
        the layer becomes its base class again, without adapters."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.lora_scale
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        del self.lora_A, self.lora_B, self.lora_kind, self.lora_scale, self.lora_dropout
        self.__class__ = self.lora_base_class


class ParallelLoraLinear(LoraLinear):
    """An adapted megatron (local or Transformer Engine) parallel linear, which describes its own
    checkpoint entries."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """The base layer's entries under its own names, the adapters' beside them. The base
        layer describes its whole state dict with its own sharding, so the tensor-parallel half
        of the adapter (B of a column-parallel base, A of a row-parallel one) describes itself
        again; the replicated half is already right."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        half = "lora_B" if self.lora_kind == COLUMN else "lora_A"
        sharded.update(getattr(self, half).sharded_state_dict(f"{prefix}{half}.", sharded_offsets, metadata))
        return sharded


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    """The adapted class of a linear class, made once per class."""
    if base not in _LORA_CLASSES:
        mixin = ParallelLoraLinear if hasattr(base, "sharded_state_dict") else LoraLinear
        _LORA_CLASSES[base] = type(f"Lora{base.__name__}", (mixin, base), {"lora_base_class": base})
    return _LORA_CLASSES[base]


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    """megatron's init_method for the adapters: zeros, drawing nothing from any RNG (the values
    come from GokuModel.init_weights, or from a checkpoint)."""
    return torch.nn.init.zeros_(weight)


def _adapt(linear: torch.nn.Module, kind: str, lora: LoraConfig, config: TransformerConfig) -> None:
    """Give ``linear`` an adapter sharded like it (module docstring)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out_features, in_features = linear.weight.shape  # this rank's shard: full along the other side
    if kind == COLUMN:
        out_features *= tp
    elif kind == ROW:
        in_features *= tp
    dtype, rank = config.params_dtype, lora.rank
    if kind == COLUMN:
        lora_A = ReplicatedLinear(in_features, rank, dtype)
        lora_B = ColumnParallelLinear(rank, out_features, config=config, init_method=_no_init, bias=False,
                                      gather_output=getattr(linear, "gather_output", False))
        parallel, dim = lora_B.weight, 0
    elif kind == ROW:
        lora_A = LocalRowParallelLinear(in_features, rank, config=config, init_method=_no_init, bias=False,
                                        input_is_parallel=True, skip_bias_add=False)
        lora_B = ReplicatedLinear(rank, out_features, dtype)
        parallel, dim = lora_A.weight, 1
    else:
        lora_A, lora_B = ReplicatedLinear(in_features, rank, dtype), ReplicatedLinear(rank, out_features, dtype)
        parallel = None
    # megatron marks its weights tensor-parallel only when it initialises them
    # (config.perform_initialization); init_weights, the grad norm and checkpoints read the marks.
    if parallel is not None and not hasattr(parallel, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(parallel, is_parallel=True, dim=dim, stride=1)
    linear.__class__ = _lora_class(type(linear))
    linear.lora_A, linear.lora_B = lora_A, lora_B
    linear.lora_kind, linear.lora_scale, linear.lora_dropout = kind, lora.alpha / lora.rank, lora.dropout


def apply_lora(stage: torch.nn.Module, lora: LoraConfig, config: TransformerConfig,
               trained_in_full: tuple[str, ...] = ()) -> None:
    """Adapters on the linears of this pipeline stage that ``lora.targets`` names, before the
    weights are initialised or loaded; every other parameter is frozen (requires_grad=False, so
    megatron's DDP, optimizer and grad norm and goku's EMA leave it alone), except those whose
    names start with ``trained_in_full``: layers the finetune adds to its base (goku.NEW_LAYERS:
    model.i2v's condition layer, which an I2V finetune of a text-to-video base must learn)."""
    patterns = [pattern for target in lora.targets for pattern in TARGET_MODULES[target]]
    for name, module in list(stage.named_modules()):
        kinds = [kind for pattern, kind in patterns if fnmatchcase(name, pattern)]
        if kinds:
            _adapt(module, kinds[0], lora, config)
    for name, param in stage.named_parameters():
        param.requires_grad_(is_adapter(name) or name.startswith(trained_in_full))


def merge_adapters(model: torch.nn.Module) -> int:
    """Fold every adapter of ``model`` (a stage, or a wrapper of one) into its base weight, shard
    by shard (not for FSDP's sharded weights); returns how many were merged."""
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for module in adapted:
        module.merge()
    return len(adapted)
