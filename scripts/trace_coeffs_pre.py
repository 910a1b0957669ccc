"""Timing trace of mhc_dynamic_coeffs_pre (compiled here with -DMHC_CP_TRACE: globaltimer stamps over
its mix output; outputs otherwise wrong): per event, the median over CTAs and tiles of its time
relative to the iteration's first barrier (event 6: tile i landed, the workers past their barrier).

  python scripts/trace_coeffs_pre.py [T n C] [DEFINE ...] [VARIANT.cu] [@LAUNCH_CONSTANT=VALUE ...]
  python scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_TRACE_X   # the x_in warps' tile split
                                   into h_pre's loads and x_in (events 7 and 9)
  MHC_TRACE_SAVE=trace.npz python scripts/trace_coeffs_pre.py ...   # also the raw stamps and each CTA's SM
  python scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 --after-post-res   # each traced launch queued
                                   right after a post_res over the same x, as in DynamicMHC's forward (in the layer
                                   the launch starts with post_res's last writes in L2), not after a synchronise
"""
import os
import sys
from pathlib import Path

import numpy as np
import mlx.core as mx

from mhc_aot import cuda, cuda_dynamic
from mhc_aot.dynamic import Config, mhc_post_res

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_source_ab  # noqa: E402

nums = [a for a in sys.argv[1:] if a.lstrip("-").isdigit()]
path = next((a for a in sys.argv[1:] if a.endswith(".cu")), "")  # a variant's source (default: the shipped one)
knobs = dict(a[1:].split("=") for a in sys.argv[1:] if a.startswith("@"))  # launch constants, e.g. @CP_SMEM_BYTES=N
after_post_res = "--after-post-res" in sys.argv[1:]
defs = [a for a in sys.argv[1:] if not a.lstrip("-").isdigit() and a != path and not a.startswith("@")
        and a != "--after-post-res"]
T, n, C = (int(v) for v in (nums[:3] or (8192, 4, 4096)))


def define(name: str, default: int) -> int:
    """A define's value as given on the command line (a variant's MHC_CP_RING=4), else the kernel's default."""
    return int(next((d.split("=")[1] for d in defs if d.startswith(name + "=")), default))


SOURCE = "mhc_dynamic_coeffs_pre"
gpu_source_ab.use(SOURCE, gpu_source_ab.compile_variant(SOURCE, f"trace={path}:MHC_CP_TRACE:" + ":".join(defs), (4,))[1],
                  cuda._binary)
for k, v in knobs.items():
    setattr(cuda_dynamic, k, int(v))
