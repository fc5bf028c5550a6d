"""Model FLOPs of Goku training steps, for TFLOP/s per GPU and MFU: the one place they are counted.

Counted: every matrix multiply of the forward pass (2 FLOPs per multiply-add), attention's
QK^T and softmax(QK^T)V included; elementwise work (norms, modulation, activations, RoPE) is
left out, as in the MFU convention of PaLM / Megatron-LM. Per Goku layer, for one sample of S
video tokens and L caption tokens (hidden D, MLP width F):

    self-attention   Q, K, V, O projections   8 S D^2      scores + weighted sum   4 S^2 D
    cross-attention  Q, O projections         4 S D^2      K, V over the caption   4 L D^2
                     scores + weighted sum    4 S L D
    MLP              two linears              4 S D F
    adaLN            SiLU(t) -> 6 D           12 D^2 (per sample, not per token)

plus, once per sample: patch embedding 2 S P D and the final layer 2 S D P + 4 D^2 (P = patch
volume x channels), caption projection 2 L (T D + D^2) (T = text width), timestep MLP
2 (f D + D^2)
(f = frequency width). Packed samples attend only within themselves, so S^2 is per sample.
A training step is 3x the forward (backward = 2x); activation recompute is not model FLOPs.

The backward's 2x is, per matrix multiply, one input-gradient and one weight-gradient GEMM, each
as costly as the forward one; attention's scores and weighted sum have no weights but two input
gradients. A linear whose weight is frozen (LoRA's base) skips its weight-gradient GEMM, so such
a step costs 3F less the linears' forward FLOPs (``weight_gradient_flops``): 2F plus attention's
4 S^2 D + 4 S L D per layer.
"""

from __future__ import annotations

import math
from typing import Sequence

from goku_megatron.batch import Pack
from goku_megatron.config import ModelConfig

# Dense bf16 peak per GPU (NVIDIA datasheets, SXM parts, no sparsity), FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def layer_forward_flops(model: ModelConfig, video_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one Goku layer for one sample of ``video_tokens`` tokens and a caption of
    ``text_tokens`` tokens (benchmarks/throughput.py times layers alone)."""
    s, length, d, f = video_tokens, text_tokens, model.hidden_size, model.ffn_hidden_size
    return float(8 * s * d * d                                  # self-attention projections
                 + 4 * s * d * d + 4 * length * d * d           # cross-attention projections
                 + 4 * s * d * f                                # MLP
                 + 12 * d * d                                   # adaLN modulation
                 + layer_attention_core_flops(model, s, length))


def layer_attention_core_flops(model: ModelConfig, video_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one layer's attention scores and weighted sums, the matrix multiplies
    without weights (self-attention 4 S^2 D, cross-attention 4 S L D): what stays of the weight
    gradients' share of a step when the linears are frozen (``weight_gradient_flops``)."""
    return float(4 * video_tokens * video_tokens * model.hidden_size
                 + 4 * video_tokens * text_tokens * model.hidden_size)


def forward_flops(model: ModelConfig, video_tokens: Sequence[int], text_tokens: Sequence[int]) -> float:
    """Forward FLOPs for samples with the given video token counts and caption token counts."""
    if len(video_tokens) != len(text_tokens):
        raise ValueError(f"{len(video_tokens)} video token counts but {len(text_tokens)} caption counts")
    d = model.hidden_size
    patch = model.in_channels * model.patch_volume
    total = 0.0
    for s, length in zip(video_tokens, text_tokens):
        total += model.num_layers * layer_forward_flops(model, s, length)
        total += 2 * s * patch * d + 2 * s * d * patch + 4 * d * d  # patch embed, final layer
        total += 2 * length * (model.text_dim * d + d * d) + 2 * (model.timestep_freq_dim * d + d * d)
    return float(total)


def training_flops(model: ModelConfig, video_tokens: Sequence[int], text_tokens: Sequence[int],
                   frozen_base: bool = False) -> float:
    """Model FLOPs of one forward and backward pass: 3x forward, less the weight gradients a
    ``frozen_base`` (a LoRA run's) does not compute (``weight_gradient_flops``)."""
    flops = 3.0 * forward_flops(model, video_tokens, text_tokens)
    return flops - weight_gradient_flops(model, video_tokens, text_tokens) if frozen_base else flops


def weight_gradient_flops(model: ModelConfig, video_tokens: Sequence[int], text_tokens: Sequence[int]) -> float:
    """FLOPs of the backward's weight-gradient GEMMs, one per linear and as costly as its forward:
    the forward less attention's weightless matrix multiplies. A step whose linears are all frozen
    (LoRA's base; the adapters' own GEMMs are left out) skips them: 3F - this = 2F + attention's."""
    core = sum(layer_attention_core_flops(model, s, length) for s, length in zip(video_tokens, text_tokens))
    return forward_flops(model, video_tokens, text_tokens) - model.num_layers * core


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None when unknown."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return peak
    return None


def mfu(flops_per_step: float, step_time_s: float, num_gpus: int, peak_per_gpu: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all GPUs (None without one)."""
    if peak_per_gpu is None or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / (num_gpus * peak_per_gpu)


def pack_tokens(packs: Sequence[Pack]) -> tuple[list[int], list[int]]:
    """Video tokens and caption tokens of each sample in ``packs`` (padding and dropped captions'
    null token excluded): what ``training_flops`` counts for a step."""
    video = [math.prod(grid) for pack in packs for grid in pack.grids]
    text = [n for pack in packs for n in pack.text_mask.sum(dim=1).tolist()]
    return video, text
