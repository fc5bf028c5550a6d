"""The sbatch scripts' dry-run mode under a faked SLURM environment: launch command and layout."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO

FAKE_SLURM = {"SLURM_JOB_NAME": "goku-test", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "8",
              "SLURM_JOB_NODELIST": "gpu[017-020,031-034]", "SLURM_GPUS_ON_NODE": "8",
              "SLURM_SUBMIT_DIR": str(REPO)}


def _dry_run(script: str, *args: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({**FAKE_SLURM, "DRY_RUN": "1", "PATH": os.environ["PATH"], "PYTHONWARNINGS": "ignore",
                     **env})
    proc = subprocess.run(["bash", f"examples/slurm/{script}", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _planned(recipe: str, gpus: int) -> str:
    """What goku-plan recommends for the recipe (parallel.auto), as the dry run prints it."""
    from goku_megatron.config import load_config
    from goku_megatron.planner import recommend

    lay = recommend(load_config(recipe), gpus)
    return f"world_size={gpus} tp={lay.tp} pp={lay.pp} cp={lay.cp} dp={lay.dp} "


@pytest.mark.parametrize("script, recipe", [("goku8b.sh", "goku-8b"), ("goku2b.sh", "goku-2b")])
def test_srun_native_launch(script, recipe):
    out = _dry_run(script, "optim.lr=5e-5")
    lines = out.splitlines()
    assert lines[0] == "# job goku-test (4242): 8 nodes x 8 GPUs = 64 ranks, launcher srun"
    assert "master gpu017:29500" in lines[1] and "run dir runs/goku-test" in lines[1]
    srun = lines[2]
    assert srun.startswith("srun --nodes 8 --ntasks-per-node 8 --kill-on-bad-exit=1 --container-image=")
    assert "RANK=\\$SLURM_PROCID" in srun and "WORLD_SIZE=\\$SLURM_NTASKS" in srun
    assert f"--config\\ {recipe}\\ train.run_dir=runs/goku-test\\ optim.lr=5e-5" in srun
    layout = lines[lines.index("# parallel layout") + 1]
    assert layout.startswith(_planned(recipe, 64))
    assert any(line.startswith("parameters=") for line in lines)


def test_torchrun_launch_with_overridden_environment():
    out = _dry_run("goku8b.sh", LAUNCHER="torchrun", RUN_DIR="/lustre/runs/x", MASTER_PORT="31000",
                   CONTAINER_IMAGE="/images/goku.sqsh", MAX_RESTARTS="5")
    srun = out.splitlines()[2]
    assert "--ntasks-per-node 1" in srun and "--container-image=/images/goku.sqsh" in srun
    assert ("torchrun\\ --nnodes\\ 8\\ --nproc-per-node\\ 8\\ --rdzv-backend\\ c10d\\ "
            "--rdzv-endpoint\\ gpu017:31000\\ --rdzv-id\\ 4242\\ --max-restarts\\ 5\\ "
            "-m\\ goku_megatron.cli.train\\ --config\\ goku-8b\\ train.run_dir=/lustre/runs/x") in srun


def test_bad_layout_fails_the_dry_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({**FAKE_SLURM, "DRY_RUN": "1", "SLURM_NNODES": "1", "GPUS_PER_NODE": "4"})
    proc = subprocess.run(["bash", "examples/slurm/goku8b.sh", "parallel.auto=false", "parallel.tp=8"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "world size 4 is not divisible by tp*pp*cp=8" in proc.stderr
    planned = subprocess.run(["bash", "examples/slurm/goku8b.sh"], cwd=REPO, env={**env, "GPUS_PER_NODE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode != 0
    assert "parallel.auto: no layout of 1 GPUs x 80 GiB fits goku-8b at 65536 tokens per pack" in planned.stderr


def test_the_wandb_api_key_is_passed_by_name_only():
    """WANDB_API_KEY reaches the container by name (pyxis --container-env) and its value is in
    nothing the script prints; without it the option is left out."""
    key = "0123456789abcdef0123456789abcdef01234567"
    out = _dry_run("goku8b.sh", "train.wandb_project=goku-8b", WANDB_API_KEY=key)
    srun = out.splitlines()[2]
    assert "--container-env=WANDB_API_KEY " in srun and "train.wandb_project=goku-8b" in srun
    assert key not in out
    assert "--container-env" not in _dry_run("goku8b.sh", WANDB_API_KEY="").splitlines()[2]
