"""Weights & Biases beside TensorBoard (metrics.WandbSink), in W&B's offline mode only: the run's
history, read back from the .wandb file (tests/wandb_records.py), holds what metrics.jsonl holds at
the same steps, a restart in the same run directory continues the same W&B run, and neither a W&B
failure nor a missing wandb package stops training. The runs are goku-train's own loop (train.run)
in the test process's one-rank megatron world, as in tests/test_checkpoint.py."""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import json
import logging
import signal
import sys
from pathlib import Path

import pytest
from conftest import TOY_CHECKPOINT_RUN
from wandb_records import offline_runs

from goku_megatron.config import load_config, validate
from goku_megatron.evaluation import Evaluator
from goku_megatron.metrics import MetricsLogger, chart_tag
from goku_megatron.resilience import EXIT_PREEMPTED, Preempted
from goku_megatron.train import run

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="needs wandb: pip install -e '.[wandb]'")

API_KEY = "0123456789abcdef" * 2 + "f00dfeed"  # 40 characters, the shape of a real key
PROMPT = "a red square moving right"
SAMPLE = "samples/000_a_red_square_moving_right"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, every W&B folder in tmp (nothing in ~), and an API key in the environment that must
    never be written anywhere."""
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    yield
    wandb = sys.modules.get("wandb")  # None while a test hides the package
    if wandb is not None and wandb.run is not None:
        wandb.finish()  # a run that a failure left open (goku-train's process ends it at exit)


def _cfg(toy_data: Path, run_dir: Path, *extra: str):
    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={run_dir}",
                              "data.workers=0", "train.wandb_project=goku-test", "train.wandb_mode=offline", *extra])
    validate(cfg, 1)
    return cfg


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wandb_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "W&B" in r.getMessage() and r.levelno >= logging.WARNING]


@needs_wandb
def test_an_offline_run_mirrors_metrics_jsonl_and_a_restart_continues_it(toy_data, tmp_path, wandb_env,
                                                                        megatron_world, monkeypatch, caplog, capfd):
    """Steps 1-3, then a restart to step 6 in the same run directory: two offline W&B files of one
    run id (the one in run_dir/wandb_run_id) whose history holds every metrics.jsonl value at its
    step under its TensorBoard name, the evaluations, the samples (the same MP4s) and the config;
    the API key is in no file of the run directory and in no log line."""
    import wandb

    # What an evaluation returns reaches W&B like any metric (the real ShapesBench takes ~20 s here).
    monkeypatch.setattr(Evaluator, "run", lambda self, step, live: {"eval/val_loss": 1.25, "eval/color_seen": 0.5})
    run_dir = tmp_path / "run"
    sampled = ["train.sample_interval=3", f"train.sample_prompts=[{PROMPT}]", "flow.sample_steps=2",
               "train.eval_interval=3"]
    with caplog.at_level(logging.INFO, logger="goku_megatron"):
        run(_cfg(toy_data, run_dir, "train.steps=3", *sampled))
        run(_cfg(toy_data, run_dir, "train.steps=6", *sampled))
    wandb.teardown()  # what goku-train's exit does: wait for wandb-core to finish writing

    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    first, resumed = offline_runs(run_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first.run_id == resumed.run_id == run_id
    assert first.exit_code == resumed.exit_code == 0 and not first.preempting
    assert sorted(first.history) == [1, 2, 3] and sorted(resumed.history) == [4, 5, 6]
    history = {**first.history, **resumed.history}
    for record in records:
        row = history[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert row[chart_tag(key)] == pytest.approx(value), (record["step"], key)
    assert history[3]["eval/val_loss"] == 1.25 and history[6]["eval/color_seen"] == 0.5
    for step, offline in ((3, first), (6, resumed)):
        assert history[step][f"{SAMPLE}/_type"] == "video-file" and history[step][f"{SAMPLE}/caption"] == PROMPT
        mp4 = (run_dir / "samples" / f"step_{step:07d}" / f"{Path(SAMPLE).name}.mp4").read_bytes()
        assert history[step][f"{SAMPLE}/sha256"] == hashlib.sha256(mp4).hexdigest()
        assert (offline.folder / "files" / history[step][f"{SAMPLE}/path"]).read_bytes() == mp4
    assert first.config["train"]["steps"] == 3 and resumed.config["train"]["steps"] == 6
    assert resumed.config["model"] == _cfg(toy_data, run_dir).to_dict()["model"]
    messages = [r.getMessage() for r in caplog.records]
    assert f"W&B: new run {run_id} in project goku-test (offline)" in messages
    assert f"W&B: continuing run {run_id} in project goku-test (offline)" in messages
    assert not _wandb_warnings(caplog)

    written = [path for path in run_dir.rglob("*") if path.is_file() and API_KEY.encode() in path.read_bytes()]
    assert written == []
    out, err = capfd.readouterr()
    assert API_KEY not in out + err + caplog.text


@needs_wandb
def test_a_failing_wandb_log_is_reported_once_and_training_goes_on(toy_data, tmp_path, wandb_env, megatron_world,
                                                                   monkeypatch, caplog):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []
    real_log = wandb.Run.log

    def flaky_log(self, data, step=None, **kwargs):
        calls.append(step)
        if len(calls) >= 2:
            raise RuntimeError("connection reset by peer")
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", flaky_log)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="goku_megatron"):
        run(_cfg(toy_data, run_dir, "train.steps=4"))
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert calls == [1, 2]  # off after the failure: steps 3 and 4 were not offered to W&B
    assert _wandb_warnings(caplog) == [
        "W&B: wandb.log failed (RuntimeError: connection reset by peer); W&B is off for the rest of this run, "
        "TensorBoard and metrics.jsonl continue"]


@pytest.mark.parametrize("failure", ["no package", "broken package", "init raises"])
def test_without_wandb_one_line_and_training_goes_on(failure, toy_data, tmp_path, wandb_env, megatron_world,
                                                     monkeypatch, caplog):
    """No wandb package, one whose import fails otherwise, or wandb.init failing (here with the API
    key in its message, which the log line must not repeat): one warning, the run trains to the
    end, no run id is kept."""
    if failure == "no package":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
        expected = ("train.wandb_project=goku-test but the wandb package is not installed (pip install "
                    "'goku-megatron[wandb]'): no W&B for this run; TensorBoard and metrics.jsonl continue")
    elif failure == "broken package":
        real_import = builtins.__import__

        def broken(name, *args, **kwargs):
            if name == "wandb":
                raise TypeError("Descriptors cannot be created directly.\nDowngrade protobuf")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", broken)
        expected = ("W&B: import wandb failed (TypeError: Descriptors cannot be created directly.); W&B is off "
                    "for the rest of this run, TensorBoard and metrics.jsonl continue")
    else:
        wandb = pytest.importorskip("wandb")

        def refuse(**kwargs):
            raise wandb.errors.CommError(f"invalid API key {API_KEY}\nretry later")

        monkeypatch.setattr(wandb, "init", refuse)
        expected = ("W&B: wandb.init failed (CommError: invalid API key <WANDB_API_KEY>); W&B is off for the rest "
                    "of this run, TensorBoard and metrics.jsonl continue")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="goku_megatron"):
        run(_cfg(toy_data, run_dir, "train.steps=2"))
    assert [r["step"] for r in _records(run_dir)] == [1, 2]
    assert _wandb_warnings(caplog) == [expected]
    assert not (run_dir / "wandb_run_id").exists()
    assert API_KEY not in caplog.text


@needs_wandb
def test_a_resumed_online_run_gets_only_the_steps_it_lacks_and_a_preempted_run_says_so(tmp_path, wandb_env, monkeypatch):
    """Online, a resumed W&B run starts after the last step it holds (Run.starting_step, here 3 as
    the server would say); the steps a restart redoes before it are left out instead of being
    dropped by W&B with a warning each. A one-frame sample is a W&B image. A run stopped by a
    signal ends marked preempting, with goku-train's exit code 99."""
    import torch
    import wandb

    monkeypatch.setattr(wandb.Run, "starting_step", property(lambda self: 3))
    cfg = load_config("toy", [f"train.run_dir={tmp_path}", "train.wandb_project=goku-test", "train.wandb_mode=offline"])
    step_metrics = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 1.0, "step_time_s": 1.0}
    with pytest.raises(Preempted), MetricsLogger(tmp_path, cfg, enabled=True) as metrics:
        for step in range(1, 5):
            metrics.log(step, {**step_metrics, "loss": 1.0 / step})
        metrics.media(4, [PROMPT], torch.zeros(1, 3, 1, 8, 8), fps=8)
        raise Preempted(signal.SIGTERM, 4)
    wandb.teardown()
    (offline,) = offline_runs(tmp_path)
    assert sorted(offline.history) == [3, 4] and offline.history[4]["train/loss"] == 0.25
    assert offline.history[4][f"{SAMPLE}/_type"] == "image-file"
    assert offline.preempting and offline.exit_code == EXIT_PREEMPTED


def test_wandb_mode_disabled_does_not_import_wandb(tmp_path, monkeypatch, caplog):
    """disabled turns W&B off as an empty project does: nothing imported, nothing said."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config("toy", ["train.wandb_project=goku-test", "train.wandb_mode=disabled"])
    with caplog.at_level(logging.INFO, logger="goku_megatron"), MetricsLogger(tmp_path, cfg, enabled=True):
        pass
    assert "W&B" not in caplog.text and not (tmp_path / "wandb").exists()
