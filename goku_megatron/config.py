"""Run configuration: one dataclass tree, presets, YAML recipes and ``key=value`` overrides.

Resolution order: dataclass defaults < ``model.preset`` < recipe YAML < command-line overrides;
a ``model.preset`` given on the command line replaces the recipe's preset-defined shape fields.
Everything is validated before any heavy import or allocation, and every rule fails with a one-line
``ConfigError`` that names the field (and the file, when a file is involved) and how to fix it.
A config saved with a run (checkpoints, exported weights) comes back through the same coercion
(``config_from_dict``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the field and the fix."""


class UnknownKeyError(ConfigError):
    """A key that names no field. ``key`` is its dotted name, so that a saved config (which nobody
    mistyped: another version wrote it) words its own line instead of suggesting a spelling."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


# Paper Table 1 (docs/model.md, "Model sizes"). Shared: latent channels 16, patch 1x2x2, FLAN-T5 XL
# text width 2048.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "goku-1b": dict(num_layers=28, hidden_size=1152, ffn_hidden_size=4608, num_heads=16, text_dim=2048),
    "goku-2b": dict(num_layers=28, hidden_size=1792, ffn_hidden_size=7168, num_heads=28, text_dim=2048),
    "goku-8b": dict(num_layers=40, hidden_size=3072, ffn_hidden_size=12288, num_heads=48, text_dim=2048),
    # For tests and quick CPU checks: every code path, seconds per step.
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=256, num_heads=4, text_dim=32),
}

TIMESTEP_SAMPLERS = ("uniform", "logit_normal")
ATTENTION_BACKENDS = ("auto", "te", "flash", "sdpa")
LINEAR_BACKENDS = ("auto", "te", "local")
PRECISIONS = ("auto", "fp32", "bf16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
LR_DECAYS = ("cosine", "constant")
DATA_KINDS = ("toy", "raw", "latent")
TEXT_ENCODERS = ("hash", "t5")
DECODERS = ("auto", "pyav", "dali")
CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p")
RECOMPUTE_GRANULARITIES = ("full", "selective")
FP8_FORMATS = ("", "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
WANDB_MODES = ("online", "offline", "disabled")
# What lora.targets may name (docs/recipes.md, "LoRA finetuning"); goku_megatron/model/lora.py maps
# each name to the linear layers it adapts. Per layer: the self- (attn1) and cross-attention
# (attn2) projections, the MLP and the adaLN modulation (norm1.linear); once per model: the final
# layer (its adaLN and output projection).
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                "mlp.fc1", "mlp.fc2", "adaln", "final")
# lora.base for adapters on the base that train.seed initialises (tests, benchmarks): no weights read.
LORA_SEED_BASE = "seed"


@dataclass
class ModelConfig:
    """Goku transformer shape; see docs/model.md for what each field reproduces. The defaults are the
    ``tiny`` preset, so ``Config()`` equals ``load_config()``."""

    preset: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_heads: int = 4
    in_channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    text_dim: int = 32
    timestep_freq_dim: int = 256
    rope_theta: float = 10000.0
    cross_attn_rope_q: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # adaLN-Zero: gates and the output layer start at zero, so every block starts as the identity.
    zero_init: bool = True
    # Image-to-video (Goku-I2V): the first-frame latent, broadcast over time, is concatenated on
    # channels with the noisy latent and mapped back by one linear layer before the patch embedding.
    i2v: bool = False
    recompute: bool = False
    # What model.recompute recomputes in the backward pass: "full" reruns whole layers (least
    # memory), "selective" only the core attention softmax(QK^T)V, whose activations are large and
    # whose FLOPs are few (megatron's "core_attn"; the projections and MLP keep theirs).
    recompute_granularity: str = "full"
    # FP8 matrix multiplies through Transformer Engine (GPU, linear backend te): "" off, "e4m3"
    # everywhere or "hybrid" (e4m3 forward, e5m2 gradients). fp8_recipe picks the scaling: delayed
    # (amax history), tensorwise (current scaling), blockwise, mxfp8 (Blackwell only); see
    # docs/performance.md.
    fp8: str = ""
    fp8_recipe: str = "delayed"
    # Keep the first and last N layers in bf16 (FP8 hurts most at the ends of the network); not
    # with the delayed recipe, whose amax reduction needs one FP8 region around all layers.
    fp8_bf16_layers: int = 0
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    # torch.compile each Goku layer (fullgraph, as torchtitan compiles each block): fused
    # elementwise kernels around the GEMMs and attention; the first step compiles (minutes).
    # compile_backend: torch.compile's backend ("aot_eager" traces without generating kernels).
    compile: bool = False
    compile_backend: str = "inductor"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw


@dataclass
class ParallelConfig:
    """Megatron parallel layout; data parallelism fills the world: dp = world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 0  # 0: derived from the world size
    distributed_backend: str = "auto"
    # Transformer Engine's CP communication (GPU, attention_backend te): p2p ring, a2a (Ulysses
    # inside TE) or a2a+p2p (hierarchical); without TE, CP is always Ulysses all-to-all.
    cp_comm_type: str = "p2p"
    # Let goku-plan choose tp, cp, pp, fsdp, fsdp_shard_size and model.recompute for the world size,
    # GPU memory and the largest data.stages token budget (goku_megatron/planner.py); the choice is
    # logged and saved in the run's config.yaml. Checkpoints reshard, so a run may continue under another layout.
    auto: bool = False
    gpu_memory_gb: float = 80.0  # what parallel.auto plans for: H100 80, H200 141
    # Fully sharded data parallelism (megatron-core's FSDP2 wrapper, docs/parallelism.md): every
    # DP x CP rank keeps 1/N of the weights, gradients and Adam state and all-gathers a layer's
    # weights just before it runs. Replaces optim.distributed_optimizer (which shards the Adam
    # state only); not with pipeline parallelism (megatron: FSDP2 does not work with PP).
    fsdp: bool = False
    # Hybrid sharding: shard inside groups of N consecutive DP x CP ranks (a node, say) and
    # replicate across groups, all-reducing the sharded gradients between replicas; 0: shard
    # over all DP x CP ranks. megatron's equivalent: num_distributed_optimizer_instances = DPxCP / N.
    fsdp_shard_size: int = 0
    # Free each layer's gathered weights after its forward pass (gathered again for the backward);
    # false keeps them until the backward (more memory, one all-gather less per layer).
    fsdp_reshard_after_forward: bool = True


