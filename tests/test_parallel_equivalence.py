"""TP=2, PP=2, DP=2, CP=2 (gloo, 2 processes each), TP=2 x PP=2 and CP=2 with each of TP, PP and DP
(4 processes) and TP=2 x CP=2 x PP=2 (8 processes) reproduce the single-process run for two steps:
loss, gradient norm, every gradient and the final weights (fp32 tolerance). Context-parallel layouts
run on packs of differently sized samples (and DP=2 x CP=2 on packs of equal clips), each against the
single-process run of the same data. DP=2 with optim.overlap_grad_reduce and overlap_param_gather
(gloo runs megatron's asynchronous bucket reductions and all-gathers) matches too, and so does FSDP
over 4 ranks, hybrid 2 x 2, FSDP x CP=2 (sharded over all four, or over each CP pair and
replicated across DP) and TP=2 x FSDP over 2 with recompute, and CP=2 with compiled layers. The distributed
checkpoint each layout saves loads into one unsharded model and holds the single-process run's weights, so checkpoints do not depend on the parallel layout."""

from __future__ import annotations

import pytest
from conftest import FSDP, WEIGHT_ULPS, assert_same_run, build_stage, layout_runner, run_equivalence
from numerics import assert_close_to_scale

from goku_megatron.checkpoint import latest_checkpoint, load_model_weights
from goku_megatron.config import load_config

@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process run of equal-clip packs (False) or mixed packs (True), run once each."""
    done: dict[bool, dict] = {}

    def get(packed: bool) -> dict:
        if packed not in done:
            done[packed] = run_equivalence(tmp_path_factory, "single_packed" if packed else "single", 1,
                                ["--packed"] if packed else [])
        return done[packed]

    return get


@pytest.fixture(scope="module")
def baseline(single_process):
    return single_process(False)


LAYOUTS = {  # name: (processes, overrides); "--packed" trains on packs
    # Each parallelism alone (tp2, pp2, cp2) and in combination; a layout a combination covers is
    # not run alone too (DP=2 by dp2_overlap and dp2_cp2, TP=2 with recompute by tp2_fsdp2_recompute,
    # TP x PP by tp2_cp2_pp2_packed, FSDP over 4 ranks by fsdp_cp2_packed and
    # tests/test_checkpoint_dist.py's FSDP run against DDP): the suite has 15 minutes.
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "cp2_packed": (2, ["--packed", "parallel.cp=2"]),
    "tp2_cp2_packed": (4, ["--packed", "parallel.tp=2", "parallel.cp=2"]),
    "pp2_cp2_recompute_packed": (4, ["--packed", "parallel.pp=2", "parallel.cp=2", "model.recompute=true"]),
    "dp2_cp2": (4, ["parallel.cp=2"]),
    "tp2_cp2_pp2_packed": (8, ["--packed", "parallel.tp=2", "parallel.cp=2", "parallel.pp=2"]),
    # Gradient reduction during the backward pass and the weights' all-gather during the next
    # forward, bucket by bucket (small buckets, so there are several); the EMA would read stale
    # weights, so it is off (config validation).
    "dp2_overlap": (2, ["optim.overlap_grad_reduce=true", "optim.overlap_param_gather=true",
                        "optim.ddp_bucket_size=20000", "checkpoint.ema_decay=0"]),
    "pp2_dp2_overlap_grad_reduce": (4, ["parallel.pp=2", "optim.overlap_grad_reduce=true",
                                        "optim.ddp_bucket_size=20000"]),
    # FSDP (megatron's FSDP2 wrapper): weights, gradients and Adam state sharded over 4 ranks;
    # hybrid: sharded over pairs, replicated across them; with CP=2 the DP x CP ranks shard.
    "hsdp2x2": (4, [*FSDP, "parallel.fsdp_shard_size=2"]),
    "fsdp_cp2_packed": (4, ["--packed", "parallel.cp=2", *FSDP]),
    "hsdp_cp2_packed": (4, ["--packed", "parallel.cp=2", *FSDP, "parallel.fsdp_shard_size=2"]),  # shard: CP pair
    "tp2_fsdp2_recompute": (4, ["parallel.tp=2", "model.recompute=true", *FSDP,
                                "parallel.fsdp_reshard_after_forward=false"]),
    # model.compile: every layer one graph, the Ulysses all-to-alls traced into it, recompiled as
    # the packs' layouts change (aot_eager: the graphs inductor would take, without generating
    # kernels, which takes minutes on two CPU cores). Not TP: megatron's column-parallel linear
    # all-reduces its input gradient with async_op=True, which dynamo cannot trace.
    "cp2_compiled_packed": (2, ["--packed", "parallel.cp=2", "model.compile=true",
                                "model.compile_backend=aot_eager"]),
}


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    return layout_runner(tmp_path_factory, LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout_run, single_process, layout):
    got = layout_run(layout)
    baseline = single_process("--packed" in LAYOUTS[layout][1])
    ref_rec, rec = baseline["record"], got["record"]
    assert len(rec["loss"]) == 2
    assert_same_run(rec, ref_rec, got, baseline)
    assert ref_rec["loss"][1] != ref_rec["loss"][0]  # the first step changed the weights


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2_dp2_overlap_grad_reduce", "dp2_cp2", "dp2_overlap", "tp2_fsdp2_recompute",
                                    "hsdp2x2"])
def test_layout_checkpoint_loads_unsharded(layout_run, baseline, layout, megatron_world):
    got = layout_run(layout)
    cfg = load_config(str(got["dir"] / "config.yaml"), ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"])
    cfg.train.seed += 1  # start from other weights, so a key the load misses shows up
    stage = build_stage(cfg)
    info = load_model_weights(latest_checkpoint(got["dir"]), [stage])
    assert info["step"] == 2
    loaded = {name: param.detach() for name, param in stage.named_parameters()}
    assert loaded.keys() == baseline["weights"].keys()
    for name, ref in baseline["weights"].items():
        assert_close_to_scale(loaded[name], ref, ulps=WEIGHT_ULPS, msg=name)


@pytest.mark.slow
def test_i2v_under_context_parallelism_matches_single_process(tmp_path_factory):
    """model.i2v: the first-frame condition is sharded over CP ranks like the noisy tokens, and
    two steps (the second with a trained condition layer) give the single-process numbers."""
    i2v = ["model.i2v=true", "data.image_ratio=0"]
    ref = run_equivalence(tmp_path_factory, "single_i2v", 1, i2v)
    got = run_equivalence(tmp_path_factory, "cp2_i2v", 2, ["parallel.cp=2", *i2v])
    assert any(name.startswith("image_cond.") for name in ref["grads2"])
    assert_same_run(got["record"], ref["record"], got, ref)
