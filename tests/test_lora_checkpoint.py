"""LoRA runs and their checkpoints, in goku-train's own loop (one process; docs/recipes.md, "LoRA
finetuning"): a LoRA run starts from the base that lora.base names (a goku-train checkpoint or a
reference .safetensors file), its checkpoints hold the adapters with their optimizer state and EMA
and name the base, it resumes bitwise, goku-sample and convert-checkpoint read base + adapters, and
what does not fit is refused in one line. TP/PP equivalence of the adapters: tests/test_lora.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_utils import assert_same_tensors, checkpoint_tensors, losses
from conftest import TOY_CHECKPOINT_RUN, one_process_world, run_torchrun
from safetensors import safe_open

from goku_megatron.batch import pack_batch
from goku_megatron.checkpoint import checkpoint_dir, latest_checkpoint, load_model_weights, read_manifest
from goku_megatron.config import ConfigError, load_config, validate
from goku_megatron.convert import export_checkpoint
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.model.lora import LoraLinear, is_adapter
from goku_megatron.sample import checkpoint_config, unsharded_model

pytestmark = pytest.mark.usefixtures("megatron_world")  # goku-train's loop in this process's one-rank world

LORA = ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-2"]


def _cfg(toy_data: Path, run_dir: Path, *extra: str):
    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={run_dir}",
                              "train.save_interval=3", *extra])
    validate(cfg, 1)
    return cfg


def _run(cfg):
    from goku_megatron.train import run

    return run(cfg)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def base(toy_data, tmp_path_factory):
    """A full toy run of 3 steps: the base the LoRA runs adapt."""
    one_process_world()
    run_dir = tmp_path_factory.mktemp("base") / "run"
    _run(_cfg(toy_data, run_dir, "train.steps=3"))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(base, toy_data, tmp_path_factory):
    """Six LoRA steps on the base, checkpoints at 3 and 6."""
    one_process_world()
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    _run(_cfg(toy_data, run_dir, *LORA, f"lora.base={base}"))
    return run_dir


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(base, lora_run):
    """Weights, EMA and optimizer state of the adapters only; the manifest names the base's
    checkpoint (resolved, so the base's run may move on)."""
    checkpoint = checkpoint_dir(lora_run, 6)
    assert read_manifest(checkpoint)["base"] == {"path": str(checkpoint_dir(base, 3).absolute()), "ema": False}
    tensors = checkpoint_tensors(checkpoint)
    assert {k.split(".", 1)[0] for k in tensors} == {"model", "ema", "optimizer"}
    assert tensors and all(is_adapter(k) for k in tensors), [k for k in tensors if not is_adapter(k)][:3]
    adapters = {k for k in tensors if k.startswith("model.")}
    assert len(adapters) == 2 * 10 * 4  # A and B of ten projections in each of the 4 layers
    assert {f"optimizer.state.{s}.{k}" for k in adapters for s in ("param", "exp_avg", "exp_avg_sq")} == \
        {k for k in tensors if k.startswith("optimizer.")}


def test_a_tiny_lora_checkpoint_is_under_5_percent_of_a_full_one(base, toy_data, tmp_path):
    """The tiny preset with LoRA's original targets (rank 4 on self-attention's Q and V): its
    checkpoint after as many steps takes under 5% of the base run's bytes on disk. (At this size
    each saved tensor's ~2 kB of torch_dist framing counts: rank 4 on all ten projections is 80
    adapter tensors and 16% of the bytes for 6% of the parameters; docs/recipes.md.)"""
    run_dir = tmp_path / "run"
    _run(_cfg(toy_data, run_dir, *LORA, f"lora.base={base}", "lora.targets=[self_attn.q,self_attn.v]", "train.steps=3"))
    lora, full = _dir_bytes(checkpoint_dir(run_dir, 3)), _dir_bytes(checkpoint_dir(base, 3))
    assert lora < 0.05 * full, (lora, full)


def test_the_base_stays_bitwise_the_bases_and_the_adapters_train(base, lora_run):
    """goku-sample's model of the LoRA checkpoint: every base weight is the base checkpoint's, bit
    for bit, after six steps of training; the adapters are the checkpoint's, and B moved off 0."""
    plain, _ = unsharded_model(checkpoint_config(checkpoint_dir(base, 3)))
    load_model_weights(checkpoint_dir(base, 3), [plain])
    adapted, _ = unsharded_model(checkpoint_config(latest_checkpoint(lora_run)))
    load_model_weights(latest_checkpoint(lora_run), [adapted])
    (want,), (got,) = iter_stage_models([plain]), iter_stage_models([adapted])
    base_weights = dict(want.named_parameters())
    saved = checkpoint_tensors(latest_checkpoint(lora_run))
    for name, param in got.named_parameters():
        if is_adapter(name):
            assert torch.equal(param, saved[f"model.{name}"]), name
        else:
            assert torch.equal(param, base_weights[name]), name
    assert any(".lora_B." in n and p.abs().max() > 0 for n, p in got.named_parameters())
    assert losses(lora_run)[6] != losses(lora_run)[1]


def test_a_lora_run_resumes_bitwise(lora_run, toy_data, tmp_path):
    """A LoRA run stopped after its step-3 checkpoint (what a kill leaves: the newer one removed)
    continues to the uninterrupted run's losses and checkpoint, bit for bit: it reloads the base
    its manifest names, then the adapters, their optimizer state, EMA, RNG and loader state."""
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    shutil.rmtree(checkpoint_dir(run_dir, 6))
    (run_dir / "checkpoints" / "latest").write_text("iter_0000003\n")
    cfg = _cfg(toy_data, run_dir, *LORA, f"lora.base={tmp_path / 'moved-on'}")  # the manifest's base wins
    _run(cfg)
    got, want = losses(run_dir), losses(lora_run)
    assert [got[s] for s in range(4, 7)] == [want[s] for s in range(4, 7)]
    resumed, reference = checkpoint_tensors(checkpoint_dir(run_dir, 6)), checkpoint_tensors(checkpoint_dir(lora_run, 6))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())