@dataclass
class FlowConfig:
    """Rectified-flow training and sampling (docs/model.md, "Flow formulation").

    ``logit_mean`` / ``logit_std`` parametrise the ``logit_normal`` timestep sampler the SD3 way:
    the logit of the noise level ``1 - t`` is N(logit_mean, logit_std) (t = 0 is noise, t = 1 data),
    so a positive mean puts more training steps near the noise end (median t = sigmoid(-mean)).
    """

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    caption_dropout: float = 0.1
    sample_steps: int = 25
    cfg_scale: float = 5.0


@dataclass
class StageConfig:
    """One stage of a cascaded schedule (docs/model.md, "Training recipe": 288x512 -> 480x864 -> 720x1280).

    A stage runs for ``steps`` optimizer steps on the shards at ``path`` (empty: data.path; the
    paper's Table 4 keeps one data tier per resolution); raw clips are decoded at ``fps``, cut to ``frames``
    and resized/centre-cropped to height x width; samples are packed into micro-batches of
    ``token_budget`` tokens, drawing an image instead of a clip with probability ``image_ratio``.
    """

    name: str = ""
    steps: int = 0
    path: str = ""
    height: int = 288
    width: int = 512
    frames: int = 33
    fps: float = 8.0
    token_budget: int = 8192
    image_ratio: float = 0.0


@dataclass
class DataConfig:
    """Training data. ``toy``: pixel-space clips from goku-data make-toy, decoded like raw
    shards, with the identity as their "VAE"; ``raw``: clip and image shards
    (goku-data prepare-shards) decoded and VAE-encoded online; ``latent``: shards of precomputed
    latents and text embeddings (goku-data precompute-latents). Every kind follows ``stages`` and
    trains on packed sequences; a toy run's one stage is derived from the toy fields (toy_stage)."""

    kind: str = "toy"
    path: str = "data/toy"
    create_if_missing: bool = True
    toy_clips: int = 2048
    toy_images: int = 512
    toy_size: int = 16
    toy_frames: int = 8
    # Colours the toy's training samples show (names of TOY_COLORS); empty: all. A base model
    # trained without one is what a finetune teaches it (docs/recipes.md, LoRA on CPU).
    toy_colors: list[str] = field(default_factory=list)
    image_ratio: float = 0.25
    text_encoder: str = "hash"
    text_encoder_path: str = ""
    vae_path: str = ""
    # auto: DALI mixed on GPU, PyAV on CPU, the faster there (docs/data.md, "Decode throughput");
    # pyav: PyAV everywhere; dali: DALI wherever it takes the codec (on CPU: VP8/VP9/MJPEG).
    decoder: str = "auto"
    max_text_tokens: int = 16
    # Prepared samples (decoded, VAE-encoded) kept in memory, least recently used out first: a
    # dataset that fits (the toy's 2048 clips take 50 MB) is decoded once, not once per epoch.
    cache_mb: int = 0
    # A draw that finds this many bad samples in a row (or a whole pass of a stream's samples, if
    # that is fewer) stops the run with one line: the data path holds no usable sample.
    max_bad_in_a_row: int = 1000
    # Read-ahead (docs/data.md, "Read-ahead"): threads that read and decode samples while the step
    # runs, and how many steps of packs they prepare ahead. -1: on GPU from the cores per process,
    # on CPU 0 (pipeline.data_workers); 0: everything inline on the training thread.
    workers: int = -1
    read_ahead_steps: int = 2
    stages: list[StageConfig] = field(default_factory=list)

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(index, stage) that optimizer step ``step`` (1-based) belongs to; the last stage
        continues past its end."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if step <= end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def stage_path(self, stage: StageConfig) -> str:
        return stage.path or self.path


# The toy dataset's frame rate (goku_megatron/data/toy.py FPS): toy clips decode at their own rate.
TOY_FPS = 8.0
# The toy's colour names (goku_megatron/data/toy.py COLORS, which tests/test_toy_data.py checks
# against this): named here so that data.toy_colors is checked without importing the data package.
TOY_COLORS = ("red", "green", "blue", "yellow")


