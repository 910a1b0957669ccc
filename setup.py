"""mhc-aot build: `build_ext` compiles the kernels ahead of time (build_tools/) and the pybind11 shim."""

import os
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import build_tools  # noqa: E402  (the repo's own build package)

VERSION = "0.1.0"
MLX_VERSION = "0.32.4"  # exact: the shim and kernels are built and tested against it


class BuildExt(build_ext):
    """Compile kernels into mhc_aot/kernels (of the build tree, or in place), then the shim."""

    def run(self):
        pkg = ROOT / "mhc_aot" if self.inplace else Path(self.build_lib) / "mhc_aot"
        build_tools.build_all(pkg / "kernels", Path(self.build_temp) / "kernel-cache", VERSION, MLX_VERSION)
        super().run()


setup(
    name="mhc-aot",
    version=VERSION,
    description="Manifold-Constrained Hyper-Connections for MLX with ahead-of-time compiled CUDA and Metal kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mhc_aot", "mhc_aot.cli", "mhc_aot.kernels"],
    package_dir={"mhc_aot.cli": "cli"},
    package_data={"mhc_aot.kernels": ["manifest.json", "cuda/*", "*.metallib"]},
    ext_modules=[Pybind11Extension("mhc_aot._shim", ["mhc_aot/_shim/shim.cpp"], cxx_std=17)],
    cmdclass={"build_ext": BuildExt},
    install_requires=[f"mlx=={MLX_VERSION}", "typer>=0.12,<0.30", "rich>=13"],
    extras_require={
        "cpu": [f"mlx[cpu]=={MLX_VERSION}"],
        "cuda": [f"mlx[cuda13]=={MLX_VERSION}"],
        "test": ["pytest>=8", "numpy>=1.26", "mhc-mlx==0.6.3"],
        "plot": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["mhc=mhc_aot.cli.main:main"]},
    zip_safe=False,
)
