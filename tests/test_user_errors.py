"""User mistakes, each answered by goku-train with one line that names the field or file and
the fix, exit code resilience.EXIT_CONFIG_ERROR, and no traceback (the table in docs/errors.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from goku_megatron.resilience import EXIT_CONFIG_ERROR

BAD_YAML = "model:\n  preset: tiny\n   num_layers: [1,\n"

# (mistake, goku-train arguments ({tmp}: the test's directory), what the one line must say)
MISTAKES = [
    ("a typo'd key", ["train.stpes=5"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
    ("tp does not divide the heads", ["--dry-run", "--world-size", "3", "parallel.tp=3"],
     "model.num_heads=4 is not divisible by parallel.tp=3; choose a tp that divides the number of heads"),
    ("a world size the layout does not divide", ["--dry-run", "--world-size", "3", "parallel.tp=2"],
     "world size 3 is not divisible by tp*pp*cp=2; launch a multiple of 2 processes"),
    ("an unknown recipe", ["--config", "goku-9b"], "unknown recipe 'goku-9b': use a YAML path or one of goku-2b"),
    ("a directory as the recipe", ["--config", "{tmp}/empty"],
     "{tmp}/empty: a directory, not a recipe file; pass an existing YAML file or one of goku-2b"),
    ("an empty data directory", ["data.path={tmp}/empty", "data.create_if_missing=false"],
     "no toy dataset in {tmp}/empty, or an incomplete one; make it with 'goku-data make-toy --out {tmp}/empty'"),
    ("a VAE path with no VAE", ["--config", "goku-2b", "parallel.auto=false", "data.vae_path={tmp}/novae"],
     "data.vae_path: {tmp}/novae: no model there"),
    ("the T5 encoder without its path", ["data.text_encoder=t5"],
     "data.text_encoder=t5 needs data.text_encoder_path (a local FLAN-T5 checkpoint)"),
    ("--resume to nothing", ["--resume", "{tmp}/nothing"],
     "checkpoint.resume={tmp}/nothing: no such file or directory; give a run directory or its checkpoints/iter_N"),
    ("a YAML syntax error", ["--config", "{tmp}/bad.yaml"], "bad.yaml: line 3 is not valid YAML; fix the syntax there"),
    ("an unknown decoder", ["data.decoder=nvdec"], "data.decoder='nvdec' is not one of auto, pyav, dali"),
]


def goku_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "goku_megatron.cli.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("mistake, args, says", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_user_mistake_is_one_line_and_exit_2(mistake, args, says, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    proc = goku_train([a.format(tmp=tmp_path) for a in args], tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("goku-train: error: "), proc.stderr
    assert says.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_the_docs_table_lists_the_mistakes():
    """docs/errors.md shows each mistake's line; keep it in step with MISTAKES."""
    table = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for _, _, says in MISTAKES:
        assert says.replace("{tmp}", "/tmp/x") in table, says