cuda_dynamic.CP_MIN_T, cuda_dynamic.CP_SHAPES = 1, False  # any shape
G = cuda_dynamic.coeffs_pre_groups(T, n, C, mx.bfloat16)
S = -(-C // cuda_dynamic.CP_CW)
x = (mx.random.normal((T, n, C)) * 0.5).astype(mx.bfloat16)
# phi in the dtype the dispatch gives this build: the one-term build serves a bfloat16 phi (BF16_PHI_TERMS), the
# three-term one float32 (until session 57 the one-term traces ran a float32 phi: its rows staged in two rounds of
# twice the bytes, a startup no user's launch has)
terms = define("MHC_PHI_TERMS", 3)
phi = (mx.random.normal((n * C, n * n + 2 * n)) * 0.01).astype(mx.bfloat16 if terms == 1 else mx.float32)
b, a = mx.zeros((n * n + 2 * n,)), mx.array([1.0])
outs = None
for _ in range(3):
    if after_post_res and outs is not None:  # queued behind a post_res of the same x, as the layer's next forward is
        mx.async_eval(mhc_post_res(x, outs[3], outs[1], outs[2]))  # (the previous launch's x_in and coefficients)
    outs = cuda_dynamic._coeffs_pre(x, phi, b, a, a, a, Config(), G, phi_terms=terms)
    mx.eval(outs)
mix = np.array(outs[4]).reshape(-1).view(np.uint32)
ntile = -(-T // cuda_dynamic.CP_TT) // G
# the kernel's TRACE: 10 stamps for each of a CTA's first 64 tiles, [ticket][tile][event], over mix [T, M],
# then TRACE_CTA's 16 a CTA
if G * S * 656 > mix.size or ntile > 64:
    sys.exit(f"T={T} n={n} C={C}: the trace needs mix to hold {G * S * 656} stamps (it holds {mix.size}) and at "
             f"most 64 tiles a group ({ntile}): choose a larger T or n, or fewer tokens per group")
# stamps are the low 32 bits of globaltimer (ns): differences taken modulo 2^32, signed
wrap = lambda d: ((d + 2**31) % 2**32) - 2**31  # noqa: E731


ev = mix[: G * S * 64 * 10].reshape(G * S, 64, 10).astype(np.int64)[:, :ntile]
# the launch's own stamps after them, [ticket][16]: entry, phi loaded, the workers' / x_in warps' / first
# coefficient warp's loop done, past the last barrier (all relative to the earliest entry); each CTA's SM;
# the startup's stamps (below)
stamps = mix[G * S * 640: G * S * 656].reshape(G * S, 16).astype(np.int64)
cta, smid = stamps[:, :6], stamps[:, 6]  # (then each CTA's SM)
if os.environ.get("MHC_TRACE_SAVE"):  # the raw stamps, for a look elsewhere (npz: ev, cta, smid, G, S, stamps)
    np.savez(os.environ["MHC_TRACE_SAVE"], ev=ev, cta=cta, smid=smid, G=G, S=S, stamps=stamps)
# (MHC_CP_TRACE_X: events 7 and 9 time the first x_in warp instead of the workers)
xin_trace = "MHC_CP_TRACE_X" in defs
names = {7: "x_in warp: h_pre loaded" if xin_trace else "workers: product done (before barrier)",
         9: "x_in warp: x_in formed (before barrier)" if xin_trace else "workers: after the barrier",
         0: "partials, handoff, DRAM refill issued",
         1: "x_in warp: share in registers, refill issued",
         2: "coefficient warp: own partials synced", 3: "coefficient warp: all S projected",
         4: "coefficient warp: h_pre stored", 5: "coefficient warp: h_res done"}
ref = ev[:, :, 6]
print(f"T={T} n={n} C={C} G={G} S={S} tiles/group={ntile}")
it = np.diff(ref, axis=1)
print(f"iteration (tile landed -> next tile landed) median {np.median(it) / 1e3:.2f} us, "
      f"p10 {np.percentile(it, 10) / 1e3:.2f}, p90 {np.percentile(it, 90) / 1e3:.2f}")
span = (ref[:, -1] - ref[:, 0]) / 1e3
print(f"first to last tile per CTA: median {np.median(span):.1f} us")
t_in = wrap(cta - cta[:, :1].min())
kernel = t_in[:, 5].max() / 1e3
print(f"launch: the last CTA past its last barrier {kernel:.1f} us after the first CTA's entry; CTA entries spread "
      f"{t_in[:, 0].max() / 1e3:.2f} us; entry -> phi loaded median {np.median(t_in[:, 1] - t_in[:, 0]) / 1e3:.2f}, "
      f"-> first tile landed median {np.median(wrap(ev[:, 0, 6] - cta[:, 0])) / 1e3:.2f} us")
# the startup, each CTA's stamps after its own entry (median, p90): thread 0's ticket, map, ring issued, zero
# stores issued; the first x_in warp past tile 0's landing and the group's zeroing (ready[g]); phi loaded;
# then tile 0's chain (its tile events)
start = [(stamps[:, 11], "ticket read"), (stamps[:, 8], "map acquired"), (stamps[:, 9], "ring's copies issued"),
         (stamps[:, 10], "zero stores issued"), (stamps[:, 7], "x_in warp: tile 0 in, ready[g]"),
         (stamps[:, 1], "phi loaded"), (ev[:, 0, 6], "tile 0: workers past barrier"),
         (ev[:, 0, 0], "tile 0: partials stored"), (ev[:, 0, 3], "tile 0: all S projected"),
         (ev[:, 0, 4], "tile 0: h_pre stored"), (ev[:, 0, 1], "tile 0: refill (tile RING) issued"),
         (ev[:, 0, 8], "tile 0: h_pre in (x_in warp)"), (ev[:, 1, 1], "tile 1: refill issued"),
         (ev[:, 2, 1], "tile 2: refill issued")]
# the signaler's release of the mailbox zeroing (stamps 12-14: past the workers' barrier, past its fence, past
# its atomics' issue: ready[g], and tile 0's projected where the two go together), where the source has them: a
# variant without them leaves those words as the launch found them
handover = [(stamps[:, 12], "signaler: zeroing's barrier"), (stamps[:, 13], "past its fence"),
            (stamps[:, 14], "past its atomics")]
since_entry = lambda v: wrap(v - cta[:, 0])  # noqa: E731  (each CTA's stamp after its own entry, ns)
if all(((since_entry(t) > 0) & (since_entry(t) < 10**7)).all() for t, _ in handover):  # within 10 ms of entry
    at = [name for _, name in start].index("tile 0: partials stored") + 1
    start[at:at] = handover
print("startup after the CTA's entry (median / p90 us): " + "; ".join(
    f"{name} {np.median(since_entry(v)) / 1e3:.2f} / {np.percentile(since_entry(v), 90) / 1e3:.2f}"
    for v, name in start))
last = wrap(ev[:, -1, 6] - cta[:, 0].min()) / 1e3
done = [(2, "workers"), (3, "x_in warps"), (4, "first coefficient warp"), (5, "last barrier")]
print(f"last tile landed median {np.median(last):.1f} (max {last.max():.1f}); loops done (median, max): "
      + ", ".join(f"{name} {np.median(t_in[:, k]) / 1e3:.1f}, {t_in[:, k].max() / 1e3:.1f}" for k, name in done)
      + " us after the first entry")
for e, name in names.items():
    r = wrap(ev[:, :, e] - ref)[:, 6:-1]
    print(f"{e} {name:38s} after tile landed: p10 {np.percentile(r, 10) / 1e3:6.2f} "
          f"median {np.median(r) / 1e3:6.2f} p90 {np.percentile(r, 90) / 1e3:6.2f} us")
pub = wrap(ev[:, 1:-1, 8] - ev[:, 1:-1, 6])
print(f"8 x_in warp: the tile's h_pre in, after the tile landed: median {np.median(pub) / 1e3:.2f} us")
# the skew between a group's CTAs: for each tile, the spread of its landing (event 6, absolute stamps) over the
# group's S CTAs, and where this CTA's landing falls after the group's first; every hand-over waits for the last
# CTA of the group, so a tile's chain starts at the group's latest landing, not at this CTA's
land = ev[:, :, 6].reshape(G, S, ntile)
rel = wrap(land - land[:, :1])  # vs CTA 0 of the group: wraps once in ~4.3 s
spread = (rel.max(axis=1) - rel.min(axis=1))[:, 6:-1]
late = (rel - rel.min(axis=1, keepdims=True))[:, :, 6:-1]
last = rel.argmax(axis=1)[:, 6:-1]  # [G, tiles]: the group's last CTA to land each tile
persistent = np.median([np.bincount(row).max() / row.size for row in last])  # its most frequent one's share
print(f"landing spread over a group's {S} CTAs per tile: p10 {np.percentile(spread, 10) / 1e3:.2f} median "
      f"{np.median(spread) / 1e3:.2f} p90 {np.percentile(spread, 90) / 1e3:.2f} us; a CTA's landing after the "
      f"group's first: median {np.median(late) / 1e3:.2f} us; a group's most frequent last CTA is last in "
      f"{persistent * 100:.0f}% of its tiles")
# which CTAs lag: the split index (a CTA's column range) of each group's most frequent last CTA. The same
# index across groups points at the columns (their phi rows, their L2 slices); different ones at the CTA's SM
top = [np.bincount(row, minlength=S).argmax() for row in last]
share = [np.bincount(row, minlength=S).max() / row.size for row in last]
print("most frequent last CTA per group (split index: share of the group's tiles): "
      + ", ".join(f"{t}: {100 * f:.0f}%" for t, f in zip(top, share)))
# a ring buffer's refill: tile i + RING issued by the x_in warp (event 1 of tile i) -> the workers past its wait
ring = define("MHC_CP_RING", 6)
fill = wrap(ev[:, ring:, 6] - ev[:, :-ring, 1])
print(f"refill issued -> workers past its landing (RING = {ring}): p10 {np.percentile(fill, 10) / 1e3:.2f} "
      f"median {np.median(fill) / 1e3:.2f} p90 {np.percentile(fill, 90) / 1e3:.2f} us")
# the coefficient warps (tiles w, w + CWARPS, ...): time from its own partials synced to h_res done, and the
# gap from its previous tile's h_res to this tile's handoff (> 0: the warp waited for the workers)
cw = define("MHC_CP_CWARPS", 3)  # a variant's coefficient warps
busy = wrap(ev[:, cw + 1:-1, 5] - ev[:, cw + 1:-1, 2])
gap = wrap(ev[:, cw:-1, 2] - ev[:, :-1 - cw, 5])  # (tile i - CWARPS: with the queue, not always the same warp's)
print(f"coefficient warp per tile: handoff -> h_res median {np.median(busy) / 1e3:.2f} us "
      f"(projected wait {np.median(wrap(ev[:, 4:-1, 3] - ev[:, 4:-1, 2])) / 1e3:.2f}, to h_pre stored "
      f"{np.median(wrap(ev[:, 4:-1, 4] - ev[:, 4:-1, 3])) / 1e3:.2f}, Sinkhorn {np.median(wrap(ev[:, 4:-1, 5] - ev[:, 4:-1, 4])) / 1e3:.2f}); "
      f"idle before the handoff median {np.median(gap) / 1e3:.2f} us")
# the first x_in warp: from this tile's refill issued (event 1: its share in registers) to the tile's
# h_pre in (event 8) it waits on the group's coefficient warps, holding the tile; from there to the next
# tile's refill it works (h_pre's loads, x_in, the next share's loads, the x_in warps' barrier). Mostly waiting: the hand-over chain sets the pace; mostly working: the x_in warps do
xwait = wrap(ev[:, 1:-1, 8] - ev[:, 1:-1, 1])
xwork = wrap(ev[:, 2:, 1] - ev[:, 1:-1, 8])
print(f"x_in warp per tile: waiting for h_pre median {np.median(xwait) / 1e3:.2f} us (p90 "
      f"{np.percentile(xwait, 90) / 1e3:.2f}), h_pre + x_in, the next share + barrier median {np.median(xwork) / 1e3:.2f} us (p90 "
      f"{np.percentile(xwork, 90) / 1e3:.2f})")
# per SM: a CTA's pace (first to last tile landed over its tiles) against its SM's id. In a group every CTA
# waits for the last, so an SM that is slow on its own (its GPC's share of the crossbar, say) paces the group
pace = span / max(ntile - 1, 1)
order = np.argsort(pace)
print(f"a CTA's pace (us a tile): fastest {pace[order[0]]:.2f} (SM {smid[order[0]]}), median {np.median(pace):.2f}, "
      f"slowest {pace[order[-1]]:.2f} (SM {smid[order[-1]]}); the 8 slowest SMs: "
      + ", ".join(str(v) for v in smid[order[-8:]]))
# the startup's stragglers: tile 0's chain waits for the group's last CTA to store its partials (all S
# projected): session 50's H100 traces had it 0.8-1.8 µs after the group's median with the shipped kernel,
# ~7 µs with the ring's first fill issued a few tiles at a time (docs/HISTORY.md). For each group, that CTA's
# split index, SM and startup stamps, after the group's first entry: whether its phi, its first tile or its
# own entry came late
first = cta[:, 0].reshape(G, S).min(axis=1)
for g in range(G):
    rows = np.arange(g * S, (g + 1) * S)
    k = rows[np.argmax(wrap(ev[rows, 0, 0] - first[g]))]
    at = lambda v: wrap(v - first[g]) / 1e3  # noqa: E731
    print(f"group {g}: tile 0's last partials from split {k - g * S} (SM {smid[k]}) at {at(ev[k, 0, 0]):.2f} us "
          f"(the group's median {np.median(at(ev[rows, 0, 0])):.2f}): its entry {at(cta[k, 0]):.2f}, ring issued "
          f"{at(stamps[k, 9]):.2f}, zero stores issued {at(stamps[k, 10]):.2f}, phi loaded {at(stamps[k, 1]):.2f} "
          f"(median {np.median(at(stamps[rows, 1])):.2f}), tile 0 landed {at(ev[k, 0, 6]):.2f} "
          f"(median {np.median(at(ev[rows, 0, 6])):.2f})")
