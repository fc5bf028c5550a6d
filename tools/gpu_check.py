"""Every GPU figure and CUDA-only check of goku-megatron in one call on a GPU machine (docs/gpu.md).

    python tools/gpu_check.py prepare                  # where PyPI is reachable: the wheels, into .gpukit/
    python3 tools/gpu_check.py run --out $OUT          # on the GPU machine, no network: < 8 min on one H100
    python tools/gpu_check.py run --device cpu --quick --out /tmp/gpu-check   # tiny shapes on CPU (CI)
    python tools/gpu_check.py env                      # the report's environment part, as JSON

GPU time is scarce (one H100 or H200 for 15 minutes, start-up included, no package registry), so the
work is split in two. ``prepare`` downloads, on any machine with PyPI, the wheels the GPU image
lacks (megatron-core, webdataset, braceexpand, PyAV; for Python 3.12 manylinux x86_64) into the
ignored folder .gpukit/wheels, which travels with the tree. ``run`` installs them without the
network into /tmp/site, then runs stages one after another, each a subprocess with its own timeout
inside one total budget: the environment, ``pytest -m gpu`` (tests/test_gpu.py), the layer
throughput benchmark, the step time and peak memory of goku-2b and goku-8b against goku-plan, the
README's main job (the toy run with samples and checkpoints, then a resume), and DALI's NVDEC
decoding against PyAV. A stage that fails, times out or cannot run is recorded as such and the
next one runs. After every stage it rewrites gpu-report.md, gpu-report.json and gpu-check.log (each
stage's whole output) in --out, so a call cut short still brings back what it measured.

``run`` itself imports nothing but the standard library: each stage is its own process, so a
broken install or a crashed CUDA context costs one stage, and no parent process holds GPU memory
while the stages measure it. ``--quick`` runs the same stages at tiny shapes (with ``--device cpu``
in tests/test_gpu_check.py, so the kit cannot rot between two GPU runs); what only makes sense on a
GPU is skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpukit"
WHEELS = KIT / "wheels"
SITE = Path("/tmp/site")

# What the GPU image lacks (docs/gpu.md lists what it holds: torch, pytest,
# pytest-xdist, psutil, pyyaml, tensorboard, safetensors, einops, pillow, numpy are there), pinned
# to the versions the CPU suite runs with. megatron-core 0.16.1 is the newest that installs on both
# Python 3.11 and 3.12 (setup.py); webdataset needs braceexpand; av (PyAV) decodes the toy clips.
WHEEL_PINS = ("megatron-core==0.16.1", "webdataset==1.0.2", "braceexpand==0.1.7", "av==18.1.0")
# pip matches a manylinux tag exactly: name each a wheel of these packages may carry.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
GPU_PYTHON = "3.12"
# The device tool carries at most 64 MiB per call, the tree (~2 MiB) included.
KIT_LIMIT_MIB = 60
BUDGET_S = 480  # the bound: everything in under 8 minutes on one H100
MIN_STAGE_S = 10  # a stage left less than this by the budget is skipped, not started
TAIL_CHARS = 4000
PYTEST_XML = "pytest-gpu.xml"  # in the work folder: each test's outcome and printed figures
OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # JUnit's elements, pytest's words

# The packages the report names: (distribution names, the module whose import is tried, or "" where
# the version says enough: GPU-kernel packages install fine and then fail to import against another
# CUDA, cuDNN or torch, so those are imported).
PACKAGES = {
    "megatron-core": (("megatron-core", "megatron_core"), ""),
    "transformer-engine": (("transformer-engine", "transformer_engine", "transformer-engine-cu12",
                            "transformer-engine-cu13", "transformer_engine_torch"), "transformer_engine.pytorch"),
    "flash-attn": (("flash-attn", "flash_attn", "flash-attn-4"), "flash_attn"),
    "apex": (("apex",), "apex"),
    "nvidia-dali": (("nvidia-dali-cuda120", "nvidia-dali-cuda130"), "nvidia.dali"),
    "torchao": (("torchao",), "torchao"),
    "nvidia-resiliency-ext": (("nvidia-resiliency-ext",), "nvidia_resiliency_ext"),
    "triton": (("triton",), ""),
    "webdataset": (("webdataset",), ""),
    "av (PyAV)": (("av",), ""),
    "psutil": (("psutil",), ""),
}


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(kit: Path) -> int:
    """Download the pinned wheels for the GPU machine's Python into ``kit``/wheels (replacing what
    was there: two versions of one package stop the whole install) and check they fit a call."""
    wheels = kit / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           GPU_PYTHON, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(wheels), *WHEEL_PINS]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    sizes = {w.name: w.stat().st_size for w in sorted(wheels.glob("*.whl"))}
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{total / 2**20:8.2f} MiB  in all, in {wheels}")
    if total > KIT_LIMIT_MIB * 2**20:
        print(f"error: the wheels take more than {KIT_LIMIT_MIB} MiB; the device tool carries 64 MiB per call")
        return 1
    carried = os.path.relpath(kit, REPO)
    print(f"\ncarry: {carried} (ignored by git, so name it in the device tool's carry)\n"
          f"run:   python3 tools/gpu_check.py run --out $OUT    (timeout_s 560: the stages take at most {BUDGET_S} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# env


def package_version(dists: tuple[str, ...], module: str) -> str:
    """The installed version, 'not installed', or the version and why ``module`` does not import."""
    for dist in dists:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            if module:
                __import__(module)
        except Exception as err:  # noqa: BLE001  any import failure is the finding
            return f"{version} (installed, does not import: {type(err).__name__}: {str(err).splitlines()[0][:160]})"
        return version
    return "not installed"


def environment() -> dict[str, object]:
    """Device, driver, Python, torch, CUDA, cuDNN, the code's commit and each package's version.
    torch is imported here, in the ``env`` process, never in ``run`` (module doc)."""
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda or "none",
                               "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
                               else "none", "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        smi = shutil.which("nvidia-smi")
        driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip() if smi else ""
        info["driver"] = driver or "unknown (no nvidia-smi)"
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", driver="none")
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (the tree came without .git)"
    info["packages"] = {name: package_version(dists, module) for name, (dists, module) in PACKAGES.items()}
    return info


# ----------------------------------------------------------------------------------------------
# Stages


@dataclass
class Stage:
    """Commands run one after another in one time box; ``figures`` reads what they printed (and
    the work folder) into the report; a non-empty ``skip`` says why the stage does not run."""

    name: str
    what: str
    commands: list[list[str]]
    timeout_s: float
    figures: Callable[[str, Path], dict] = lambda output, work: {}
    skip: str = ""


@dataclass
class StageResult:
    """What the report says of one stage (gpu-report.json holds these as they are)."""

    name: str
    what: str
    commands: list[str]
    status: str  # pass, fail or skipped
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of its processes: on a shared machine, steadier than wall
    command_seconds: list[float] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    reason: str = ""  # why it failed or was skipped
    tail: str = ""  # the end of its output, on failure


def _py(*args: str) -> list[str]:
    """A command of this interpreter: on the GPU machine the one that holds torch."""
    return [sys.executable, *args]


def pytest_figures(output: str, work: Path) -> dict:
    """Each test's outcome, seconds and message, and the ``gpu-figure`` lines it printed, from
    pytest's JUnit XML (its captured output included)."""
    tests: dict[str, dict] = {}
    figures: dict[str, str] = {}
    for case in ElementTree.parse(work / PYTEST_XML).iter("testcase"):
        outcome = next(((OUTCOMES[child.tag], child.get("message", "")) for child in case if child.tag in OUTCOMES),
                       ("passed", ""))
        tests[case.get("name", "?")] = {"outcome": outcome[0], "seconds": round(float(case.get("time", 0)), 1),
                                        "message": outcome[1].splitlines()[0][:300] if outcome[1] else ""}
        for out in case.iter("system-out"):
            figures.update(re.findall(r"^gpu-figure (\S+)=(.*)$", out.text or "", re.M))
    return {"tests": [{"test": name, **t} for name, t in tests.items()], "figures": figures}


