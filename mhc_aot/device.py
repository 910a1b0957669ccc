"""Facts about the GPU that the launchers and the dispatcher size work by.

The SM count sizes the backward's grid (two CTAs per SM). It comes from the shim's CUDA driver
query when that is available; otherwise DEFAULT_SM_COUNT (the H100 SXM's 132) is used, which
only changes how work is split, never the result.
"""

from __future__ import annotations

import functools

DEFAULT_SM_COUNT = 132


@functools.lru_cache(maxsize=1)
def cuda_facts() -> dict:
    """The shim's CUDA device facts, or {'available': False, 'reason': ...}."""
    try:
        from . import _shim
    except ImportError as e:  # the package was installed without its native shim
        return {"available": False, "reason": f"mhc_aot._shim not importable: {e}"}
    if not hasattr(_shim, "cuda_device_facts"):
        return {"available": False, "reason": "this build of the shim has no CUDA driver query"}
    return dict(_shim.cuda_device_facts())


def sm_count() -> int:
    facts = cuda_facts()
    return int(facts.get("sm_count") or DEFAULT_SM_COUNT) if facts.get("available") else DEFAULT_SM_COUNT
