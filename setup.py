"""mhc-aot build: `build_ext` compiles the kernels ahead of time (build_tools/) and the pybind11 shim."""

import importlib.util
import os
import platform
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


SHIM_SOURCES = ["mhc_aot/_shim/shim.cpp", "mhc_aot/_shim/cuda_driver.cpp", "mhc_aot/_shim/metal_preload.cpp",
                "mhc_aot/_shim/nvtx.cpp"]


def _nvtx_include() -> Path | None:
    """The CUDA toolkit's include dir when it has NVTX v3 (header-only): next to nvcc (NVCC or PATH),
    under CUDA_HOME / CUDA_PATH or /usr/local/cuda. Linux only: the ranges are for Nsight tools."""
    if platform.system() != "Linux":
        return None
    import shutil

    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots += [Path(os.environ[k]) for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    roots.append(Path("/usr/local/cuda"))  # the toolkit's default prefix (nvcc on PATH may be a wrapper)
    for root in roots:
        if (root / "include/nvtx3/nvToolsExt.h").exists():
            return root / "include"
    return None


def _mlx_metal_sdk() -> Path | None:
    """The installed MLX's C++ SDK dir (include/ with metal_cpp, lib/libmlx.dylib) on macOS, else None.
    Found without importing mlx; present when mlx-metal is installed in the build environment."""
    if platform.system() != "Darwin":
        return None
    spec = importlib.util.find_spec("mlx")
    for base in (spec.submodule_search_locations or []) if spec else []:
        base = Path(base)
        if ((base / "include/mlx/backend/metal/device.h").exists() and (base / "include/metal_cpp").is_dir()
                and (base / "lib/libmlx.dylib").exists()):
            return base
    return None


def _shim(with_mlx: Path | None, no_preload_reason: str = "") -> Pybind11Extension:
    """The pybind11 shim. On macOS with MLX's SDK it links libmlx (as MLX's own extension helper
    does: C++20, -D_METAL_, rpath @loader_path/../mlx/lib) to preload mhc_aot.metallib."""
    flags = "-O2"
    kw: dict = {"cxx_std": 17, "extra_compile_args": ["-O2"], "define_macros": []}
    if with_mlx is not None:
        kw["cxx_std"] = 20
        kw["include_dirs"] = [str(with_mlx / "include"), str(with_mlx / "include/metal_cpp")]
        kw["library_dirs"] = [str(with_mlx / "lib")]
        kw["libraries"] = ["mlx"]
        kw["define_macros"] += [("MHC_AOT_WITH_MLX_METAL", "1"), ("_METAL_", None), ("ACCELERATE_NEW_LAPACK", None)]
        # installed next to mlx in site-packages first; the build-time MLX for in-place/editable builds
        kw["extra_link_args"] = ["-Wl,-rpath,@loader_path/../mlx/lib", f"-Wl,-rpath,{with_mlx / 'lib'}",
                                 "-framework", "Metal", "-framework", "Foundation"]
        flags += " -std=c++20 -DMHC_AOT_WITH_MLX_METAL (libmlx " + str(with_mlx / "lib") + ")"
    else:
        flags += f" -std=c++{kw['cxx_std']}"
    nvtx = _nvtx_include()
    if nvtx is not None:
        kw.setdefault("include_dirs", []).append(str(nvtx))
        kw["define_macros"].append(("MHC_AOT_HAVE_NVTX", "1"))
        kw["libraries"] = [*kw.get("libraries", []), "dl"]  # NVTX v3 dlopens a profiler's injection library
        flags += " -DMHC_AOT_HAVE_NVTX"
    kw["define_macros"].append(("MHC_AOT_SHIM_FLAGS", '"' + flags + '"'))
    if no_preload_reason:
        kw["define_macros"].append(("MHC_AOT_NO_PRELOAD_REASON", '"' + no_preload_reason.replace('"', "'") + '"'))
    return Pybind11Extension("mhc_aot._shim", SHIM_SOURCES, **kw)


class BuildExt(build_ext):
    """Compile kernels into mhc_aot/kernels (of the build tree, or in place), then the shim."""

    def run(self):
        pkg = ROOT / "mhc_aot" if self.inplace else Path(self.build_lib) / "mhc_aot"
        build_tools.build_all(pkg / "kernels", Path(self.build_temp) / "kernel-cache", VERSION, MLX_VERSION)
        super().run()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # the MLX-linked shim (macOS) is never a reason for a failed install
            if not any(m[0] == "MHC_AOT_WITH_MLX_METAL" for m in ext.define_macros):
                raise
            print(f"mhc-aot: building the shim against MLX's C++ SDK failed ({e}); building it without the "
                  "Metal preload (mhc_aot._shim.build_info() says so)")
            plain = _shim(None, f"building the shim against MLX's C++ SDK failed: {str(e)[:200]}")
            ext.__dict__.update(plain.__dict__)
            super().build_extension(ext)


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
    ext_modules=[_shim(_mlx_metal_sdk())],
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
