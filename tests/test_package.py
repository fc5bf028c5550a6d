"""A package a newcomer can read: its import graph, where imports sit, and what a fresh run prints.

The import graph is read from the source (ast), so a cycle fails here whether or not some
function-level import hides it at run time.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REPO

from goku_megatron.logs import setup_logging

PACKAGE = REPO / "goku_megatron"

# What may be imported inside a function: optional packages a CPU install lacks (GPU kernels, the
# data extra's DALI / transformers / diffusers, the resiliency launcher, the wandb extra), each
# behind a clean fallback; and megatron-core inside cpu_compat and patching (which cpu_compat
# imports), which goku_megatron/__init__.py imports before megatron-core is ever imported (its JIT
# hook must be in place first).
OPTIONAL = ("transformer_engine", "flash_attn", "nvidia.dali", "nvidia_resiliency_ext", "transformers",
            "diffusers", "wds2idx", "megatron.core.extensions.transformer_engine", "wandb")
ORDERED = {"goku_megatron/cpu_compat.py": ("megatron.core",), "goku_megatron/patching.py": ("megatron.core",)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, at the top of the file) for every import in ``path``; imports under
    ``if TYPE_CHECKING:`` count as top-level (they never run)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top |= {id(child) for child in ast.walk(node)}
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node, base, id(node) in top))
            # "from goku_megatron.data import dali" imports the module goku_megatron.data.dali
            found += [(node, f"{base}.{alias.name}", id(node) in top) for alias in node.names
                      if f"{base}.{alias.name}" in MODULES]
    return found


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for _, target, _ in _imports(path):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(MODULES):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_goku_megatron_is_acyclic():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a graph with a cycle is reported as one."""
    edges = {"goku_megatron.config": {"goku_megatron.planner"}, "goku_megatron.planner": {"goku_megatron.config"}}
    assert _find_cycle(edges) == ["goku_megatron.config", "goku_megatron.planner", "goku_megatron.config"]


def test_imports_inside_functions_are_only_for_optional_packages():
    """A file's top shows what it depends on: nothing of goku_megatron, torch or megatron-core is
    imported inside a function (except cpu_compat's and patching's megatron imports, see ORDERED)."""
    offenders = []
    for name, path in MODULES.items():
        rel = path.relative_to(REPO).as_posix()
        allowed = OPTIONAL + ORDERED.get(rel, ())
        for node, target, at_top in _imports(path):
            if not at_top and not any(target == a or target.startswith(a + ".") for a in allowed):
                offenders.append(f"{rel}:{node.lineno} imports {target}")
    assert not offenders, "\n".join(sorted(set(offenders)))


def test_library_modules_do_not_import_the_command_line():
    """Dependencies point one way: config -> batch/model/data -> training -> cli."""
    for name, path in MODULES.items():
        if not name.startswith("goku_megatron.cli"):
            assert not [t for _, t, _ in _imports(path) if t.startswith("goku_megatron.cli")], name


# ----------------------------------------------------------------------------------------------
# What a fresh toy run prints

LINE = re.compile(r"^\[\d\d:\d\d:\d\d rank0 (?P<logger>[\w.]+)\] (?P<message>.*)$")
# Before the first step's progress line only these are printed (issue 16): the data (including
# the toy dataset being written, on a fresh machine), the backends, the layout and run directory.
BEFORE_FIRST_STEP = ("data", "backends:", "layout:", "toy data", "step 1: stage", "decode:")


@pytest.fixture(scope="module")
def fresh_toy_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """``goku-train train.steps=2`` in an empty directory: the README's toy run, toy data included
    (a smaller dataset, same code path), as a user starts it."""
    cwd = tmp_path_factory.mktemp("fresh")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", "train.steps=2", "data.toy_clips=64",
           "train.global_batch_size=4", "train.micro_batch_size=4", "train.run_dir=run"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_a_fresh_toy_run_prints_no_megatron_dump_and_no_warning(fresh_toy_run):
    out = fresh_toy_run.stdout + fresh_toy_run.stderr
    assert fresh_toy_run.returncode == 0, out[-3000:]
    assert "Params for bucket" not in out and "Setting up optimizer with config" not in out, out[:3000]
    assert "Warning" not in out and "warnings.warn" not in out, out[:3000]
    assert fresh_toy_run.stderr == "", fresh_toy_run.stderr[:3000]


