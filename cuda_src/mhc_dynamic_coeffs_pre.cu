// mhc_coeffs with x_in, reading x from DRAM once (bfloat16 x, n <= 4): the projection z = vec(x) @ phi
// and the sum of squares (mhc_dynamic_proj_tc), the per-token coefficients (mhc_dynamic_coeffs: RMS
// scale, activations, Liger's Sinkhorn) and x_in = h_pre . x (mhc_dynamic_pre) in one launch. The
// three-kernel path reads x from DRAM twice (the projection, then pre) and waits on a latency-bound
// coefficients launch between them. Its tiles move by TMA (mhc_tma.cuh): one thread issues a tile's
// copies, so the 256 workers spend no instructions on addresses and copies (the cp.async version,
// sessions 14-15, ran slower than the three-kernel path on the H200). sm_90a only; bfloat16 x with
// C % 8 == 0 (TMA's 16-byte row strides) at a 16-byte aligned address.
//
// A persistent grid: G groups of S = ceil(C / CW) CTAs. CTA s of a group owns columns [s CW, s CW + CW)
// of every stream: phi's rows j C + c for those columns (n x 128 x 24 floats) are read once and held
// for the whole launch as split B fragments in the registers of the worker warps (warp = stream x half
// of the columns), and the group walks token tiles z = g, g + G, g + 2 G, ... of TT tokens. Tile i of
// the group (two TMA boxes of 64 columns x TT tokens x n streams, the 128-byte swizzle) lands in ring
// buffer i % RING and stays there until its x_in is formed; then the buffer takes tile i + RING. Per
// tile a CTA:
//   1. (workers, iteration i) multiplies its columns of the tile's tokens on tensor cores (as proj_tc:
//      bfloat16 x exact, phi split in three bfloat16 terms, or one for a bfloat16 phi (MHC_PHI_TERMS);
//      the sums of squares on the CUDA cores from the same A fragments): partial z and sum of squares
//      of every token over its columns, stored as one block of tagged words in the group's partials
//      mailbox; the signaler warp then adds one to the tile's `projected` counter (named-barrier
//      handoff; a warp that does nothing else, so the signal never waits for a busy warp: session 21's
//      trace);
//   2. (coefficient warps, their own loop) once `projected` says all S partials of the tile are stored,
//      sums those of its own tokens (r = s, s + S, ... of the tile; a lane per sum) as their tags show
//      them in, the RMS scale, h_pre and h_post, writes them and mix, and h_pre again as tagged words
//      in the group's h_pre mailbox; then, batched over a few of its tiles, h_res by the Sinkhorn (a
//      lane per matrix element, shuffles, Liger's order and divisions: dyn::sinkhorn_forward_lanes_k)
//      from mix as written, off every other warp's path;
//   3. (XWARPS x_in warps, their own loop) their share of the tile into registers once it lands, then,
//      once they all have it and the workers have read it, the buffer's refill; once the h_pre mailbox
//      has the tile's tag on its tokens, x_in of its columns from those registers and h_pre (each warp
//      TT / XWARPS of the tokens). Session 22 (H200, T = 8192, n = 4, C = 4096): the workers forming x_in
//      between their products took 2.46 us a tile, 1.54 without it; one x_in warp took 5.4 us a tile,
//      four take ~1.8 next to the workers' 2.08.
// Deadlock-free whatever the hardware schedules: CTAs take their (group, split) from a ticket in start
// order and wait only on CTAs of their own group, so the group of the lowest tickets is always wholly
// running. The launcher passes the counters zeroed, and no CTA zeroes them again: a buffer that launches
// share in sequence counts on, launch k's tickets being k G S .. k G S + G S - 1 and its waits counting to
// S (k + 1) (the epoch k = ticket / (G S)). Until session 54 the last CTA to finish zeroed them (a fence and
// an atomic at every CTA's end, then 2 + 2 tiles serial stores); same-run A/Bs on the H100 (DynamicMHC
// forward, n = 4, C = 4096, medians of 6-10 rounds, four A/Bs): at T = 8192 366.4 against 370.4 us, 363.5
// against 369.0, 360.6 against 365.1, 365.4 against 366.3; at 16384 679.9 against 682.8, 680.5 against 685.5.
// Nothing accumulates with atomics: per-CTA partials summed in a fixed order.
// The hand-overs between CTAs carry no fences: a mailbox word is a value with the tag of the tile that
// wrote it (tagged(): one 64-bit access), so what a reader sees with the right tag is that value
// whatever the order writes reach it in, and a counter only says when to look. Each CTA zeroes its own
// mailbox words first (the buffer may hold an earlier launch's), and releases them once to the group
// (ready[g]), which the readers acquire before their first read.
//
// Block: BLOCK = 8 worker warps + the signaler + XWARPS x_in warps + CWARPS coefficient warps (each takes
// the group's next tile from a queue in shared memory when it is free, so CWARPS tiles' coefficients can
// be in flight). Workers synchronise on named barrier 1.
// Grid (threads): (G S BLOCK, 1, 1). Shared memory (dynamic): SMEM_BYTES.
// Inputs: x [T, n, C] bfloat16, tmpl [32] uint32 (x's tensor-map template: mhc_aot/tma.py, dims
// (C, T, n), box (64, TT, n), 128-byte swizzle), phi [n C, M] (float32, bfloat16 or float16: the scalar
// phi_kind; read as it is, no float32 copy first), b [M], alpha_pre / _post / _res
// [1], sync [1 + 2 tiles] int32 zeros (counted on, never zeroed: ticket, projected[tiles], ready[G]; G <= tiles).
// Outputs: h_pre [T, n], h_post [T, n], h_res [T, n, n], x_in [T, C], mix [T, M], invr [T] (as
// mhc_dynamic_coeffs), mbox (scratch, 64-bit words: the partials [G NSLOT S TT RL] and h_pre
// [G NSLOT TT NS] of a group's last NSLOT tiles), maps [G S 32] uint32 (scratch: each CTA's tensor map, mhc_tma.cuh), consts [3 + M] (as
// mhc_dynamic_phi_split's: alpha_pre, alpha_post, alpha_res, b, for the backward). MHC_GRID_RESIDENT: the
// CPU emulation runs all CTAs of the launch together. MHC_CP_TRACE
// (timing only, scripts/trace_coeffs_pre.py) writes globaltimer stamps of the workers' phases over mix;
// with MHC_CP_TRACE_X two of them time the first x_in warp's h_pre loads and x_in instead.
// MHC_CP_UNGATED (tests only: tests/test_dynamic.py's mailbox test): the coefficient warps read a tile's
// partials without waiting on `projected`, by the tags alone.
// MHC_CP_SKIP_EXCHANGE, _XIN, _PRODUCT (timing only, wrong outputs): no coefficients (h_pre 1, the x_in
// warps wait only for their own CTA's workers), no x_in, no products. Session 43, H100, T = 8192, n = 4,
// C = 4096, trace's launch span: all three skipped (the TMA ring alone) 99.1 us, x read at ~2.8 TB/s;
// the exchange alone skipped 133.7 us; the kernel 172-179 us: the exchange costs ~40-45 us of it.
#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"
#include "mhc_tma.cuh"

