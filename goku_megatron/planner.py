"""goku-plan: memory per GPU and step time of candidate TP/CP/PP/DP layouts (megatron DDP or FSDP),
and a recommendation.

    goku-plan --preset goku-8b --gpus 256 --gpu-memory-gb 80 --height 720 --width 1280 --frames 33
    goku-plan --preset goku-2b --gpus 64 --tokens 32768 --samples-per-pack 1
    goku-plan --preset goku-8b --gpus 64 --tokens 65536 --samples-per-pack 2 --lora-rank 64

Memory per GPU (bytes), for a pipeline stage holding L / PP layers:

    weights + grads + optimizer   P_gpu x w + T_gpu x (4 + o / DP_opt)
        P_gpu = layer params / TP x L / PP + embedders (replicated on every stage), + A_gpu, the
        LoRA adapters (below); T_gpu = the parameters that train: P_gpu, or with LoRA A_gpu
        w = 2 (bf16) or 4 (fp32); grads are fp32 (megatron's grad buffer); o = 12 for Adam
        (moments, plus fp32 main weights in bf16: 4 + 4 + 4) or 8 in fp32; DP_opt = DP with the
        distributed optimizer, else 1
    activations                   (L / PP) x min(PP, m) x (S / CP) x a x e
        S = tokens per micro-batch (one pack), m = micro-batches per step and DP rank (1F1B keeps
        up to PP of them in flight on the first stage), e = bytes per element,
        a = 14 D + (15 D + 2 F) / TP elements per token and layer without recompute; 2 D with
            full recompute (the layer input), plus one layer's a for the recomputed layer.

``a`` was measured on this code (torch.distributed._tools.MemTracker, tiny CPU runs, fp32: 29 D +
2 F per token and layer at TP=1, within 5% for D = 64..256,
F = 2D..8D; about 2 D with recompute; tests/test_planner.py keeps them honest). The TP split
(what stays replicated: the residual stream, norms and modulation) is read from the code, not
measured; docs/parallelism.md derives it.

Step time: 3 x forward FLOPs (flops.py) of a pack, x 4/3 with recompute, over TP x CP GPUs at an
assumed fraction of bf16 peak (``--efficiency``, 0.4 by default), for m micro-batches with the 1F1B
bubble (1 + (PP - 1) / m); plus tensor-parallel all-reduces (4 per layer: 2 forward, 2 backward, of
S/CP x D x 2 bytes, ring cost 2 (TP - 1) / TP over NVLink) and Ulysses all-to-alls under CP (8 per
layer of S/CP x D/TP x 2 bytes x (CP - 1) / CP, over the network once TP x CP leaves a node).
Data-parallel gradient reduction is assumed
overlapped with the backward pass. These are estimates to rank layouts, not measurements.

FSDP (parallel.fsdp, PP = 1; model/fsdp.py: megatron's FSDP2 wrapper, one unit per GokuLayer plus
the root unit of the embedders, patch embed and final layer), with N = the shard group's DP x CP
ranks (all of them, or parallel.fsdp_shard_size) and R = DP x CP / N replicas:

    sharded     (P_gpu w + T_gpu (w + o)) / N weights, gradients (in the weights' dtype: FSDP2 has
                                              no fp32 grad buffer) and optimizer state, all
                                              DTensors sharded along dim 0 over the shard group
    gathered    w x (P_root + 2 P_layer       P_root = the root unit's (embedder) parameters,
                     + 2 T_layer)             P_layer = one layer's TP-local parameters, T_layer
                                              those that train (all of them, or LoRA's adapters)

The gathered term is FSDP2's peak of unsharded tensors, measured on this code
(torch.distributed._tools.fsdp2_mem_tracker, tests/test_planner.py): the root unit's weights (all-
gathered at the start of forward and again at the start of backward, freed at the end of each, so
held throughout both), the running layer's weights, the next layer's all-gather buffer (FSDP2
prefetches one layer ahead: implicitly in forward, explicitly in backward), the running layer's
unsharded gradients and the previous layer's reduce-scatter buffer. It is added to the activations'
peak although it peaks during the backward, when some activations are freed: an upper bound. With
parallel.fsdp_reshard_after_forward=false every layer stays gathered from its forward to its
backward, so the gathered term is w x (P_root + L P_layer + 2 T_layer). In bf16 the optimizer step
briefly holds fp32 main gradients (4 bytes) where the bf16 ones (2) were: P_gpu x 18 / N, with no
activations and nothing gathered, below the backward's peak unless those weigh less than
2 P_gpu / N.

FSDP2 does not skip gradient synchronisation between micro-batches: each micro-batch all-gathers
P_gpu x w bytes in forward and, with reshard_after_forward, again in backward, and reduce-scatters
T_gpu x w gradient bytes; each moves (N - 1) / N of them per GPU (ring), over NVLink when the shard
group's N x TP GPUs fit in a node (megatron's groups are consecutive ranks), else over the network.
Hybrid sharding (R > 1) adds the all-reduce of each gradient shard across the replicas,
2 (R - 1) / R x T_gpu x w / N per GPU, over the network once DP x CP x TP leaves a node. FSDP2
overlaps these with compute (the next layer's all-gather runs while a layer computes; reduce-
scatters run behind the backward), so a micro-batch takes max(compute, FSDP communication) plus
the TP and CP communication: only what compute cannot hide counts.

LoRA (lora.rank > 0; model/lora.py): the base is frozen (requires_grad=False), so megatron's DDP
gives it no fp32 gradient buffer and the optimizer no moments and no fp32 main copy: a frozen
weight costs its w bytes only. The adapters cost what trained weights cost (weights, fp32 gradients,
Adam / DP_opt). Per TP rank (model/lora.py adapter_params, from the sharding of each adapted
linear), A_gpu = rank x (in + out / TP) per column-parallel base (A replicated, B split), rank x
(in / TP + out) per row-parallel one (A split, B replicated), rank x (in + out) per replicated one
(the final layer's, counted on every stage like the embedders), over L / PP layers; T_gpu = A_gpu
plus model.i2v's image_cond, which an I2V LoRA trains in full. Under FSDP every weight is sharded,
frozen or not (P_gpu x w / N), and all-gathered for compute as before (P_layer includes the
layer's adapters, P_root the final layer's); the unsharded gradients and reduce-scatter buffers
hold the adapters' gradients only (T_layer = the layer's adapters; measured, tests/
test_planner.py), and only those are reduce-scattered: a micro-batch moves one collective of the
weights' size fewer.

Activations: the full finetune's figure, kept as an upper bound. An adapter's A saves the input
that its base linear saves for its weight gradient, the same tensor; a frozen base without an
adapter saves nothing for a weight gradient. B saves A's rank-wide output, 6 rank elements per
token and layer for the default targets (0.3% of a at rank 64 on goku-8b). Measured (saved
tensors, D = 128, rank 16, tests/test_planner.py): 66% of the estimate with the default targets,
80% with all twelve, 92% for the full finetune.

Step time: frozen linears skip their weight-gradient GEMMs (flops.weight_gradient_flops), so a
LoRA step costs 2F + attention's scores and weighted sums (4 S^2 D + 4 S L D per layer, 60% of a
goku-8b layer's F at 720p) instead of 3F, F = forward FLOPs (+ F with recompute). Left out, as
negligible: the adapters' own GEMMs (forward and backward, 6 rank x (in + out) FLOPs per token and
adapter, about 1.5% of a goku-8b LoRA step at rank 64 and 720p), their rank-wide TP all-reduces,
and the input-gradient GEMMs that autograd also skips where no input needs one (embedders, adaLN,
cross-attention K and V: under 0.1% of F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from goku_megatron.config import Config, ConfigError, LoraConfig, ModelConfig, StageConfig
from goku_megatron.flops import forward_flops, training_flops
from goku_megatron.model.lora import adapter_params

GIB = 1024**3
ADAM_BYTES = {"bf16": 12, "fp32": 8}  # optimizer state per parameter (see the module doc)
WEIGHT_BYTES = {"bf16": 2, "fp32": 4}
HEADROOM = 0.9  # the share of a GPU's memory a layout may plan to fill (the rest: allocator, NCCL, spikes)


@dataclass(frozen=True)
class Workload:
    """One training step's shape: packs of ``tokens`` tokens holding ``samples_per_pack`` samples
    of ``caption_tokens`` text tokens each, ``global_packs`` packs per optimizer step."""

    tokens: int
    samples_per_pack: int = 1
    caption_tokens: int = 256
    global_packs: int = 256


@dataclass(frozen=True)
class Hardware:
    gpus: int
    memory_bytes: float = 80 * GIB
    peak_flops: float = 989e12  # dense bf16, H100 SXM
    efficiency: float = 0.4
    nvlink_bytes_per_s: float = 450e9
    network_bytes_per_s: float = 50e9  # per GPU across nodes (400 Gb/s NICs)
    gpus_per_node: int = 8
    precision: str = "bf16"


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    recompute: bool
    distributed_optimizer: bool = True
    # FSDP's shard group in DP x CP ranks (dp x cp: all of them; fewer: hybrid, replicated across
    # groups); 0: megatron DDP, no FSDP.
    fsdp_shard: int = 0
    reshard_after_forward: bool = True  # parallel.fsdp_reshard_after_forward; FSDP only

    @property
    def fsdp_replicas(self) -> int:
        """Hybrid FSDP's replicas of each shard (1: sharded over all DP x CP ranks, or no FSDP)."""
        return self.dp * self.cp // self.fsdp_shard if self.fsdp_shard else 1

    @property
    def fsdp_shard_size(self) -> int:
        """parallel.fsdp_shard_size for this layout: 0 when FSDP shards over all DP x CP ranks."""
        return self.fsdp_shard if self.fsdp_replicas > 1 else 0


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    weights_bytes: float
    activation_bytes: float
    step_time_s: float

    @property
    def memory_bytes(self) -> float:
        return self.weights_bytes + self.activation_bytes