def markdown_rows(output: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``output``, by column name (whatever the columns:
    a benchmark that gains columns or rows, compiled ones say, still parses)."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def throughput_figures(output: str, work: Path) -> dict:
    """benchmarks/throughput.py: its table's rows and its '#' lines (device, versions, skips)."""
    notes = [line[2:] for line in output.splitlines() if line.startswith("# ")]
    return {"rows": markdown_rows(output), "notes": notes}


def step_time_figures(output: str, work: Path) -> dict:
    """benchmarks/step_time.py: its run's key=value line, the step time, peak memory and plan."""
    figures: dict = {}
    if m := re.search(r"^preset=.*$", output, re.M):
        figures.update(dict(kv.split("=", 1) for kv in m[0].split()))
    for pattern, names in ((r"step_ms median=(\S+) min=(\S+) max=(\S+)", ("step_ms_median", "step_ms_min", "step_ms_max")),
                           (r"planned_ms=(\S+)", ("planned_step_ms",)),
                           (r"memory_gib peak=(\S+) planned=(\S+)", ("peak_gib", "planned_gib"))):
        if m := re.search(pattern, output):
            figures.update(zip(names, m.groups()))
    if m := re.search(r"^fit: .*$", output, re.M):
        figures["fit"] = m[0][5:]
    return figures


def main_job_figures(output: str, work: Path) -> dict:
    """What the README's main job left in its run folder, and where the second command resumed."""
    run_dir = work / "toy-run"
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    train = [r for r in records if "loss" in r]
    figures: dict = {"logged_steps": len(train)}
    if train:
        figures.update(first_step=train[0]["step"], last_step=train[-1]["step"], loss_first=train[0]["loss"],
                       loss_last=train[-1]["loss"],
                       step_time_s_median=round(statistics.median(r["step_time_s"] for r in train), 4))
        figures["checkpoint_blocking_s"] = {r["step"]: round(r["checkpoint_blocking_s"], 3) for r in train
                                            if "checkpoint_blocking_s" in r}
    figures["samples"] = len(list((run_dir / "samples").glob("step_*/*.mp4")))
    figures["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    if m := re.search(r"resumed from (\S+): step (\d+)", output):
        figures["resumed_from_step"] = int(m[2])
    return figures


def dali_figures(output: str, work: Path) -> dict:
    """benchmarks/data_throughput.py: frames/s per decode path beside PyAV's, and what it skipped."""
    rows = [dict(zip(("path", "codec", "frames_per_s", "vs_pyav", "frames_per_cpu_s", "cpu_vs_pyav"),
                     (m[1].strip(), *m.groups()[1:])))
            for m in re.finditer(r"^(.{34}) (\S+)\s+(\d+)\s+([\d.]+)x\s+(\d+)\s+([\d.]+)x$", output, re.M)]
    return {"rows": rows, "skipped": re.findall(r"^skipped: (.*)$", output, re.M)}


def environment_figures(output: str, work: Path) -> dict:
    """The ``env`` verb's JSON line."""
    return json.loads(output.strip().splitlines()[-1])


@dataclass(frozen=True)
class Shapes:
    """Each stage's arguments: the GPU run's, or the quick run's tiny ones."""

    throughput: dict[str, list[str]]  # stage suffix -> benchmarks/throughput.py arguments
    step_time: dict[str, list[str]]  # stage suffix -> benchmarks/step_time.py arguments
    main_job: list[str]  # goku-train overrides (none: the README's job)
    main_job_steps: int  # its train.steps (the recipe's, for the README job)
    resume_steps: int  # the second command trains on to this step
    dali: list[str]


ONE_CLIP = ["train.global_batch_size=1", "train.micro_batch_size=1"]
FULL = Shapes(
    # 33-frame clips at 480p and 720p: 14580 and 32400 tokens (benchmarks/throughput.py RESOLUTIONS).
    throughput={p: ["--preset", p, "--layers", "2", "--resolution", "480p", "720p"] for p in ("goku-2b", "goku-8b")},
    step_time={
        # All 28 layers on one 480p clip: without recompute where the planner says it fits (H200).
        "goku-2b": ["model.preset=goku-2b", *ONE_CLIP, "--grid", "9", "60", "108", "--fit", "--warmup", "2",
                    "--steps", "3"],
        # 8 of 40 layers on one 720p clip, full recompute.
        "goku-8b-8-layers": ["model.preset=goku-8b", "model.num_layers=8", "model.recompute=true", *ONE_CLIP,
                             "--grid", "9", "90", "160", "--warmup", "2", "--steps", "3"]},
    main_job=[], main_job_steps=600, resume_steps=620,
    dali=["--clips", "32"],
)
QUICK = Shapes(
    throughput={"tiny": ["--preset", "tiny", "--tokens", "64", "--text-tokens", "8", "--layers", "1", "--warmup",
                         "1", "--iters", "1"]},
    step_time={"tiny": ["model.num_layers=2", "train.global_batch_size=2", "train.micro_batch_size=2", "--grid",
                        "2", "4", "4", "--warmup", "1", "--steps", "1"]},
    main_job=["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "data.toy_clips=8",
              "data.toy_images=0", "train.global_batch_size=4", "train.micro_batch_size=4",
              "train.log_interval=1", "train.save_interval=2", "train.sample_interval=2",
              "train.sample_prompts=[a red square moving right]", "flow.sample_steps=1", "optim.warmup_steps=1"],
    main_job_steps=2, resume_steps=3,
    dali=["--clips", "2", "--size", "32", "--frames", "4", "--steps", "1", "--workers", "1", "--batch", "2",
          "--threads", "1"],
)


def stages(device: str, quick: bool, work: Path) -> list[Stage]:
    """The stages in the order they run: what matters most first, so that a budget cut short
    drops the least."""
    shapes = QUICK if quick else FULL
    wheels = sorted(WHEELS.glob("*.whl"))
    if device == "cpu":
        install_skip = "--device cpu runs on this environment's packages"
    elif not wheels:
        install_skip = f"no wheels in {WHEELS.relative_to(REPO)}: run `python tools/gpu_check.py prepare` and carry .gpukit"
    else:
        install_skip = ""
    precision = ["--precision", "bf16" if device == "cuda" else "fp32"]
    toy = ["goku_megatron.cli.train", f"train.run_dir={work / 'toy-run'}", f"data.path={work / 'toy-data'}",
           *shapes.main_job]
    if importlib.util.find_spec("nvidia.dali") is None:
        dali_skip = "DALI is not installed here (nvidia-dali-cuda120 is ~1 GB: more than one call carries)"
    else:
        dali_skip = ""
    out = [
        Stage("install", "the kit's wheels into /tmp/site, without the network", [
            _py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", str(SITE), *map(str, wheels))], 90,
            lambda output, work: {"wheels": [w.name for w in wheels]}, install_skip),
        Stage("environment", "device, driver, torch, CUDA, cuDNN and package versions",
              [_py(str(Path(__file__).resolve()), "env")], 90, environment_figures),
        Stage("pytest-gpu", "tests/test_gpu.py: what only a GPU shows",
              [_py("-m", "pytest", "-q", "-n", "0", "-m", "gpu", "-rfE", "-o", "junit_logging=system-out",
                   f"--junitxml={work / PYTEST_XML}", f"--basetemp={work / 'pytest'}", "tests/test_gpu.py")], 200,
              pytest_figures),
        *[Stage(f"throughput-{name}", "Goku layers fwd+bwd: ours vs the plain PyTorch block, TFLOP/s and MFU",
                [_py("benchmarks/throughput.py", *args, *precision)], 100, throughput_figures)
          for name, args in shapes.throughput.items()],
        *[Stage(f"step-time-{name}", "a training step's time and peak memory beside goku-plan's prediction",
                [_py("benchmarks/step_time.py", *args)], 120, step_time_figures)
          for name, args in shapes.step_time.items()],
        Stage("main-job", "the README's main job (toy run, samples, checkpoints), then a resume",
              [_py("-m", *toy, f"train.steps={shapes.main_job_steps}"),
               _py("-m", *toy, f"train.steps={shapes.resume_steps}")], 180, main_job_figures),
        Stage("dali", "DALI mixed (NVDEC) decoding against PyAV: benchmarks/data_throughput.py",
              [_py("benchmarks/data_throughput.py", *shapes.dali)], 90, dali_figures, dali_skip),
    ]
    return out


# ----------------------------------------------------------------------------------------------
# run


def run_stage(stage: Stage, env: dict[str, str], deadline: float, work: Path, log_path: Path) -> StageResult:
    """Run a stage's commands in its own session (so a timeout ends its whole process tree), its
    output in a file (so a process it leaves behind cannot hold the stage open)."""
    result = StageResult(stage.name, stage.what, [" ".join(c) for c in stage.commands], "skipped", reason=stage.skip)
    if stage.skip:
        return result
    left = deadline - time.monotonic()
    if left < MIN_STAGE_S:
        result.reason = f"the run's budget was spent before this stage ({left:.0f} s left)"
        return result
    box = min(stage.timeout_s, left)
    start, cpu = time.monotonic(), _children_cpu_s()
    output = ""
    failure = ""
    for cmd in stage.commands:
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+b") as sink:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=max(1.0, box - (t0 - start)))
            except subprocess.TimeoutExpired:
                failure = f"timed out after {box:.0f} s"
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
                os.killpg(proc.pid, signal.SIGKILL)  # the timed-out tree, or what the command left running
            proc.wait()
            sink.seek(0)
            text = sink.read().decode(errors="replace")
        result.command_seconds.append(round(time.monotonic() - t0, 1))
        output += f"$ {' '.join(cmd)}\n{text}\n"
        if not failure and proc.returncode != 0:
            failure = f"exit code {proc.returncode}"
        if failure:
            break
    result.seconds = round(time.monotonic() - start, 1)
    result.cpu_seconds = round(_children_cpu_s() - cpu, 1)
    with log_path.open("a") as log:
        log.write(f"===== {stage.name} ({result.seconds} s)\n{output}\n")
    try:
        result.figures = stage.figures(output, work)
    except Exception as err:  # noqa: BLE001  a figure that does not parse is reported, not fatal
        result.figures = {"unparsed": f"{type(err).__name__}: {err}"}
        failure = failure or f"figures did not parse: {type(err).__name__}: {err}"
    result.status = "fail" if failure else "pass"
    result.reason = failure
    if failure:
        result.tail = output[-TAIL_CHARS:]
    return result


def _children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children so far (every stage's processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_report(out: Path, header: dict, results: list[StageResult]) -> None:
    """gpu-report.json (everything) and gpu-report.md (for people), rewritten after each stage."""
    env = next((r.figures for r in results if r.name == "environment" and r.status == "pass"), {})
    data = {**header, "environment": env, "stages": [asdict(r) for r in results]}
    (out / "gpu-report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = [f"# GPU check, {header['started']}", "",
             f"`{header['command']}`: device {header['device']}{', quick shapes' if header['quick'] else ''}, "
             f"budget {header['budget_s']} s, {header['wall_s']} s so far.", "", "## Environment", "",
             "| what | value |", "|---|---|"]
    for key, value in env.items():
        if key != "packages":
            lines.append(f"| {key} | {_cell(value)} |")
    lines += [f"| {name} | {_cell(version)} |" for name, version in env.get("packages", {}).items()]
    lines += ["", "## Stages", "", "| stage | result | seconds | CPU seconds | what |", "|---|---|---|---|---|"]
    for r in results:
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(f"| {r.name} | {_cell(status)} | {r.seconds} | {r.cpu_seconds} | {r.what} |")
    for r in results:
        if r.name == "environment" or r.status == "skipped":
            continue
        lines += ["", f"## {r.name}: {r.status} ({r.seconds} s)", ""]
        lines += [f"    {c}" for c in r.commands] + [""]
        lines += _figures_markdown(r.figures)
        if r.tail:
            lines += ["", "Output tail:", "", "```", r.tail.rstrip(), "```"]
    (out / "gpu-report.md").write_text("\n".join(lines) + "\n")


def _cell(value: object) -> str:
    """A Markdown table cell: one line, its bars escaped (test messages and import errors hold both)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _figures_markdown(figures: dict) -> list[str]:
    """A stage's figures as Markdown: lists of rows as tables, mappings as lists, the rest as lines."""
    lines: list[str] = []
    for key, value in figures.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            columns = list(value[0])
            lines += [f"{key}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in value]
            lines.append("")
        elif isinstance(value, dict) and value:
            lines += [f"{key}:", ""] + [f"- {k}: {v}" for k, v in value.items()] + [""]
        else:
            lines.append(f"- {key}: {value}")
    return lines


def run(out: Path, device: str, quick: bool, budget_s: float, work: Path | None) -> int:
    """Every stage, in order, within ``budget_s``; the report in ``out``. Exit code 0 when no
    stage failed (skipped ones do not fail the run)."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu-check.log"
    log_path.write_text("")
    started = time.monotonic()
    deadline = started + budget_s
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(SITE) if device == "cuda" else "",
                                                       os.environ.get("PYTHONPATH", "")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    header = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["tools/gpu_check.py", *sys.argv[1:]]), "device": device, "quick": quick,
              "budget_s": budget_s, "wall_s": 0.0}
    results: list[StageResult] = []
    try:
        for stage in stages(device, quick, work):
            if device == "cuda" and not stage.skip and _no_cuda(results):
                stage.skip = "--device cuda, but torch sees no CUDA device (environment stage)"
            result = run_stage(stage, env, deadline, work, log_path)
            results.append(result)
            header["wall_s"] = round(time.monotonic() - started, 1)
            write_report(out, header, results)
            print(f"[gpu_check] {result.name}: {result.status} {result.seconds} s {result.reason}".rstrip(), flush=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    cpu = sum(r.cpu_seconds for r in results)
    print(f"[gpu_check] {header['wall_s']} s in all ({cpu:.1f} CPU seconds); report: {out / 'gpu-report.md'}")
    return 1 if any(r.status == "fail" for r in results) else 0


def _no_cuda(results: list[StageResult]) -> bool:
    """Whether the environment stage ran and found no CUDA device: a GPU run would measure nothing."""
    env = next((r for r in results if r.name == "environment"), None)
    return env is not None and env.status == "pass" and "capability" not in env.figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="download the wheels the GPU image lacks (needs PyPI)")
    prep.add_argument("--kit", type=Path, default=KIT, help="the folder to fill and carry")
    go = verbs.add_parser("run", help="install the kit and run every stage; write the report to --out")
    go.add_argument("--out", type=Path, required=True, help="where gpu-report.md/.json and gpu-check.log go")
    go.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    go.add_argument("--quick", action="store_true", help="tiny shapes: minutes become seconds (CI: --device cpu)")
    go.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    go.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    verbs.add_parser("env", help="print the environment part of the report as JSON")
    args = parser.parse_args(argv)
    if args.verb == "prepare":
        return prepare(args.kit)
    if args.verb == "env":
        print(json.dumps(environment()))
        return 0
    return run(args.out, args.device, args.quick, args.budget, args.work)


if __name__ == "__main__":
    sys.exit(main())
