"""Checkpoint <-> safetensors conversion: exact round trip, and blocks in the reference layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_stage, one_process_world
from reference_goku import ReferenceGokuBlock
from safetensors.torch import load_file, save_file

from goku_megatron.checkpoint import latest_checkpoint, save_checkpoint
from goku_megatron.cli import data as goku_data
from goku_megatron.config import load_config, validate
from goku_megatron.convert import export_checkpoint, import_checkpoint
from goku_megatron.resilience import EXIT_CONFIG_ERROR
from goku_megatron.sample import Sampler


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    one_process_world()
    out = tmp_path_factory.mktemp("src")
    cfg = load_config(None, ["model.zero_init=false", "model.cross_attn_rope_q=false"])
    validate(cfg, 1)
    stage = build_stage(cfg)
    save_checkpoint(out, 5, [stage], cfg.to_dict())
    return out, cfg, stage


def test_round_trip_is_exact(source, tmp_path, megatron_world):
    run_dir, cfg, stage = source
    first = export_checkpoint(run_dir, tmp_path / "a.safetensors")
    imported = tmp_path / "imported"
    import_checkpoint(first, imported)
    assert latest_checkpoint(imported).name == "iter_0000000"
    second = export_checkpoint(imported, tmp_path / "b.safetensors")
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours = {k: v for k, v in stage.state_dict().items() if not k.endswith("_extra_state")}
    assert len(a) == len(ours)
    for name, tensor in ours.items():
        assert torch.equal(a[name.replace("layers.", "blocks.", 1) if name.startswith("layers.") else name], tensor)
    assert not Sampler(imported).cfg.model.cross_attn_rope_q  # the config travelled too


def test_exported_blocks_load_into_the_reference_block(source, tmp_path, megatron_world):
    run_dir, cfg, stage = source
    weights = load_file(str(export_checkpoint(run_dir, tmp_path / "m.safetensors")))
    m = cfg.model
    for i in range(m.num_layers):
        block = ReferenceGokuBlock(m.hidden_size, m.num_heads, m.ffn_hidden_size, m.hidden_size,
                                   cross_attn_rope_q=m.cross_attn_rope_q)
        prefix = f"blocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                              strict=True)
        assert torch.equal(block.attn1.q_proj.weight, stage.layers[i].attn1.q_proj.weight)


def test_import_refuses_foreign_files(tmp_path, capsys):
    foreign = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    assert goku_data.main(["convert-checkpoint", "import", str(foreign), str(tmp_path / "r")]) == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err == (f"goku-data: error: {foreign}: no goku_config metadata; export it "
                                       "with 'goku-data convert-checkpoint export'\n")


def test_import_refuses_a_config_this_version_cannot_read(tmp_path, capsys):
    """The file's config goes through the loader's coercion: a key this version lacks is one line."""
    saved = load_config(None, []).to_dict()
    saved["model"]["fp8_margin"] = 0
    weights = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights), metadata={"goku_config": json.dumps(saved)})
    assert goku_data.main(["convert-checkpoint", "import", str(weights), str(tmp_path / "r")]) == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err == (
        f"goku-data: error: {weights} (goku_config metadata): saved config: unknown key 'model.fp8_margin', a field "
        "this version does not have; another version of goku-megatron saved it (or it was edited): load it with "
        "the version that saved it\n")
    assert not (tmp_path / "r").exists()
