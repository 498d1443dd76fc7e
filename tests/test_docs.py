"""The documents: every public name in the API reference, every example run or marked.

The manual's examples run as ``testcode`` blocks (``make doctest``, on the
host backend); an example shown as a plain ``python`` block must say on its
first line that it needs a GPU. The README's examples run here, on the host
backend, unless they say the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cupystreams

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GPU_MARK = "# needs a GPU"
# A fenced block: its info string and its text.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    return [text for info, text in FENCE.findall(path.read_text()) if info.strip() == "python"]


def test_the_api_reference_documents_every_public_name() -> None:
    reference = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: cupystreams\.(\w+)", reference, re.MULTILINE))
    assert set(cupystreams.__all__) <= documented, set(cupystreams.__all__) - documented
    for module in ("pipeline", "testing", "adapters.torch", "adapters.jax", "adapters.numba"):
        assert f".. automodule:: cupystreams.{module}\n" in reference, module


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_example_of_the_manual_runs_or_says_it_needs_a_gpu(page: str) -> None:
    for block in python_blocks(DOCS / page):
        assert block.startswith(GPU_MARK), (
            f"{page}: make this example a testcode block (run by make doctest), "
            f"or start it with {GPU_MARK!r}:\n{block}"
        )


def test_the_readme_examples_run_on_the_host_backend(tmp_path: Path) -> None:
    """The README's unmarked examples, in order, in one fresh interpreter."""
    blocks = python_blocks(ROOT / "README.md")
    runnable = [block for block in blocks if not block.startswith(GPU_MARK)]
    assert runnable and len(runnable) < len(blocks), "the README shows both kinds"
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(runnable))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "CUPYSTREAMS_BACKEND": "host"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