def layer_params(model: ModelConfig) -> tuple[int, int]:
    """(parameters of one Goku layer split over TP, those replicated on every TP rank)."""
    d, f = model.hidden_size, model.ffn_hidden_size
    split = 6 * d * d + 6 * d  # adaLN (column-parallel)
    split += 2 * (4 * d * d) + 2 * (2 * d)  # attn1/attn2 Q, K, V, O and full-width QK norms
    split += d * f + f + f * d  # MLP (fc2 bias is replicated)
    replicated = 2 * d + d  # norm2, norm3, fc2 bias
    return split, replicated


def embedder_params(model: ModelConfig) -> int:
    """Parameters outside the layers: embedders, patch embedding (and model.i2v's image_cond),
    final layer."""
    d, patch = model.hidden_size, model.in_channels * model.patch_volume
    t_embed = model.timestep_freq_dim * d + d + d * d + d
    caption = model.text_dim * d + d + d * d + d
    return (t_embed + caption + (patch * d + d) + image_cond_params(model)
            + (d * 2 * d + 2 * d + d * patch + patch))


def image_cond_params(model: ModelConfig) -> int:
    """model.i2v's condition layer, Linear(2 x patch, patch): the one layer a LoRA finetune trains
    in full (goku.NEW_LAYERS)."""
    patch = model.in_channels * model.patch_volume
    return 2 * patch * patch + patch if model.i2v else 0