#include <type_traits>

using namespace mhc;

#ifndef MHC_CP_RING
#define MHC_CP_RING 6
#endif

namespace {
constexpr int TT = 32;                     // tokens a tile (two m16 tiles)
constexpr int CW = 128;                    // columns of each stream a CTA owns
constexpr int NS = 4;                      // streams at most (M = n n + 2 n <= 24: three n8 tiles)
constexpr int NT = 3, MP = 8 * NT, RL = MP + 1;  // a partial row: M values (zero-padded to MP), then the sum of squares
// tile buffers, a ring: tile i lands in buffer i % RING, is multiplied at the workers' iteration i,
// read again by the x_in warps once its h_pre is in, and the buffer then takes tile i + RING.
// Session 22 measured why the tile stays in shared memory: the earlier copy back from L2, ~9 tiles
// (~40 MB of the GPU's traffic) after the first read, missed L2 almost always (ncu, H200, T = 8192:
// 534 MB read from DRAM for x's 268)
constexpr int RING = MHC_CP_RING;
// MHC_PHI_TERMS: phi's bfloat16 terms held in the workers' registers (build_tools/variants.py: 3 for a
// float32 phi, exact to its 24 bits; 1 for a bfloat16 phi, which is its own first term): one term is a
// third of the MMAs and of the fragment registers (session 21's timing-only two-term knob, a numerics
// change, took 2.78 us a tile against 2.94)
#ifndef MHC_PHI_TERMS
#define MHC_PHI_TERMS 3
#endif
constexpr int TERMS = MHC_PHI_TERMS;
static_assert(TERMS == 1 || TERMS == 3, "one bfloat16 term (a bfloat16 phi) or three (float32)");
// partial and h_pre slots a group (slot i % NSLOT: see the partials' writes), the fewest the reuse allows
// (NSLOT > RING + 1, below): each CTA zeroes its words of every slot used before its first tile, and
// those stores share the startup's memory traffic with phi's loads and the ring's first copies. Session
// 48, same-run A/B on the H100 against 12 slots, the forward at T = 8192 374.4-383.5 against 379.1-384.3
// us, at 16384 704.0-717.1 against 716.2-722.7.
constexpr int NSLOT = 8;
#ifndef MHC_CP_SK_TILES
#define MHC_CP_SK_TILES 4
#endif
#ifndef MHC_CP_SK_ILP
#define MHC_CP_SK_ILP 2
#endif
constexpr int SK_TILES = MHC_CP_SK_TILES;  // a coefficient warp's tiles whose h_res it forms together
constexpr int SK_ILP = MHC_CP_SK_ILP;      // tokens a lane in one Sinkhorn pass (two half-warps: 2 SK_ILP a pass)
#ifndef MHC_CP_CWARPS
#define MHC_CP_CWARPS 3
#endif
#ifndef MHC_CP_XWARPS
#define MHC_CP_XWARPS 4
#endif
// warps: WORKERS / 32 workers, the signaler, XWARPS x_in warps, CWARPS coefficient warps. 512 threads
// leave 128 registers a thread; the workers, with x_in elsewhere, fit (ptxas: 32 bytes of spills at
// XU = 4, 4 at XU = 2)
constexpr int WORKERS = 256, CWARPS = MHC_CP_CWARPS, XWARPS = MHC_CP_XWARPS;
constexpr int BLOCK = WORKERS + 32 + 32 * XWARPS + 32 * CWARPS;
constexpr int SIGNALER = WORKERS / 32, XWARP = SIGNALER + 1, COEFF0 = XWARP + XWARPS;
#ifndef MHC_CP_XU
#define MHC_CP_XU 4
#endif
constexpr int XU = MHC_CP_XU;  // x_in items a lane of an x_in warp has in flight
// The x_in warps take their share of tile ix into registers as soon as it lands (XU items a lane are the
// whole share), and its buffer is refilled once they and the workers have read it, before ix's h_pre is in:
// the buffer is free once the x_in warps are done with tile ix - 1 (they wait on its h_pre), not
// with ix, so the registers are a seventh tile in flight. H100, same-run A/B against refilling after x_in
// (docs/HISTORY.md, session 45's register knob; the old order is 6b630c2's source): the tile's pace 2.14 ->
// 2.05 us, the forward at T = 8192 within the spread, 16384 ~10 us and a float32 phi ~8 us faster.
// tile i's partials written -> the signaler warp (which does nothing else, so is never late) signals
// `projected`: named barrier handoff(i). Workers arrive for tile i having waited for its copy, which
// the first x_in warp issued after tile i - RING - 1's x_in was formed (its registers hold tile i - RING), so
// this CTA's signaler had synced that tile: an id is reused only after its last tile was synced.
constexpr int HANDOFF = 2, HANDOFF_IDS = 13;
constexpr int XIN_DONE = HANDOFF + HANDOFF_IDS;  // named barrier: the x_in warps hold their shares of a tile
__device__ __forceinline__ int handoff(int i) { return HANDOFF + i % HANDOFF_IDS; }
#ifdef MHC_CP_SKIP_EXCHANGE  // timing only (the header): no coefficients, no signals
constexpr bool EXCHANGE = false;
#else
constexpr bool EXCHANGE = true;
#endif
// the workers' handoff is taken by the signaler, or without the exchange by the x_in warps
constexpr int HANDOFF_COUNT = WORKERS + (EXCHANGE ? 32 : 32 * XWARPS);
constexpr int CSEGS = CW / 8;              // 16-byte segments of a stream's columns
constexpr int BOXC = 64;                   // a TMA box's columns: one 128-byte swizzled line a (token, stream)
constexpr int X_BYTES = TT * NS * CW * 2;  // a tile buffer: [CW / BOXC][NS][TT] lines of 128 bytes
constexpr int TM_BYTES = 128;              // the CTA's tensor map, staged in shared memory
constexpr int KSTEPS = CW / 16;            // k16 steps a stream
constexpr int KH = KSTEPS / 2;             // k16 steps a worker warp: warp = (stream, half of the columns)
constexpr int SLICES = 2 * NS;             // partial sums in shared memory: a (stream, half) each
// 1024 bytes of slack: the buffers start at the first 1024-byte boundary (the 128-byte swizzle's)
constexpr int SMEM_BYTES = 1024 + RING * X_BYTES + TM_BYTES + SLICES * TT * RL * 4 + 8 * RING + 16;
static_assert(WORKERS == 8 * 32 && NS * 2 == WORKERS / 32, "8 worker warps: a stream x half its columns each");
static_assert(CW == 2 * BOXC && X_BYTES % 1024 == 0, "two boxes a tile; buffers keep 1024-byte alignment");
static_assert(RL <= 32, "a lane per partial sum");
static_assert(TT * RL % 4 == 0, "a slice and a CTA's partials are whole float4s");
static_assert(HANDOFF + HANDOFF_IDS <= 16 && RING < HANDOFF_IDS, "named barrier ids");
static_assert(TT * CSEGS % (32 * XWARPS * XU) == 0 && 32 % CSEGS == 0 && TT <= 32,
              "x_in: whole rounds of XU items a lane of each x_in warp; h_pre a lane per token");
static_assert(XIN_DONE < 16, "named barrier ids");
static_assert(SK_TILES <= 32, "a lane per tile of a Sinkhorn batch");
static_assert(NSLOT > RING + 1 && HANDOFF_IDS > RING + 1, "a slot or id is reused only after its tile's h_pre was seen");
static_assert(TT * CSEGS == 32 * XWARPS * XU, "an x_in lane's whole share of a tile in registers at once");
static_assert(RING != 6 || SMEM_BYTES == 223424, "keep CP_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");
static_assert(SMEM_BYTES <= 223424, "the launcher passes CP_SMEM_BYTES (mhc_aot/cuda_dynamic.py)");
static_assert(NSLOT == 8, "keep CP_NSLOT in mhc_aot/cuda_dynamic.py equal (the mailboxes' size)");
// byte offset of (token r, stream j, 8-column segment sg of the CTA's CW) in a tile buffer: box
// sg / 8's line (j, r), chunk sg % 8 swizzled (ldmatrix's eight rows and x_in's eight segments of a
// phase fall in eight bank groups)
__device__ __forceinline__ uint32_t tile_at(int r, int j, int sg) {
  return tma::swizzle128(((sg >> 3) * NS + j) * TT + r, sg & 7);
}
}  // namespace

