"""TFLOP/s per GPU, MFU and op counts of Goku layers: ours (megatron-core, TE / flash-attn / SDPA,
bf16 or FP8, eager or torch.compile'd) against a plain PyTorch implementation of the same block
(torch SDPA), in the same run.

    python benchmarks/throughput.py --preset goku-8b --layers 4 --resolution 720p --precision bf16 fp8 --compile
    python benchmarks/throughput.py --preset goku-2b goku-8b --resolution 480p 720p \\
        --precision bf16 fp8 --fp8-recipe delayed tensorwise blockwise
    python benchmarks/throughput.py --preset tiny --tokens 256 --text-tokens 16    # CPU, seconds

Each row times forward + backward of ``--layers`` Goku layers with a preset's shapes (fewer
layers than the preset, so that goku-8b fits one GPU) on one clip: 33 frames are 9 latent frames,
so 480p (480x864) is 9 x 30 x 54 = 14580 tokens and 720p (720x1280) 9 x 45 x 80 = 32400 tokens,
with a caption of ``--text-tokens`` tokens. Our layers run exactly as in training: the pack comes
from the data path's packing (batch.build_pack: the clip, then a padding segment up to a token
budget that is a multiple of ``--budget-multiple``; ``--tokens N`` packs a clip of N - N/16 tokens
into a budget of N), the layer inputs from GokuModel's own ``pack_shard`` and ``_packed_inputs``,
and the layers through GokuModel's layer loop (FP8 contexts, recompute). The plain PyTorch block
takes the same weights' shapes and the same padded sequence as one dense SDPA sequence.
``--compile`` adds rows with every layer (ours: ``model.compile``) and every plain block
torch.compile'd; the warm-up iterations include the compilation. No gradient reduction or
optimizer step is timed.

``ops/layer``: aten ops dispatched by one forward + backward per layer (goku_megatron.op_trace,
the same count for ours and plain; eager rows only: compiled code runs fused kernels instead).
Model FLOPs come from goku_megatron.flops (the clip's real tokens only; padding is not counted; a
step is 3x the forward); MFU is against the GPU's dense bf16 peak for every row, FP8 rows included,
so FP8's gain shows as a higher MFU. ``x plain``: against the eager plain block of the same
precision (bf16 for FP8). Times are the fastest of ``--iters`` timed iterations after
``--warmup`` (as timeit advises: slower iterations measure whatever else the machine did, not the
code); ours and the plain block of one precision and mode alternate iteration by iteration, so
that a change of load on a shared machine hits both alike. Not a test: figures depend on the machine; docs/performance.md has the commands to
run on an H100 and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from goku_megatron import cpu_compat
from goku_megatron.batch import PackSample, build_pack
from goku_megatron.config import (
    FP8_RECIPES,
    MODEL_PRESETS,
    Config,
    ModelConfig,
    fp8_align_size,
    load_config,
    validate,
)
from goku_megatron.flops import gpu_peak_flops, layer_forward_flops, mfu
from goku_megatron.model.build import build_stage, build_transformer_config
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.model.rope import Rotation, apply_rope, rope_angles, rope_rotation
from goku_megatron.op_trace import OpTrace
from goku_megatron.platform import (
    choose_backends,
    has_cuda,
    has_flash_attn,
    has_transformer_engine,
    init_distributed,
    seed_everything,
)

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
    ops: float | None  # aten ops per layer, forward + backward (eager rows)
    vs_bf16: float | None = None
    vs_plain: float | None = None


@dataclass
class Timing:
    seconds: float
    mem_gib: float | None
    ops: float | None


@dataclass
class Runner:
    """One implementation's forward of the timed layers (a scalar-free output), what it trains,
    how many layers it runs and whether to count its ops (eager only)."""

    step: Callable[[], torch.Tensor]
    params: list[torch.Tensor]
    layers: int
    count_ops: bool

    def run(self) -> None:
        for p in self.params:
            p.grad = None
        out = self.step()
        out.backward(torch.ones_like(out))


def time_fwd_bwd(runners: list[Runner], args: argparse.Namespace, device: torch.device) -> list[Timing]:
    """Seconds of forward + backward of each runner (the fastest of ``--iters``), its peak GPU
    memory in GiB (None on CPU) and, when asked, the aten ops one forward + backward dispatches
    per layer. The runners' iterations alternate, so a change of load on a shared machine hits all
    of them alike."""
    cuda = device.type == "cuda"
    for runner in runners:
        for _ in range(args.warmup):
            runner.run()
    times: list[list[float]] = [[] for _ in runners]
    mems: list[float | None] = [None for _ in runners]
    for _ in range(args.iters):
        for i, runner in enumerate(runners):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            runner.run()
            if cuda:
                torch.cuda.synchronize()
                mems[i] = max(mems[i] or 0.0, torch.cuda.max_memory_allocated() / 2**30)
            times[i].append(time.perf_counter() - start)
    timings = []
    for runner, seconds, mem in zip(runners, times, mems):
        ops = None
        if runner.count_ops:
            with OpTrace() as trace:
                runner.run()
            ops = trace.total / runner.layers
        timings.append(Timing(min(seconds), mem, ops))
    return timings


def clip_pack(cfg: Config, grid: tuple[int, int, int], budget: int, text_tokens: int, device: torch.device):
    """One clip of the given patch grid and caption, packed into ``budget`` tokens as the data path
    packs it (batch.build_pack): the clip, then a padding segment."""
    m = cfg.model
    pt, ph, pw = m.patch_size
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(m.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=gen)
    sample = PackSample(noisy=latent, target=latent, timestep=0.5,
                        text=torch.randn(text_tokens, m.text_dim, generator=gen),
                        text_mask=torch.ones(text_tokens, dtype=torch.bool))
    return build_pack([sample], budget, tuple(m.patch_size)).to(device)


def run_ours(cfg: Config, base_precision: str, grid: tuple[int, int, int], budget: int, text_tokens: int,
             device: torch.device) -> tuple[str, str, Runner]:
    """Our layers on one clip packed into ``budget`` tokens: (linear, attention, runner)."""
    backends = dataclasses.replace(choose_backends(cfg), precision=base_precision)
    dtype = torch.bfloat16 if base_precision == "bf16" else torch.float32
    # The model as training builds it (bf16: megatron's Float16Module; model.compile: compiled
    # layers), on the benchmark's device.
    model = build_stage(cfg, backends, build_transformer_config(cfg, backends), seed=0).to(device)
    (stage,) = iter_stage_models([model])
    pack = clip_pack(cfg, grid, budget, text_tokens, device)
    # What GokuModel.forward computes once per micro-batch, for all layers: the shard, the
    # projected captions and the RoPE rotation, the conditioning. Without gradients, like the
    # plain block's inputs.
    with torch.no_grad():
        inputs = stage._packed_inputs(pack, stage.pack_shard(pack))
        silu_temb = F.silu(stage.t_embedder(pack.timesteps)).to(dtype)
    x = torch.randn(pack.budget, 1, cfg.model.hidden_size, device=device, dtype=dtype, requires_grad=True)
    # GokuModel's own layer loop, so FP8 contexts and recompute are exactly those of training.
    runner = Runner(lambda: stage._run_layers(x, inputs, silu_temb), [x, *stage.layers.parameters()],
                    cfg.model.num_layers, count_ops=not cfg.model.compile)
    return backends.linear, backends.attention, runner


def run_plain(cfg: Config, dtype: torch.dtype, grid: tuple[int, int, int], budget: int, text_tokens: int,
              device: torch.device, compiled: bool) -> Runner:
    """The plain PyTorch blocks on the same padded sequence as one dense SDPA sequence."""
    m = cfg.model
    blocks = torch.nn.ModuleList(PlainGokuBlock(m.hidden_size, m.num_heads, m.ffn_hidden_size, m.norm_eps)
                                 for _ in range(m.num_layers)).to(device=device, dtype=dtype)
    if compiled:
        for block in blocks:
            block.compile(fullgraph=True)
    pack = clip_pack(cfg, grid, budget, text_tokens, device)
    rotation = rope_rotation(rope_angles(pack.positions, m.head_dim, m.rope_theta)[None])
    x = torch.randn(1, budget, m.hidden_size, device=device, dtype=dtype, requires_grad=True)
    silu_temb = F.silu(torch.randn(1, m.hidden_size, device=device, dtype=dtype))
    context = torch.randn(1, text_tokens, m.hidden_size, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        h = x
        for block in blocks:
            h = block(h, silu_temb, context, rotation)
        return h

    return Runner(step, [x, *blocks.parameters()], m.num_layers, count_ops=not compiled)


# ----------------------------------------------------------------------------------------------
# Output


def versions() -> dict[str, str]:
    """Versions of what the figures depend on; 'not available' when a package does not import."""

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
           "MFU", "peak GiB", "ops/layer", "x bf16", "x plain"]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tokens = f"{r.tokens}" + (f" (+{r.budget - r.tokens} pad)" if r.budget > r.tokens else "")
        cells = [r.preset, r.shape, tokens, str(r.layers), r.impl, r.precision, r.attention, f"{r.ms:.1f}",
                 f"{r.tflops:.4g}", _fmt(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu else ""),
                 _fmt(r.mem_gib, ".1f"), _fmt(r.ops, ".0f"), _fmt(r.vs_bf16, ".2f"), _fmt(r.vs_plain, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["goku-2b", "goku-8b"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="layers timed (the preset's width, not depth)")
    parser.add_argument("--resolution", nargs="+", default=["480p", "720p"], choices=sorted(RESOLUTIONS))
    parser.add_argument("--tokens", type=int, default=0,
                        help="time a pack of this many tokens (a clip of 15/16 of them, then padding) "
                             "instead of --resolution (e.g. on CPU)")
    parser.add_argument("--budget-multiple", type=int, default=256,
                        help="a --resolution clip is packed into the next multiple of this many tokens")
    parser.add_argument("--text-tokens", type=int, default=128, help="caption tokens per clip")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp8"], default=None,
                        help="default: bf16 fp8 on a GPU (fp8 needs Transformer Engine), fp32 on CPU")
    parser.add_argument("--fp8-format", default=FP8_FORMAT_DEFAULT, choices=["e4m3", "hybrid"])
    parser.add_argument("--fp8-recipe", nargs="+", default=[ModelConfig.fp8_recipe], choices=FP8_RECIPES)
    parser.add_argument("--attention", default="auto", choices=["auto", "te", "flash", "sdpa"],
                        help="our self-attention backend (model.attention_backend)")
    parser.add_argument("--recompute", default="none", choices=["none", "full", "selective"],
                        help="activation recompute in our layers (the plain block has none)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours (model.compile) and the plain block under torch.compile")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    return parser.parse_args(argv)


def measure(preset: str, shape: str, grid: tuple[int, int, int], budget: int, precisions: list[str],
            fp8_ok: bool, args: argparse.Namespace, device: torch.device,
            peak: float | None) -> tuple[list[Row], list[str]]:
    """Every requested row for one preset and clip shape, with its speed-ups; and skip notes."""
    cuda = device.type == "cuda"
    tokens = math.prod(grid)
    recompute = [] if args.recompute == "none" else ["model.recompute=true",
                                                      f"model.recompute_granularity={args.recompute}"]
    base = [f"model.preset={preset}", f"model.num_layers={args.layers}", "model.zero_init=false",
            f"model.attention_backend={args.attention}", *recompute]
    cfg = load_config(None, base)
    validate(cfg, 1, has_cuda=cuda)
    flops = 3 * args.layers * layer_forward_flops(cfg.model, tokens, args.text_tokens)
    rows: list[Row] = []
    notes: list[str] = []
    modes = [False, True] if args.compile else [False]

    def add(impl: str, precision: str, attention: str, timing: Timing) -> Row:
        rows.append(Row(preset, shape, tokens, budget, args.layers, impl, precision, attention, timing.seconds * 1e3,
                        flops / timing.seconds / 1e12, mfu(flops, timing.seconds, 1, peak), timing.mem_gib,
                        timing.ops))
        return rows[-1]

    baselines: dict[str, Row] = {}
    for precision in precisions:
        if precision == "fp8" and not fp8_ok:
            notes.append(f"{preset} {shape} fp8: skipped, FP8 needs Transformer Engine on a GPU")
        elif precision == "fp8":
            for recipe, compiled in ((r, c) for r in args.fp8_recipe for c in modes):
                fp8_cfg = load_config(None, [*base, f"model.fp8={args.fp8_format}", f"model.fp8_recipe={recipe}",
                                             f"model.compile={compiled}"])
                try:
                    validate(fp8_cfg, 1, has_cuda=cuda)
                    linear, attention, runner = run_ours(fp8_cfg, "bf16", grid, budget, args.text_tokens, device)
                    (timing,) = time_fwd_bwd([runner], args, device)
                except (RuntimeError, ValueError) as err:  # e.g. mxfp8 on Hopper, a TE without the recipe
                    notes.append(f"{preset} {shape} fp8 {recipe}: skipped, {err}")
                    continue
                add(f"goku ({linear}{', compiled' if compiled else ''})", f"fp8 {args.fp8_format}/{recipe}",
                    attention, timing)
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            for compiled in modes:
                run_cfg = load_config(None, [*base, f"model.compile={compiled}"])
                linear, attention, ours = run_ours(run_cfg, precision, grid, budget, args.text_tokens, device)
                runners = [ours] if args.no_plain else \
                    [ours, run_plain(cfg, dtype, grid, budget, args.text_tokens, device, compiled)]
                timings = time_fwd_bwd(runners, args, device)
                baselines.setdefault(precision, add(f"goku ({linear}{', compiled' if compiled else ''})", precision,
                                                    attention, timings[0]))
                if not args.no_plain:
                    baselines.setdefault(f"plain {precision}", add(f"plain torch{' (compiled)' if compiled else ''}",
                                                                   precision, "sdpa", timings[1]))
        if cuda:
            torch.cuda.empty_cache()
    # FP8 against our eager bf16; every row against the eager plain block of its precision (FP8: of bf16).
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
    align = max(fp8_align_size(r) for r in args.fp8_recipe) if fp8_ok else 1
    multiple = math.lcm(args.budget_multiple, align)
    if args.tokens:
        budget = -(-args.tokens // align) * align
        shapes = {f"{args.tokens} tokens": ((1, 1, budget - budget // 16), budget)}
    else:
        shapes = {name: (RESOLUTIONS[name], -(-math.prod(RESOLUTIONS[name]) // multiple) * multiple)
                  for name in args.resolution}
    rows: list[Row] = []
    notes: list[str] = []
    for preset in args.preset:
        for shape, (grid, budget) in shapes.items():
            shape_rows, shape_notes = measure(preset, shape, grid, budget, precisions, fp8_ok, args, device, peak)
            rows += shape_rows
            notes += shape_notes

    recompute = f", recompute {args.recompute}" if args.recompute != "none" else ""
    print(f"# Goku layers, forward + backward of one packed clip (caption {args.text_tokens} tokens), "
          f"fastest of {args.iters} after {args.warmup} warm-up{recompute}")
    print(f"# device: {device_line(device, peak)}")
    print("# " + " | ".join(f"{k} {v}" for k, v in versions().items()))
    print("# model FLOPs: goku_megatron.flops (3 x forward, real tokens only); MFU against the dense bf16 "
          "peak, FP8 rows included")
    print(table(rows))
    for note in notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()