def toy_stage(d: DataConfig, steps: int, micro_batch_size: int, patch: Sequence[int]) -> StageConfig:
    """The one stage of a toy run: its clips at their own size and rate, packed ``micro_batch_size``
    clips to a pack (token budget = micro_batch_size x tokens per clip), so a toy micro-batch is a
    pack of equal segments on the same path as every other run."""
    pt, ph, pw = patch
    tokens = -(-d.toy_frames // pt) * (d.toy_size // ph) * (d.toy_size // pw)
    return StageConfig(name="toy", steps=steps, height=d.toy_size, width=d.toy_size, frames=d.toy_frames,
                       fps=TOY_FPS, token_budget=micro_batch_size * tokens, image_ratio=d.image_ratio)


@dataclass
class OptimConfig:
    """AdamW through megatron-core's optimizer, warmup then cosine decay."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    decay: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # ZeRO-1: each data-parallel rank keeps the Adam state of its 1/dp of the parameters.
    distributed_optimizer: bool = True
    # Reduce each bucket of gradients over data parallelism as soon as the backward pass has
    # produced it, overlapping the communication with the rest of the backward pass.
    overlap_grad_reduce: bool = False
    # Distributed optimizer: all-gather the updated weights bucket by bucket during the next
    # forward pass instead of at the end of the step.
    overlap_param_gather: bool = False
    # Distributed optimizer with model.fp8: keep the layers' weights in FP8, so the all-gather moves
    # half the bytes of bf16 (fp32 main weights stay in the optimizer).
    fp8_param_gather: bool = False
    # Elements per gradient bucket, the unit that overlap_grad_reduce communicates; 0: megatron's
    # default (max(40M, 1M x dp)).
    ddp_bucket_size: int = 0


@dataclass
class TrainConfig:
    """Loop length, batch sizes, precision and outputs."""

    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_interval: int = 10
    save_interval: int = 0  # 0: save only at the end
    run_dir: str = ""  # "": runs/<name>-<timestamp> (runs/<name>-<rdzv id> under torchrun)
    name: str = "goku"
    # Every sample_interval steps (0: never) the model being trained samples sample_prompts at the
    # current stage's size: MP4s under <run_dir>/samples/ and GIFs in TensorBoard.
    sample_interval: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    # Toy runs: every eval_interval steps (0: never) ShapesBench prompt adherence (seen and held-out
    # colour x shape x direction prompts, eval_samples_per_prompt clips each) and the validation
    # loss at fixed timesteps and noise, as eval/* scalars (goku_megatron/evaluation.py).
    eval_interval: int = 0
    eval_samples_per_prompt: int = 1
    # Weights & Biases beside TensorBoard (rank 0; pip install 'goku-megatron[wandb]'): every
    # metrics.jsonl record, the resolved config and the samples go to this W&B project; "": off.
    # A restart in the same run_dir continues the W&B run named in <run_dir>/wandb_run_id; W&B's
    # own files go under <run_dir>/wandb/. The API key comes from WANDB_API_KEY, never the config.
    wandb_project: str = ""
    wandb_entity: str = ""  # "": the API key's default entity
    wandb_run_name: str = ""  # "": the run directory's name
    wandb_mode: str = "online"  # offline: written to <run_dir>/wandb/ for `wandb sync`; disabled: no W&B


RESUME_MODES = ("auto", "")


@dataclass
class CheckpointConfig:
    """Fault tolerance: what a checkpoint holds, when a run resumes, how it reacts to faults
    (docs/checkpointing.md). Checkpoints are written every ``train.save_interval`` steps, at the
    end, and when SIGTERM/SIGUSR1 asks the run to stop."""

    # auto: continue from train.run_dir's newest valid checkpoint; "": always start fresh; a run
    # directory or checkpoints/iter_N: start from there (once the run dir holds checkpoints of its
    # own, restarts continue from those).
    resume: str = "auto"
    keep_last: int = 3  # complete checkpoints kept in the run dir; 0 keeps all
    async_save: bool = True  # write in a background thread; training blocks only for the snapshot
    ema_decay: float = 0.9999  # fp32 EMA of the weights, updated after each optimizer step; 0: off
    max_bad_steps: int = 5  # this many skipped (NaN/Inf loss or gradient) steps in a row stop the run
    spike_factor: float = 10.0  # log a loss above spike_factor x the running mean; 0: off
    spike_window: int = 50  # steps in that running mean
    # nvidia-resiliency-ext heartbeats and sections (needs the package and its ft_launcher).
    fault_tolerance: bool = False
    # Finetuning: a run that starts fresh takes its weights (only) from this run directory or
    # checkpoints/iter_N, e.g. the T2V checkpoint an I2V finetune starts from; layers that the
    # checkpoint lacks (model.i2v's image_cond) keep their initialisation. "": no. Checked when the
    # run starts, so that a recipe chained after another one dry-runs before that one has trained.
    init_from: str = ""
    init_from_ema: bool = False  # take init_from's EMA weights instead of its trained ones


@dataclass
class LoraConfig:
    """LoRA finetuning (docs/recipes.md, "LoRA finetuning"): low-rank adapters on the linear layers
    that ``targets`` names, ``scale * B(A(dropout(x)))`` added to each one's output with scale =
    alpha / rank; every other weight is the base's and stays frozen (model.i2v's image_cond, the
    one layer an I2V finetune adds to a text-to-video base, trains in full). ``rank`` 0: off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' inputs only; the base sees x unchanged
    targets: list[str] = field(default_factory=lambda: [t for t in LORA_TARGETS if t not in ("adaln", "final")])
    # The frozen base: a run directory or its checkpoints/iter_N, or a .safetensors file in the
    # reference block layout (goku-data convert-checkpoint); "seed": the base that train.seed
    # initialises. Read when the run starts, so a recipe chained after the run that trains its
    # base dry-runs before that run exists.
    base: str = ""
    base_ema: bool = False  # take a checkpoint base's EMA weights instead of its trained ones


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=20", "model.patch_size=[1,2,2]"]`` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override '{item}' is not key=value: write e.g. train.steps=20")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a field inside '{part}', which is a value")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe is a YAML file or the name of a packaged recipe (goku_megatron/recipes/NAME.yaml).

    A packaged name means that recipe unless the path is an existing YAML file: a run directory
    called ``goku-2b`` or a folder ``toy/`` in the working directory must not shadow it, on every
    requeue of the job. An existing file without a YAML suffix is read as YAML when no packaged
    recipe has its name; a directory is never a recipe."""
    path = Path(name_or_path)
    packaged = name_or_path in available_recipes()
    yaml_suffix = path.suffix in (".yaml", ".yml")
    if path.is_file() and (yaml_suffix or not packaged):
        return path
    if packaged:
        return RECIPES_DIR / f"{name_or_path}.yaml"
    if yaml_suffix or path.exists():
        found = ("a directory, not a recipe file" if path.is_dir() else "not a regular file, so not a recipe file"
                 if path.exists() else "recipe file not found (no such file or directory)")
        raise ConfigError(f"{path}: {found}; pass an existing YAML file or one of "
                          f"{', '.join(available_recipes())}")
    raise ConfigError(f"unknown recipe '{name_or_path}': use a YAML path or one of "
                      f"{', '.join(available_recipes())}")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model:, train:, ...)")
    return data


def _recipe_values(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe's values over those of its ``base:`` recipe (a packaged name, or a path relative to
    the recipe), recursively; sections merge key by key, lists (data.stages) are replaced whole."""
    values = _read_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one recipe (e.g. base: goku-8b), got {base!r}")
    relative = path.parent / base
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else resolve_recipe(base)
    if base_path.resolve() in seen + (path.resolve(),):
        raise ConfigError(f"{path}: base: {base} leads back to itself; break the cycle of base: recipes")
    inherited = _recipe_values(base_path, seen + (path.resolve(),))
    _build(Config, _with_preset(inherited, f"{base_path}: "), "", f"{base_path}: ")  # blame the base
    return _merge(inherited, values)