#define MHC_GRID_RESIDENT 1

// A mailbox word: a float's bits (low half) and the tag of the tile that wrote it (high half), stored and
// loaded as one 64-bit access, so a reader that sees the tag it waits for sees that tile's value with it,
// whatever order the writes reach it in: no fence before a signal and no counter between a value and its
// reader. Session 47's same-run A/B (H100, T = 8192): the two fences of the counter hand-overs cost ~15
// us a forward, and the x_in warps' h_pre load after their counter ~5 us more.
__device__ __forceinline__ unsigned long long tagged(float v, unsigned tag) {
  return (unsigned long long)tag << 32 | __float_as_uint(v);
}
__device__ __forceinline__ unsigned tag_of(unsigned long long w) { return (unsigned)(w >> 32); }
__device__ __forceinline__ float value_of(unsigned long long w) { return __uint_as_float((unsigned)w); }
#ifdef MHC_EMULATED
__device__ __forceinline__ void named_sync(int id, int count) { emu_named_sync(id, count); }
__device__ __forceinline__ void named_arrive(int id, int count) { emu_named_arrive(id, count); }
__device__ __forceinline__ int ld_acquire(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
__device__ __forceinline__ int ld_relaxed(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
__device__ __forceinline__ unsigned long long ld_word(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}
__device__ __forceinline__ void ld_words2(const unsigned long long* p, unsigned long long& a, unsigned long long& b) {
  a = ld_word(p);
  b = ld_word(p + 1);
}
__device__ __forceinline__ void st_word(unsigned long long* p, unsigned long long v) {
  *reinterpret_cast<volatile unsigned long long*>(p) = v;
}
__device__ __forceinline__ void st_words2(unsigned long long* p, unsigned long long a, unsigned long long b) {
  st_word(p, a);
  st_word(p + 1, b);
}
__device__ __forceinline__ void spin_pause() { emu_yield(); }
#else
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// ready[g]'s reads acquire: its writer releases (__threadfence() before the atomicAdd), and the mailbox
// reads after it must not see words from before the zeroing. (Session 46: the counters that guarded
// plain data then were read relaxed, a data race: scripts/gpu_coeffs_pre_stress.py on the H100 found x_in
// formed from h_pre before it was written, in every launch with the spin's sleep taken out,
// MHC_CP_SPIN_NS=0.)
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// The counters the mailboxes' readers wait on before they read (a hint of when to look, not an order:
// the tags check what was read)
__device__ __forceinline__ int ld_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// mailbox words, morally strong (relaxed, gpu scope): a 64-bit access is single-copy atomic, and a
// vector access is one of each of its 64-bit elements
__device__ __forceinline__ unsigned long long ld_word(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void ld_words2(const unsigned long long* p, unsigned long long& a, unsigned long long& b) {
  asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];\n" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}
// The stores keep their lines in L2 (evict_last): a slot is written again NSLOT tiles later, ~40 MB of the
// kernel's traffic on, and at the default priority its lines were evicted in between and written back to
// DRAM each time. Session 52, H100, ncu (no cache flush) at T = 8192, n = 4, C = 4096: the launch wrote 102-106
// MB to DRAM for x_in's 67, 75.6 with the hint; same-run A/Bs of the forward (sorted medians): 372.6-384.0 against
// 378.3-401.6 us at T = 8192, 690.1-707.9 against 708.6-736.6 at 16384. The loads stay plain: the hint on the
// readers' polls too was slower (382.1-395.9 against 376.0-390.0 us at 8192).
#define MHC_CP_EVICT_LAST "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "  // the policy both stores carry
__device__ __forceinline__ void st_word(unsigned long long* p, unsigned long long v) {
  asm volatile("{ .reg .b64 pol; " MHC_CP_EVICT_LAST "st.relaxed.gpu.global.L2::cache_hint.b64 [%0], %1, pol; }\n"
               ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_words2(unsigned long long* p, unsigned long long a, unsigned long long b) {
  asm volatile("{ .reg .b64 pol; " MHC_CP_EVICT_LAST "st.relaxed.gpu.global.L2::cache_hint.v2.b64 [%0], {%1, %2}, pol; }\n"
               ::"l"(p), "l"(a), "l"(b) : "memory");
}
#ifndef MHC_CP_SPIN_NS  // a spin's sleep (ns); 0: polls back to back (a stress knob: see ld_acquire)
#define MHC_CP_SPIN_NS 32
#endif
__device__ __forceinline__ void spin_pause() {
  if (MHC_CP_SPIN_NS > 0) __nanosleep(MHC_CP_SPIN_NS);
}
#endif
__device__ __forceinline__ void workers_sync() { named_sync(1, WORKERS); }
// Until *p reaches target, read acquiring (what is read after it is ordered after it) or relaxed (a
// hint of when to look, where tags check what is read after)
template <bool ACQUIRE = true>
__device__ __forceinline__ void spin_until(const int* p, int target) {
  for (int seen = ACQUIRE ? ld_acquire(p) : ld_relaxed(p); seen < target; seen = ACQUIRE ? ld_acquire(p) : ld_relaxed(p))
    spin_pause();
}

#ifdef MHC_CP_TRACE  // timing only: globaltimer stamps over mix (scripts/trace_coeffs_pre.py)
__device__ __forceinline__ unsigned gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return (unsigned)t;
}
#define TRACE(i, ev) \
  do { if ((i) < 64) reinterpret_cast<unsigned*>(mix)[((size_t)ticket * 64 + (i)) * 10 + (ev)] = gtimer(); } while (0)
// the launch's own stamps, after every CTA's tile stamps: [ticket][16] (entry, phi loaded, the workers' /
// x_in warps' / first coefficient warp's loop done, past the last barrier; then the SM's id; then the
// startup: the first x_in warp past tile 0's landing and the group's zeroing (ready[g]), and thread 0 past
// its map's acquire, the ring's first copies issued, its zero stores issued, the ticket read; then the
// signaler past tile 0's hand-over barrier, past its fence, and past its two atomics' issue)
#define TRACE_CTA(k, t) \
  do { reinterpret_cast<unsigned*>(mix)[(size_t)gridDim.x * 640 + (size_t)ticket * 16 + (k)] = (t); } while (0)
#else
#define TRACE(i, ev)
#define TRACE_CTA(k, t)
#endif


extern "C" __global__ void __launch_bounds__(BLOCK, 1) MHC_NAME(
    const bf16* __restrict__ x, const uint32_t* __restrict__ tmpl, const void* __restrict__ phi, const float* __restrict__ b,
    const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post, const float* __restrict__ alpha_res,
    const int* sync_in, float* h_pre, float* __restrict__ h_post, float* __restrict__ h_res, bf16* __restrict__ x_in,
    float* __restrict__ mix, float* __restrict__ invr_out, unsigned long long* mbox, uint32_t* maps, float* __restrict__ consts, int n,
    int C, int Tn, int S, int G, int tmax,
    float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult, int phi_kind) {
  extern __shared__ float smem[];
#ifdef MHC_CP_TRACE
  const unsigned t_entry = gtimer();
#endif
  // the buffers from the first 1024-byte boundary of shared memory (SMEM_BYTES has the slack)
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  base += (1024u - (tma::smem_addr(base) & 1023u)) & 1023u;
  unsigned char* ring = base;                                           // [RING] tile buffers
  uint32_t* tm = reinterpret_cast<uint32_t*>(base + RING * X_BYTES);    // the tensor map, staged
  float* ksum = reinterpret_cast<float*>(base + RING * X_BYTES + TM_BYTES);  // [stream][half][TT][RL]
  uint64_t* bars = reinterpret_cast<uint64_t*>(ksum + SLICES * TT * RL);  // [RING] tiles
  int* ticket_s = reinterpret_cast<int*>(bars + RING);
  volatile int* wdone_s = ticket_s + 1;  // the tiles whose products are done (worker thread 0's count)
  int* queue_s = ticket_s + 2;           // the coefficient warps' next tile
  int* sync = const_cast<int*>(sync_in);  // zeroed by the launcher (or counted on by launches before, see above)
  const int tiles = (Tn + TT - 1) / TT, M = n * n + 2 * n;
  int* projected = sync + 1;
  int* ready = sync + 1 + tiles;  // [G] (G <= tiles): the group's CTAs whose mailboxes are zeroed
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#ifndef MHC_EMULATED
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0) {  // TMA reads from 16-byte aligned addresses only
    if (tid == 0 && blockIdx.x == 0)
      printf("mhc_dynamic_coeffs_pre: x is not 16-byte aligned (a view at an odd element offset); pass a copy of x\n");
    __trap();
  }
#endif
  // phi_split's consts for the backward, which the forward's other path gets from phi_split
  if (blockIdx.x == 0) dyn::write_consts(consts, tid, M, alpha_pre, alpha_post, alpha_res, b);
  uint32_t* gmap = maps + (size_t)blockIdx.x * 32;  // this CTA's published tensor map
  if (warp == 0) tma::publish_map(gmap, tm, tmpl, x, lane);
  if (tid == 0) {
    *ticket_s = atomicAdd(sync, 1);
    *wdone_s = 0;
    *queue_s = 0;
    for (int k = 0; k < RING; ++k) tma::bar_init(bars + k, 1);  // the issuing thread's arrival
    tma::bar_init_fence();
  }
  __syncthreads();
  // the launch's epoch on a shared buffer (0 on the launcher's own zeros): every count it waits for is S more
  // per launch before it
  const int epoch = *ticket_s / (int)gridDim.x, ticket = *ticket_s % (int)gridDim.x;
  const int g = ticket / S, s = ticket % S, c0 = s * CW, all_in = S * (epoch + 1);
  if (tid == 0) TRACE_CTA(0, t_entry);
  if (tid == 0) TRACE_CTA(11, gtimer());
#ifdef MHC_CP_TRACE
  if (tid == 0) {  // the CTA's SM (which SMs lag: scripts/trace_coeffs_pre.py's per-SM rates)
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    TRACE_CTA(6, sm);
  }
#endif
  const int ntile = g < tiles ? (tiles - g + G - 1) / G : 0;  // the group's tiles z = g + i G, i < ntile
  // The mailboxes (tagged words, tag i + 1 for the group's tile i), slot i % NSLOT of the group:
  // part_box [G][NSLOT][split][TT][RL], a CTA's partials of a tile one contiguous block (coalesced
  // stores on the workers' path; the coefficient warps' strided loads are off it); hpre_box
  // [G][NSLOT][TT][NS], the tile's h_pre
  auto part_box = [&](int i) { return mbox + (size_t)(g * NSLOT + i % NSLOT) * TT * RL * S; };
  auto hpre_box = [&](int i) { return mbox + (size_t)G * NSLOT * TT * RL * S + (size_t)(g * NSLOT + i % NSLOT) * TT * NS; };
  // a mailbox reader's wait, once before its first read: every CTA of the group zeroed its words (see the
  // workers' zeroing)
  auto await_zeroed = [&] {
    if (lane == 0) spin_until(ready + g, all_in);
    __syncwarp();
  };

  // Tile i lands in ring buffer i % RING and completes dbar[i % RING]'s (i / RING)-th phase. Thread 0
  // issues the first RING tiles; the first x_in warp issues tile ix + RING once every x_in warp holds
  // its share of tile ix and the workers have read it.
  uint64_t* dbar = bars;
  auto issue_tile = [&](int i) {  // tile i of the group: two boxes
    const int t0 = (g + i * G) * TT;
    unsigned char* dst = ring + (size_t)(i % RING) * X_BYTES;
    uint64_t* bar = dbar + i % RING;
    tma::expect_tx(bar, 2 * BOXC * TT * n * 2);  // out-of-range elements (past T, C) count too
    tma::load_3d(dst, gmap, bar, c0, t0, 0);
    tma::load_3d(dst + NS * TT * 128, gmap, bar, c0 + BOXC, t0, 0);
  };
  auto at = [&](unsigned char* tile, int r, int j, int sg) { return tile + tile_at(r, j, sg); };
  if (warp < WORKERS / 32) {
    // ---------------------------------------------------------------- workers: step 1
    if (tid == 0) tma::acquire_map(gmap);
    if (tid == 0) TRACE_CTA(8, gtimer());
    // the first RING tiles' copies before phi's fragments load (those loads then overlap the copies)
    if (tid == 0)
      for (int p = 0; p < RING && p < ntile; ++p) issue_tile(p);
    if (tid == 0) TRACE_CTA(9, gtimer());
    // Zero the words this CTA will write in its group's mailboxes: the buffer may hold an earlier
    // launch's words with the tags this one waits for. Its readers acquire ready[g] == all_in before
    // their first read; the signaler releases it once tile 0's partials are handed over (one fence, after the
    // workers' barrier arrival), and this CTA's own writes come after iteration 0's barrier. The one-term
    // build zeroes once phi's copies are out (below), so these stores do not queue in front of them; the
    // three-term build before its loads.
    auto zero_mailboxes = [&] {
      if (EXCHANGE) {
        const int used = min(ntile, NSLOT);
        for (int e = tid; e < used * TT * RL / 2; e += WORKERS)
          st_words2(part_box(e / (TT * RL / 2)) + (size_t)s * TT * RL + 2 * (e % (TT * RL / 2)), 0ull, 0ull);
        for (int e = tid; e < used * TT * NS; e += WORKERS) {
          const int k = e / (TT * NS), r = e / NS % TT;
          if (r % S == s) st_word(hpre_box(k) + e % (TT * NS), 0ull);
        }
      }
      if (tid == 0) TRACE_CTA(10, gtimer());
    };
    // phi's rows of this warp's stream js and k16 steps [kh KH, kh KH + KH) of the CTA's columns as B
    // fragments (rows 2q, 2q+1, 2q+8, 2q+9 of a step, column 8 nt + g), zeros past C and M, split into
    // TERMS bfloat16 terms once for the whole launch: registers, not shared memory (splitting at every
    // use was a third of the kernel's instructions, ncu, session 15)
    const int js = warp >> 1, kh = warp & 1, g4 = lane / 4, q = lane % 4;
    // phi's rows of the CTA's columns are contiguous in phi (stream j: rows j C + c0 .. + CW, M values
    // each), so the workers copy them into ksum (free until the first tile's products) with coalesced
    // 16-byte loads, a few a thread, and each lane then picks its fragments' values from shared memory.
    // Session 48's startup trace (H100, T = 8192): the lanes' own 48 two-byte gathers from global memory
    // took ~15 us from issue to phi loaded, with nothing else in flight (a variant issuing them before the
    // ring), and phi loaded at 18.4 us after entry set the first tile's products; staged, 16.1 us, and the
    // forward ~2 us faster at T = 8192 and ~10 at 16384 (same-run A/B). Streams go in rounds of what ksum
    // holds (all n at once for a 16-bit phi; two for float32). C % 8 == 0 and c0 % CW == 0 keep every
    // stream's block 16-byte aligned when phi is (else element loads). The one-term build only: with three
    // terms (float32 and float16 phi) it spilled 20 bytes in the tile loop and ran ~30 us slower at T =
    // 8192, so that build keeps the lanes' own loads (load_phi_gathered).
    uint32_t bq[KH][NT][TERMS][2];
    auto set_fragment = [&](int k, int nt, const float (&v)[4]) {  // v split into TERMS bfloat16 terms
      uint2 terms[3];
      mma::split_b_fragment(v, terms);
#pragma unroll
      for (int t = 0; t < TERMS; ++t) {  // one term: hi, which is phi itself when phi is bfloat16
        bq[k][nt][t][0] = terms[t].x;
        bq[k][nt][t][1] = terms[t].y;
      }
    };
    auto load_phi_staged = [&](const auto* p) {
#pragma unroll
      for (int k = 0; k < KH; ++k)  // a stream j >= n keeps zeros
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int t = 0; t < TERMS; ++t) bq[k][nt][t][0] = bq[k][nt][t][1] = 0u;
      using P = std::remove_cv_t<std::remove_pointer_t<decltype(p)>>;
      constexpr int ES = sizeof(P), ROUNDS = ES == 4 ? 2 : 1, SPR = NS / ROUNDS;  // streams a round
      static_assert(SPR * CW * MP * ES <= SLICES * TT * RL * 4, "a round's rows fit ksum");
      P* stage = reinterpret_cast<P*>(ksum);
      const int rows = min(CW, C - c0), chunk16 = rows * M * ES / 16;  // 16-byte chunks of a stream's block
      const bool vec = (reinterpret_cast<uintptr_t>(p) & 15) == 0;
#pragma unroll
      for (int round = 0; round < ROUNDS; ++round) {
        const int j0 = round * SPR, nj = max(0, min(SPR, n - j0));
        if (vec) {  // cp.async: every copy of the thread in flight, no registers held
          for (int e = tid; e < nj * chunk16; e += WORKERS) {
            const int jl = e / chunk16, q16 = e - jl * chunk16;
            __pipeline_memcpy_async(reinterpret_cast<uint4*>(stage + (size_t)jl * CW * M) + q16,
                                    reinterpret_cast<const uint4*>(p + ((size_t)(j0 + jl) * C + c0) * M) + q16, 16);
          }
          __pipeline_commit();
          if (j0 == 0) zero_mailboxes();
          __pipeline_wait_prior(0);
        } else {
          if (j0 == 0) zero_mailboxes();
          for (int e = tid; e < nj * rows * M; e += WORKERS) {
            const int jl = e / (rows * M), r = e - jl * rows * M;
            stage[(size_t)jl * CW * M + r] = p[((size_t)(j0 + jl) * C + c0) * M + r];
          }
        }
        workers_sync();  // the round's rows staged
        const int jl = js - j0;
        bool picked = false;  // this warp's fragments taken by ldmatrix (below)
        if constexpr (std::is_same_v<P, bf16> && TERMS == 1) {
          // A bfloat16 phi is its own one term, and a stream's staged rows ([CW][M], 48 bytes each at M = 24)
          // hold the B fragments as ldmatrix.trans reads them: lanes 8 m .. 8 m + 7 give rows 8 (m % 2) ..
          // + 7 of the k16 step, at n8 tile m / 2 (the second call: tile 2, matrices 2 and 3 repeating 0 and
          // 1). Eight ldmatrix a warp in place of 48 bounds-checked element picks (~1/20 of the startup's
          // fragment code; 123 registers against 127). n = 4 and whole 128-column splits only (rows past C
          // or M < 24 need the zeros the element path gives). Same-run A/B on the H100 (docs/HISTORY.md,
          // session 51): the forward at T = 8192 367.6-374.5 against 370.3-383.2 us, at 16384 692.6-706.0
          // against 705.3-724.5.
          if (jl >= 0 && jl < nj && M == MP && rows == CW) {
            const int mi = lane / 8, row0 = (mi & 1) * 8 + lane % 8;
#pragma unroll
            for (int k = 0; k < KH; ++k) {
              const P* rowp = stage + ((size_t)jl * CW + (kh * KH + k) * 16 + row0) * MP;
              uint32_t r[4];
              mma::ldmatrix_x4<true>(r, rowp + (mi >> 1) * 8);  // n8 tiles 0 (matrices 0, 1) and 1 (2, 3)
              bq[k][0][0][0] = r[0];
              bq[k][0][0][1] = r[1];
              bq[k][1][0][0] = r[2];
              bq[k][1][0][1] = r[3];
              mma::ldmatrix_x4<true>(r, rowp + 16);  // n8 tile 2
              bq[k][2][0][0] = r[0];
              bq[k][2][0][1] = r[1];
            }
            picked = true;
          }
        }
        if (!picked && jl >= 0 && jl < nj) {  // this warp's stream: its fragments (a stream j >= n keeps zeros)
#pragma unroll
          for (int k = 0; k < KH; ++k)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const int m = nt * 8 + g4, r0 = (kh * KH + k) * 16 + 2 * q;  // r0: a row of the CTA's columns
              float v[4];
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                const int r = r0 + (u & 1) + 8 * (u >> 1);
                v[u] = r < rows && m < M ? to_float(stage[((size_t)jl * CW + r) * M + m]) : 0.0f;
              }
              set_fragment(k, nt, v);
            }
        }
        workers_sync();  // ksum free again (the next round, or the first tile's partial sums)
      }
    };
    // The three-term build: every value of the lane loaded before any is split, unconditionally (index 0
    // where out of range, then zeroed), after the mailboxes' zeroing (below). Session 42, two same-run
    // A/Bs against a bounds branch around each load, forward at T = 8192: float32 phi 412.3 / 411.7 us
    // against 418.5 / 416.6.
    auto load_phi_gathered = [&](const auto* p) {
      float v[KH][NT][4];
#pragma unroll
      for (int k = 0; k < KH; ++k)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int m = nt * 8 + g4, r0 = c0 + (kh * KH + k) * 16 + 2 * q;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int c = r0 + (u & 1) + 8 * (u >> 1);
            const bool in = js < n && c < C && m < M;
            const float w = to_float(p[in ? ((size_t)js * C + c) * M + m : 0]);
            v[k][nt][u] = in ? w : 0.0f;
          }
        }
#pragma unroll
      for (int k = 0; k < KH; ++k)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) set_fragment(k, nt, v[k][nt]);
    };
    if constexpr (TERMS == 1)
      dyn::with_phi(phi, phi_kind, load_phi_staged);
    else {
      zero_mailboxes();
      dyn::with_phi(phi, phi_kind, load_phi_gathered);
    }
    if (tid == 0) TRACE_CTA(1, gtimer());
    for (int i = 0; i < ntile; ++i) {
      tma::wait(dbar + i % RING, (i / RING) & 1);  // tile i has landed and is visible
      workers_sync();                              // ksum free again (the partials of tile i - 1 read)
      if (tid == 0) TRACE(i, 6);
      unsigned char* xb = ring + (size_t)(i % RING) * X_BYTES;
#ifdef MHC_CP_SKIP_PRODUCT  // timing only (scripts/trace_coeffs_pre.py): wrong coefficients
      const bool product = false;
#else
      const bool product = js < n;
#endif
      float acc[2][NT][4] = {}, sq[2][2] = {};  // sq[mt]: rows g, g + 8 of m16 tile mt
      if (product) {
#pragma unroll
        for (int k = 0; k < KH; ++k)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            uint32_t a[4];
            mma::ldmatrix_x4<false>(a, at(xb, mt * 16 + lane % 16, js, 2 * (kh * KH + k) + lane / 16));
            mma::mma_terms<NT, TERMS>(acc[mt], a, bq[k]);
            // sums of squares of the lane's eight values on the CUDA cores, idle while the MMAs run (the
            // diagonal of x x^T on tensor cores, as mhc_dynamic_proj_tc, cost two MMAs of eleven)
            sq[mt][0] += mma::sq_pair(a[0]) + mma::sq_pair(a[2]);  // row g
            sq[mt][1] += mma::sq_pair(a[1]) + mma::sq_pair(a[3]);  // row g + 8
          }
        float* rows = ksum + (size_t)(js * 2 + kh) * TT * RL;
        mma::store_tiles<2, NT>(acc, rows, RL, lane);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int u = 0; u < 2; ++u)
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) sq[mt][u] += __shfl_xor_sync(0xffffffffu, sq[mt][u], o);  // over q
        if (q == 0) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            rows[(size_t)(mt * 16 + g4) * RL + MP] = sq[mt][0];
            rows[(size_t)(mt * 16 + g4 + 8) * RL + MP] = sq[mt][1];
          }
        }
      }
