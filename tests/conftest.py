"""Shared fixtures: a one-process megatron world (gloo, TP=PP=1), a torchrun launcher, and the
rule that makes every test independent of the others: a test gets the process-group state it asks
for (``megatron_world``, or none at all) and fails if it leaves that state changed. So a test
passes alone, by file, in any ``-k`` selection and in reverse order (``--reverse``)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import goku_megatron  # noqa: F401  before megatron-core: cpu_compat.disable_jit_fuser_on_cpu
from numerics import assert_close_to_scale

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_goku.py


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true",
                     help="run the selected tests in reverse order: each builds the state it needs, so any order passes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def _logging_as_found():
    """Commands run in-process (goku_megatron.cli.*.main) call logs.setup_logging; logging is put
    back after each test, so one test's set-up does not change what the next one captures."""
    root, goku = logging.getLogger(), logging.getLogger("goku_megatron")
    handlers, root_level, goku_level = root.handlers[:], root.level, goku.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    goku.setLevel(goku_level)
    logging.captureWarnings(False)


def one_process_world() -> None:
    """torch.distributed + megatron parallel_state for one process, as goku-train sets them up;
    kept when intact, built again when missing or half torn down. For module-scoped fixtures that
    build or train something once; a test asks for ``megatron_world`` instead."""
    from goku_megatron import cpu_compat
    from goku_megatron.config import Config
    from goku_megatron.platform import choose_backends, init_distributed, shutdown_distributed

    cpu_compat.apply()
    if not _one_process_world_is_intact():
        shutdown_distributed()
        cfg = Config()
        init_distributed(cfg, choose_backends(cfg))


def _one_process_world_is_intact() -> bool:
    from megatron.core import parallel_state

    return (torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
            and parallel_state.model_parallel_is_initialized()
            and _live_groups(parallel_state.get_context_parallel_group(check_initialized=False)) != ())


def _live_groups(value: object) -> tuple[int, ...]:
    """The ids of the live process groups in ``value`` (a group, or a list or dict of them)."""
    if isinstance(value, torch.distributed.ProcessGroup):
        return (id(value),) if value in torch.distributed.distributed_c10d._world.pg_map else ()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return tuple(i for v in value for i in _live_groups(v))
    return ()


def _world_state() -> tuple:
    """What a test must leave as it found it: torch.distributed's default group, and megatron's
    parallel_state: its live process groups (by identity), memory buffers and size/rank settings.
    Groups destroyed with their world do not count: megatron's destroy_model_parallel leaves
    some of them (and rank lists) behind, where a fresh import has none."""
    world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    megatron = sys.modules.get("megatron.core.parallel_state")  # never imported: nothing to change
    state = []
    for name, value in sorted(vars(megatron).items()) if megatron else ():
        if not (name.startswith("_") and name.isupper()) or value is None:
            continue
        if isinstance(value, (int, float, str)):
            state.append((name, value))
        elif not isinstance(value, (list, tuple, dict, torch.distributed.ProcessGroup)):
            state.append((name, id(value)))
        elif groups := _live_groups(value):
            state.append((name, groups))
    return (None if world is None else id(world)), tuple(state)


def _left_changed(request: pytest.FixtureRequest, what: str) -> None:
    """Fail the test that changed the process-group state, after tearing it down, so the next test
    starts from a known state and the failure stays with the test that caused it."""
    from goku_megatron.platform import shutdown_distributed

    shutdown_distributed()
    pytest.fail(f"{request.node.nodeid} {what}: build and tear down process groups in a fixture (tests/conftest.py)",
                pytrace=False)


@pytest.fixture(autouse=True)
def _no_process_group_unless_asked(request):
    """A test that does not ask for ``megatron_world`` runs without torch.distributed or megatron
    state (an earlier test's world is torn down first) and must leave none behind: so no test
    passes only after another one, in any selection or order."""
    if "megatron_world" in request.fixturenames:
        yield
        return
    if torch.distributed.is_initialized() or "megatron.core.parallel_state" in sys.modules:
        from goku_megatron.platform import shutdown_distributed

        shutdown_distributed()
    found = _world_state()
    yield
    if _world_state() != found:
        _left_changed(request, "left torch.distributed or megatron parallel_state behind")


@pytest.fixture
def megatron_world(request):
    """torch.distributed + megatron parallel_state for one process, as goku-train sets them up
    (kept from the test before when intact), host RNGs and megatron's RNG tracker seeded. The
    test must leave the world as it found it."""
    from goku_megatron.platform import seed_everything

    one_process_world()
    seed_everything(0)
    found = _world_state()
    yield
    if _world_state() != found:
        _left_changed(request, "changed the megatron_world it was given (tore down or rebuilt its groups)")


@functools.cache
def script_module(path: Path):
    """A script of benchmarks/ or tools/ as a module, loaded once (and registered, so that its
    dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_stage(cfg):
    """A whole (TP=PP=1) model for cfg, initialised and typed as goku-train builds it."""
    from goku_megatron.model.build import build_stage as build, build_transformer_config
    from goku_megatron.platform import choose_backends

    backends = choose_backends(cfg)
    return build(cfg, backends, build_transformer_config(cfg, backends), cfg.train.seed)


def backward_nodes(output: torch.Tensor, name: str) -> list[str]:
    """Names of the nodes of ``output``'s autograd graph that contain ``name`` (e.g. "Index": a
    gather whose backward is a scatter, IndexBackward0 / IndexPutBackward0)."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            found.append(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return found


