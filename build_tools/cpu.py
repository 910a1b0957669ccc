"""Host toolchain facts (the C++ compiler that builds the pybind11 shim), for the manifest."""

from __future__ import annotations

import platform
import sysconfig


def facts() -> dict:
    return {"found": True, "compiler": sysconfig.get_config_var("CXX") or "c++",
            "python": platform.python_version(), "machine": platform.machine(), "os": platform.system()}
