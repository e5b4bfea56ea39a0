"""Every ```python block of README.md runs, in order, in one namespace (later blocks use earlier names)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5, "README.md lost its API tour code blocks"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from jaxlab.training import METHODS

    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    before = dict(METHODS)
    try:
        _run_blocks()
    finally:  # methods the README registers do not leak into other tests (the contract suite counts them)
        METHODS.clear()
        METHODS.update(before)


def _run_blocks():
    # a real module, so dataclasses (flax Modules) defined in a block can find their module
    module = types.ModuleType("readme_blocks")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block, not just the line
            pytest.fail(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n---\n{block}")