def activation_elements(model: ModelConfig, tp: int, recompute: bool) -> float:
    """Saved activation elements per token and layer (module doc)."""
    d, f = model.hidden_size, model.ffn_hidden_size
    if recompute:
        return 2 * d
    return 14 * d + (15 * d + 2 * f) / tp


def stage_params(model: ModelConfig, tp: int, pp: int) -> float:
    """P_gpu: the parameters one GPU holds without FSDP (its TP share of L / PP layers, and the
    embedders, replicated on every stage)."""
    split, replicated = layer_params(model)
    return (split / tp + replicated) * model.num_layers / pp + embedder_params(model)


def lora_on(lora: LoraConfig | None) -> LoraConfig | None:
    """``lora`` when it trains adapters (rank > 0), else None: the whole model trains."""
    return lora if lora is not None and lora.rank > 0 else None


def stage_adapter_params(model: ModelConfig, tp: int, pp: int, lora: LoraConfig | None) -> float:
    """A_gpu: the LoRA adapters' parameters one GPU holds (module doc), 0 without LoRA."""
    if lora_on(lora) is None:
        return 0.0
    per_layer, final = adapter_params(model, lora, tp)
    return per_layer * model.num_layers / pp + final


def trainable_params(model: ModelConfig, tp: int, pp: int, lora: LoraConfig | None) -> float:
    """T_gpu: the parameters one GPU trains (module doc): all of P_gpu, or with LoRA its adapters
    and model.i2v's image_cond."""
    if lora_on(lora) is None:
        return stage_params(model, tp, pp)
    return stage_adapter_params(model, tp, pp, lora) + image_cond_params(model)


