"""The README's Python examples run as printed (issue 6 asks for a dynamic-layer example that does):
each ```python block executed on its own, in a fresh namespace, on whatever device MLX has here,
then its results checked against what the block's comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(marker: str) -> tuple[dict, str]:
    """The one README block that contains `marker`, executed; its namespace and what it printed."""
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    ns: dict = {"__name__": "readme_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(found[0], f"README.md ({marker})", "exec"), ns)
    return ns, out.getvalue()


def test_readme_quick_start_runs_as_printed():
    ns, printed = _run("MHCLayer(n=4, C=256)")
    x, y, grads, z, M = (ns[k] for k in ("x", "y", "grads", "z", "M"))
    assert y.shape == x.shape == (2, 16, 4, 256) and y.dtype == x.dtype  # "same shape and dtype as x"
    assert grads.shape == x.shape
    assert z.shape == (8, 512) and M.shape == (4, 4)
    assert printed.strip() == "(2, 16, 4, 256) (8, 512) (4, 4)"


def test_readme_dynamic_example_runs_as_printed():
    ns, printed = _run("DynamicMHC(")
    y, state = ns["y"], ns["state"]
    assert y.shape == (8, 4, 256)
    assert {"phi", "b", "alpha_pre", "alpha_post", "alpha_res"} <= set(state)  # LigerMHC's key names
    assert printed.strip() == "(8, 4, 256) ['alpha_post', 'alpha_pre', 'alpha_res', 'b']"