def test_every_line_names_its_logger_and_nothing_but_the_set_up_precedes_step_1(fresh_toy_run):
    lines = fresh_toy_run.stdout.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), "\n".join(line for line, m in zip(lines, parsed) if not m)
    first_step = next(i for i, m in enumerate(parsed) if m["message"].startswith("step 1/2 |"))
    before = [(m["logger"], m["message"]) for m in parsed[:first_step]]
    assert all(logger.startswith("goku_megatron.") for logger, _ in before), before
    assert all(message.startswith(BEFORE_FIRST_STEP) for _, message in before), before
    assert sum(message.startswith("backends:") for _, message in before) == 1
    backends = next(message for _, message in before if message.startswith("backends:"))
    # The one backends: line says what megatron-core's folded warnings would have said.
    assert "no Transformer Engine" in backends and "torch.optim.AdamW" in backends
    assert any(message.startswith("layout:") and "run dir run" in message for _, message in before)


# ----------------------------------------------------------------------------------------------
# The one logging setup


# Library notices in the words megatron-core 0.16.1 and torch 2.13 print them, with the module
# each is attributed to; logs.py must fold these and nothing else.
MEGATRON_NOTICES = [
    ("FutureWarning", "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
     "instead.", "megatron.core.dist_checkpointing.strategies.torch"),
    ("FutureWarning", "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
     "`torch.distributed.reduce_scatter_single` instead.", "torch.distributed.c10d_logger"),
    ("FutureWarning", "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
     "`torch.distributed.all_gather_single` instead.", "torch.distributed.c10d_logger"),
    ("UserWarning", "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
     "attribute won't be populated during autograd.backward().", "megatron.core.optimizer.optimizer"),
]


def test_megatrons_notices_are_folded_and_other_warnings_still_show():
    """In a fresh interpreter: importing goku_megatron installs the filters, then megatron-core's
    import-time fallback notices and the notices its own code raises are dropped, while another
    UserWarning, and megatron's checkpoint-loader deprecation and the non-leaf .grad warning
    raised from user code, still reach the log."""
    code = [
        "import warnings, goku_megatron",
        "from goku_megatron.logs import setup_logging",
        "setup_logging(rank=0)",
        "warnings.warn('Transformer Engine and Apex are not installed. Falling back to Torch optimizers.')",
        "warnings.warn('Apex is not installed. Falling back to Torch Norm')",
        "warnings.warn('something else entirely')",
    ]
    for i, (category, message, module) in enumerate(MEGATRON_NOTICES):
        code.append(f"warnings.warn_explicit({message + f' [library {i}]'!r}, {category}, 'lib.py', {i + 1}, "
                    f"module={module!r})")
    for i in (0, 3):  # attributed to megatron's module above; from user code they still show
        category, message, _ = MEGATRON_NOTICES[i]
        code.append(f"warnings.warn_explicit({message + f' [user {i}]'!r}, {category}, 'mine.py', {i + 1}, "
                    "module='mine')")
    proc = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Falling back" not in output and "[library" not in output, output
    assert "py.warnings" in proc.stdout and "something else entirely" in proc.stdout
    assert "[user 0]" in proc.stdout and "[user 3]" in proc.stdout


def test_setup_logging_levels(capsys):

    setup_logging(rank=0)  # conftest's _logging_as_found puts logging back afterwards
    logging.getLogger("goku_megatron.train").info("goku info")
    logging.getLogger("megatron.core.distributed").info("megatron info")
    logging.getLogger("megatron.core.distributed").warning("megatron warning")
    setup_logging(rank=1)
    logging.getLogger("goku_megatron.train").info("rank 1 info")
    logging.getLogger("goku_megatron.train").warning("rank 1 warning")
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("rank0 goku_megatron.train] goku info")
    assert [line.split("] ", 1)[1] for line in out] == ["goku info", "megatron warning", "rank 1 warning"]
    assert "rank0 megatron.core.distributed]" in out[1] and "rank1 goku_megatron.train]" in out[2]
