"""LoRA finetuning on the model side (goku_megatron/model/lora.py; docs/recipes.md, "LoRA finetuning").

- Adapters sit inside the layers that lora.targets names, under the names peft uses, and leave the
  base's parameter and checkpoint names as they were; everything else is frozen (model.i2v's
  condition layer trains).
- At init (B = 0) an adapted model's output is bitwise the base model's, in fp32 and bf16, in
  training mode with adapter dropout too; merging the adapters into the base weights gives the
  adapted model's output to fp32 rounding.
- Training moves the adapters only: the base stays bitwise as it was, the optimizer holds state
  for the adapters only, the EMA averages only them; under full activation recompute the adapters
  get the gradients they get without it.
- TP=2 (with full recompute), PP=2 and FSDP x CP=2 train the adapters as one process does
  (tests/dist_equivalence.py); the distributed optimizer at DP=1 in the one-process runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_run, build_stage, layout_runner
from numerics import assert_close_to_scale

from goku_megatron.batch import pack_batch
from goku_megatron import train
from goku_megatron.config import LORA_TARGETS, load_config, validate
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.model.lora import TARGET_MODULES, LoraLinear, is_adapter, merge_adapters

ALL_TARGETS = f"lora.targets=[{','.join(LORA_TARGETS)}]"
LORA = ["lora.rank=4", "lora.base=seed", ALL_TARGETS]


def _config(*overrides: str):
    cfg = load_config(None, ["model.preset=tiny", "model.zero_init=false", "model.in_channels=3", *overrides])
    validate(cfg, 1)
    return cfg


def _pack(cfg, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 8, 8, generator=gen)
    text = torch.randn(2, 4, cfg.model.text_dim, generator=gen)
    return pack_batch(x, torch.tensor([0.3, 0.8]), text, torch.ones(2, 4, dtype=torch.bool), cfg.model.patch_size,
                      target=torch.randn(2, 3, 2, 8, 8, generator=gen))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return next(iter_stage_models([module]))


@torch.no_grad()
def _train_the_adapters_a_little(stage: torch.nn.Module) -> None:
    """B away from zero (seeded), as training would move it, so that the adapters change outputs."""
    gen = torch.Generator().manual_seed(7)
    for name, param in stage.named_parameters():
        if ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_the_targets_are_the_configs_vocabulary():
    assert set(TARGET_MODULES) == set(LORA_TARGETS)


def test_adapters_sit_in_the_targeted_layers_and_the_rest_is_frozen(megatron_world):
    base = _unwrap(build_stage(_config("model.i2v=true", "data.image_ratio=0")))
    stage = _unwrap(build_stage(_config(*LORA, "model.i2v=true", "data.image_ratio=0")))
    adapted = [name for name, module in stage.named_modules() if isinstance(module, LoraLinear)]
    per_layer = ["norm1.linear", *(f"attn{i}.{p}_proj" for i in (1, 2) for p in "qkvo"), "mlp.fc1", "mlp.fc2"]
    assert sorted(adapted) == sorted([f"layers.{i}.{m}" for i in range(4) for m in per_layer]
                                     + ["final_layer.adaln", "final_layer.linear"])
    names = [name for name, _ in stage.named_parameters()]
    assert [n for n in names if not is_adapter(n)] == [n for n, _ in base.named_parameters()]
    assert {n for n in names if is_adapter(n)} == {f"{m}.lora_{h}.weight" for m in adapted for h in "AB"}
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if is_adapter(n) or n.startswith("image_cond.")}

    only_mlp = _unwrap(build_stage(_config("lora.rank=4", "lora.base=seed", "lora.targets=[mlp.fc2]")))
    assert [n for n, m in only_mlp.named_modules() if isinstance(m, LoraLinear)] == \
        [f"layers.{i}.mlp.fc2" for i in range(4)]


def test_checkpoint_keys_keep_the_base_names_and_add_the_adapters(megatron_world):
    base = _unwrap(build_stage(_config())).sharded_state_dict()
    adapted = _unwrap(build_stage(_config(*LORA))).sharded_state_dict()
    assert {k for k in adapted if ".lora_" not in k} == set(base)
    assert {(k, v.global_shape) for k, v in adapted.items() if k in base and hasattr(v, "global_shape")} == \
        {(k, v.global_shape) for k, v in base.items() if hasattr(v, "global_shape")}
    assert adapted["layers.3.attn1.o_proj.lora_A.weight"].global_shape == (4, 64)
    assert adapted["layers.3.mlp.fc1.lora_B.weight"].global_shape == (256, 4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adapters_at_init_leave_the_output_bitwise_the_bases(precision, megatron_world):
    """B starts at zero; the base's weights are initialised by name, as without LoRA. In training
    mode with adapter dropout too: dropout never touches the base's input."""
    cfg = _config(f"train.precision={precision}")
    base, adapted = build_stage(cfg), build_stage(_config(*LORA, "lora.dropout=0.5", f"train.precision={precision}"))
    pack = _pack(cfg)
    with torch.no_grad():
        want = base.eval()(pack)
        assert torch.equal(adapted.eval()(pack), want)
        assert torch.equal(adapted.train()(pack), want)
    dtypes = {p.dtype for n, p in adapted.named_parameters() if is_adapter(n)}
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}


def test_adapter_dropout_applies_in_training_only(megatron_world):
    adapted = build_stage(_config(*LORA, "lora.dropout=0.5"))
    _train_the_adapters_a_little(adapted)
    pack = _pack(_config())
    with torch.no_grad():
        evaluated = adapted.eval()(pack)
        assert torch.equal(adapted(pack), evaluated)
        assert not torch.equal(adapted.train()(pack), evaluated)


