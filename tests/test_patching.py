"""The rules every megatron-core patch follows (goku_megatron/patching.py): one pinned version,
and a one-line RuntimeError naming the goku module to update when the patched thing is gone."""

from __future__ import annotations

import sys
import types

import pytest

from goku_megatron import patching
from goku_megatron.config import ConfigError


def test_installed_megatron_core_is_the_pinned_version():
    from megatron.core import package_info

    assert package_info.__version__ == patching.MEGATRON_CORE_VERSION
    patching.check_version()


def test_check_version_refuses_other_megatron_core(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(ConfigError) as err:  # a fault in the user's environment: one line, exit 2
        patching.check_version()
    msg = str(err.value)
    assert patching.MEGATRON_CORE_VERSION in msg and "0.17.0" in msg
    assert f"megatron-core=={patching.MEGATRON_CORE_VERSION}" in msg  # the fix: pin back...
    assert "tests/test_cpu_compat.py" in msg  # ...or update the patches and re-run their tests


class _Owner:
    def method(self):
        return "megatron's"


def _wrapper(original):
    def wrapped(self):
        return "goku's, around " + original(self)

    return wrapped


def test_wrap_method_wraps_once_and_keeps_the_original(monkeypatch):
    monkeypatch.setattr(_Owner, "method", _Owner.__dict__["method"])
    patching.wrap_method(_Owner, "method", _wrapper)
    patching.wrap_method(_Owner, "method", _wrapper)  # idempotent: not wrapped twice
    assert _Owner().method() == "goku's, around megatron's"
    assert _Owner.__dict__["method"].__wrapped__(_Owner()) == "megatron's"


def test_a_vanished_target_names_the_module_to_update(monkeypatch):
    """The message names the file of the module that defines the patch (here this test file)."""
    module = types.ModuleType("megatron_like")
    monkeypatch.setitem(sys.modules, "megatron_like", module)
    with pytest.raises(RuntimeError, match=r"^megatron_like.gone is gone; update test_patching.py "):
        patching.patch_attr("megatron_like", "gone", _wrapper)
    with pytest.raises(RuntimeError, match=r"_Owner.gone is gone; update test_patching.py "):
        patching.wrap_method(_Owner, "gone", _wrapper)