def _coerce(value: Any, typ: Any, dotted: str, source: str) -> Any:
    """``value`` as a field of type ``typ``, or a one-line ConfigError naming ``source`` (the file or
    checkpoint, "" for the command line) and the field ``dotted``."""
    where = f"{source}{dotted}"
    origin = get_origin(typ)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type,) = get_args(typ)
        if dataclasses.is_dataclass(item_type):
            items = []
            for i, v in enumerate(value):
                if not isinstance(v, Mapping):
                    raise ConfigError(f"{where}[{i}] must be a mapping of {item_type.__name__} fields")
                items.append(_build(item_type, v, f"{dotted}[{i}].", source))
            return items
        return [_coerce(v, item_type, dotted, source) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config field type {typ}")


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid: {', '.join(names)}"
            raise UnknownKeyError(f"{source}unknown key '{dotted}'{hint}", dotted)
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}'{dotted}' is a section: give it as {dotted}.FIELD=VALUE")
            kwargs[key] = _build(typ, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, typ, dotted, source)
    return cls(**kwargs)


def load_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build the run's config from an optional recipe and ``key=value`` overrides (not validated)."""
    values: dict[str, Any] = {}
    if recipe:
        path = resolve_recipe(recipe)
        values = _recipe_values(path, ())
        _build(Config, _with_preset(values, f"{path}: "), "", f"{path}: ")  # blame the file
    cli = parse_overrides(overrides)
    cli_preset = cli["model"].get("preset") if isinstance(cli.get("model"), dict) else None
    if isinstance(cli_preset, str) and cli_preset in MODEL_PRESETS and isinstance(values.get("model"), dict):
        # A preset named on the command line picks the architecture: the recipe's shape fields
        # that the preset defines give way to it (other recipe fields, e.g. in_channels, stay).
        values = {**values, "model": {k: v for k, v in values["model"].items()
                                      if k not in MODEL_PRESETS[cli_preset]}}
    values = _merge(values, cli)
    return _build(Config, _with_preset(values, ""), "", "")


def config_from_dict(saved: Any, source: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """A saved ``Config.to_dict()`` (a checkpoint's, an exported file's metadata) as a Config, through
    the coercion and checks that recipes and ``key=value`` overrides go through:
    ``config_from_dict(cfg.to_dict(), ...) == cfg``. ``overrides``, sections of fields as in
    ``to_dict()``, replace saved values (goku-sample's one-process layout). Not validated, like
    load_config's result: a caller that runs the config validates it.

    A saved config is resolved, so its ``model.preset`` is a name and not expanded; a field added
    since it was saved takes its default (new fields default to the behaviour before them). A
    key this version does not know, or a value of the wrong type, is refused in one line that
    names ``source`` and the field: it was saved by another version of goku-megatron (or edited),
    which is the version to load it with."""
    where = f"{source}: saved config"
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{where} is a {type(saved).__name__}, not a mapping of sections (model, train, ...); "
                          f"goku-train did not write it: load a checkpoint or file that goku-megatron saved")
    fix = "another version of goku-megatron saved it (or it was edited): load it with the version that saved it"
    try:
        return _build(Config, _merge(dict(saved), overrides or {}), "", f"{where}: ")
    except UnknownKeyError as err:
        raise ConfigError(f"{where}: unknown key '{err.key}', a field this version does not have; {fix}") from None
    except ConfigError as err:
        raise ConfigError(f"{err}; {fix}") from None