# Merged, W' = W + s B A is rounded once per weight and its matmul sums other products than W x +
# s B (A x): fp32 rounding relative to the output's scale, through the 4 layers (2 ulps measured).
MERGE_ULPS = 16


def test_merged_weights_give_the_adapted_models_output(megatron_world):
    cfg = _config(*LORA)
    adapted = build_stage(cfg).eval()
    _train_the_adapters_a_little(adapted)
    pack = _pack(cfg)
    with torch.no_grad():
        want = adapted(pack)
        assert not torch.equal(want, build_stage(_config()).eval()(pack))  # the adapters matter
        assert merge_adapters(adapted) == 4 * 11 + 2
        got = adapted(pack)
    assert not any(isinstance(m, LoraLinear) or is_adapter(n) for n, m in adapted.named_modules())
    assert [n for n, _ in adapted.named_parameters()] == [n for n, _ in build_stage(_config()).named_parameters()]
    assert_close_to_scale(got, want, ulps=MERGE_ULPS)


def _adapter_grads(stage: torch.nn.Module, pack) -> dict[str, torch.Tensor]:
    stage.train()(pack).square().mean().backward()
    return {n: p.grad for n, p in stage.named_parameters() if p.requires_grad}


def test_full_recompute_hands_the_adapters_their_gradients(megatron_world):
    """megatron's checkpoint passes gradients only when an input requires grad; behind the frozen
    patch embedding none does unless GokuModel asks for it. Recompute reruns the same kernels on
    the same inputs, so the gradients are bitwise those without recompute."""
    plain, recomputed = build_stage(_config(*LORA)), build_stage(_config(*LORA, "model.recompute=true"))
    _train_the_adapters_a_little(plain)
    _train_the_adapters_a_little(recomputed)
    pack = _pack(_config())
    want, got = _adapter_grads(plain, pack), _adapter_grads(recomputed, pack)
    assert got.keys() == want.keys() and all(is_adapter(n) for n in want)
    for name, grad in want.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert torch.equal(got[name], grad), name


def _optimizer_state_numel(optimizer) -> tuple[int, int]:
    """(elements of the main parameters, elements of Adam's exp_avg) the optimizer holds."""
    inner = optimizer.inner
    parts = getattr(inner, "chained_optimizers", [inner])
    params = sum(p.numel() for p in inner.get_parameters())
    state = sum(s["exp_avg"].numel() for part in parts for s in part.optimizer.state.values())
    return params, state


@pytest.mark.parametrize("extra", [[], ["train.precision=bf16", "optim.distributed_optimizer=false"]],
                         ids=["fp32-distributed-optimizer", "bf16"])
def test_training_moves_the_adapters_only(extra, megatron_world):
    cfg = _config(*LORA, *extra, "train.global_batch_size=2", "train.micro_batch_size=2", "optim.warmup_steps=0",
                  "optim.lr=1e-3", "checkpoint.ema_decay=0.5")
    training = train.setup(cfg)
    stage = next(iter_stage_models(training.model))
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    for step in range(3):  # A moves from the second step on, once B is no longer zero
        result = train.train_step([_pack(cfg, seed=step)], training.model, training.optimizer, training.scheduler)
        assert not result.skipped and result.grad_norm > 0
        training.ema.update()
    adapters = {n: p for n, p in stage.named_parameters() if is_adapter(n)}
    for name, param in stage.named_parameters():
        assert torch.equal(param, before[name]) != (name in adapters), name
    adapter_numel = sum(p.numel() for p in adapters.values())
    assert _optimizer_state_numel(training.optimizer) == (adapter_numel, adapter_numel)
    assert {id(p) for p in training.ema.params} == {id(p) for p in adapters.values()}
    assert all(not torch.equal(avg, before[name].float()) for name, avg in zip(adapters, training.ema.averages))


# Layouts of tests/dist_equivalence.py with adapters on every target (two Adam steps at lr 1e-3).
LAYOUTS = {
    "single": (1, LORA),
    "tp2_recompute": (2, [*LORA, "parallel.tp=2", "model.recompute=true"]),
    "pp2": (2, [*LORA, "parallel.pp=2"]),
    # FSDP2 over the DP x CP ranks (frozen base sharded, only adapter gradients reduce-scattered),
    # with Ulysses context parallelism.
    "fsdp_cp2": (2, [*LORA, "parallel.cp=2", "parallel.fsdp=true", "optim.distributed_optimizer=false"]),
}
# Adam's step m / (sqrt(v) + eps) passes a gradient element's rounding on amplified by up to
# ~1/eps where the element is near eps (1e-8). The adapters start at zero (B) and their first
# gradients are small (~1e-4), so some elements are: they agree to a small fraction of the step
# (measured 1e-4 of lr over the two steps), not to their own scale (2 lr after two steps).
ADAM_NEAR_EPS = 1e-3 * 1e-3 * 2


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return layout_runner(tmp_path_factory, LAYOUTS, prefix="lora-")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_recompute", "pp2", "fsdp_cp2"])
def test_a_lora_layout_matches_one_process(lora_run, layout):
    got, ref = lora_run(layout), lora_run("single")
    assert all(is_adapter(name) for name in ref["grads1"]) and len(ref["grads1"]) == 2 * (4 * 11 + 2)
    assert_same_run(got["record"], ref["record"], got, ref, weights_plus=ADAM_NEAR_EPS)
    for name, weight in ref["weights"].items():  # the frozen base: the same initial weights everywhere
        if not is_adapter(name):
            assert torch.equal(got["weights"][name], weight), name
