"""The rule tests/conftest.py sets for every test, checked on tests that break it: a test that
uses a process group without asking for ``megatron_world`` fails wherever it runs (not only after
a test that happened to leave one), and one that changes the world it was given fails at its
teardown, naming itself, while the tests after it still get a sound world."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

BREAKERS = '''
import torch
from megatron.core import parallel_state


def test_a_world(megatron_world):
    assert parallel_state.get_data_parallel_world_size() == 1


def test_leans_on_the_world_before_it():
    parallel_state.get_data_parallel_group()


def test_tears_down_its_world(megatron_world):
    torch.distributed.destroy_process_group()


def test_after_a_torn_down_world(megatron_world):
    assert parallel_state.get_data_parallel_world_size() == 1
'''


def test_a_test_that_leans_on_or_breaks_shared_state_fails(tmp_path):
    (tmp_path / "test_breakers.py").write_text(BREAKERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-c", os.devnull, "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", "-q", "-rA", str(tmp_path / "test_breakers.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    report = proc.stdout
    assert "PASSED test_breakers.py::test_a_world" in report, report[-3000:]
    assert "FAILED test_breakers.py::test_leans_on_the_world_before_it - AssertionError: data parallel group " \
           "is not initialized" in report, report[-3000:]
    assert ("ERROR test_breakers.py::test_tears_down_its_world - Failed: test_breakers.py::test_tears_down_its_world "
            "changed the megatron_world it was given") in report, report[-3000:]
    assert "PASSED test_breakers.py::test_after_a_torn_down_world" in report, report[-3000:]
