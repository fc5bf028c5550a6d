"""goku-data, the console script of the data and checkpoint tools: it is installed, each subcommand
answers --help, make-toy writes a dataset that loads, and a user mistake is one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import REPO

from goku_megatron.cli import data as goku_data
from goku_megatron.data.toy import COLORS, VAL_DIR, iter_raw_samples, read_manifest, read_validation
from goku_megatron.resilience import EXIT_CONFIG_ERROR

SUBCOMMANDS = ["make-toy", "prepare-shards", "precompute-latents", "convert-checkpoint"]


def goku_data_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``goku-data ARGS`` through the installed module, as the console script runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "goku_megatron.cli.data", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=env)


def test_console_script_is_declared() -> None:
    (script,) = entry_points(group="console_scripts", name="goku-data")
    assert script.value == "goku_megatron.cli.data:main" and script.load() is goku_data.main


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_answers_help(command: str, tmp_path: Path) -> None:
    proc = goku_data_cli(command, "--help", cwd=tmp_path)  # outside the checkout
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: goku-data {command} ")


def test_help_lists_every_subcommand() -> None:
    parser = goku_data.build_parser()
    help_text = parser.format_help()
    assert all(command in help_text for command in SUBCOMMANDS)
    for direction in ("export", "import"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["convert-checkpoint", direction, "--help"])
        assert exit_.value.code == 0


def test_make_toy_writes_a_dataset_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    proc = goku_data_cli("make-toy", "--out", str(out), "--clips", "3", "--images", "1", "--size", "16",
                         "--frames", "4", "--shard-size", "2", "--val-clips", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 3 clips + 1 images in 2 shards and 2 validation clips to {out}" in proc.stdout
    manifest = read_manifest(out)
    assert (manifest["clips"], manifest["images"], len(manifest["shards"])) == (3, 1, 2)
    samples = list(iter_raw_samples(out))
    assert len(samples) == 4 and all("txt" in s for s in samples)
    assert sum("webm" in s for s in samples) == 3 and sum("png" in s for s in samples) == 1
    validation = read_validation(out)
    assert tuple(validation.pixels.shape) == (2, 3, 4, 16, 16) and (out / VAL_DIR).is_dir()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("goku-data: error: ")
    return proc.stderr.strip()


def test_a_missing_input_folder_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-clips"
    line = one_line_error(goku_data_cli("prepare-shards", "--input", str(missing), "--output", str(tmp_path / "out")))
    assert line == f"goku-data: error: input folder {missing} does not exist"
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-run"
    code = goku_data.main(["convert-checkpoint", "export", str(missing), str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR and err.count("\n") == 1
    assert err.startswith(f"goku-data: error: {missing}: not a goku-train checkpoint")
    missing_file = tmp_path / "none.safetensors"
    assert goku_data.main(["convert-checkpoint", "import", str(missing_file), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"goku-data: error: {missing_file}: no such file")


def test_usage_mistakes_are_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in [
        (["make-toy"], "the following arguments are required: --out (see 'goku-data make-toy --help')"),
        (["prepare-shards", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--samples-per-shard", "0"],
         "argument --samples-per-shard: must be >= 1, got 0 (see 'goku-data prepare-shards --help')"),
        (["make-toy", "--out", str(tmp_path / "t"), "--colors", "red,purple"],
         "argument --colors: unknown toy colour(s) purple; choose from red, green, blue, yellow "
         "(see 'goku-data make-toy --help')"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            goku_data.main(argv)
        assert exit_.value.code == EXIT_CONFIG_ERROR
        assert capsys.readouterr().err == f"goku-data: error: {message}\n"
    assert goku_data.main(["make-toy", "--out", str(tmp_path / "t"), "--clips", "0", "--images", "0"]) == 2
    assert capsys.readouterr().err == "goku-data: error: need at least one sample, got clips=0 images=0\n"


def test_make_toy_colors_leaves_the_others_out_of_training(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    proc = goku_data_cli("make-toy", "--out", str(out), "--clips", "6", "--images", "2", "--frames", "4",
                         "--val-clips", "32", "--colors", "blue,red")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 clips + 2 images (blue, red only) in 1 shards" in proc.stdout
    assert read_manifest(out)["params"]["colors"] == ["red", "blue"]
    assert {json.loads(s["json"])["color"] for s in iter_raw_samples(out)} == {"red", "blue"}
    assert {json.loads(s["json"])["color"] for s in iter_raw_samples(out / VAL_DIR)} == set(COLORS)

