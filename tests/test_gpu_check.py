"""tools/gpu_check.py, the one command a GPU machine runs (docs/gpu.md), kept from rotting between
two GPU runs: its quick run on CPU goes through every stage at tiny shapes and reports each; a
stage that times out or fails is recorded and the next one still runs; the GPU run's own arguments
are accepted by the benchmarks and goku-train."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, script_module

from goku_megatron.config import load_config, validate

TOOL = REPO / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(TOOL), "run", "--device", "cpu", "--quick", "--out", str(out),
                           "--work", str(out / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu-report.json").read_text())
    return report, (out / "gpu-report.md").read_text(), proc


def test_the_quick_cpu_run_passes_every_stage_or_says_why_not(quick_report):
    report, markdown, proc = quick_report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["install", "environment", "pytest-gpu", "throughput-tiny", "step-time-tiny", "main-job",
                            "dali"]
    assert stages["install"]["status"] == "skipped" and "--device cpu" in stages["install"]["reason"]
    for stage in stages.values():
        assert stage["status"] in ("pass", "skipped"), stage
        assert stage["status"] == "pass" or stage["reason"], stage
        assert f"| {stage['name']} | {stage['status']}" in markdown
    env = report["environment"]
    assert env["cuda"] == "none" and env["packages"]["megatron-core"] == "0.16.1"


def test_the_quick_run_reports_each_stages_figures(quick_report):
    stages = {s["name"]: s for s in quick_report[0]["stages"]}
    tests = stages["pytest-gpu"]["figures"]["tests"]
    assert tests and all(t["outcome"] == "skipped" and t["message"] for t in tests)  # no CUDA here
    rows = stages["throughput-tiny"]["figures"]["rows"]
    assert [(r["impl"], r["precision"]) for r in rows] == [("goku (local)", "fp32"), ("plain torch", "fp32")]
    step = stages["step-time-tiny"]["figures"]
    assert float(step["step_ms_median"]) > 0 and float(step["planned_gib"]) > 0 and step["peak_gib"] == "n/a"
    job = stages["main-job"]["figures"]
    assert (job["first_step"], job["last_step"], job["resumed_from_step"]) == (1, 3, 2)
    assert job["checkpoints"] == ["iter_0000002", "iter_0000003"] and job["samples"] >= 1
    assert set(job["checkpoint_blocking_s"]) == {"2", "3"}
    assert len(stages["main-job"]["command_seconds"]) == 2
    if stages["dali"]["status"] == "pass":  # DALI is in the test extra; its CPU rows beside PyAV's
        assert any(r["path"].startswith("PyAV") for r in stages["dali"]["figures"]["rows"])


def test_a_stage_that_times_out_or_fails_is_recorded_and_ends_its_processes(tmp_path):
    tool = script_module(TOOL)
    log = tmp_path / "log"
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    start = time.monotonic()
    slow = tool.run_stage(tool.Stage("slow", "sleeps", [sleeper], timeout_s=2), {}, time.monotonic() + 100,
                          tmp_path, log)
    assert (slow.status, slow.reason) == ("fail", "timed out after 2 s")
    assert time.monotonic() - start < 20
    # A command that exits but leaves a child running does not hold its stage open.
    leaves = [sys.executable, "-c", "import subprocess, sys; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"]
    quick = tool.run_stage(tool.Stage("leaves", "exits", [leaves], timeout_s=30), {}, time.monotonic() + 100,
                           tmp_path, log)
    assert quick.status == "pass" and quick.seconds < 20
    failing = [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"]
    failed = tool.run_stage(tool.Stage("failing", "fails", [failing, failing], timeout_s=30), {},
                            time.monotonic() + 100, tmp_path, log)
    assert (failed.status, failed.reason, len(failed.command_seconds)) == ("fail", "exit code 3", 1)
    assert "the reason" in failed.tail
    late = tool.run_stage(tool.Stage("late", "no time", [failing], timeout_s=30), {}, time.monotonic() + 1,
                          tmp_path, log)
    assert late.status == "skipped" and "budget" in late.reason


def test_the_throughput_table_parses_whatever_its_columns_and_rows():
    tool = script_module(TOOL)
    output = "# note\n| preset | impl | compiled | ms |\n|---|---|---|---|\n| goku-2b | plain torch | yes | 3.0 |\n"
    assert tool.throughput_figures(output, Path()) == {
        "rows": [{"preset": "goku-2b", "impl": "plain torch", "compiled": "yes", "ms": "3.0"}], "notes": ["note"]}


def test_the_gpu_runs_arguments_are_accepted(tmp_path):
    """What only the GPU run passes (resolutions, goku-2b/8b, --fit, the README's job) is parsed and
    validated here, so a renamed flag or override fails in CI, not in a scarce GPU call."""
    tool = script_module(TOOL)
    throughput = script_module(REPO / "benchmarks" / "throughput.py")
    step_time = script_module(REPO / "benchmarks" / "step_time.py")
    full = {s.name: s for s in tool.stages("cuda", quick=False, work=tmp_path)}
    for name, stage in full.items():
        (cmd, *more) = stage.commands
        if name.startswith("throughput-"):
            throughput.parse_args(cmd[2:])
        elif name.startswith("step-time-"):
            args = step_time.parse_args(cmd[2:])
            validate(load_config(None, args.overrides), 1, has_cuda=True)
        elif name == "main-job":  # goku-train: the toy recipe
            for command in (cmd, *more):
                validate(load_config("toy", command[3:]), 1, has_cuda=True)
    job = full["main-job"].commands[0]
    assert job[3:] == [f"train.run_dir={tmp_path / 'toy-run'}", f"data.path={tmp_path / 'toy-data'}",
                       f"train.steps={load_config('toy').train.steps}"]  # the README's job, as it is


def test_pytest_outcomes_and_figures_come_from_the_junit_xml(tmp_path):
    tool = script_module(TOOL)
    (tmp_path / tool.PYTEST_XML).write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.25">'
        '<system-out>noise\ngpu-figure first_async_save_blocking_s=0.21\n</system-out></testcase>'
        '<testcase classname="tests.test_gpu" name="test_b" time="0.5">'
        '<failure message="RuntimeError: called a synchronizing CUDA operation&#10;more">trace</failure></testcase>'
        '</testsuite></testsuites>')
    assert tool.pytest_figures("", tmp_path) == {
        "tests": [{"test": "test_a", "outcome": "passed", "seconds": 1.2, "message": ""},
                  {"test": "test_b", "outcome": "failed", "seconds": 0.5,
                   "message": "RuntimeError: called a synchronizing CUDA operation"}],
        "figures": {"first_async_save_blocking_s": "0.21"}}
