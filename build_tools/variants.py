"""The one KernelVariant table: drives the CUDA and Metal builds, the manifest, the loader's checks
and `mhc info`. Pure Python with no dependencies, so it runs inside pip's isolated build.

Each kernel source (`cuda_src/<source>.cu`, `metal_src/<source>.metal`) is a template compiled
once per variant with macros MHC_NAME, MHC_DTYPE (f32 / f16 / bf16) and MHC_NMAX (compile-time
upper bound on n; 0 = generic loop). A kernel with NMAX serves every n <= NMAX; n above the
largest NMAX takes the generic kernel (NMAX 0) of the same source, so any n and C run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPES = ("f32", "f16", "bf16")
NMAX_VALUES = (2, 4, 8, 16, 32, 64)  # DESIGN.md section 4
RESIDENT_NMAX = (2, 4)  # strategy `resident` (CUDA): a token's streams held on chip
CLUSTER_NMAX = (16, 32)  # strategy `cluster` (CUDA, bfloat16): n equal to NMAX, tensor-core tiles of 16
# strategy `ring`'s forward (cuda_src/mhc_forward_ring.cu, MHC_RING_UNITS): 16-column groups a warp
# streams as one ring slot; the launcher takes the widest that C allows (C % (256 units) == 0)
RING_UNITS = (1, 2, 4)


@dataclass(frozen=True)
class KernelVariant:
    op: str  # Python op it serves: sinkhorn, mhc_forward, mhc_backward, stream_mix_add
    source: str  # file stem in cuda_src/ and metal_src/
    strategy: str  # dispatch strategy name
    dtype: str | None  # None: float32 parameters only (Sinkhorn)
    nmax: int  # 0 = generic n
    min_arch: int = 0  # oldest SM it is built for (90: thread block clusters); 0 = every listed arch
    # True: built for exactly min_arch with its arch-specific features (sm_90a: TMA's tensormap.replace),
    # one cubin shipped under tag sm_<min_arch> and no PTX (nothing newer could run it)
    arch_exact: bool = False
    units: int = 1  # the forward ring's groups a slot (MHC_RING_UNITS; 1: the macro left undefined)
    # phi's bfloat16 terms in the projection's products (MHC_PHI_TERMS: proj_tc, coeffs_pre): 1 for a
    # phi that is bfloat16 already;
    # 3 (the source's default, a float32 phi; the macro left undefined) for every other variant
    terms: int = 3

    @property
    def name(self) -> str:
        parts = [self.source]
        if self.dtype:
            parts.append(self.dtype)
        if self.nmax:
            parts.append(f"n{self.nmax}")
        if self.units > 1:
            parts.append(f"u{self.units}")
        if self.terms != 3:
            parts.append(f"t{self.terms}")
        return "_".join(parts)

    def defines(self) -> dict[str, str]:
        d = {"MHC_NAME": self.name, "MHC_DTYPE": self.dtype or "f32", "MHC_NMAX": str(self.nmax)}
        if self.units > 1:
            d["MHC_RING_UNITS"] = str(self.units)
        if self.terms != 3:
            d["MHC_PHI_TERMS"] = str(self.terms)
        return d

    def row(self) -> dict:
        return {**asdict(self), "name": self.name}


def _table() -> tuple[KernelVariant, ...]:
    v = [
        KernelVariant("sinkhorn", "mhc_sinkhorn_fwd", "sinkhorn", None, 0),
        KernelVariant("sinkhorn", "mhc_sinkhorn_bwd", "sinkhorn", None, 0),
    ]
    for dt in DTYPES:
        for nmax in NMAX_VALUES + (0,):
            v.append(KernelVariant("mhc_forward", "mhc_forward_fused", "fused", dt, nmax))
            v.append(KernelVariant("mhc_backward", "mhc_backward_fused", "fused", dt, nmax))
            v.append(KernelVariant("stream_mix_add", "mhc_stream_mix_add", "mix_add", dt, nmax))
        for nmax in RESIDENT_NMAX:  # CUDA only (no metal_src twin): n <= 4, each token held on chip
            v.append(KernelVariant("mhc_forward", "mhc_forward_resident", "resident", dt, nmax))
            v.append(KernelVariant("mhc_backward", "mhc_backward_resident", "resident", dt, nmax))
        v.append(KernelVariant("mhc_forward", "mhc_forward_column_rms", "column", dt, 0))
        v.append(KernelVariant("mhc_forward", "mhc_forward_column", "column", dt, 0))
        v.append(KernelVariant("mhc_backward", "mhc_backward_dm", "fused", dt, 0))
    for nmax in CLUSTER_NMAX:  # CUDA sm_90+ only (no metal_src twin): a cluster of CTAs per token
        v.append(KernelVariant("mhc_forward", "mhc_forward_cluster", "cluster", "bf16", nmax, min_arch=90))
    for nmax in CLUSTER_NMAX:  # CUDA only (no metal_src twin): a persistent CTA per SM, a ring per warp
        for units in RING_UNITS:
            v.append(KernelVariant("mhc_forward", "mhc_forward_ring", "ring", "bf16", nmax, units=units))
    for nmax in CLUSTER_NMAX:  # CUDA only (no metal_src twin): dM on tensor cores (bfloat16, n == NMAX)
        v.append(KernelVariant("mhc_backward", "mhc_backward_dm_tc", "fused", "bf16", nmax))
    for nmax in CLUSTER_NMAX:  # CUDA only (no metal_src twin): the backward's ring (bfloat16, n == NMAX)
        v.append(KernelVariant("mhc_backward", "mhc_backward_ring", "ring", "bf16", nmax))
    # dtype-independent: sums the backward's per-CTA partials, applies the activations' derivatives
    v.append(KernelVariant("mhc_backward", "mhc_backward_reduce", "fused", None, 0))
    v += _dynamic_variants()  # dynamic mHC (issue 6): see _dynamic_variants below
    return tuple(v)


# ---------------------------------------------------------------- dynamic mHC (issue 6)
# cuda_src/mhc_dynamic_*.cu. Compile-time n = 4 (the paper's and the benchmark's) where
# registers hold a token's streams, plus the generic-n kernel; the GEMM-like kernels
# (skinny, dx) and the reduce do not depend on n.
DYNAMIC_NMAX = (4, 0)


def _dynamic_variants() -> list[KernelVariant]:
    v = [KernelVariant("mhc_coeffs", "mhc_dynamic_colsum", "fused", None, 0),
         KernelVariant("mhc_coeffs", "mhc_dynamic_phi_split", "fused", None, 0),  # proj_tc's B fragments
         KernelVariant("mhc_coeffs", "mhc_dynamic_proj_tc", "fused", "bf16", 0),  # tensor cores: bfloat16 x
         KernelVariant("mhc_coeffs", "mhc_dynamic_proj_tc", "fused", "bf16", 0, terms=1),  # ... and bfloat16 phi
         KernelVariant("mhc_coeffs", "mhc_dynamic_dphi_tc", "fused", "bf16", 0),
         # coefficients + x_in reading x once (bfloat16, n <= 4): a persistent grid, column-owned phi,
         # tiles moved by TMA (sm_90a)
         KernelVariant("mhc_coeffs", "mhc_dynamic_coeffs_pre", "fused", "bf16", 4, min_arch=90, arch_exact=True),
         KernelVariant("mhc_coeffs", "mhc_dynamic_coeffs_pre", "fused", "bf16", 4, min_arch=90, arch_exact=True,
                       terms=1),  # ... and bfloat16 phi
         KernelVariant("mhc_coeffs", "mhc_dynamic_proj_cluster", "fused", "bf16", 4, min_arch=90, arch_exact=True)]
    for dt in DTYPES:
        for src in ("mhc_dynamic_skinny", "mhc_dynamic_dx"):
            v.append(KernelVariant("mhc_coeffs", src, "fused", dt, 0))
        v.append(KernelVariant("mhc_pre", "mhc_dynamic_pre_bwd", "fused", dt, 0))
        # few tokens, n <= 4: a CTA per token projects it itself, phi read in its own dtype (one launch)
        v.append(KernelVariant("mhc_coeffs", "mhc_dynamic_coeffs_proj", "fused", dt, 4))
        for nmax in DYNAMIC_NMAX:
            v.append(KernelVariant("mhc_coeffs", "mhc_dynamic_coeffs", "fused", dt, nmax))
            v.append(KernelVariant("mhc_coeffs", "mhc_dynamic_coeffs_bwd", "fused", dt, nmax))
            v.append(KernelVariant("mhc_pre", "mhc_dynamic_pre", "fused", dt, nmax))
            v.append(KernelVariant("mhc_post_res", "mhc_dynamic_post_res", "fused", dt, nmax))
            v.append(KernelVariant("mhc_post_res", "mhc_dynamic_post_res_bwd", "fused", dt, nmax))
    return v


VARIANTS: tuple[KernelVariant, ...] = _table()


def sources() -> list[str]:
    """Distinct source stems, in table order."""
    return list(dict.fromkeys(v.source for v in VARIANTS))
