"""TFLOP/s per GPU and MFU of Goku layers: ours (megatron-core, TE / flash-attn / SDPA, bf16 or
FP8) against a plain PyTorch implementation of the same block (torch SDPA), in the same run.

    python benchmarks/throughput.py --preset goku-8b --layers 4 --resolution 720p --precision bf16 fp8
    python benchmarks/throughput.py --preset goku-2b goku-8b --resolution 480p 720p \\
        --precision bf16 fp8 --fp8-recipe delayed tensorwise blockwise
    python benchmarks/throughput.py --preset tiny --tokens 256 --text-tokens 16    # CPU, seconds

Each row times forward + backward of ``--layers`` Goku layers with a preset's shapes (fewer
layers than the preset, so that goku-8b fits one GPU) on one clip: 33 frames are 9 latent frames,
so 480p (480x864) is 9 x 30 x 54 = 14580 tokens and 720p (720x1280) 9 x 45 x 80 = 32400 tokens,
with a caption of ``--text-tokens`` tokens. Our layers run exactly as in training on real data:
GokuModel's layer loop (FP8 contexts, recompute) on a Patch n' Pack sequence whose token budget is
the clip rounded up to what FP8 GEMMs need (a multiple of 16; 32 for mxfp8), the rest a padding
segment. The plain PyTorch block takes the same weights' shapes and the same padded sequence as one
dense SDPA sequence (no torch.compile). No gradient reduction or optimizer step is timed.

Model FLOPs come from goku_megatron.flops (the clip's real tokens only; padding is not counted; a
step is 3x the forward); MFU is against the GPU's dense bf16 peak for every row, FP8 rows included,
so FP8's gain shows as a higher MFU. Figures are medians over ``--iters`` timed iterations after
``--warmup``. Not a test: figures depend on the machine; docs/performance.md has the commands to
run on an H100 and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from goku_megatron.model.rope import Rotation, apply_rope, rope_angles, rope_rotation

if TYPE_CHECKING:
    from goku_megatron.config import Config

# Latent patch grids (T', H', W') of a 33-frame clip: VAE 4x in time, 8x in space; patch 1x2x2.
RESOLUTIONS = {"480p": (9, 30, 54), "720p": (9, 45, 80)}
FP8_FORMAT_DEFAULT = "hybrid"


# ----------------------------------------------------------------------------------------------
# The plain PyTorch block


class PlainRMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class PlainAttention(torch.nn.Module):
    """Bias-free Q/K/V/O, full-width QK RMSNorm, 3D RoPE, torch SDPA; batch-first [B, S, D]."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = PlainRMSNorm(dim, eps), PlainRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, rotation: Rotation, rope_k: bool) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, s, self.heads, -1)
        k = self.k_norm(self.k_proj(kv)).view(b, kv.shape[1], self.heads, -1)
        v = self.v_proj(kv).view(b, kv.shape[1], self.heads, -1)
        q = apply_rope(q, rotation)
        if rope_k:
            k = apply_rope(k, rotation)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class PlainGokuBlock(torch.nn.Module):
    """The Goku block (docs/model.md, "The block") in torch.nn alone, with the layer's parameter names.

    adaLN-Zero modulation from SiLU(t); LayerNorm + modulated self-attention, gated; RMSNorm +
    cross-attention to the caption (RoPE on queries), ungated; RMSNorm + modulated GELU(tanh) MLP,
    gated. Modulation and norms in float32, as in ours.
    """

    def __init__(self, dim: int, heads: int, ffn: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.norm1 = torch.nn.Module()
        self.norm1.linear = torch.nn.Linear(dim, 6 * dim)
        self.attn1 = PlainAttention(dim, heads, eps)
        self.norm2 = PlainRMSNorm(dim, eps)
        self.attn2 = PlainAttention(dim, heads, eps)
        self.norm3 = PlainRMSNorm(dim, eps)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(dim, ffn)
        self.mlp.fc2 = torch.nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor, context: torch.Tensor,
                rotation: Rotation) -> torch.Tensor:
        """x [B, S, D], silu_temb [B, D], context [B, L, D], rotation (cos, sin) [1, S, 1, head_dim / 2]."""
        mod = self.norm1.linear(silu_temb).float().unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        h = (h * (1 + scale_msa) + shift_msa).to(x.dtype)
        x = (x.float() + gate_msa * self.attn1(h, h, rotation, rope_k=True).float()).to(x.dtype)
        x = x + self.attn2(self.norm2(x), context, rotation, rope_k=False)
        h = (self.norm3(x).float() * (1 + scale_mlp) + shift_mlp).to(x.dtype)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))
        return (x.float() + gate_mlp * h.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    preset: str
    shape: str  # resolution name or "N tokens"
    tokens: int  # the clip's tokens (model FLOPs count these)
    budget: int  # tokens run, padding included
    layers: int
    impl: str
    precision: str
    attention: str
    ms: float
    tflops: float
    mfu: float | None
    mem_gib: float | None
    vs_bf16: float | None = None
    vs_plain: float | None = None


def time_fwd_bwd(step: Callable[[], torch.Tensor], params: list[torch.Tensor], warmup: int, iters: int,
                 device: torch.device) -> tuple[float, float | None]:
    """Median seconds of forward + backward, and the peak GPU memory in GiB (None on CPU)."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = step()
        out.backward(torch.ones_like(out))
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), mem


def fp8_align(recipe: str) -> int:
    from goku_megatron.config import FP8_ALIGN, FP8_ALIGN_DEFAULT

    return FP8_ALIGN.get(recipe, FP8_ALIGN_DEFAULT)


def run_ours(cfg: Config, base_precision: str, grid: tuple[int, int, int], budget: int, text_tokens: int,
             args: argparse.Namespace, device: torch.device) -> tuple[str, str, float, float | None]:
    """Our layers on one clip packed into ``budget`` tokens: (linear, attention, seconds, GiB)."""
    from goku_megatron.batch import PackSample, build_pack
    from goku_megatron.model.build import build_stage, build_transformer_config
    from goku_megatron.model.goku import iter_stage_models
    from goku_megatron.model.layer import LayerInputs
    from goku_megatron.platform import choose_backends

    m = cfg.model
    backends = dataclasses.replace(choose_backends(cfg), precision=base_precision)
    dtype = torch.bfloat16 if base_precision == "bf16" else torch.float32
    # The model as training builds it (bf16: megatron's Float16Module), on the benchmark's device.
    model = build_stage(cfg, backends, build_transformer_config(cfg, backends), seed=0).to(device)
    (stage,) = iter_stage_models([model])
    pt, ph, pw = m.patch_size
    latent = torch.zeros(m.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    sample = PackSample(noisy=latent, target=latent, timestep=0.5, text=torch.zeros(text_tokens, m.text_dim),
                        text_mask=torch.ones(text_tokens, dtype=torch.bool))
    pack = build_pack([sample], budget, tuple(m.patch_size)).to(device)
    shard = stage.pack_shard(pack)
    d = m.hidden_size
    # The caption's tokens as the caption projection would give them, then the padding segment's
    # null token (GokuModel._packed_inputs).
    context = torch.cat([torch.randn(text_tokens, d, device=device), torch.zeros(1, d, device=device)])
    start, end = shard.text_range
    inputs = LayerInputs(context=context[start:end].unsqueeze(1).to(dtype),
                         rope=rope_rotation(rope_angles(shard.positions, m.head_dim, m.rope_theta).unsqueeze(1)),
                         rows=shard.rows, packed_self=shard.packed_self,
                         packed_cross=shard.packed_cross)
    silu_temb = F.silu(torch.randn(pack.num_samples, d, device=device, dtype=dtype))
    x = torch.randn(shard.source.shape[0], 1, d, device=device, dtype=dtype, requires_grad=True)
    params = [x, *stage.layers.parameters()]
    # GokuModel's own layer loop, so FP8 contexts and recompute are exactly those of training.
    seconds, mem = time_fwd_bwd(lambda: stage._run_layers(x, inputs, silu_temb), params, args.warmup,
                                args.iters, device)
    return backends.linear, backends.attention, seconds, mem


def run_plain(cfg: Config, dtype: torch.dtype, budget: int, text_tokens: int, args: argparse.Namespace,
              device: torch.device) -> tuple[float, float | None]:
    """The plain PyTorch blocks on the same padded sequence as one dense SDPA sequence."""
    m = cfg.model
    blocks = torch.nn.ModuleList(PlainGokuBlock(m.hidden_size, m.num_heads, m.ffn_hidden_size, m.norm_eps)
                                 for _ in range(m.num_layers)).to(device=device, dtype=dtype)
    positions = torch.zeros(budget, 3, dtype=torch.long, device=device)
    rotation = rope_rotation(rope_angles(positions, m.head_dim, m.rope_theta).unsqueeze(0))
    x = torch.randn(1, budget, m.hidden_size, device=device, dtype=dtype, requires_grad=True)
    silu_temb = F.silu(torch.randn(1, m.hidden_size, device=device, dtype=dtype))
    context = torch.randn(1, text_tokens, m.hidden_size, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        h = x
        for block in blocks:
            h = block(h, silu_temb, context, rotation)
        return h

    return time_fwd_bwd(step, [x, *blocks.parameters()], args.warmup, args.iters, device)


# ----------------------------------------------------------------------------------------------
# Output


def versions() -> dict[str, str]:
    """Versions of what the figures depend on; 'not available' when a package does not import."""
    from goku_megatron.platform import has_flash_attn, has_transformer_engine

    def dist_version(*names: str) -> str:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "?"

    out = {"torch": torch.__version__, "megatron-core": dist_version("megatron-core", "megatron_core")}
    out["CUDA"] = torch.version.cuda or "none"
    out["transformer-engine"] = (dist_version("transformer_engine", "transformer-engine", "transformer_engine_torch")
                                 if has_transformer_engine() else "not available")
    out["flash-attn"] = dist_version("flash_attn", "flash-attn") if has_flash_attn() else "not available"
    return out


def device_line(device: torch.device, peak: float | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        peak_text = f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "bf16 peak unknown: MFU n/a"
        return f"{name} (compute capability {major}.{minor}, {peak_text})"
    return f"cpu ({torch.get_num_threads()} threads; no GPU peak: MFU n/a)"


COLUMNS = ["preset", "clip", "tokens", "layers", "impl", "precision", "attention", "ms fwd+bwd", "TFLOP/s",
           "MFU", "peak GiB", "x bf16", "x plain"]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tokens = f"{r.tokens}" + (f" (+{r.budget - r.tokens} pad)" if r.budget > r.tokens else "")
        cells = [r.preset, r.shape, tokens, str(r.layers), r.impl, r.precision, r.attention, f"{r.ms:.1f}",
                 f"{r.tflops:.4g}", _fmt(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu else ""),
                 _fmt(r.mem_gib, ".1f"), _fmt(r.vs_bf16, ".2f"), _fmt(r.vs_plain, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from goku_megatron.config import FP8_RECIPES, MODEL_PRESETS, ModelConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["goku-2b", "goku-8b"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="layers timed (the preset's width, not depth)")
    parser.add_argument("--resolution", nargs="+", default=["480p", "720p"], choices=sorted(RESOLUTIONS))
    parser.add_argument("--tokens", type=int, default=0,
                        help="time a clip of this many tokens instead of --resolution (e.g. on CPU)")
    parser.add_argument("--text-tokens", type=int, default=128, help="caption tokens per clip")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp8"], default=None,
                        help="default: bf16 fp8 on a GPU (fp8 needs Transformer Engine), fp32 on CPU")
    parser.add_argument("--fp8-format", default=FP8_FORMAT_DEFAULT, choices=["e4m3", "hybrid"])
    parser.add_argument("--fp8-recipe", nargs="+", default=[ModelConfig.fp8_recipe], choices=FP8_RECIPES)
    parser.add_argument("--attention", default="auto", choices=["auto", "te", "flash", "sdpa"],
                        help="our self-attention backend (model.attention_backend)")
    parser.add_argument("--recompute", default="none", choices=["none", "full", "selective"],
                        help="activation recompute in our layers (the plain block has none)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    return parser.parse_args(argv)


def measure(preset: str, shape: str, grid: tuple[int, int, int], precisions: list[str], fp8_ok: bool, align: int,
            args: argparse.Namespace, device: torch.device, peak: float | None) -> tuple[list[Row], list[str]]:
    """Every requested row for one preset and clip shape, with its speed-ups; and skip notes."""
    from goku_megatron.config import load_config, validate
    from goku_megatron.flops import layer_forward_flops, mfu

    cuda = device.type == "cuda"
    tokens = math.prod(grid)
    budget = -(-tokens // align) * align
    recompute = [] if args.recompute == "none" else ["model.recompute=true",
                                                      f"model.recompute_granularity={args.recompute}"]
    base = [f"model.preset={preset}", f"model.num_layers={args.layers}", "model.zero_init=false",
            f"model.attention_backend={args.attention}", *recompute]
    cfg = load_config(None, base)
    validate(cfg, 1, has_cuda=cuda)
    flops = 3 * args.layers * layer_forward_flops(cfg.model, tokens, args.text_tokens)
    rows: list[Row] = []
    notes: list[str] = []

    def add(impl: str, precision: str, attention: str, seconds: float, mem: float | None) -> Row:
        rows.append(Row(preset, shape, tokens, budget, args.layers, impl, precision, attention, seconds * 1e3,
                        flops / seconds / 1e12, mfu(flops, seconds, 1, peak), mem))
        return rows[-1]

    baselines: dict[str, Row] = {}
    for precision in precisions:
        if precision == "fp8" and not fp8_ok:
            notes.append(f"{preset} {shape} fp8: skipped, FP8 needs Transformer Engine on a GPU")
        elif precision == "fp8":
            for recipe in args.fp8_recipe:
                fp8_cfg = load_config(None, [*base, f"model.fp8={args.fp8_format}", f"model.fp8_recipe={recipe}"])
                try:
                    validate(fp8_cfg, 1, has_cuda=cuda)
                    linear, attention, seconds, mem = run_ours(fp8_cfg, "bf16", grid, budget, args.text_tokens,
                                                               args, device)
                except (RuntimeError, ValueError) as err:  # e.g. mxfp8 on Hopper, a TE without the recipe
                    notes.append(f"{preset} {shape} fp8 {recipe}: skipped, {err}")
                    continue
                add(f"goku ({linear})", f"fp8 {args.fp8_format}/{recipe}", attention, seconds, mem)
        else:
            linear, attention, seconds, mem = run_ours(cfg, precision, grid, budget, args.text_tokens, args, device)
            baselines[precision] = add(f"goku ({linear})", precision, attention, seconds, mem)
            if not args.no_plain:
                dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                seconds, mem = run_plain(cfg, dtype, budget, args.text_tokens, args, device)
                baselines[f"plain {precision}"] = add("plain torch", precision, "sdpa", seconds, mem)
        if cuda:
            torch.cuda.empty_cache()
    # FP8 against our bf16; ours against the plain block of its precision (FP8: of bf16).
    for row in rows:
        fp8 = row.precision.startswith("fp8")
        if fp8 and "bf16" in baselines:
            row.vs_bf16 = baselines["bf16"].ms / row.ms
        plain = baselines.get("plain bf16" if fp8 else f"plain {row.precision}")
        if plain is not None:
            row.vs_plain = plain.ms / row.ms
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from goku_megatron import cpu_compat
    from goku_megatron.config import load_config
    from goku_megatron.flops import gpu_peak_flops
    from goku_megatron.platform import (
        choose_backends,
        has_cuda,
        has_transformer_engine,
        init_distributed,
        seed_everything,
    )

    cuda = has_cuda()
    cpu_compat.apply()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precisions = args.precision or (["bf16", "fp8"] if cuda else ["fp32"])
    base_cfg = load_config(None, [])
    init_distributed(base_cfg, choose_backends(base_cfg))
    seed_everything(base_cfg.train.seed)
    peak = gpu_peak_flops(torch.cuda.get_device_name()) if cuda else None
    fp8_ok = "fp8" in precisions and cuda and has_transformer_engine()
    # Every row runs the same padded sequence: FP8 GEMMs need a multiple of the recipe's alignment.
    align = max(fp8_align(r) for r in args.fp8_recipe) if fp8_ok else 1
    shapes = {f"{args.tokens} tokens": (1, 1, args.tokens)} if args.tokens else \
        {name: RESOLUTIONS[name] for name in args.resolution}
    rows: list[Row] = []
    notes: list[str] = []
    for preset in args.preset:
        for shape, grid in shapes.items():
            shape_rows, shape_notes = measure(preset, shape, grid, precisions, fp8_ok, align, args, device, peak)
            rows += shape_rows
            notes += shape_notes

    recompute = f", recompute {args.recompute}" if args.recompute != "none" else ""
    print(f"# Goku layers, forward + backward of one packed clip (caption {args.text_tokens} tokens), "
          f"median of {args.iters} after {args.warmup} warm-up{recompute}")
    print(f"# device: {device_line(device, peak)}")
    print("# " + " | ".join(f"{k} {v}" for k, v in versions().items()))
    print("# model FLOPs: goku_megatron.flops (3 x forward, real tokens only); MFU against the dense bf16 "
          "peak, FP8 rows included")
    print(table(rows))
    for note in notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()