@pytest.mark.slow
def test_a_lora_checkpoint_reshards_to_tp2(base, lora_run, tmp_path):
    """The TP=1 LoRA checkpoint loaded by two tensor-parallel ranks (tests/reshard_worker.py) and
    saved again: every adapter tensor, its optimizer state and EMA come back exactly, and the
    re-saved checkpoint names the same base."""
    source = checkpoint_dir(lora_run, 6)
    worker = str(Path(__file__).with_name("reshard_worker.py"))
    run_torchrun(2, [worker, str(source), str(tmp_path), *TOY_CHECKPOINT_RUN, *LORA, f"lora.base={base}",
                     "parallel.tp=2"])
    got = latest_checkpoint(tmp_path)
    assert_same_tensors(checkpoint_tensors(got), checkpoint_tensors(source))
    assert read_manifest(got)["base"] == read_manifest(source)["base"]


def test_export_writes_the_adapters_alone_or_merged(base, lora_run, tmp_path):
    """convert-checkpoint export of a LoRA checkpoint: --adapters gives lora_A/lora_B under the
    reference block names with rank, alpha and base; by default the adapters are merged into the
    base, a whole model whose config has LoRA off, giving the adapted model's output."""
    checkpoint = latest_checkpoint(lora_run)
    adapters = export_checkpoint(lora_run, tmp_path / "adapters.safetensors", adapters=True)
    with safe_open(str(adapters), framework="pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert len(names) == 80 and all(n.startswith("blocks.") and is_adapter(n) for n in names)
    assert "blocks.2.attn1.q_proj.lora_A.weight" in names
    assert (meta["lora_rank"], meta["lora_alpha"], meta["base"]) == ("4", "8.0", str(checkpoint_dir(base, 3).absolute()))

    merged = export_checkpoint(lora_run, tmp_path / "merged.safetensors")
    with safe_open(str(merged), framework="pt") as f:
        assert not any(is_adapter(n) for n in f.keys())
    with pytest.raises(ValueError, match=r"is not a LoRA run's checkpoint .* drop --adapters"):
        export_checkpoint(base, tmp_path / "x.safetensors", adapters=True)

    from goku_megatron.convert import import_checkpoint

    imported = import_checkpoint(merged, tmp_path / "imported")
    plain, _ = unsharded_model(checkpoint_config(imported))
    load_model_weights(imported, [plain])
    adapted, _ = unsharded_model(checkpoint_config(checkpoint))
    load_model_weights(checkpoint, [adapted])
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    m = checkpoint_config(checkpoint).model
    gen = torch.Generator().manual_seed(0)
    pack = pack_batch(torch.randn(2, m.in_channels, 8, 16, 16, generator=gen), torch.tensor([0.2, 0.7]),
                      torch.randn(2, 5, m.text_dim, generator=gen), torch.ones(2, 5, dtype=torch.bool), m.patch_size)
    with torch.no_grad():
        want, got = adapted(pack), plain(pack)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_safetensors_base_gives_the_same_base(base, lora_run, toy_data, tmp_path):
    """lora.base as the reference .safetensors file that convert-checkpoint exports from the base:
    the run starts from the same weights (its first loss is the checkpoint-based run's)."""
    file = export_checkpoint(base, tmp_path / "base.safetensors")
    run_dir = tmp_path / "run"
    _run(_cfg(toy_data, run_dir, *LORA, f"lora.base={file}", "train.steps=1"))
    assert losses(run_dir)[1] == losses(lora_run)[1]
    assert read_manifest(latest_checkpoint(run_dir))["base"] == {"path": str(file.absolute())}


def test_what_does_not_fit_a_lora_run_is_refused_in_one_line(base, lora_run, toy_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^lora.base=.* is itself a LoRA run's checkpoint; export it merged"):
        _run(_cfg(toy_data, tmp_path / "a", *LORA, f"lora.base={lora_run}"))
    with pytest.raises(ConfigError, match=r"^lora.base: .*missing: not a goku-train checkpoint"):
        _run(_cfg(toy_data, tmp_path / "b", *LORA, f"lora.base={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match=r"saved for another model: model.hidden_size 64 \(checkpoint\) vs 96"):
        _run(_cfg(toy_data, tmp_path / "c", *LORA, f"lora.base={base}", "model.hidden_size=96"))
    resumed = tmp_path / "d"
    shutil.copytree(lora_run, resumed)
    with pytest.raises(ConfigError, match=r"saved with other LoRA adapters: lora.rank 4 \(checkpoint\) vs 8"):
        _run(_cfg(toy_data, resumed, "lora.rank=8", f"lora.base={base}"))
    with pytest.raises(ConfigError, match=r"holds LoRA adapters on the base .*export it merged"):
        _run(_cfg(toy_data, tmp_path / "e", f"checkpoint.init_from={lora_run}"))
