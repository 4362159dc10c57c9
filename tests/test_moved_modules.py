"""The modules the layout moved still import under their earlier paths, for one release: the
same module object, with a DeprecationWarning that names the new path."""

from __future__ import annotations

import importlib
import sys

import pytest

from engram_core._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_earlier_path_is_the_moved_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_every_new_path_exists_and_no_old_file_is_left():
    from pathlib import Path

    root = Path(importlib.import_module("engram_core").__file__).parent.parent
    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
        stale = root.joinpath(*old.split("."))
        assert not stale.with_suffix(".py").exists() and not (stale / "__init__.py").exists(), old