def _with_preset(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Expand ``model.preset`` into model fields that the explicit ones then override."""
    model = values.get("model") or {}
    if not isinstance(model, Mapping):
        raise ConfigError(f"{source}'model' is a section: give it as model.FIELD=VALUE")
    model_values = dict(model)
    preset = model_values.setdefault("preset", ModelConfig.preset)
    if not isinstance(preset, str) or preset not in MODEL_PRESETS:
        raise ConfigError(f"{source}model.preset '{preset}' is unknown; use one of "
                          f"{', '.join(MODEL_PRESETS)}")
    return {**values, "model": _merge(MODEL_PRESETS[preset], model_values)}


# --------------------------------------------------------------------------------------------
# Validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(value: str, allowed: Sequence[str], where: str) -> None:
    _require(value in allowed, f"{where}='{value}' is not one of {', '.join(allowed)}")


def _derive_toy_stage(cfg: Config) -> None:
    """A toy run's data.stages is its one toy_stage, derived from the toy fields (and replaced
    when a saved config already holds it)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    _require(d.toy_size > 0 and d.toy_frames > 0,
             f"data.toy_size={d.toy_size} and data.toy_frames={d.toy_frames} must be positive")
    pt, ph, pw = m.patch_size
    _require(d.toy_size % ph == 0 and d.toy_size % pw == 0,
             f"data.toy_size={d.toy_size} is not divisible by model.patch_size h/w={ph}/{pw}")
    _require(d.toy_frames % pt == 0,
             f"data.toy_frames={d.toy_frames} is not divisible by model.patch_size t={pt}")
    _require(0 <= d.image_ratio <= 1, f"data.image_ratio must be in [0, 1], got {d.image_ratio}")
    d.stages = [toy_stage(d, t.steps, t.micro_batch_size, m.patch_size)]


def _budget_name(d: DataConfig, stage: int) -> str:
    """How an error names a stage's token budget: the toy's is derived from fields the user sets."""
    if d.kind == "toy":
        return ("the toy pack (train.micro_batch_size x tokens per clip of data.toy_frames x "
                "data.toy_size^2 / model.patch_size)")
    return f"data.stages[{stage}].token_budget"