def fsdp_memory(model: ModelConfig, layout: Layout, precision: str,
                lora: LoraConfig | None = None) -> tuple[float, float]:
    """(sharded, gathered) bytes per GPU under FSDP (module doc): weights, the trained ones'
    gradients and optimizer state divided by the shard group, and FSDP2's peak of all-gathered
    weights and unsharded gradients."""
    w, tp, lora = WEIGHT_BYTES[precision], layout.tp, lora_on(lora)
    held = stage_params(model, tp, 1) + stage_adapter_params(model, tp, 1, lora)
    trained = trainable_params(model, tp, 1, lora)
    sharded = (held * w + trained * (w + ADAM_BYTES[precision])) / layout.fsdp_shard
    split, replicated = layer_params(model)
    adapters, final_adapters = adapter_params(model, lora, tp) if lora else (0, 0)
    layer = split / tp + replicated + adapters
    layer_grads = adapters if lora else layer
    layers_gathered = 2 if layout.reshard_after_forward else model.num_layers
    return sharded, w * (embedder_params(model) + final_adapters + layers_gathered * layer + 2 * layer_grads)


def fsdp_comm_s(model: ModelConfig, hw: Hardware, layout: Layout, lora: LoraConfig | None = None) -> float:
    """Seconds of FSDP communication per micro-batch (module doc): all-gathers of the weights in
    forward (and backward), the reduce-scatter of the trained ones' gradients, hybrid's all-reduce
    of those over replicas."""
    n, replicas, w, tp = layout.fsdp_shard, layout.fsdp_replicas, WEIGHT_BYTES[hw.precision], layout.tp
    weights = (stage_params(model, tp, 1) + stage_adapter_params(model, tp, 1, lora)) * w
    grads = trainable_params(model, tp, 1, lora) * w
    gathers = 2 if layout.reshard_after_forward else 1
    shard_bw = hw.nvlink_bytes_per_s if n * layout.tp <= hw.gpus_per_node else hw.network_bytes_per_s
    replica_bw = (hw.nvlink_bytes_per_s if layout.dp * layout.cp * layout.tp <= hw.gpus_per_node
                  else hw.network_bytes_per_s)
    return ((gathers * weights + grads) * (n - 1) / n / shard_bw
            + 2 * (replicas - 1) / replicas * grads / n / replica_bw)


