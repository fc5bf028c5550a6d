"""The packaged recipes: base: inheritance, the Goku training chain (T2I -> joint -> modality
finetunes -> I2V; docs/model.md, "Training recipe"), the LoRA finetunes on its runs, and
parallel.auto's layouts from goku-plan for 64 to 1024 GPUs (LoRA: 8 to 1024)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from goku_megatron.config import ConfigError, available_recipes, load_config, validate
from goku_megatron.cli.plan import fsdp_column, main as plan_main
from goku_megatron.cli.train import main as train_main
from goku_megatron.planner import recommend, resolve_layout

REPO = Path(__file__).resolve().parents[1]
CHAIN = ["t2i", "", "ft-t2v", "ft-t2i", "i2v"]
GOKU = [f"goku-{size}{'-' + step if step else ''}" for size in ("2b", "8b") for step in CHAIN]
LORA = ["goku-2b-lora-t2v", "goku-8b-lora-t2v", "goku-8b-lora-i2v"]


def test_base_recipe_is_merged_key_by_key_and_lists_replaced(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {num_layers: 6, hidden_size: 96}\ntrain: {steps: 7, name: p}\n"
                                          "data: {stages: [{name: a, steps: 7}]}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel: {num_layers: 2}\ntrain: {name: c}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps, cfg.train.name) == (2, 96, 7, "c")
    assert [s.name for s in cfg.data.stages] == ["a"]
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ndata: {stages: [{name: b, steps: 3}]}\n")
    assert [s.name for s in load_config(str(tmp_path / "grandchild.yaml")).data.stages] == ["b"]


def test_base_errors_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: no-such-recipe\n")
    with pytest.raises(ConfigError, match="unknown recipe 'no-such-recipe'"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"e\.yaml: unknown key 'train.stepz'"):  # blames the base file
        load_config(str(tmp_path / "d.yaml"))


def test_goku_recipes_exist_and_chain():
    """Each step starts from the run of the step before it (checkpoint.init_from -> its run dir)."""
    assert set(GOKU) <= set(available_recipes())
    names = {name: load_config(name).train.name for name in GOKU}
    for name in GOKU:
        cfg = load_config(name)
        assert cfg.train.name == name
        source = cfg.checkpoint.init_from
        if name.endswith("-t2i") and "ft" not in name:
            assert source == ""  # pretraining starts from random weights
            continue
        assert source.startswith("runs/") and source[len("runs/"):] in names.values(), (name, source)
        predecessor = load_config(source[len("runs/"):])
        assert predecessor.model.preset == cfg.model.preset
    assert load_config("goku-8b-i2v").model.i2v and load_config("goku-8b-i2v").checkpoint.init_from == \
        "runs/goku-8b-ft-t2v"
    stages = load_config("goku-8b").data.stages
    assert [(s.height, s.width) for s in stages] == [(288, 512), (480, 864), (720, 1280)]
    assert load_config("goku-8b-i2v").train.steps == 10000  # docs/model.md, "Training recipe": I2V, 10k steps
    assert load_config("goku-2b").model.num_layers == 28 and load_config("goku-8b").model.num_layers == 40


def test_lora_recipes_adapt_a_run_of_the_chain():
    """Each LoRA recipe's frozen base is the run of a full recipe of its size (lora.base, in place
    of checkpoint.init_from, which a LoRA run refuses); the I2V one trains image_cond in full."""
    for name in LORA:
        cfg = load_config(name)
        assert cfg.train.name == name and cfg.lora.rank > 0 and cfg.checkpoint.init_from == ""
        base = cfg.lora.base
        assert base.startswith("runs/") and base[len("runs/"):] in GOKU, (name, base)
        assert load_config(base[len("runs/"):]).model.preset == cfg.model.preset
    i2v, t2v = load_config("goku-8b-lora-i2v"), load_config("goku-8b-lora-t2v")
    assert i2v.model.i2v and i2v.lora.base == load_config("goku-8b-i2v").checkpoint.init_from
    assert i2v.train.steps == load_config("goku-8b-i2v").train.steps  # the paper's 10k I2V steps
    assert (i2v.lora.rank, i2v.lora.alpha, i2v.optim.lr) == (t2v.lora.rank, t2v.lora.alpha, t2v.optim.lr)
    assert load_config("toy-lora").lora.base == "runs/toy" and load_config("toy-lora").model == load_config("toy").model


@pytest.mark.parametrize("name", LORA)
def test_lora_recipes_dry_run(name, capsys):
    assert train_main(["--dry-run", "--config", name, "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"\nlora:\n  rank: {load_config(name).lora.rank}\n" in out


@pytest.mark.parametrize("name, gpus", [(name, gpus) for name in GOKU for gpus in (64, 128, 256, 512, 1024)]
                         + [(name, gpus) for name in LORA for gpus in (8, 16, 32, 64, 128, 256, 512, 1024)])
def test_recipes_plan_a_layout_for_64_to_1024_gpus(name, gpus):
    cfg = load_config(name)
    layout = recommend(cfg, gpus)
    resolve_layout(cfg, gpus)
    validate(cfg, gpus)
    assert layout is not None
    p = cfg.parallel
    assert (p.tp, p.cp, p.pp, p.dp, cfg.model.recompute) == (layout.tp, layout.cp, layout.pp, layout.dp,
                                                             layout.recompute)
    assert (p.fsdp, p.fsdp_shard_size) == (layout.fsdp_shard > 0, layout.fsdp_shard_size)
    assert cfg.optim.distributed_optimizer == (not p.fsdp)  # the recipes' default, unless FSDP replaces it
    assert p.tp * p.cp * p.pp * p.dp == gpus and not p.auto  # resolved, and saved as such


def test_auto_layout_rules():
    with pytest.raises(ConfigError, match="parallel.auto picks tp, cp and pp itself"):
        resolve_layout(load_config("goku-8b", ["parallel.tp=2"]), 64)
    validate(load_config("goku-8b", ["parallel.auto=false", "parallel.tp=8"]), 64)
    with pytest.raises(ConfigError, match="parallel.auto plans for data.stages"):
        resolve_layout(load_config("toy", ["parallel.auto=true"]), 1)
    with pytest.raises(ConfigError, match="no layout of 64 GPUs x 1 GiB"):
        resolve_layout(load_config("goku-8b", ["parallel.gpu_memory_gb=1"]), 64)
    with pytest.raises(ConfigError, match="full activation recompute"):
        resolve_layout(load_config("goku-8b", ["model.recompute_granularity=selective"]), 64)
    # The planner resolves the layout before validation; validate itself never plans.
    with pytest.raises(ConfigError, match="parallel.auto=true: the layout is chosen by goku_megatron.planner"):
        validate(load_config("goku-8b"), 64)


def test_docs_layout_table_is_what_goku_plan_recommends():
    """docs/recipes.md's table of layouts is goku-plan's current output, row by row."""
    rows = re.findall(r"^\| (goku-\S+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (-|all|\d+) \| (yes|no) \|$",
                      (REPO / "docs" / "recipes.md").read_text(), flags=re.M)
    assert len(rows) == 4 * 5 + 2 * 4  # the chain at 64-1024 GPUs; the T2V LoRAs at 8-64
    for name, gpus, tp, cp, pp, dp, fsdp, recompute in rows:
        lay = recommend(load_config(name), int(gpus))
        assert (lay.tp, lay.cp, lay.pp, lay.dp, fsdp_column(lay), lay.recompute) == \
            (int(tp), int(cp), int(pp), int(dp), fsdp, recompute == "yes"), (name, gpus)


def test_goku_plan_reads_a_recipe(capsys):
    assert plan_main(["--config", "goku-2b", "--gpus", "256", "--top", "2"]) == 0
    out = capsys.readouterr().out
    lay = recommend(load_config("goku-2b"), 256)
    assert "# goku-2b: 65536 tokens per pack, 256 packs per step, 256 GPUs" in out
    assert f"recommendation: parallel.tp={lay.tp} parallel.cp={lay.cp} parallel.pp={lay.pp}" in out


def test_the_i2v_lora_plans_like_the_t2v_lora():
    """docs/recipes.md lists the T2V LoRAs only: goku-8b-lora-i2v shares goku-8b-lora-t2v's packs
    and adapters (its image_cond is 8k parameters), so it gets the same layouts."""
    for gpus in (8, 16, 32, 64, 128, 256, 512, 1024):
        assert recommend(load_config("goku-8b-lora-i2v"), gpus) == recommend(load_config("goku-8b-lora-t2v"), gpus)