#ifndef MHC_CP_TRACE_X
      if (tid == 0) TRACE(i, 7);
#endif
      workers_sync();  // ksum written
      if (tid == 0) *wdone_s = i + 1;  // every worker's reads of the buffer are done
#ifndef MHC_CP_TRACE_X
      if (tid == 0) TRACE(i, 9);
#endif
      // the slices' sums, in (stream, half) order, into mailbox slot i % NSLOT, tagged i + 1. The slot's
      // previous tile, i - NSLOT, had every h_pre of it seen by the x_in warps (every CTA's coefficient
      // warps had read its partials before they wrote h_pre) before the first issued tile
      // i - NSLOT + RING + 1 <= i, which landed before this iteration.
      // (four floats a load: a quarter of the instructions of one float each)
      unsigned long long* dst = part_box(i) + (size_t)s * TT * RL;
      const unsigned tag = i + 1;
      const float4* src4 = reinterpret_cast<const float4*>(ksum);
#pragma unroll
      for (int k = 0; k < (TT * RL / 4 + WORKERS - 1) / WORKERS; ++k) {
        const int e = tid + k * WORKERS;
        if (e < TT * RL / 4) {
          float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
          for (int j = 0; j < SLICES; ++j)
            if (j < 2 * n) {
              const float4 w = src4[(size_t)j * TT * RL / 4 + e];
              v.x += w.x;
              v.y += w.y;
              v.z += w.z;
              v.w += w.w;
            }
          st_words2(dst + 4 * e, tagged(v.x, tag), tagged(v.y, tag));
          st_words2(dst + 4 * e + 2, tagged(v.z, tag), tagged(v.w, tag));
        }
      }
      named_arrive(handoff(i), HANDOFF_COUNT);  // to the signaler: tile i's partials are stored
      if (tid == 0) TRACE(i, 0);
    }
    if (tid == 0) TRACE_CTA(2, gtimer());
  } else if (warp == SIGNALER) {
    // ---------------------------------------------------------------- the signaler
    // projected[] tells the coefficient warps when to read a tile's partials; the tags say whether
    // what they read is in (no fence first: session 47)
    for (int j = 0; j < (EXCHANGE ? ntile : 0); ++j) {
      named_sync(handoff(j), HANDOFF_COUNT);
      if (lane == 0) {
        if (j == 0) {  // the workers' zeroing (before their arrival) released to the group
          TRACE_CTA(12, gtimer());
          __threadfence();
          TRACE_CTA(13, gtimer());
          atomicAdd(ready + g, 1);
        }
        atomicAdd(projected + g + j * G, 1);
        if (j == 0) TRACE_CTA(14, gtimer());
      }
    }
  } else if (warp < XWARP + XWARPS) {
    // ---------------------------------------------------------------- the x_in warps: step 3
    // Tile ix once it lands: the warp's share into registers (x_in warp xw: tokens xw TT / XWARPS ...;
    // lane: segment lane % 16 of tokens 2 k + lane / 16; a load instruction reads four whole 128-byte
    // lines), then, once every x_in warp holds its share and the workers have read the tile, the buffer's
    // refill with tile ix + RING; then its h_pre from the mailbox and x_in = h_pre . x from the registers.
    // (Session 22: one x_in warp took 5.4 us a tile, the workers 1.54 without x_in.)
    const int xw = warp - XWARP, rx = xw * (TT / XWARPS);  // this warp's first token of a tile
    if (warp == XWARP && lane == 0) tma::acquire_map(gmap);
    const bool vec = (reinterpret_cast<uintptr_t>(x_in) & 15) == 0;  // C % 8 == 0 (the launcher's rule)
    const int sg = lane % CSEGS, c = c0 + 8 * sg;
    // The loop reads every stream without a predicate: with the runtime `j < n` a lane's 16 loads cost
    // ~64 register moves a tile (ncu, session 32: 537 instructions a warp a tile). A stream j >= n is
    // weighed by -0.0, which adds exactly nothing to a finite sum (+0 + -0 is +0), and its lines must
    // then hold finite values: a box lands as n x TT lines and TMA never writes the streams past n, so
    // this warp zeroes those lines of its own tokens in every buffer, once.
    if (n < NS) {
      constexpr int LINES = TT / XWARPS;  // this warp's tokens: rows rx .. rx + LINES - 1 of a stream
      const int pad = RING * 2 * (NS - n) * LINES * 8;  // 16-byte chunks of whole lines (the swizzle moves none out)
      for (int e = lane; e < pad; e += 32) {
        const int chunk = e % 8, r = rx + e / 8 % LINES, j = n + e / (8 * LINES) % (NS - n);
        const int box = e / (8 * LINES * (NS - n)) % 2, k = e / (8 * LINES * (NS - n) * 2);
        *reinterpret_cast<uint4*>(ring + (size_t)k * X_BYTES + ((box * NS + j) * TT + r) * 128 + chunk * 16) =
            make_uint4(0u, 0u, 0u, 0u);
      }
      __syncwarp();
    }
    if (EXCHANGE && ntile > 0) await_zeroed();
    for (int ix = 0; ix < ntile; ++ix) {
      tma::wait(dbar + ix % RING, (ix / RING) & 1);  // (landed: visible to this warp too)
      if (ix == 0 && warp == XWARP && lane == 0) TRACE_CTA(7, gtimer());
      const unsigned char* xb = ring + (size_t)(ix % RING) * X_BYTES;
      uint4 w[XU][NS];  // the lane's share of the tile: items rx + 2 u + lane / CSEGS, segment sg
#pragma unroll
      for (int u = 0; u < XU; ++u)
#pragma unroll
        for (int j = 0; j < NS; ++j)
          w[u][j] = *reinterpret_cast<const uint4*>(xb + tile_at(rx + 2 * u + lane / CSEGS, j, sg));
      named_sync(XIN_DONE, 32 * XWARPS);  // every x_in warp holds its share
      if (warp == XWARP && lane == 0) {
        while (*wdone_s <= ix) spin_pause();  // and the workers' products of it are done
        if (ix + RING < ntile) issue_tile(ix + RING);
        TRACE(ix, 1);
      }
      // h_pre of the warp's tokens (lane r holds token r's) from the mailbox, read until every word has
      // the tile's tag: one round trip once they are in, where a counter and then h_pre were two
      const int t0 = (g + ix * G) * TT;
      float hp[NS];
#pragma unroll
      for (int j = 0; j < NS; ++j) hp[j] = j >= n ? -0.0f : !EXCHANGE ? 1.0f : 0.0f;
      if (EXCHANGE) {
        const bool mine = lane >= rx && lane < rx + TT / XWARPS && t0 + lane < Tn;
        const unsigned long long* box = hpre_box(ix) + (size_t)lane * NS;
        const unsigned tag = ix + 1;
        for (;;) {
          bool in = true;
          if (mine) {
            unsigned long long wd[NS];
#pragma unroll
            for (int j = 0; j < NS; j += 2) ld_words2(box + j, wd[j], wd[j + 1]);
#pragma unroll
            for (int j = 0; j < NS; ++j)
              if (j < n) {
                in = in && tag_of(wd[j]) == tag;
                hp[j] = value_of(wd[j]);
              }
          }
          if (__all_sync(0xffffffffu, in)) break;
          spin_pause();
        }
      } else {  // only this CTA's workers waited for (timing only); h_pre 1
        named_sync(handoff(ix), HANDOFF_COUNT);
      }
      if (warp == XWARP && lane == 0) TRACE(ix, 8);
#ifdef MHC_CP_TRACE_X  // timing only: events 7 and 9 time the first x_in warp's tile instead of the workers'
      asm volatile("" ::"f"(hp[0]), "f"(hp[1]), "f"(hp[2]), "f"(hp[3]));  // (h_pre's loads returned)
      if (warp == XWARP && lane == 0) TRACE(ix, 7);
#endif
#ifndef MHC_CP_SKIP_XIN  // timing only (scripts/trace_coeffs_pre.py): x_in unwritten
#pragma unroll
      for (int u = 0; u < XU; ++u) {
        const int r = rx + 2 * u + lane / CSEGS, t = t0 + r;
        float xa[8] = {};
#pragma unroll
        for (int j = 0; j < NS; ++j)  // Liger's order: streams 0, 1, ... (mhc_dynamic_pre); j >= n adds -0
          dyn::fma8_bf16(xa, w[u][j], __shfl_sync(0xffffffffu, hp[j], r));
        if (t < Tn && c < C) dyn::store8_bf16(x_in + (size_t)t * C + c, xa, c, C, vec);
      }
#endif
#ifdef MHC_CP_TRACE_X
      if (warp == XWARP && lane == 0) TRACE(ix, 9);
#endif
    }
    if (warp == XWARP && lane == 0) TRACE_CTA(3, gtimer());
  } else {
    // ---------------------------------------------------------------- coefficient warps: step 2
    // A warp that is free takes the group's next tile from a queue in shared memory. With fixed tiles
    // (i = w, w + CWARPS, ...) a warp's Sinkhorn batch (~6 us) held back its next tile, and the three
    // warps' batches fell on tiles 9-11 (mod 12) together: tiles 12-14 published 3-4 us late and every
    // 12th tile landed late (session 46's H200 trace). The first batches are staggered (SK_TILES - w
    // tiles). Same-run A/B on the H100 (docs/HISTORY.md, session 47): the forward at T = 8192 ~6 us and at
    // 16384 ~10 us faster.
    const int h = lane / 16, l16 = lane % 16;
    const float a_pre = *alpha_pre, a_post = *alpha_post, a_res = *alpha_res;
    // h_res after the publication (x_in needs only h_pre), batched: the tokens of the nb tiles whose
    // indices lanes 0 .. nb - 1 hold, SK_ILP a lane in each half-warp (nothing in this launch waits on
    // h_res, and a token's Sinkhorn is a latency-bound chain: session 22's trace had the coefficient
    // warps busy 7.8 us a tile, 4.4 of it one token's Sinkhorn, so they set the pace)
    auto sinkhorn_batch = [&](int nb, int btile) {
      const int per = (TT - s + S - 1) / S, ntok = per * nb;  // tokens r = s, s + S, ... a tile
      const bool elem = l16 < n * n;
      for (int e0 = 0; e0 < ntok; e0 += 2 * SK_ILP) {
        float L[SK_ILP], P[SK_ILP];
        int t[SK_ILP];
#pragma unroll
        for (int u = 0; u < SK_ILP; ++u) {
          const int e = e0 + h * SK_ILP + u, r = s + (e % per) * S;
          t[u] = (g + __shfl_sync(0xffffffffu, btile, e / per) * G) * TT + r;
          if (e >= ntok || t[u] >= Tn) t[u] = -1;
          // (v_m invr) a_res + b_m, as the tile's loop had it: mix as written there (by this warp, a
          // __syncwarp ago)
          L[u] = elem && t[u] >= 0 ? __ldcg(mix + (size_t)t[u] * M + 2 * n + l16) * a_res + b[2 * n + l16] : 0.0f;
        }
        dyn::sinkhorn_forward_lanes_k<SK_ILP>(L, P, n, tmax, sinkhorn_eps, lane);  // Liger's Sinkhorn
#pragma unroll
        for (int u = 0; u < SK_ILP; ++u)
          if (elem && t[u] >= 0) h_res[(size_t)t[u] * n * n + l16] = P[u];
      }
    };
    if (EXCHANGE && s < TT && ntile > 0) await_zeroed();
    int nb = 0, thr = max(1, SK_TILES - (warp - COEFF0)), btile = 0;
    for (;;) {
      int i = 0;
      if (lane == 0) i = atomicAdd(queue_s, 1);
      i = __shfl_sync(0xffffffffu, i, 0);
      if (!EXCHANGE || i >= ntile) break;
      const int z = g + i * G, t0 = z * TT;
      if (lane == 0) TRACE(i, 2);
      // this CTA has tokens r = s, s + S, ... of the tile
      if (s < TT) {
#ifndef MHC_CP_UNGATED  // (tests only: the readers go by the tags alone, from the first read)
        if (lane == 0) spin_until<false>(projected + z, all_in);  // when to read: every split signalled the tile
#endif
        if (lane == 0) TRACE(i, 3);
        __syncwarp();
        const unsigned long long* src = part_box(i);
        const unsigned tag = i + 1;
        const int m = min(lane, RL - 1);  // lane m sums element m (z_m, m < M; the sum of squares at MP)
        for (int r = s; r < TT; r += S) {
          const int t = t0 + r;
          const unsigned long long* pr = src + (size_t)r * RL + m;
          float v = 0.0f;
          for (int s0 = 0; s0 < S; s0 += 32) {  // every load of a round in flight at once; splits in order
            float a[32];
            for (;;) {  // until every split's word has the tile's tag (read again: one not in yet)
              bool late = false;
#pragma unroll
              for (int u = 0; u < 32; ++u) {
                const unsigned long long w = s0 + u < S ? ld_word(pr + (size_t)(s0 + u) * TT * RL) : tagged(0.0f, tag);
                a[u] = value_of(w);
                late = late || tag_of(w) != tag;
              }
              if (!__any_sync(0xffffffffu, late)) break;
              spin_pause();
            }
#pragma unroll
            for (int u = 0; u < 32; ++u) v += a[u];
          }
          const float invr = rsqrtf(__shfl_sync(0xffffffffu, v, MP) / (float)(n * C) + rms_eps);
          const float hp = sigmoid(v * invr * a_pre + b[min(lane, M - 1)]) + pre_eps;
          if (lane < n) st_word(hpre_box(i) + (size_t)r * NS + lane, tagged(hp, tag));  // to the x_in warps
          if (t < Tn) {
#ifndef MHC_CP_TRACE
            if (lane < M) mix[(size_t)t * M + lane] = v * invr;
#endif
            if (lane == MP) invr_out[t] = invr;
            if (lane < n) h_pre[(size_t)t * n + lane] = hp;
            else if (lane < 2 * n) h_post[(size_t)t * n + lane - n] = sigmoid(v * invr * a_post + b[lane]) * post_mult;
          }
        }
      }
      __syncwarp();  // (mix as the Sinkhorn batch reads it)
      if (lane == 0) TRACE(i, 4);
      if (lane == nb) btile = i;  // lane k keeps the batch's k-th tile
      if (++nb == thr) {
        if (s < TT) sinkhorn_batch(nb, btile);
        nb = 0;
        thr = SK_TILES;
      }
      if (lane == 0) TRACE(i, 5);
    }
    if (s < TT && nb > 0) sinkhorn_batch(nb, btile);  // the last batch's tiles
    if (warp == COEFF0 && lane == 0) TRACE_CTA(4, gtimer());
  }

#ifdef MHC_CP_TRACE
  __syncthreads();
  if (tid == 0) TRACE_CTA(5, gtimer());
#endif
}
