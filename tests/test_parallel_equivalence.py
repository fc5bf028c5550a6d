"""TP=2, PP=2 and DP=2 (gloo, 2 processes each) reproduce the single-process run for two steps:
loss, gradient norm, every gradient and the final weights (fp32 tolerance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_torchrun

WORKER = str(Path(__file__).with_name("dist_equivalence.py"))


def _run(tmp_path_factory, name: str, nproc: int, overrides: list[str]) -> dict:
    out = tmp_path_factory.mktemp(name)
    run_torchrun(nproc, [WORKER, str(out), *overrides])
    merged: dict = {"record": torch.load(out / "record.pt")}
    for kind in ("grads1", "grads2", "weights"):
        merged[kind] = {}
        for path in sorted(out.glob(f"{kind}_pp*.pt")):
            merged[kind].update(torch.load(path))
    return merged


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return _run(tmp_path_factory, "single", 1, [])


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "dp2": [],
    "tp2_recompute": ["parallel.tp=2", "model.recompute=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(tmp_path_factory, baseline, layout):
    got = _run(tmp_path_factory, layout, 2, LAYOUTS[layout])
    ref_rec, rec = baseline["record"], got["record"]
    assert len(rec["loss"]) == 2
    torch.testing.assert_close(torch.tensor(rec["loss"]), torch.tensor(ref_rec["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(rec["grad_norm"]), torch.tensor(ref_rec["grad_norm"]),
                               rtol=1e-5, atol=1e-6)
    assert ref_rec["loss"][1] != ref_rec["loss"][0]  # the first step changed the weights
    for kind in ("grads1", "grads2", "weights"):
        assert got[kind].keys() == baseline[kind].keys(), kind
        for name, ref in baseline[kind].items():
            torch.testing.assert_close(got[kind][name], ref, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