def _validate_stages(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    _require(bool(d.stages), f"data.kind={d.kind} trains in stages: list data.stages in the recipe "
             "(see goku_megatron/recipes/goku-8b.yaml)")
    total = sum(s.steps for s in d.stages)
    _require(total == t.steps, f"data.stages steps add up to {total} but train.steps={t.steps}; "
             "make them equal")
    _require(d.kind == "toy" or t.micro_batch_size == 1, f"train.micro_batch_size={t.micro_batch_size}: "
             "with packing a micro-batch is one pack of data.stages[].token_budget tokens; set it to 1")
    _require(d.kind != "raw" or d.vae_path != "",
             "data.kind=raw encodes clips online and needs data.vae_path (a local CogVideoX VAE)")
    for i, s in enumerate(d.stages):
        where = f"data.stages[{i}]"
        _require(s.steps > 0, f"{where}.steps must be positive, got {s.steps}")
        _require(min(s.height, s.width, s.frames) > 0 and s.fps > 0,
                 f"{where}: height, width, frames and fps must be positive")
        _require(s.token_budget > 0, f"{where}.token_budget must be positive, got {s.token_budget}")
        _require(0 <= s.image_ratio <= 1, f"{where}.image_ratio must be in [0, 1], got {s.image_ratio}")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(c.resume in RESUME_MODES or Path(c.resume).exists(),
             f"checkpoint.resume={c.resume}: no such file or directory; give a run directory or its "
             "checkpoints/iter_N, 'auto' (continue train.run_dir) or '' (start fresh)")
    _require(c.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0 keeps all), got {c.keep_last}")
    _require(0 <= c.ema_decay < 1, f"checkpoint.ema_decay must be in [0, 1) (0 disables EMA), got {c.ema_decay}")
    _require(c.max_bad_steps >= 1, f"checkpoint.max_bad_steps must be >= 1, got {c.max_bad_steps}")
    _require(c.spike_factor == 0 or c.spike_factor > 1,
             f"checkpoint.spike_factor must be > 1 (0 disables spike logging), got {c.spike_factor}")
    _require(c.spike_window >= 1, f"checkpoint.spike_window must be >= 1, got {c.spike_window}")
    _require(not c.fault_tolerance or importlib.util.find_spec("nvidia_resiliency_ext") is not None,
             "checkpoint.fault_tolerance=true needs nvidia-resiliency-ext: pip install "
             "nvidia-resiliency-ext and launch with its ft_launcher, or set checkpoint.fault_tolerance=false")


def fp8_align_size(recipe: str) -> int:
    """Rows that TE's FP8 GEMMs need a multiple of under ``recipe`` (model.fp8_recipe): what
    megatron.core.fp8_utils.get_fp8_align_size says, defined here because config.py imports no
    megatron (its errors come before the heavy imports); tests/test_performance.py holds the two
    equal. Validation asks it of token budgets, model/layer.py of caption rows."""
    return 32 if recipe == "mxfp8" else 16


def _validate_performance(cfg: Config, has_cuda: bool) -> None:
    """FP8, activation recompute and communication overlap (docs/performance.md)."""
    m, o, p, d = cfg.model, cfg.optim, cfg.parallel, cfg.data
    _one_of(m.recompute_granularity, RECOMPUTE_GRANULARITIES, "model.recompute_granularity")
    _require(m.fp8 in FP8_FORMATS, f"model.fp8='{m.fp8}' is not one of '' (off), e4m3, hybrid")
    _one_of(m.fp8_recipe, FP8_RECIPES, "model.fp8_recipe")
    _require(m.fp8_bf16_layers >= 0, f"model.fp8_bf16_layers must be >= 0, got {m.fp8_bf16_layers}")
    _require(o.ddp_bucket_size >= 0, f"optim.ddp_bucket_size must be >= 0 (0: megatron's default), "
                                     f"got {o.ddp_bucket_size}")
    _require(not (m.compile and p.tp > 1),
             f"model.compile=true with parallel.tp={p.tp}: megatron's tensor-parallel linears all-reduce "
             f"their input gradient asynchronously, which torch.compile cannot trace; set parallel.tp=1 "
             f"or model.compile=false")
    if m.fp8:
        _require(has_cuda, f"model.fp8={m.fp8} needs a GPU with Transformer Engine; set model.fp8='' on CPU")
        _require(m.linear_backend in ("auto", "te"),
                 f"model.fp8={m.fp8} runs in Transformer Engine's linears; set model.linear_backend=te "
                 f"(or auto), or model.fp8=''")
        align = fp8_align_size(m.fp8_recipe)
        for i, stage in enumerate(d.stages):
            _require(stage.token_budget % (align * p.cp) == 0,
                     f"{_budget_name(d, i)}={stage.token_budget}: FP8 GEMMs ({m.fp8_recipe}) need a "
                     f"multiple of {align} tokens per context-parallel rank; make it a multiple of {align * p.cp}")
    if m.fp8_bf16_layers:
        n, layers = m.fp8_bf16_layers, m.num_layers
        _require(bool(m.fp8), f"model.fp8_bf16_layers={n} keeps layers out of FP8 training; set model.fp8 "
                              f"(e4m3 or hybrid) or model.fp8_bf16_layers=0")
        _require(m.fp8_recipe != "delayed",
                 f"model.fp8_bf16_layers={n} needs an FP8 context per layer, which the delayed recipe's amax "
                 f"reduction does not allow; use model.fp8_recipe=tensorwise (or blockwise, mxfp8) or "
                 f"model.fp8_bf16_layers=0")
        _require(2 * n < layers, f"model.fp8_bf16_layers={n} keeps {2 * n} of the {layers} layers (first and "
                                 f"last {n}) in bf16 and none in FP8; lower it")
        _require(n <= layers // p.pp,
                 f"model.fp8_bf16_layers={n} is more than the {layers // p.pp} layers of one pipeline stage "
                 f"(megatron's limit, parallel.pp={p.pp}); lower it")
    if o.fp8_param_gather:
        _require(bool(m.fp8), "optim.fp8_param_gather keeps the weights in FP8: set model.fp8 (e4m3 or hybrid) "
                              "or optim.fp8_param_gather=false")
        _require(o.distributed_optimizer, "optim.fp8_param_gather is the distributed optimizer's FP8 all-gather: "
                                          "set optim.distributed_optimizer=true or optim.fp8_param_gather=false")
        _require(m.fp8_bf16_layers == 0,
                 f"optim.fp8_param_gather makes every layer's weights FP8, so none can run in bf16: set "
                 f"model.fp8_bf16_layers=0 (is {m.fp8_bf16_layers}) or optim.fp8_param_gather=false")
    if o.overlap_param_gather:
        _require(o.distributed_optimizer, "optim.overlap_param_gather overlaps the distributed optimizer's "
                                          "all-gather: set optim.distributed_optimizer=true")
        _require(cfg.checkpoint.ema_decay == 0,
                 "optim.overlap_param_gather leaves the weights stale until the next forward pass gathers "
                 "them, but the EMA reads them right after each step: set checkpoint.ema_decay=0 or "
                 "optim.overlap_param_gather=false")


def _validate_lora(cfg: Config) -> None:
    """lora.*: adapters need a base to adapt and targets that exist (docs/recipes.md, "LoRA finetuning")."""
    lora = cfg.lora
    _require(lora.rank >= 0, f"lora.rank must be >= 0 (0: no LoRA, the whole model trains), got {lora.rank}")
    if lora.rank == 0:
        _require(not lora.base, f"lora.base={lora.base} names the base of a LoRA run, but LoRA is off: set "
                                f"lora.rank > 0 (e.g. 16), or lora.base=''")
        return
    _require(lora.alpha > 0, f"lora.alpha must be positive (the adapters' scale is alpha / rank), got {lora.alpha}")
    _require(0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1), got {lora.dropout}")
    _require(bool(lora.targets), f"lora.targets is empty: name the layers to adapt, from {', '.join(LORA_TARGETS)}")
    for target in lora.targets:
        _require(target in LORA_TARGETS, f"lora.targets: unknown target '{target}'; use names from "
                                         f"{', '.join(LORA_TARGETS)}")
        _require(lora.targets.count(target) == 1, f"lora.targets names '{target}' twice; list it once")
    _require(bool(lora.base), f"lora.rank={lora.rank} trains adapters on a base model: set lora.base to its run "
                              f"directory, checkpoints/iter_N or .safetensors file (lora.base={LORA_SEED_BASE}: "
                              f"the base that train.seed initialises, for tests)")
    _require(not lora.base_ema or (lora.base != LORA_SEED_BASE and not lora.base.endswith(".safetensors")),
             f"lora.base_ema=true takes the EMA weights of a goku-train checkpoint, but lora.base={lora.base} is "
             f"not one: set lora.base_ema=false")
    _require(not cfg.checkpoint.init_from,
             f"checkpoint.init_from={cfg.checkpoint.init_from} and lora.base both name the weights a run starts "
             f"from; a LoRA run takes them from lora.base: set checkpoint.init_from=''")
    _require(cfg.parallel.pp == 1 or lora.targets != ["final"],
             f"lora.targets=[final] leaves the first {cfg.parallel.pp - 1} of parallel.pp={cfg.parallel.pp} pipeline "
             f"stages nothing to train: add a per-layer target (e.g. self_attn.q) or set parallel.pp=1")
    _require(not cfg.optim.fp8_param_gather,
             "optim.fp8_param_gather all-gathers FP8 weights, but LoRA's base is frozen (never gathered) and its "
             "adapters train in bf16: set optim.fp8_param_gather=false")


def _validate_fsdp(cfg: Config, sharding_ranks: int) -> None:
    """parallel.fsdp: the combinations megatron's FSDP2 wrapper refuses, one line each."""
    p, o = cfg.parallel, cfg.optim
    _require(p.fsdp_shard_size >= 0, f"parallel.fsdp_shard_size must be >= 0 (0: all DP x CP ranks), "
                                     f"got {p.fsdp_shard_size}")
    if not p.fsdp:
        _require(p.fsdp_shard_size == 0, f"parallel.fsdp_shard_size={p.fsdp_shard_size} sizes FSDP's shard "
                                         f"groups: set parallel.fsdp=true or parallel.fsdp_shard_size=0")
        return
    _require(p.pp == 1, f"parallel.fsdp=true does not work with pipeline parallelism (megatron-core's FSDP2; "
                        f"parallel.pp={p.pp}): set parallel.pp=1, or parallel.fsdp=false")
    _require(not o.distributed_optimizer, "parallel.fsdp=true shards the optimizer state itself: set "
                                          "optim.distributed_optimizer=false (megatron refuses both)")
    _require(not o.overlap_grad_reduce, "parallel.fsdp=true reduce-scatters each layer's gradients during the "
                                        "backward pass already: set optim.overlap_grad_reduce=false")
    shard = p.fsdp_shard_size or sharding_ranks
    _require(sharding_ranks % shard == 0,
             f"parallel.fsdp_shard_size={p.fsdp_shard_size} does not divide the {sharding_ranks} DP x CP ranks "
             f"(dp={sharding_ranks // p.cp} x cp={p.cp}); choose a divisor, or 0 for all of them")


def validate(cfg: Config, world_size: int, has_cuda: bool = False) -> None:
    """Check every rule that would otherwise fail deep inside a run; fills in ``parallel.dp``."""
    m, p, t, o, f, d = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.flow, cfg.data

    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "in_channels", "text_dim"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _require(len(m.patch_size) == 3 and all(s > 0 for s in m.patch_size),
             f"model.patch_size must be three positive ints [t, h, w], got {m.patch_size}")
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
             f"choose heads that divide the hidden size")
    _require(m.head_dim % 2 == 0 and m.head_dim >= 8,
             f"model head_dim={m.head_dim} (hidden_size/num_heads) must be even and >= 8 for 3D RoPE; "
             f"change model.num_heads")
    _one_of(m.attention_backend, ATTENTION_BACKENDS, "model.attention_backend")
    _one_of(m.linear_backend, LINEAR_BACKENDS, "model.linear_backend")
    if d.kind == "toy":  # before the checks below, which read every run's data.stages
        _derive_toy_stage(cfg)
    if not has_cuda:
        _require(m.attention_backend in ("auto", "sdpa"),
                 f"model.attention_backend='{m.attention_backend}' needs a GPU; use auto or sdpa on CPU")
        _require(m.linear_backend in ("auto", "local"),
                 f"model.linear_backend='{m.linear_backend}' needs a GPU; use auto or local on CPU")

    _require(world_size >= 1, f"world size must be >= 1, got {world_size}; pass --world-size N or launch "
                              f"with torchrun")
    for name in ("tp", "pp", "cp"):
        _require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    _require(not p.auto, "parallel.auto=true: the layout is chosen by goku_megatron.planner.resolve_layout, "
             "which every command runs before validation; call it first (or set parallel.auto=false)")
    if p.cp > 1:  # context parallelism splits each sequence over cp ranks (model/context_parallel.py)
        # Transformer Engine's CP attention (attention_backend te, or auto on GPU) cuts every
        # sequence into 2*cp chunks; Ulysses all-to-all (any other backend) splits heads over cp.
        te = m.attention_backend == "te" or (m.attention_backend == "auto" and has_cuda)
        split = 2 * p.cp if te else p.cp
        why = f"2*cp={split} chunks for Transformer Engine's CP attention" if te else f"cp={split} ranks"
        heads = m.num_heads // p.tp
        _require(m.attention_backend == "te" or m.num_heads % p.tp != 0 or heads % p.cp == 0,
                 f"parallel.cp={p.cp}: Ulysses all-to-all splits the {heads} heads per tensor-parallel rank "
                 f"(model.num_heads={m.num_heads} / parallel.tp={p.tp}) over cp ranks; choose a parallel.cp "
                 f"that divides {heads}, or model.attention_backend=te on GPU")
        for i, stage in enumerate(d.stages):
            _require(stage.token_budget % split == 0,
                     f"{_budget_name(d, i)}={stage.token_budget} does not split into {why} "
                     f"(parallel.cp={p.cp}); make it a multiple of {split}")
    _one_of(p.distributed_backend, DIST_BACKENDS, "parallel.distributed_backend")
    _require(has_cuda or p.distributed_backend != "nccl",
             "parallel.distributed_backend='nccl' needs GPUs; use auto or gloo on CPU")
    model_parallel = p.tp * p.pp * p.cp
    _require(world_size % model_parallel == 0,
             f"parallel: world size {world_size} is not divisible by tp*pp*cp={model_parallel}; "
             f"launch a multiple of {model_parallel} processes or change parallel.tp/pp/cp")
    dp = world_size // model_parallel
    _require(p.dp in (0, dp),
             f"parallel.dp={p.dp} but world size {world_size} / (tp*pp*cp={model_parallel}) = {dp}; "
             f"set parallel.dp={dp} or 0 (derived)")
    p.dp = dp
    _one_of(p.cp_comm_type, CP_COMM_TYPES, "parallel.cp_comm_type")
    _validate_fsdp(cfg, dp * p.cp)
    _require(m.num_heads % p.tp == 0,
             f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; "
             f"choose a tp that divides the number of heads")
    _require(m.ffn_hidden_size % p.tp == 0,
             f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    _require(m.num_layers % p.pp == 0,
             f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}; "
             f"choose a pp that divides the number of layers")

    _require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    _require(t.micro_batch_size > 0, f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    _require(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}")
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size={t.global_batch_size} is not divisible by "
             f"micro_batch_size*dp={t.micro_batch_size}*{dp}; make it a multiple of "
             f"{t.micro_batch_size * dp}")
    _one_of(t.precision, PRECISIONS, "train.precision")
    _require(t.log_interval > 0, f"train.log_interval must be positive, got {t.log_interval}")
    _require(t.save_interval >= 0, f"train.save_interval must be >= 0, got {t.save_interval}")
    _one_of(t.wandb_mode, WANDB_MODES, "train.wandb_mode")
    _require(bool(t.wandb_project) or not (t.wandb_entity or t.wandb_run_name),
             "train.wandb_entity and train.wandb_run_name name a W&B run, but W&B is off: set "
             "train.wandb_project (or leave them empty)")
    if t.sample_interval:
        _require(t.sample_interval > 0, f"train.sample_interval must be >= 0 (0: no samples), got {t.sample_interval}")
        _require(bool(t.sample_prompts), "train.sample_interval needs prompts: set train.sample_prompts, e.g. "
                 "train.sample_prompts='[a red square moving left]'")
        _require(not m.i2v, "train.sample_interval: in-training samples are text-to-video; sample an I2V run "
                 "with goku-sample --image, and set train.sample_interval=0")
        _require(d.kind != "latent" or d.vae_path != "", "train.sample_interval>0 decodes samples with the VAE: "
                 "set data.vae_path for data.kind=latent, or train.sample_interval=0")
    if t.eval_interval:
        _require(t.eval_interval > 0, f"train.eval_interval must be >= 0 (0: no evaluation), got {t.eval_interval}")
        _require(t.eval_samples_per_prompt >= 1,
                 f"train.eval_samples_per_prompt must be >= 1, got {t.eval_samples_per_prompt}")
        _require(d.kind == "toy" and not m.i2v, "train.eval_interval runs ShapesBench, which scores text-to-video "
                 "toy runs; set train.eval_interval=0 for this run")
    _validate_checkpoint(cfg.checkpoint)
    _validate_lora(cfg)

    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _one_of(o.decay, LR_DECAYS, "optim.decay")
    _require(o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables), got {o.clip_grad}")
    _validate_performance(cfg, has_cuda)

    _one_of(f.timestep_sampling, TIMESTEP_SAMPLERS, "flow.timestep_sampling")
    _require(f.logit_std > 0, f"flow.logit_std must be positive, got {f.logit_std}")
    _require(f.shift > 0, f"flow.shift must be positive, got {f.shift}")
    _require(0 <= f.caption_dropout < 1, f"flow.caption_dropout must be in [0, 1), got {f.caption_dropout}")

    _one_of(d.kind, DATA_KINDS, "data.kind")
    _one_of(d.text_encoder, TEXT_ENCODERS, "data.text_encoder")
    _one_of(d.decoder, DECODERS, "data.decoder")
    _require(d.text_encoder != "t5" or d.text_encoder_path != "",
             "data.text_encoder=t5 needs data.text_encoder_path (a local FLAN-T5 checkpoint)")
    _require(d.max_text_tokens > 0, f"data.max_text_tokens must be positive, got {d.max_text_tokens}")
    _require(d.cache_mb >= 0, f"data.cache_mb must be >= 0 (0: no cache), got {d.cache_mb}")
    _require(d.workers >= -1, f"data.workers must be >= 0, or -1 (from the core count), got {d.workers}")
    _require(d.read_ahead_steps >= 1, f"data.read_ahead_steps must be >= 1, got {d.read_ahead_steps}")
    _require(d.max_bad_in_a_row >= 1, f"data.max_bad_in_a_row must be >= 1, got {d.max_bad_in_a_row}")
    unknown = [c for c in d.toy_colors if c not in TOY_COLORS]
    _require(not unknown, f"data.toy_colors: {', '.join(unknown)} is not a toy colour; choose from "
             f"{', '.join(TOY_COLORS)} (empty: all)")
    if m.i2v:
        _require(all(s.image_ratio == 0 for s in d.stages), "model.i2v conditions on the first frame, which is the whole of an image: "
                 "set data.image_ratio (and data.stages[].image_ratio) to 0 for I2V training")
    _validate_stages(cfg)