def estimate(model: ModelConfig, work: Workload, hw: Hardware, layout: Layout,
             lora: LoraConfig | None = None) -> Estimate:
    """Memory per GPU and step time of ``layout`` (module doc); ``lora``: a LoRA finetune's
    adapters, the rest of the model frozen."""
    tp, cp, pp, dp = layout.tp, layout.cp, layout.pp, layout.dp
    if layout.fsdp_shard:
        weights = sum(fsdp_memory(model, layout, hw.precision, lora))
    else:
        opt = ADAM_BYTES[hw.precision] / (dp * cp if layout.distributed_optimizer else 1)
        held = stage_params(model, tp, pp) + stage_adapter_params(model, tp, pp, lora)
        weights = held * WEIGHT_BYTES[hw.precision] + trainable_params(model, tp, pp, lora) * (4 + opt)

    micro = max(1, work.global_packs // dp)
    layers = model.num_layers / pp
    elem = WEIGHT_BYTES[hw.precision]
    local_tokens = work.tokens / cp
    acts = layers * min(pp, micro) * local_tokens * activation_elements(model, tp, layout.recompute) * elem
    if layout.recompute:  # the layer being recomputed holds its full activations
        acts += local_tokens * activation_elements(model, tp, False) * elem

    video = [work.tokens // work.samples_per_pack] * work.samples_per_pack
    text = [work.caption_tokens] * work.samples_per_pack
    # A LoRA step's frozen linears skip their weight gradients; recompute runs the forward again.
    flops = training_flops(model, video, text, frozen_base=lora_on(lora) is not None)
    if layout.recompute:
        flops += forward_flops(model, video, text)
    compute = flops / (tp * cp * hw.peak_flops * hw.efficiency)
    message = local_tokens * model.hidden_size * 2
    tp_comm = 4 * layers * message * 2 * (tp - 1) / tp / hw.nvlink_bytes_per_s
    # TP ranks are adjacent (one node); a CP group that leaves the node crosses the network.
    cp_bw = hw.nvlink_bytes_per_s if tp * cp <= hw.gpus_per_node else hw.network_bytes_per_s
    cp_comm = 8 * layers * message / tp * (cp - 1) / cp / cp_bw
    # FSDP (PP = 1) hides its communication behind compute as far as compute lasts (module doc).
    compute_or_fsdp = max(compute, fsdp_comm_s(model, hw, layout, lora)) if layout.fsdp_shard else compute / pp
    per_micro = compute_or_fsdp + tp_comm + cp_comm
    step = per_micro * micro * (1 + (pp - 1) / micro)
    return Estimate(layout, weights, acts, step)


def candidate_layouts(model: ModelConfig, work: Workload, gpus: int, gpus_per_node: int = 8,
                      fsdp: bool = True, reshard_after_forward: bool = True) -> list[Layout]:
    """Every TP (<= 8, one node, dividing the heads), CP dividing the tokens, PP dividing the
    layers, that multiplies to a divisor of the GPU count; with and without recompute. With
    ``fsdp``, each PP = 1 layout also as FSDP over all DP x CP ranks and, when those span more than
    a node, hybrid FSDP sharded inside a node (gpus_per_node / TP ranks)."""
    out = []
    for tp in (1, 2, 4, 8):
        if model.num_heads % tp or tp > gpus:
            continue
        for cp in (1, 2, 4, 8, 16):
            if work.tokens % cp or (model.num_heads // tp) % cp or tp * cp > gpus:
                continue
            for pp in (1, 2, 4, 8):
                if model.num_layers % pp or gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                if work.global_packs % dp:
                    continue
                shards = []
                if fsdp and pp == 1 and dp * cp > 1:
                    node = gpus_per_node // tp
                    shards = [dp * cp] + ([node] if 1 < node < dp * cp and dp * cp % node == 0 else [])
                for recompute in (False, True):
                    out.append(Layout(tp, cp, pp, dp, recompute))
                    out.extend(Layout(tp, cp, pp, dp, recompute, distributed_optimizer=False, fsdp_shard=shard,
                                      reshard_after_forward=reshard_after_forward) for shard in shards)
    return out


def plan(model: ModelConfig, work: Workload, hw: Hardware, headroom: float = HEADROOM, fsdp: bool = True,
         reshard_after_forward: bool = True, lora: LoraConfig | None = None) -> list[tuple[Estimate, bool]]:
    """All candidates (FSDP ones unless ``fsdp`` is false), fastest first, each with whether it fits
    ``headroom`` x GPU memory (``lora``: a LoRA finetune's). At equal step times the smaller TP
    wins, then megatron DDP over FSDP (FSDP's estimate hides its communication, DDP moves less),
    then the hybrid FSDP (less network traffic)."""
    layouts = candidate_layouts(model, work, hw.gpus, hw.gpus_per_node, fsdp, reshard_after_forward)
    estimates = [estimate(model, work, hw, layout, lora) for layout in layouts]
    fits = [(e, e.memory_bytes <= headroom * hw.memory_bytes) for e in estimates]
    return sorted(fits, key=lambda pair: (not pair[1], pair[0].step_time_s, pair[0].layout.tp,
                                          pair[0].layout.fsdp_shard > 0, -pair[0].layout.fsdp_replicas))


def tokens_for(model: ModelConfig, frames: int, height: int, width: int,
               vae: tuple[int, int, int] = (4, 8, 8)) -> int:
    """Tokens of one clip: CogVideoX-style VAE compression (time, height, width), then patching."""
    pt, ph, pw = model.patch_size
    t = (frames - 1) // vae[0] + 1
    return math.ceil(t / pt) * (height // vae[1] // ph) * (width // vae[2] // pw)


def stage_workload(cfg: Config, stage: StageConfig) -> Workload:
    """A stage's packs: its token budget, filled with clips of its resolution and frames."""
    clip = tokens_for(cfg.model, stage.frames, stage.height, stage.width)
    return Workload(tokens=stage.token_budget, samples_per_pack=max(1, stage.token_budget // clip),
                    caption_tokens=cfg.data.max_text_tokens, global_packs=cfg.train.global_batch_size)


def planned_stage(cfg: Config) -> StageConfig:
    """The stage a run's one layout must fit: the one with the largest token budget."""
    return max(cfg.data.stages, key=lambda s: s.token_budget)


def fsdp_allowed(cfg: Config) -> bool:
    """Whether parallel.auto may pick FSDP: not when the run asks for the distributed optimizer's
    own overlap or FP8 all-gather, which FSDP replaces (config.validate refuses them together)."""
    o = cfg.optim
    return not (o.overlap_grad_reduce or o.overlap_param_gather or o.fp8_param_gather)


def recommend(cfg: Config, gpus: int) -> Layout | None:
    """The fastest layout of ``gpus`` GPUs (``parallel.gpu_memory_gb`` each) that fits the run's
    largest stage (with its lora section: a LoRA finetune's), or None; what ``parallel.auto``
    trains with."""
    hw = Hardware(gpus=gpus, memory_bytes=cfg.parallel.gpu_memory_gb * GIB)
    ranked = plan(cfg.model, stage_workload(cfg, planned_stage(cfg)), hw, fsdp=fsdp_allowed(cfg),
                  reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward, lora=lora_on(cfg.lora))
    return ranked[0][0].layout if ranked and ranked[0][1] else None


def resolve_layout(cfg: Config, world_size: int) -> None:
    """parallel.auto: write the recommended layout into parallel.tp/cp/pp/fsdp/fsdp_shard_size and
    model.recompute (and optim.distributed_optimizer=false with FSDP, which replaces it), and clear
    parallel.auto, so that config.validate checks (and config.yaml and checkpoints record) the
    layout itself. Every command calls this before validation; a no-op without parallel.auto.
    Raises ConfigError (one line) when the recipe cannot be planned or nothing fits."""
    p = cfg.parallel
    if not p.auto:
        return
    if cfg.model.recompute_granularity != "full":
        raise ConfigError(f"parallel.auto plans memory for full activation recompute, not "
                          f"model.recompute_granularity={cfg.model.recompute_granularity}; set it to full or "
                          f"choose the layout yourself (parallel.auto=false)")
    if not p.tp == p.cp == p.pp == 1:
        raise ConfigError(f"parallel.auto picks tp, cp and pp itself (given tp={p.tp} cp={p.cp} pp={p.pp}): drop "
                          f"those overrides, or set parallel.auto=false to choose the layout yourself")
    if p.fsdp or p.fsdp_shard_size:
        raise ConfigError(f"parallel.auto decides FSDP itself (given fsdp={str(p.fsdp).lower()} fsdp_shard_size="
                          f"{p.fsdp_shard_size}): drop those overrides, or set parallel.auto=false to choose the "
                          f"layout yourself")
    if cfg.data.kind == "toy" or not cfg.data.stages:
        raise ConfigError("parallel.auto plans for data.stages' token budgets; a toy run sets parallel.tp/cp/pp itself")
    if p.gpu_memory_gb <= 0:
        raise ConfigError(f"parallel.gpu_memory_gb must be positive, got {p.gpu_memory_gb}")
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}; pass --world-size N or launch with torchrun")
    layout = recommend(cfg, world_size)
    if layout is None:
        raise ConfigError(f"parallel.auto: no layout of {world_size} GPUs x {p.gpu_memory_gb:g} GiB fits "
                          f"{cfg.model.preset} at {planned_stage(cfg).token_budget} tokens per pack (goku-plan "
                          f"--config ... lists the candidates); use more GPUs or a smaller data.stages[].token_budget")
    p.tp, p.cp, p.pp, cfg.model.recompute = layout.tp, layout.cp, layout.pp, layout.recompute
    if layout.fsdp_shard:
        p.fsdp, p.fsdp_shard_size = True, layout.fsdp_shard_size
        cfg.optim.distributed_optimizer = False
    p.auto = False