def run_torchrun(nproc: int, module_args: list[str], timeout: int = 600, env: dict | None = None) -> str:
    """Run ``torchrun --nproc-per-node nproc -m ...`` on CPU; fail the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", *module_args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=run_env)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_equivalence(tmp_path_factory, name: str, nproc: int, overrides: list[str]) -> dict:
    """tests/dist_equivalence.py under torchrun: its record (losses, grad norms), both steps' full
    gradients and the final weights by global name (merged over pipeline stages), and its dir."""
    out = tmp_path_factory.mktemp(name)
    run_torchrun(nproc, [str(Path(__file__).with_name("dist_equivalence.py")), str(out), *overrides])
    merged: dict = {"record": torch.load(out / "record.pt"), "dir": out}
    for kind in ("grads1", "grads2", "weights"):
        merged[kind] = {}
        for path in sorted(out.glob(f"{kind}_pp*.pt")):
            merged[kind].update(torch.load(path))
    return merged


# Another layout computes the same sums in another order (split over TP/CP ranks, reduced over DP,
# handed between PP stages), so results agree to rounding relative to each tensor's scale: the loss
# and grad norm to a few tens of ulps; gradients, summed over more terms, and weights after two
# Adam steps (which divide by the square root of the squared gradients) to a few hundred.
LOSS_ULPS, GRAD_ULPS, WEIGHT_ULPS = 64, 512, 512


def assert_same_run(rec: dict, ref_rec: dict, got: dict, ref: dict, weights_plus: float = 0.0) -> None:
    """Losses, grad norms, both steps' gradients and the final weights of a layout equal the
    reference's; ``weights_plus``: an allowance on the weights that does not scale with them."""
    assert len(rec["loss"]) == len(ref_rec["loss"]) == 2
    for key in ("loss", "grad_norm"):
        for value, expected in zip(rec[key], ref_rec[key]):
            assert_close_to_scale(torch.tensor(value), torch.tensor(expected), ulps=LOSS_ULPS, msg=key)
    for kind in ("grads1", "grads2", "weights"):
        assert got[kind].keys() == ref[kind].keys(), kind
        for name, value in ref[kind].items():
            weights = kind == "weights"
            assert_close_to_scale(got[kind][name], value, ulps=WEIGHT_ULPS if weights else GRAD_ULPS,
                                  msg=f"{kind} {name}", plus=weights_plus if weights else 0.0)


def layout_runner(tmp_path_factory, layouts: dict[str, tuple[int, list[str]]], prefix: str = ""):
    """``run(name)``: the equivalence run of ``layouts[name]`` (processes, overrides), run once for
    every test that inspects it."""
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            nproc, overrides = layouts[name]
            done[name] = run_equivalence(tmp_path_factory, prefix + name, nproc, overrides)
        return done[name]

    return run


# FSDP (megatron's FSDP2 wrapper) in place of megatron DDP and the distributed optimizer.
FSDP = ["parallel.fsdp=true", "optim.distributed_optimizer=false"]

# Checkpoint and restart tests (test_checkpoint*.py, test_resilience.py): the toy recipe, shrunk.
TOY_CHECKPOINT_RUN = ["model.hidden_size=64", "model.ffn_hidden_size=256", "data.toy_clips=32",
                      "data.toy_images=0", "train.global_batch_size=8", "train.micro_batch_size=2",
                      "train.log_interval=1", "optim.warmup_steps=2", "train.steps=6",
                      "optim.distributed_optimizer=true",  # the toy recipe turns it off for speed
                      "data.workers=2"]  # read-ahead, whatever the machine's core count


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The toy dataset of TOY_CHECKPOINT_RUN, made once (goku-train would rebuild it if its
    parameters differed)."""
    from goku_megatron.config import load_config
    from goku_megatron.data.toy import ensure_toy_dataset

    path = tmp_path_factory.mktemp("toy-data")
    d = load_config("toy", TOY_CHECKPOINT_RUN).data
    ensure_toy_dataset(path, clips=d.toy_clips, images=d.toy_images, size=d.toy_size, frames=d.toy_frames,
                       seed=load_config("toy", TOY_CHECKPOINT_RUN).train.seed)
    return path


# A bf16 toy run end to end (tests/test_bf16.py on CPU, tests/test_gpu.py on a GPU): TOY_CHECKPOINT_RUN
# in bf16 for BF16_TOY_STEPS steps, saving every BF16_TOY_SAVE, sampling one prompt at the end.
BF16 = "train.precision=bf16"
BF16_TOY_STEPS, BF16_TOY_SAVE = 12, 6
QUIET_ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def bf16_toy_cmd(toy_data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """goku-train's command line for the bf16 toy run in ``run_dir``."""
    return [sys.executable, "-m", "goku_megatron.cli.train", *TOY_CHECKPOINT_RUN, BF16, f"data.path={toy_data}",
            f"train.run_dir={run_dir}", f"train.steps={BF16_TOY_STEPS}", f"train.save_interval={BF16_TOY_SAVE}",
            f"train.sample_interval={BF16_TOY_STEPS}", "train.sample_prompts=[a red square moving right]",
            "flow.sample_steps=2", *overrides]
