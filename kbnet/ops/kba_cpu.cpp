// Fused CPU kernels of kernel basis attention (KBA), built on first use by kbnet/ops/native.py.
//
// Why a native kernel: the official formulation materialises the fused kernel of every pixel (B·H·W·C·gc·k²
// values) and applies it with tiny batched mat-vecs, which is memory-bound. Here the bases are applied to the
// neighbourhood of a few pixels held in SIMD registers and mixed right away, so nothing bigger than a register
// block exists and the arithmetic runs at FMA speed. Same maths, different contraction order:
//     out[c=q·gc+r, p] = Σ_n a[n,p] · (bias[n,c] + Σ_j W[n,q,r,j] · u[q,j,p]),   j = (s, ky, kx).
//
// Layouts (all contiguous, prepared by native.py):
//   Positions p index a plane of length Lo (a multiple of kba_alignment()); positions without a pixel carry zero
//   coefficients and zero grad_out, so they contribute nothing and their outputs are discarded.
//   The neighbourhood value u[q,j,p] of channel group q is read at  xp[(b·C + q·gc)·cs + off[j] + p]: with a
//   zero-padded image flattened row by row (p = y·Wp + x) off[j] = s·cs + ky·Wp + kx; with unfolded columns
//   (im2col, used for small images where padded rows would waste positions) off[j] = j·Lo and cs = k²·Lo.
//   ap (B, N, Lo) coefficients · gp (B, C, Lo) grad_out · out (B, C, Lo)
//   w (N, C·gc·k²) kernel bases and bias (N, C) in the official layout (per basis: out-channel, in-channel of the
//   group, ky, kx), so the bases are read and their gradients written without any reordering copy.
// Vectors are GCC vector extensions (64 bytes with AVX-512, else 32), so the code is plain C++ for any target.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bf16.h"
#include "isa.h"
#if KBNET_AMX
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <optional>
#endif

namespace {

// The kernels' vector: a full AVX-512 register where the build targets AVX-512 (twice the lanes and 32 instead of
// 16 registers, so the blockings below grow with kRegisters), else 32 bytes (AVX2). The instruction set is the
// build's: the library is compiled with -march=native on the machine that runs it.
#if KBNET_AVX512
constexpr int kVecBytes = 64;
constexpr int kRegisters = 32;
#else
constexpr int kVecBytes = 32;
constexpr int kRegisters = 16;
#endif
template <typename T, int Bytes> struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T> using Vec = typename VecOf<T, kVecBytes>::type;
template <typename T> constexpr int kLanes = kVecBytes / sizeof(T);
// The layout copies transpose in 32-byte tiles on every target (8×8 floats, 4×4 doubles).
template <typename T> using Tile = typename VecOf<T, 32>::type;
template <typename T> constexpr int kTileLanes = 32 / sizeof(T);

template <typename T> constexpr int64_t kAlignment = kLanes<T>;
template <typename T> constexpr int64_t kLineFloats = 64 / sizeof(T);

template <typename T> inline Vec<T> load(const T* p) { Vec<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> inline void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }
template <typename T> inline Tile<T> load_tile(const T* p) { Tile<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> inline void store_tile(T* p, Tile<T> v) { std::memcpy(p, &v, sizeof v); }
// Pins v to a vector register. GCC otherwise folds a load that feeds several FMAs into each FMA's memory operand,
// one load per FMA, and the loop waits on the load ports instead of the FMA units (a no-op off x86 and in emulated
// builds, whose 64-byte vectors need not fit a register).
template <typename V> inline void in_register(V& v) {
#if defined(__x86_64__) && !defined(KBNET_EMULATED_AVX512)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}
// s - 0 is s for every s (s + 0 is not: -0 + 0 = +0), so this folds to a single broadcast from memory.
template <typename T> inline Vec<T> splat(T s) { return s - Vec<T>{}; }

// A cache-line aligned scratch buffer, zero on creation (std::vector only guarantees the alignment of T).
template <typename T> class Buffer {
 public:
  explicit Buffer(int64_t n) : n_(n), p_(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {
    zero();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }
  void zero() { std::memset(p_, 0, n_ * sizeof(T)); }

 private:
  int64_t n_;
  T* p_;
};

struct Dims {
  int64_t batch, channels, nset, ksize, gc, chan_stride, len;
  int64_t groups() const { return channels / gc; }
  int64_t taps() const { return gc * ksize * ksize; }
  int64_t basis_size() const { return channels * taps(); }  // one basis: C·gc·k² values
};

// Split [0, Lo) into about `parts` ranges that are multiples of the vector length.
template <typename T> inline void range_of(int64_t part, int64_t parts, int64_t len, int64_t& begin, int64_t& end) {
  const int64_t vectors = len / kLanes<T>;
  begin = vectors * part / parts * kLanes<T>;
  end = vectors * (part + 1) / parts * kLanes<T>;
}

// tk[m][r][i] = bias[n+m,r] + Σ_j W[n+m,r,j]·u[j, p + i·lanes] for NB bases n.. of one group: the shared inner
// loop. wn points at W[n, q·gc·J] (row r at r·J, next basis at +S), bn at bias[n, q·gc] (next basis at +C).
template <typename T, int NB, int GC, int PB>
inline void apply_bases(const T* x0, const int64_t* off, const Dims& d, const T* wn, const T* bn, int64_t p,
                        Vec<T> (&tk)[NB][GC][PB]) {
  constexpr int V = kLanes<T>;
  const int64_t J = d.taps(), S = d.basis_size();
  for (int m = 0; m < NB; ++m)
    for (int r = 0; r < GC; ++r)
      for (int i = 0; i < PB; ++i) tk[m][r][i] = splat<T>(bn[m * d.channels + r]);
  for (int64_t j = 0; j < J; ++j) {
    const T* xj = x0 + off[j] + p;
    Vec<T> u[PB];
    for (int i = 0; i < PB; ++i) u[i] = load(xj + i * V);
    for (int m = 0; m < NB; ++m)
      for (int r = 0; r < GC; ++r) {
        const Vec<T> w = splat<T>(wn[m * S + r * J + j]);
        for (int i = 0; i < PB; ++i) tk[m][r][i] += w * u[i];
      }
  }
}

// bf16 operands (AVX512_BF16): the neighbourhood and the bases hold pairs of consecutive in-channels s = 2·s2,
// 2·s2 + 1 of a group in one 32-bit value (the even channel in the low half), so one vdpbf16ps multiplies 16
// positions × 2 channels and accumulates both products in float32; a pair-tap j2 = (s2, ky, kx) replaces two taps.
// Coefficients, grad_out, biases, accumulators and results stay float32 (grad_x_w_bf16 also pairs coefficients).
struct Bf16Pair {
  uint32_t bits;
};
template <typename X> constexpr int kChannelsPer = std::is_same<X, Bf16Pair>::value ? 2 : 1;

#if KBNET_AVX512_BF16
template <typename T, int NB, int GC, int PB>
inline void apply_bases(const Bf16Pair* x0, const int64_t* off, const Dims& d, const Bf16Pair* wn, const float* bn,
                        int64_t p, Vec<float> (&tk)[NB][GC][PB]) {
  static_assert(std::is_same<T, float>::value && kLanes<float> == 16, "bf16 pairs accumulate in 16 float lanes");
  const int64_t J = d.taps() / 2, S = d.channels * J;
  __m512 acc[NB][GC][PB];
  for (int m = 0; m < NB; ++m)
    for (int r = 0; r < GC; ++r)
      for (int i = 0; i < PB; ++i) acc[m][r][i] = _mm512_set1_ps(bn[m * d.channels + r]);
  for (int64_t j = 0; j < J; ++j) {
    const Bf16Pair* xj = x0 + off[j] + p;
    __m512bh u[PB];
    for (int i = 0; i < PB; ++i) u[i] = (__m512bh)_mm512_loadu_si512(xj + i * 16);
    for (int m = 0; m < NB; ++m)
      for (int r = 0; r < GC; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wn[m * S + r * J + j].bits));
        for (int i = 0; i < PB; ++i) acc[m][r][i] = _mm512_dpbf16_ps(acc[m][r][i], u[i], w);
      }
  }
  for (int m = 0; m < NB; ++m)
    for (int r = 0; r < GC; ++r)
      for (int i = 0; i < PB; ++i) tk[m][r][i] = (Vec<float>)acc[m][r][i];
}
#endif

// Register blocking: NB bases × gc rows × PB position vectors = 12 basis accumulators with 16 registers, 24 with 32
// (enough to hide the FMA latency), plus PB inputs and a broadcast fill the vector registers; the mixing
// accumulators spill, they are touched once per NB bases. Shorter blocks finish each range, single bases finish an
// odd nset.
constexpr int bases_per_pass(int gc) { return gc == 1 ? 4 : gc == 2 ? 2 : 1; }
constexpr int blocking(int gc) { return kRegisters == 32 ? (gc <= 4 ? 6 : 3) : (gc <= 4 ? 3 : 1); }
// The same budget for grad_x (scatter_taps(gc) taps × gc rows × scatter_vectors(gc) position vectors: 12
// accumulators with 16 registers, 24 with 32; every 9·gc tap count splits into whole blocks) and grad_w (kRowTaps
// taps × kRowVectors vectors of basis rows: 12 or 24 accumulators, the row vectors and a broadcast fit too).
constexpr int scatter_taps(int gc) {
  return kRegisters == 32 ? (gc <= 4 ? 3 : 1) : (gc == 1 ? 3 : gc == 2 ? 2 : 1);
}
constexpr int scatter_vectors(int gc) {
  return kRegisters == 32 ? (gc <= 2 ? 4 : gc == 4 ? 2 : 3) : (gc <= 4 ? 3 : 1);
}
constexpr int kRowTaps = 6;
constexpr int kRowVectors = kRegisters == 32 ? 4 : 2;
// Positions per chunk of the grad_x / grad_w kernel: whole grad_x blocks for KBNet's group sizes (3 vectors of 8
// with AVX2, 2 or 4 of 16 with AVX-512), so no short block ends a chunk, and few enough that the chunk's
// coefficients and a·g products stay in cache between the sweeps that reuse them.
constexpr int64_t kChunk = kRegisters == 32 ? 128 : 120;

// Where the bases n.. of group q start in w: per basis C rows of taps()/kChannelsPer values.
template <typename X, int GC> inline const X* bases_of(const X* w, const Dims& d, int64_t n, int64_t q) {
  const int64_t J = d.taps() / kChannelsPer<X>;
  return w + n * d.channels * J + q * GC * J;
}

template <typename T, typename X, int NB, int GC, int PB>
inline void forward_bases(const X* x0, const T* a0, const X* w, const T* bias, const int64_t* off, const Dims& d,
                          int64_t q, int64_t p, int64_t n, Vec<T> (&acc)[GC][PB]) {
  Vec<T> tk[NB][GC][PB];
  apply_bases<T, NB, GC, PB>(x0, off, d, bases_of<X, GC>(w, d, n, q), bias + n * d.channels + q * GC, p, tk);
  for (int m = 0; m < NB; ++m)
    for (int i = 0; i < PB; ++i) {
      const Vec<T> a = load(a0 + (n + m) * d.len + p + i * kLanes<T>);
      for (int r = 0; r < GC; ++r) acc[r][i] += a * tk[m][r][i];
    }
}

template <typename T, typename X, int GC, int PB>
inline void forward_block(const X* x0, const T* a0, const X* w, const T* bias, T* o0, const int64_t* off,
                          const Dims& d, int64_t q, int64_t p) {
  constexpr int NB = bases_per_pass(GC);
  Vec<T> acc[GC][PB] = {};
  int64_t n = 0;
  for (; n + NB <= d.nset; n += NB) forward_bases<T, X, NB, GC, PB>(x0, a0, w, bias, off, d, q, p, n, acc);
  for (; n < d.nset; ++n) forward_bases<T, X, 1, GC, PB>(x0, a0, w, bias, off, d, q, p, n, acc);
  for (int r = 0; r < GC; ++r)
    for (int i = 0; i < PB; ++i) store(o0 + r * d.len + p + i * kLanes<T>, acc[r][i]);
}

// xp and w hold T values or bf16 pairs (X = Bf16Pair, chan_stride then counts pairs). Tasks split the positions
// into `parts` ranges and the groups into `qblocks` ranges; a task runs its groups one after the other, so the
// coefficients of its positions (read by every group) stay in cache.
template <typename T, int GC, typename X = T>
void forward(const X* xp, const int64_t* off, const T* ap, const X* w, const T* bias, T* out, const Dims& d,
             int64_t parts, int64_t qblocks, int threads) {
  constexpr int PB = blocking(GC);
  const int64_t G = d.groups(), per_qblock = (G + qblocks - 1) / qblocks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < d.batch * parts * qblocks; ++t) {
    const int64_t b = t / (parts * qblocks), qb = t % qblocks;
    int64_t begin, end;
    range_of<T>(t / qblocks % parts, parts, d.len, begin, end);
    const T* a0 = ap + b * d.nset * d.len;
    for (int64_t q = qb * per_qblock; q < std::min(G, (qb + 1) * per_qblock); ++q) {
      const X* x0 = xp + (b * d.channels + q * GC) / kChannelsPer<X> * d.chan_stride;
      T* o0 = out + (b * d.channels + q * GC) * d.len;
      int64_t p = begin;
      for (; p + PB * kLanes<T> <= end; p += PB * kLanes<T>)
        forward_block<T, X, GC, PB>(x0, a0, w, bias, o0, off, d, q, p);
      for (; p < end; p += kLanes<T>) forward_block<T, X, GC, 1>(x0, a0, w, bias, o0, off, d, q, p);
    }
  }
}

// Always inlined: GCC kept it out of line for gc ≤ 4, so each call spilled the basis accumulators to the stack
// and read them back (1.1-1.2x slower grad_att for KBNet_l's gc = 2).
template <typename T, typename X, int NB, int GC, int PB>
inline __attribute__((always_inline)) void grad_att_bases(const X* x0, const T* g0, const X* w, const T* bias,
                                                          T* d0, const int64_t* off, const Dims& d, int64_t q,
                                                          int64_t p, int64_t n) {
  constexpr int V = kLanes<T>;
  Vec<T> tk[NB][GC][PB];
  apply_bases<T, NB, GC, PB>(x0, off, d, bases_of<X, GC>(w, d, n, q), bias + n * d.channels + q * GC, p, tk);
  for (int m = 0; m < NB; ++m)
    for (int i = 0; i < PB; ++i) {
      T* dst = d0 + (n + m) * d.len + p + i * V;
      Vec<T> s = load(dst);
      for (int r = 0; r < GC; ++r) s += load(g0 + r * d.len + p + i * V) * tk[m][r][i];
      store(dst, s);
    }
}

template <typename T, typename X, int GC, int PB>
inline void grad_att_block(const X* x0, const T* g0, const X* w, const T* bias, T* d0, const int64_t* off,
                           const Dims& d, int64_t q, int64_t p) {
  constexpr int NB = bases_per_pass(GC);
  int64_t n = 0;
  for (; n + NB <= d.nset; n += NB) grad_att_bases<T, X, NB, GC, PB>(x0, g0, w, bias, d0, off, d, q, p, n);
  for (; n < d.nset; ++n) grad_att_bases<T, X, 1, GC, PB>(x0, g0, w, bias, d0, off, d, q, p, n);
}

// datt[n,p] = Σ_q Σ_r g[q,r,p] · (bias[n,q,r] + Σ_j W[n,q,r,j]·u[q,j,p]). Tasks split the groups into `qblocks`
// ranges, each summing into its own slice of `dpart` (qblocks, B, N, Lo; zero on entry), so no two threads
// write the same value and small images still give every thread work.
template <typename T, int GC, typename X = T>
void grad_att(const X* xp, const int64_t* off, const T* gp, const X* w, const T* bias, T* dpart, const Dims& d,
              int64_t parts, int64_t qblocks, int threads) {
  constexpr int PB = blocking(GC);
  const int64_t G = d.groups(), per_qblock = (G + qblocks - 1) / qblocks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < qblocks * d.batch * parts; ++t) {
    const int64_t qb = t / (d.batch * parts), b = t / parts % d.batch;
    int64_t begin, end;
    range_of<T>(t % parts, parts, d.len, begin, end);
    T* d0 = dpart + (qb * d.batch + b) * d.nset * d.len;
    for (int64_t q = qb * per_qblock; q < std::min(G, (qb + 1) * per_qblock); ++q) {
      const X* x0 = xp + (b * d.channels + q * GC) / kChannelsPer<X> * d.chan_stride;
      const T* g0 = gp + (b * d.channels + q * GC) * d.len;
      int64_t p = begin;
      for (; p + PB * kLanes<T> <= end; p += PB * kLanes<T>)
        grad_att_block<T, X, GC, PB>(x0, g0, w, bias, d0, off, d, q, p);
      for (; p < end; p += kLanes<T>) grad_att_block<T, X, GC, 1>(x0, g0, w, bias, d0, off, d, q, p);
    }
  }
}

// grad_x with the fused kernel first: dxp[q, off_j + p] += Σ_r g[r,p] · Σ_n a[n,p] · W[n,r,j] for TB taps j..,
// all GC rows and PB position vectors. ac holds the chunk's coefficients (one row per basis, `stride` apart), wj
// the group's bases from tap j on (basis n at n·GC·J, row r at r·J), g0 grad_out of the chunk (rows Lo apart).
template <typename T, int GC, int TB, int PB>
inline void scatter_block(const T* ac, int64_t stride, int64_t pb, const T* wj, const Dims& d, const T* g0,
                          const int64_t* off, T* dx0, bool accumulate) {
  constexpr int V = kLanes<T>;
  const int64_t J = d.taps();
  Vec<T> acc[TB][GC][PB] = {};
  for (int64_t n = 0; n < d.nset; ++n) {
    Vec<T> av[PB];
    for (int i = 0; i < PB; ++i) {
      av[i] = load(ac + n * stride + pb + i * V);
      in_register(av[i]);
    }
    const T* wn = wj + n * GC * J;
    for (int t = 0; t < TB; ++t)
      for (int r = 0; r < GC; ++r) {
        const Vec<T> wv = splat<T>(wn[r * J + t]);
        for (int i = 0; i < PB; ++i) acc[t][r][i] += wv * av[i];
      }
  }
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < PB; ++i) {
      T* dst = dx0 + off[t] + pb + i * V;
      Vec<T> sum = accumulate ? load(dst) : Vec<T>{};
      for (int r = 0; r < GC; ++r) sum += load(g0 + r * d.len + pb + i * V) * acc[t][r][i];
      store(dst, sum);
    }
}

template <typename T, int GC, int TB>
inline void scatter_chunk(const T* ac, int64_t stride, int64_t len, const T* wj, const Dims& d, const T* g0,
                          const int64_t* off, T* dx0, bool accumulate) {
  constexpr int V = kLanes<T>, PB = scatter_vectors(GC);
  int64_t pb = 0;
  for (; pb + PB * V <= len; pb += PB * V)
    scatter_block<T, GC, TB, PB>(ac, stride, pb, wj, d, g0, off, dx0, accumulate);
  for (; pb < len; pb += V) scatter_block<T, GC, TB, 1>(ac, stride, pb, wj, d, g0, off, dx0, accumulate);
}

// grad_w: dwq[j, nr] += Σ_p u[j,p] · h[p, nr] for JB taps × NB vectors of nr; ht rows (one per p) have `stride`.
template <typename T, int JB, int NB>
inline void accumulate_taps(const T* ht, int64_t stride, int64_t len, const T* x0, const int64_t* off, int64_t p0,
                            T* dwq, int64_t dw_stride) {
  constexpr int V = kLanes<T>;
  Vec<T> acc[JB][NB];
  for (int jj = 0; jj < JB; ++jj)
    for (int k = 0; k < NB; ++k) acc[jj][k] = load(dwq + jj * dw_stride + k * V);
  for (int64_t p = 0; p < len; ++p) {
    Vec<T> hv[NB];
    for (int k = 0; k < NB; ++k) {
      hv[k] = load(ht + p * stride + k * V);
      in_register(hv[k]);
    }
    for (int jj = 0; jj < JB; ++jj) {
      const Vec<T> u = splat<T>(x0[off[jj] + p0 + p]);
      for (int k = 0; k < NB; ++k) acc[jj][k] += u * hv[k];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int k = 0; k < NB; ++k) store(dwq + jj * dw_stride + k * V, acc[jj][k]);
}

template <typename T, int NB>
inline void accumulate_rows(const T* ht, int64_t stride, int64_t len, const T* x0, const int64_t* off, int64_t p0,
                            int64_t J, T* dwq, int64_t dw_stride) {
  int64_t j = 0;
  for (; j + kRowTaps <= J; j += kRowTaps)
    accumulate_taps<T, kRowTaps, NB>(ht, stride, len, x0, off + j, p0, dwq + j * dw_stride, dw_stride);
  for (; j + 3 <= J; j += 3)
    accumulate_taps<T, 3, NB>(ht, stride, len, x0, off + j, p0, dwq + j * dw_stride, dw_stride);
  for (; j < J; ++j) accumulate_taps<T, 1, NB>(ht, stride, len, x0, off + j, p0, dwq + j * dw_stride, dw_stride);
}

// Register-tile transposes (8×8 floats, 4×4 doubles) of the layout copies and of grad_w's a·g products.
template <typename T> struct Transpose;
template <> struct Transpose<float> {
  typedef int Mask __attribute__((vector_size(32)));
  static void run(Tile<float> (&r)[8]) {
    Tile<float> t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shuffle(r[i], r[i + 1], Mask{0, 8, 1, 9, 4, 12, 5, 13});
      t[i + 1] = __builtin_shuffle(r[i], r[i + 1], Mask{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4)
      for (int k = 0; k < 2; ++k) {
        u[i + 2 * k] = __builtin_shuffle(t[i + k], t[i + k + 2], Mask{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 2 * k + 1] = __builtin_shuffle(t[i + k], t[i + k + 2], Mask{2, 3, 10, 11, 6, 7, 14, 15});
      }
    for (int i = 0; i < 4; ++i) {
      r[i] = __builtin_shuffle(u[i], u[i + 4], Mask{0, 1, 2, 3, 8, 9, 10, 11});
      r[i + 4] = __builtin_shuffle(u[i], u[i + 4], Mask{4, 5, 6, 7, 12, 13, 14, 15});
    }
  }
};
template <> struct Transpose<double> {
  typedef long long Mask __attribute__((vector_size(32)));
  static void run(Tile<double> (&r)[4]) {
    Tile<double> t[4];
    for (int i = 0; i < 4; i += 2) {
      t[i] = __builtin_shuffle(r[i], r[i + 1], Mask{0, 4, 2, 6});
      t[i + 1] = __builtin_shuffle(r[i], r[i + 1], Mask{1, 5, 3, 7});
    }
    for (int i = 0; i < 2; ++i) {
      r[i] = __builtin_shuffle(t[i], t[i + 2], Mask{0, 1, 4, 5});
      r[i + 2] = __builtin_shuffle(t[i], t[i + 2], Mask{2, 3, 6, 7});
    }
  }
};

// rows (count × len, row stride `stride`) to columns: dst[p·dst_stride + i] = src[i·stride + p], in register tiles
// where whole tiles fit, element by element for the rest.
template <typename T>
inline void transpose_rows(const T* src, int64_t stride, int64_t count, int64_t len, T* dst, int64_t dst_stride) {
  constexpr int V = kTileLanes<T>;
  const int64_t rows = count / V * V, cols = len / V * V;
  for (int64_t i0 = 0; i0 < rows; i0 += V)
    for (int64_t p0 = 0; p0 < cols; p0 += V) {
      Tile<T> r[V];
      for (int i = 0; i < V; ++i) r[i] = load_tile(src + (i0 + i) * stride + p0);
      Transpose<T>::run(r);
      for (int i = 0; i < V; ++i) store_tile(dst + (p0 + i) * dst_stride + i0, r[i]);
    }
  for (int64_t i = 0; i < count; ++i)
    for (int64_t p = i < rows ? cols : 0; p < len; ++p) dst[p * dst_stride + i] = src[i * stride + p];
}

// Groups per grad_x_w task: the groups of up to kTaskChannels channels share one copy and transpose of each chunk's
// coefficients (one per group made KBNet_l's gc = 2 kernel 1.04-1.06x slower), as long as the tasks still split
// evenly between the threads (a multiple of them, or enough that the last round is a small share).
constexpr int64_t kTaskChannels = 8;
inline int64_t groups_per_task(int64_t groups, int gc, int threads) {
  for (int64_t per = std::max<int64_t>(1, kTaskChannels / gc); per > 1; --per) {
    const int64_t tasks = (groups + per - 1) / per;
    if (tasks % threads == 0 || tasks >= 8 * threads) return per;
  }
  return 1;
}

// One task per few groups (all batch items, see groups_per_task): no two tasks write the same dxp or dw values,
// and the weight gradient is summed over the batch in the task's own buffers, so dw (N, C·gc·k², official layout)
// needs no per-batch partials; every value of dw is written. dxp is added to where taps overlap (padded rows, zero
// on entry) or overwritten where each value has one tap (columns: `accumulate` false, no zeroing needed). Each
// group's bases are copied together once (in w, basis n + 1 is a whole basis further, often a multiple of 4 KB,
// which would put all of them in one L1 set), and per chunk of positions the coefficients into rows `cs` apart
// (the planes' stride puts every other row in the same sets). grad_x applies the fused kernels Σ_n a·W to
// grad_out; grad_w sums u · a·g over positions, with the products in position-major rows (r-major columns:
// ht[p, r·Np + n], Np = N rounded up to whole vectors, zero padded) built from the transposed coefficients, so no
// part needs a horizontal sum.
template <typename T, int GC>
void grad_x_w(const T* xp, const int64_t* off, const T* ap, const T* gp, const T* w, T* dxp, T* dw, const Dims& d,
              bool accumulate, int threads) {
  constexpr int V = kLanes<T>, TB = scatter_taps(GC);
  const int64_t G = d.groups(), N = d.nset, J = d.taps(), S = d.basis_size(), Lo = d.len;
  const int64_t np = (N + V - 1) / V * V, nrp = GC * np;
  const int64_t chunk = std::min(Lo, kChunk);
  // Row strides one cache line longer than the rows: power-of-two strides would put every row in the same few
  // L1 sets and evict them between the sweeps that reuse them.
  const int64_t cs = chunk + kLineFloats<T>, ats = np + kLineFloats<T>, hts = nrp + kLineFloats<T>;
  const int64_t per_task = groups_per_task(G, GC, threads), tasks = (G + per_task - 1) / per_task;
#pragma omp parallel num_threads(threads)
  {
    Buffer<T> wq(per_task * N * GC * J), ac(N * cs), at(chunk * ats), ht(chunk * hts), dwq(per_task * J * nrp);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t q0 = task * per_task, nq = std::min(per_task, G - q0);
      for (int64_t k = 0; k < nq; ++k)
        for (int64_t n = 0; n < N; ++n)
          std::memcpy(wq.data() + (k * N + n) * GC * J, w + n * S + (q0 + k) * GC * J, GC * J * sizeof(T));
      dwq.zero();
      for (int64_t b = 0; b < d.batch; ++b) {
        const T* a0 = ap + b * N * Lo;
        for (int64_t p0 = 0; p0 < Lo; p0 += chunk) {
          const int64_t len = std::min(chunk, Lo - p0);
          for (int64_t n = 0; n < N; ++n) std::memcpy(ac.data() + n * cs, a0 + n * Lo + p0, len * sizeof(T));
          transpose_rows(ac.data(), cs, N, len, at.data(), ats);
          for (int64_t k = 0; k < nq; ++k) {
            const int64_t q = q0 + k;
            const T* x0 = xp + (b * d.channels + q * GC) * d.chan_stride;
            const T* g0 = gp + (b * d.channels + q * GC) * Lo;
            T* dx0 = dxp + (b * d.channels + q * GC) * d.chan_stride;
            const T* wk = wq.data() + k * N * GC * J;
            T* dwk = dwq.data() + k * J * nrp;
            int64_t j = 0;
            for (; j + TB <= J; j += TB)
              scatter_chunk<T, GC, TB>(ac.data(), cs, len, wk + j, d, g0 + p0, off + j, dx0 + p0, accumulate);
            for (; j < J; ++j)
              scatter_chunk<T, GC, 1>(ac.data(), cs, len, wk + j, d, g0 + p0, off + j, dx0 + p0, accumulate);
            for (int64_t p = 0; p < len; ++p)
              for (int r = 0; r < GC; ++r) {
                const Vec<T> gv = splat<T>(g0[r * Lo + p0 + p]);
                T* hr = ht.data() + p * hts + r * np;
                for (int64_t n = 0; n < np; n += V) store(hr + n, gv * load(at.data() + p * ats + n));
              }
            int64_t nr = 0;
            for (; nr + kRowVectors * V <= nrp; nr += kRowVectors * V)
              accumulate_rows<T, kRowVectors>(ht.data() + nr, hts, len, x0, off, p0, J, dwk + nr, nrp);
            for (; nr < nrp; nr += V)
              accumulate_rows<T, 1>(ht.data() + nr, hts, len, x0, off, p0, J, dwk + nr, nrp);
          }
        }
      }
      for (int64_t k = 0; k < nq; ++k)
        for (int64_t n = 0; n < N; ++n)
          for (int r = 0; r < GC; ++r)
            for (int64_t jj = 0; jj < J; ++jj)
              dw[n * S + ((q0 + k) * GC + r) * J + jj] = dwq[k * J * nrp + jj * nrp + r * np + n];
    }
  }
}

// bf16 <-> float32 conversions of the bf16 path's layout copies (bf16.h).
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline uint32_t to_bf16(float f) { return float_to_bf16(f); }

// Element conversions between an image of I and planes of P: identity, or bf16 bits (uint16_t) <-> float32.
template <typename P> inline P to_plane(P v) { return v; }
inline float to_plane(uint16_t v) { return to_float(v); }
template <typename I, typename P> inline I to_image(P v) {
  if constexpr (std::is_same<I, P>::value) return v;
  else return static_cast<I>(to_bf16(v));
}
template <typename P, typename I> inline Tile<P> load_image_tile(const I* p) {
  if constexpr (std::is_same<I, P>::value) return load_tile(p);
  Tile<P> v;
  for (int e = 0; e < kTileLanes<P>; ++e) v[e] = to_plane(p[e]);
  return v;
}
template <typename I, typename P> inline void store_image_tile(I* p, Tile<P> v) {
  if constexpr (std::is_same<I, P>::value) store_tile(p, v);
  else
    for (int e = 0; e < kTileLanes<P>; ++e) p[e] = to_image<I>(v[e]);
}

// Layout changes between an image (B, C, H, W) with arbitrary strides (NCHW or channels-last) and the kernels'
// flat planes (B, C, plane): pixel (y, x) sits at base + y·row + x. Positions without a pixel are zero after
// pack. Channels-last images are transposed in lanes×lanes register tiles (torch's transposing copy is several
// times slower).
struct Image {
  int64_t batch, channels, height, width, sb, sc, sh, sw;
};


// One image row <-> one row of every plane.
template <typename P, typename I, bool ToPlanes>
inline void copy_row(I* img, const Image& im, P* planes, int64_t plane, int64_t base, int64_t row, int64_t b,
                     int64_t y) {
  constexpr int V = kTileLanes<P>;
  I* src = img + b * im.sb + y * im.sh;
  P* dst = planes + b * im.channels * plane + base + y * row;
  auto scalar = [&](int64_t c, int64_t x) {
    if (ToPlanes) dst[c * plane + x] = to_plane(src[c * im.sc + x * im.sw]);
    else src[c * im.sc + x * im.sw] = to_image<I>(dst[c * plane + x]);
  };
  if (im.sc != 1) {
    for (int64_t c = 0; c < im.channels; ++c)
      for (int64_t x = 0; x < im.width; ++x) scalar(c, x);
    return;
  }
  const int64_t cv = im.channels / V * V, xv = im.width / V * V;
  for (int64_t c0 = 0; c0 < cv; c0 += V)
    for (int64_t x0 = 0; x0 < xv; x0 += V) {
      Tile<P> r[V];
      for (int i = 0; i < V; ++i)
        r[i] = ToPlanes ? load_image_tile<P>(src + (x0 + i) * im.sw + c0) : load_tile(dst + (c0 + i) * plane + x0);
      Transpose<P>::run(r);
      for (int i = 0; i < V; ++i) {
        if (ToPlanes) store_tile(dst + (c0 + i) * plane + x0, r[i]);
        else store_image_tile<I, P>(src + (x0 + i) * im.sw + c0, r[i]);
      }
    }
  for (int64_t c = 0; c < im.channels; ++c)
    for (int64_t x = c < cv ? xv : 0; x < im.width; ++x) scalar(c, x);
}

// Planes of P from an image of I (the same type, or bf16 bits into float32 planes).
template <typename P, typename I>
void pack(const I* img, Image im, P* planes, int64_t plane, int64_t base, int64_t row, int threads) {
  const int64_t last = base + (im.height - 1) * row + im.width;  // one past the last pixel
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < im.batch * im.height; ++t) {
      const int64_t b = t / im.height, y = t % im.height;
      copy_row<P, I, true>(const_cast<I*>(img), im, planes, plane, base, row, b, y);
      if (y + 1 < im.height)
        for (int64_t c = 0; c < im.channels; ++c)
          std::fill_n(planes + (b * im.channels + c) * plane + base + y * row + im.width, row - im.width, P(0));
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < im.batch * im.channels; ++t) {
      std::fill_n(planes + t * plane, base, P(0));
      std::fill_n(planes + t * plane + last, plane - last, P(0));
    }
  }
}

// An image of I from planes of P (the same type, or float32 planes rounded to bf16 bits, nearest even).
template <typename P, typename I>
void unpack(const P* planes, int64_t plane, int64_t base, int64_t row, I* img, Image im, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < im.batch * im.height; ++t)
    copy_row<P, I, false>(img, im, const_cast<P*>(planes), plane, base, row, t / im.height, t % im.height);
}

// Columns (B, C, k, k, len) of an image with arbitrary strides: column (ky, kx) holds, at y·W + x, the pixel
// (y + ky - k/2, x + kx - k/2) or 0 outside; positions from H·W on are 0. Every value is written.
template <typename T>
void unfold_columns(const T* img, Image im, int64_t k, T* cols, int64_t len, int threads) {
  const int64_t pad = k / 2, hw = im.height * im.width;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < im.batch * im.channels; ++t) {
    const int64_t b = t / im.channels, c = t % im.channels;
    const T* src = img + b * im.sb + c * im.sc;
    for (int64_t ky = 0; ky < k; ++ky)
      for (int64_t kx = 0; kx < k; ++kx) {
        T* dst = cols + (t * k * k + ky * k + kx) * len;
        for (int64_t y = 0; y < im.height; ++y) {
          const int64_t sy = y + ky - pad;
          for (int64_t x = 0; x < im.width; ++x) {
            const int64_t sx = x + kx - pad;
            const bool inside = sy >= 0 && sy < im.height && sx >= 0 && sx < im.width;
            dst[y * im.width + x] = inside ? src[sy * im.sh + sx * im.sw] : T(0);
          }
        }
        std::fill_n(dst + hw, len - hw, T(0));
      }
  }
}

// The adjoint of unfold_columns: each pixel sums the column values that read it (col2im), into `img`.
template <typename T>
void fold_columns(const T* cols, int64_t len, int64_t k, T* img, Image im, int threads) {
  const int64_t pad = k / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < im.batch * im.channels; ++t) {
    const int64_t b = t / im.channels, c = t % im.channels;
    T* dst = img + b * im.sb + c * im.sc;
    const T* src = cols + t * k * k * len;
    for (int64_t y = 0; y < im.height; ++y)
      for (int64_t x = 0; x < im.width; ++x) {
        T sum = 0;
        for (int64_t ky = 0; ky < k; ++ky) {
          const int64_t oy = y - ky + pad;
          if (oy < 0 || oy >= im.height) continue;
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t ox = x - kx + pad;
            if (ox >= 0 && ox < im.width) sum += src[(ky * k + kx) * len + oy * im.width + ox];
          }
        }
        dst[y * im.sh + x * im.sw] = sum;
      }
  }
}

// bf16 pair planes of an image of S (float or bf16 bits): channels 2·c2 and 2·c2 + 1 in one 32-bit value (see
// Bf16Pair), pixel (y, x) at base + y·row + x, zero elsewhere. An odd channel count pairs the last channel with
// zeros. (A channels-last bf16 image already holds these pairs: native.py packs it as 32-bit values instead.)
template <typename S>
void pack_pairs(const S* img, Image im, uint32_t* planes, int64_t plane, int64_t base, int64_t row, int threads) {
  const int64_t pc = (im.channels + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < im.batch * pc; ++t) {
    const int64_t b = t / pc, c = t % pc * 2;
    uint32_t* pp = planes + t * plane;
    std::fill_n(pp, plane, 0u);
    // The odd channel's offset and mask (a select on a loop invariant, so the loop still vectorises).
    const int64_t odd = c + 1 < im.channels ? im.sc : 0;
    const uint32_t odd_mask = c + 1 < im.channels ? ~0u : 0u;
    for (int64_t y = 0; y < im.height; ++y) {
      const S* src = img + b * im.sb + c * im.sc + y * im.sh;
      const int64_t o = base + y * row;
      auto copy = [&](int64_t sw) {
        for (int64_t x = 0; x < im.width; ++x)
          pp[o + x] = to_bf16(to_float(src[x * sw])) | (to_bf16(to_float(src[odd + x * sw])) << 16 & odd_mask);
      };
      if (im.sw == 1) copy(1);  // a constant stride: the loop vectorises
      else copy(im.sw);
    }
  }
}

// Kernel bases in the official layout (N, C, gc, k²), float32 or bf16 bits as the caller holds them, read as bf16
// pairs of consecutive in-channels (see Bf16Pair): pair j2 = (s2, t) of row nc = n·C + c.
struct BasesSource {
  const void* w;
  bool bf16;
  int64_t gc, k2;
  uint32_t value(int64_t i) const {
    return bf16 ? static_cast<const uint16_t*>(w)[i] : to_bf16(static_cast<const float*>(w)[i]);
  }
  uint32_t pair(int64_t nc, int64_t j2) const {
    const int64_t i = (nc * gc + 2 * (j2 / k2)) * k2 + j2 % k2;
    return value(i) | value(i + k2) << 16;
  }
};

// The bases as (N, C, gc/2·k²) pairs.
inline void pair_bases(const BasesSource& w, int64_t rows, uint32_t* out) {
  const int64_t J2 = w.gc / 2 * w.k2;
  for (int64_t nc = 0; nc < rows; ++nc)
    for (int64_t j2 = 0; j2 < J2; ++j2) out[nc * J2 + j2] = w.pair(nc, j2);
}

// Scratch words of the calling thread, kept between calls (slot: one buffer per use): the packed bases of every
// KBA call in fresh memory would fault their pages in each time (about a millisecond for the 4 MB of a
// 1024-channel level). Not zeroed: users write every word they read.
template <int Slot> uint32_t* reused_words(int64_t n) {
  thread_local struct Store {
    uint32_t* p = nullptr;
    int64_t n = 0;
    ~Store() { std::free(p); }
  } store;
  if (n > store.n) {
    std::free(store.p);
    store.p = static_cast<uint32_t*>(std::aligned_alloc(64, (n * sizeof(uint32_t) + 63) / 64 * 64));
    store.n = n;
  }
  return store.p;
}

template <typename T, template <typename, int> class F, typename... A>
int dispatch_gc(int64_t gc, A... args) {
  switch (gc) {
    case 1: F<T, 1>::run(args...); return 0;
    case 2: F<T, 2>::run(args...); return 0;
    case 4: F<T, 4>::run(args...); return 0;
    case 8: F<T, 8>::run(args...); return 0;
    default: return -1;
  }
}

template <typename T, int GC> struct Forward {
  template <typename... A> static void run(A... args) { forward<T, GC>(args...); }
};
template <typename T, int GC> struct GradAtt {
  template <typename... A> static void run(A... args) { grad_att<T, GC>(args...); }
};
template <typename T, int GC> struct GradXW {
  template <typename... A> static void run(A... args) { grad_x_w<T, GC>(args...); }
};

}  // namespace

#define KBA_DIMS_ARGS int64_t batch, int64_t channels, int64_t nset, int64_t ksize, int64_t gc, int64_t chan_stride, \
                      int64_t len
#define KBA_DIMS Dims{batch, channels, nset, ksize, gc, chan_stride, len}
#define KBA_ENTRY_POINTS(T, SUFFIX)                                                                                  \
  extern "C" int kba_forward_##SUFFIX(const T* xp, const int64_t* off, const T* ap, const T* w, const T* bias,       \
                                      T* out, KBA_DIMS_ARGS, int64_t parts, int64_t qblocks, int threads) {         \
    return dispatch_gc<T, Forward>(gc, xp, off, ap, w, bias, out, KBA_DIMS, parts, qblocks, threads);                \
  }                                                                                                                  \
  extern "C" int kba_grad_att_##SUFFIX(const T* xp, const int64_t* off, const T* gp, const T* w, const T* bias,      \
                                       T* dpart, KBA_DIMS_ARGS, int64_t parts, int64_t qblocks, int threads) {       \
    return dispatch_gc<T, GradAtt>(gc, xp, off, gp, w, bias, dpart, KBA_DIMS, parts, qblocks, threads);             \
  }                                                                                                                  \
  extern "C" int kba_grad_x_w_##SUFFIX(const T* xp, const int64_t* off, const T* ap, const T* gp, const T* w, T* dxp, \
                                       T* dw, KBA_DIMS_ARGS, int64_t accumulate, int threads) {                      \
    return dispatch_gc<T, GradXW>(gc, xp, off, ap, gp, w, dxp, dw, KBA_DIMS, accumulate != 0, threads);             \
  }                                                                                                                  \
  extern "C" int64_t kba_alignment_##SUFFIX() { return kAlignment<T>; }                                               \
  extern "C" void kba_pack_##SUFFIX(const T* img, int64_t batch, int64_t channels, int64_t height, int64_t width,     \
                                    int64_t sb, int64_t sc, int64_t sh, int64_t sw, T* planes, int64_t plane,        \
                                    int64_t base, int64_t row, int threads) {                                        \
    pack<T, T>(img, Image{batch, channels, height, width, sb, sc, sh, sw}, planes, plane, base, row, threads);       \
  }                                                                                                                  \
  extern "C" void kba_unfold_##SUFFIX(const T* img, int64_t batch, int64_t channels, int64_t height, int64_t width,   \
                                      int64_t sb, int64_t sc, int64_t sh, int64_t sw, int64_t k, T* cols,            \
                                      int64_t len, int threads) {                                                    \
    unfold_columns<T>(img, Image{batch, channels, height, width, sb, sc, sh, sw}, k, cols, len, threads);            \
  }                                                                                                                  \
  extern "C" void kba_fold_##SUFFIX(const T* cols, int64_t len, int64_t k, T* img, int64_t batch, int64_t channels,  \
                                    int64_t height, int64_t width, int64_t sb, int64_t sc, int64_t sh, int64_t sw,   \
                                    int threads) {                                                                   \
    fold_columns<T>(cols, len, k, img, Image{batch, channels, height, width, sb, sc, sh, sw}, threads);              \
  }                                                                                                                  \
  extern "C" void kba_unpack_##SUFFIX(const T* planes, int64_t plane, int64_t base, int64_t row, T* img,             \
                                      int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t sb,    \
                                      int64_t sc, int64_t sh, int64_t sw, int threads) {                             \
    unpack<T, T>(planes, plane, base, row, img, Image{batch, channels, height, width, sb, sc, sh, sw}, threads);     \
  }

KBA_ENTRY_POINTS(float, f32)
KBA_ENTRY_POINTS(double, f64)

// Instruction sets of this build: 1 = 64-byte (AVX-512) kernels, 2 = bf16 kernels (AVX512_BF16), 4 = their
// intrinsics emulated (isa.h).
extern "C" int64_t kba_isa() {
#ifdef KBNET_EMULATED_AVX512
  constexpr int64_t emulated = 4;
#else
  constexpr int64_t emulated = 0;
#endif
  return (kVecBytes == 64 ? 1 : 0) | (KBNET_AVX512_BF16 ? 2 : 0) | emulated;
}

#define KBA_IMAGE_ARGS int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t sb, int64_t sc, \
                       int64_t sh, int64_t sw
#define KBA_IMAGE Image{batch, channels, height, width, sb, sc, sh, sw}
// The bf16 path's layout copies from an image of bf16 bits (`bf16`) or float32: into bf16 pair planes (`pairs`) or
// float32 planes, and float32 planes into a bf16 image.
extern "C" void kba_pack_convert(const void* img, int64_t bf16, int64_t pairs, KBA_IMAGE_ARGS, void* planes,
                                 int64_t plane, int64_t base, int64_t row, int threads) {
  const auto* h = static_cast<const uint16_t*>(img);
  const auto* f = static_cast<const float*>(img);
  auto* pp = static_cast<uint32_t*>(planes);
  auto* fp = static_cast<float*>(planes);
  if (bf16 && pairs) pack_pairs(h, KBA_IMAGE, pp, plane, base, row, threads);
  else if (bf16) pack<float, uint16_t>(h, KBA_IMAGE, fp, plane, base, row, threads);
  else if (pairs) pack_pairs(f, KBA_IMAGE, pp, plane, base, row, threads);
  else pack<float, float>(f, KBA_IMAGE, fp, plane, base, row, threads);
}
extern "C" void kba_unpack_to_bf16(const float* planes, int64_t plane, int64_t base, int64_t row, uint16_t* img,
                                   KBA_IMAGE_ARGS, int threads) {
  unpack<float, uint16_t>(planes, plane, base, row, img, KBA_IMAGE, threads);
}

#if KBNET_AVX512_BF16
namespace {
template <typename T, int GC> struct ForwardBf16 {
  template <typename... A> static void run(A... args) { forward<T, GC, Bf16Pair>(args...); }
};
template <typename T, int GC> struct GradAttBf16 {
  template <typename... A> static void run(A... args) { grad_att<T, GC, Bf16Pair>(args...); }
};

inline __m512bh splat_pair(uint32_t bits) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits)); }
inline __m512bh load_pairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
// 16 floats rounded to bf16 (nearest even), stored as 16 consecutive bf16 values.
inline void store_bf16(uint16_t* dst, __m512 v) { _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(v)); }

#if KBNET_AMX
// AMX tiles (Sapphire Rapids and later) for the bf16 forward and grad_att: per channel group and block of 16
// positions, the basis application is one tile matrix product
//     T[(n,r), p] = bias[n,r] + Σ_j2 W[n,r,j2] · u[j2,p]      (rows (n,r) = n·gc + r, K = the pair-taps j2)
// A = the bases (16 rows × 16 pairs per tile, packed once per call, the bias appended as three bf16 parts that
// sum to it exactly, against rows of ones in B), B = the block's neighbourhood in pairs (16 pair-taps × 16
// positions: the VNNI layout the tile product wants, which the pair planes already have, staged row by row),
// C = 16 rows (n,r) × 16 positions in float32. The mixing with the coefficients (forward) or grad_out (grad_att)
// then runs on the stored C tiles with AVX-512, as in the kernels above. Tiles: C 0-3, A 4-5, B 6-7.
constexpr int kTileRows = 16;   // rows of every tile, positions per block, columns of a C tile
constexpr int kTileWords = 16;  // 32-bit values (bf16 pairs or floats) per tile row: 64 bytes
constexpr int kTileSize = kTileRows * kTileWords;
constexpr int kMaxKTiles = 2;   // B tiles held per block (tiles 6 and 7)
constexpr int kCTiles = 4;      // C tiles in flight: enough to hide the tile product's latency
constexpr uint32_t kOnes = 0x3f803f80u, kOneLow = 0x3f80u;  // bf16 pairs (1, 1) and (1, 0)

// Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
// emulated tiles (KBNET_EMULATED_AVX512) are plain memory.
bool amx_permitted() {
#ifdef KBNET_EMULATED_AVX512
  return true;
#else
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
#endif
}
std::atomic<bool> amx_enabled{true};

int64_t amx_k_tiles(const Dims& d) { return (d.taps() / 2 + 2 + kTileWords - 1) / kTileWords; }

// Tile kernels exist for KBNet's group sizes (2 and 4 channels), when switched on and granted by Linux.
bool amx_usable(const Dims& d) { return amx_enabled && (d.gc == 2 || d.gc == 4) && amx_permitted(); }

// The forward and grad_att on tiles: where the pair-taps and the bias fit two B tiles.
bool amx_handles(const Dims& d) { return amx_usable(d) && amx_k_tiles(d) <= kMaxKTiles; }

// Eight tiles of 16 rows × 64 bytes on this thread for the scope's lifetime, released after (so the kernel
// saves no tile state on a context switch).
class TileScope {
 public:
  TileScope() {
    struct {
      uint8_t palette, start_row, reserved[14];
      uint16_t colsb[16];
      uint8_t rows[16];
    } config{};
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = kTileRows;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// bf16 pairs holding v's three bf16 parts (hi, mid) and (lo, 0): hi + mid + lo = v exactly for normal floats.
inline void split_in_three(float v, uint32_t& hi_mid, uint32_t& lo) {
  const uint32_t hi = to_bf16(v);
  const float r1 = v - to_float(static_cast<uint16_t>(hi));
  const uint32_t mid = to_bf16(r1);
  hi_mid = hi | mid << 16;
  lo = to_bf16(r1 - to_float(static_cast<uint16_t>(mid)));
}

// The A tiles of every group into `a`, (G, MT, KT, 16, 16) pairs, every word written: row R = n·gc + r of group q
// holds W[n, q·gc + r] (J2 pairs), then its bias in three parts, then zeros; rows past N·gc are zero.
void pack_amx_bases(const BasesSource& w, const float* bias, const Dims& d, int64_t mt, int64_t kt, uint32_t* a,
                    int threads) {
  const int64_t G = d.groups(), J2 = d.taps() / 2, gc = d.gc, block = mt * kt * kTileSize;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t q = 0; q < G; ++q) {
    std::fill_n(a + q * block, block, 0u);
    for (int64_t R = 0; R < d.nset * gc; ++R) {
      const int64_t n = R / gc, c = q * gc + R % gc;
      uint32_t* row = a + (q * mt + R / kTileRows) * kt * kTileSize + R % kTileRows * kTileWords;
      auto at = [&](int64_t j2) -> uint32_t& { return row[j2 / kTileWords * kTileSize + j2 % kTileWords]; };
      for (int64_t j2 = 0; j2 < J2; ++j2) at(j2) = w.pair(n * d.channels + c, j2);
      split_in_three(bias[n * d.channels + c], at(J2), at(J2 + 1));
    }
  }
}

// C tile c += A tile (a) · B tile b through A register t, for the literal tile numbers the instructions need.
#define KBA_TILE_PRODUCT(c, t, b, a) \
  do {                               \
    _tile_loadd(t, a, 64);           \
    _tile_dpbf16ps(c, t, b);         \
  } while (0)

// The C tiles m.. (cm of them) of one block: T for rows (m + c)·16.. against the staged B tiles.
inline void block_products(const uint32_t* a, int64_t kt, int cm, float (*cbuf)[kTileSize]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t s = kt * kTileSize;  // from one A tile row block to the next
  KBA_TILE_PRODUCT(0, 4, 6, a);
  if (cm > 1) KBA_TILE_PRODUCT(1, 5, 6, a + s);
  if (cm > 2) KBA_TILE_PRODUCT(2, 4, 6, a + 2 * s);
  if (cm > 3) KBA_TILE_PRODUCT(3, 5, 6, a + 3 * s);
  if (kt > 1) {
    KBA_TILE_PRODUCT(0, 4, 7, a + kTileSize);
    if (cm > 1) KBA_TILE_PRODUCT(1, 5, 7, a + s + kTileSize);
    if (cm > 2) KBA_TILE_PRODUCT(2, 4, 7, a + 2 * s + kTileSize);
    if (cm > 3) KBA_TILE_PRODUCT(3, 5, 7, a + 3 * s + kTileSize);
  }
  _tile_stored(0, cbuf[0], 64);
  if (cm > 1) _tile_stored(1, cbuf[1], 64);
  if (cm > 2) _tile_stored(2, cbuf[2], 64);
  if (cm > 3) _tile_stored(3, cbuf[3], 64);
}
#undef KBA_TILE_PRODUCT

using Stage = uint32_t[kMaxKTiles][kTileSize];

// Stages `count` rows of 16 pairs (row k read at row(k)) in a B tiles' buffer; its later rows keep what they hold
// (zeros, or basis_tiles' rows of ones).
template <typename Row> inline void stage_rows(Stage& stage, int64_t count, Row row) {
  for (int64_t k = 0; k < count; ++k)
    _mm512_store_si512(&stage[k / kTileRows][k % kTileRows * kTileWords], _mm512_loadu_si512(row(k)));
}

// Tiles 6 and 7 from a staged buffer.
inline void load_staged(const Stage& stage, int64_t kt) {
  _tile_loadd(6, stage[0], 64);
  if (kt > 1) _tile_loadd(7, stage[1], 64);
}

template <typename Row> inline void load_b_tiles(Stage& stage, int64_t count, int64_t kt, Row row) {
  stage_rows(stage, count, row);
  load_staged(stage, kt);
}

// All C tiles of one block (A tiles from `a`, the B tiles loaded), each group of GC consecutive rows handed to
// use(k, rows) with k = row / GC (a basis n in forward and grad_att, a tap j in grad_x) for k < count.
template <int GC, typename Use>
inline void row_groups(const uint32_t* a, int64_t mt, int64_t kt, int64_t count, float (*cbuf)[kTileSize], Use use) {
  for (int64_t m = 0; m < mt; m += kCTiles) {
    const int cm = static_cast<int>(std::min<int64_t>(kCTiles, mt - m));
    block_products(a + m * kt * kTileSize, kt, cm, cbuf);
    for (int c = 0; c < cm; ++c)
      for (int i = 0; i < kTileRows; i += GC) {
        const int64_t k = ((m + c) * kTileRows + i) / GC;
        if (k >= count) return;
        use(k, cbuf[c] + i * kTileWords);
      }
  }
}

// Σ_r w[r] · rows[r] over GC rows of 16 positions.
template <int GC> inline __m512 weighted_rows(const float* rows, const __m512 (&w)[GC]) {
  __m512 s = _mm512_mul_ps(_mm512_load_ps(rows), w[0]);
  for (int r = 1; r < GC; ++r) s = _mm512_fmadd_ps(_mm512_load_ps(rows + r * kTileWords), w[r], s);
  return s;
}

// forward (Grad false): out[r,p] = Σ_n a[n,p] · T[(n,r),p]; grad_att (Grad true): dpart[n,p] += Σ_r g[r,p] ·
// T[(n,r),p]. Arguments, tasks and layouts as in forward and grad_att; `a` holds the packed A tiles.
template <int GC, bool Grad>
void basis_tiles(const Bf16Pair* xp, const int64_t* off, const float* vp, const uint32_t* a, float* out,
                 const Dims& d, int64_t parts, int64_t qblocks, int threads) {
  const int64_t G = d.groups(), N = d.nset, J2 = d.taps() / 2, Lo = d.len, per_qblock = (G + qblocks - 1) / qblocks;
  const int64_t kt = amx_k_tiles(d), mt = (N * GC + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(threads)
  {
    const TileScope tiles;
    // Two B buffers: the next block is staged while this one's tiles multiply, so a tile load never waits for
    // the vector stores that staged it (a tile load cannot take their values from the store buffer).
    alignas(64) Stage stage[2] = {};
    alignas(64) float cbuf[kCTiles][kTileSize];
    for (Stage& st : stage) {  // the rows of ones against the bias parts; the rows past them stay zero
      std::fill_n(&st[J2 / kTileWords][J2 % kTileWords * kTileWords], kTileWords, kOnes);
      std::fill_n(&st[(J2 + 1) / kTileWords][(J2 + 1) % kTileWords * kTileWords], kTileWords, kOneLow);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < d.batch * parts * qblocks; ++t) {
      const int64_t b = Grad ? t / parts % d.batch : t / (parts * qblocks);
      const int64_t qb = Grad ? t / (d.batch * parts) : t % qblocks;
      int64_t begin, end;
      range_of<float>(Grad ? t % parts : t / qblocks % parts, parts, Lo, begin, end);
      for (int64_t q = qb * per_qblock; q < std::min(G, (qb + 1) * per_qblock); ++q) {
        const Bf16Pair* x0 = xp + (b * d.channels + q * GC) / 2 * d.chan_stride;
        const uint32_t* aq = a + q * mt * kt * kTileSize;
        auto neighbourhood = [&](int64_t p) { return [=](int64_t j2) { return x0 + off[j2] + p; }; };
        stage_rows(stage[0], J2, neighbourhood(begin));
        for (int64_t p = begin, i = 0; p < end; p += kTileRows, i ^= 1) {
          load_staged(stage[i], kt);
          if (p + kTileRows < end) stage_rows(stage[i ^ 1], J2, neighbourhood(p + kTileRows));
          __m512 v[GC], acc[GC];
          for (int r = 0; r < GC; ++r) {
            acc[r] = _mm512_setzero_ps();
            v[r] = Grad ? _mm512_loadu_ps(vp + (b * d.channels + q * GC + r) * Lo + p) : acc[r];
          }
          float* d0 = out + ((qb * d.batch + b) * N) * Lo + p;
          row_groups<GC>(aq, mt, kt, N, cbuf, [&](int64_t n, const float* rows) {
            if (Grad) {
              const __m512 s = weighted_rows<GC>(rows, v);
              _mm512_storeu_ps(d0 + n * Lo, _mm512_add_ps(_mm512_loadu_ps(d0 + n * Lo), s));
            } else {
              const __m512 an = _mm512_loadu_ps(vp + (b * N + n) * Lo + p);
              for (int r = 0; r < GC; ++r) acc[r] = _mm512_fmadd_ps(_mm512_load_ps(rows + r * kTileWords), an, acc[r]);
            }
          });
          if (!Grad)
            for (int r = 0; r < GC; ++r) _mm512_storeu_ps(out + (b * d.channels + q * GC + r) * Lo + p, acc[r]);
        }
      }
    }
  }
}

// The AMX forward (Grad false) or grad_att (Grad true) of one call; false where amx_handles says no.
template <bool Grad>
bool amx_call(const Bf16Pair* xp, const int64_t* off, const float* vp, const BasesSource& w, const float* bias,
              float* out, const Dims& d, int64_t parts, int64_t qblocks, int threads) {
  if (!amx_handles(d)) return false;
  const int64_t kt = amx_k_tiles(d), mt = (d.nset * d.gc + kTileRows - 1) / kTileRows;
  uint32_t* a = reused_words<0>(d.groups() * mt * kt * kTileSize);
  pack_amx_bases(w, bias, d, mt, kt, a, threads);
  if (d.gc == 2) basis_tiles<2, Grad>(xp, off, vp, a, out, d, parts, qblocks, threads);
  else basis_tiles<4, Grad>(xp, off, vp, a, out, d, parts, qblocks, threads);
  return true;
}

// The bf16 grad_x_w on tiles: at most 64 bases (two B tiles of pairs), positions in whole pairs of tile rows.
bool amx_grad_handles(const Dims& d) {
  return amx_usable(d) && d.nset <= 2 * kMaxKTiles * kTileWords && d.len % (2 * kTileRows) == 0;
}

// grad_x's A tiles (MT, KT, 16, 16) of one group from its basis pairs wp[R][n2], R = j·gc + r (see
// grad_x_w_bf16), into `a`, zero where no row or pair.
inline void pack_grad_x_tiles(const uint32_t* wp, int64_t rows, int64_t n2count, int64_t kt, uint32_t* a) {
  for (int64_t R = 0; R < rows; ++R)
    for (int64_t n2 = 0; n2 < n2count; ++n2)
      a[(R / kTileRows * kt + n2 / kTileWords) * kTileSize + R % kTileRows * kTileWords + n2 % kTileWords] =
          wp[R * n2count + n2];
}

// grad_x on tiles for one image and group: the fused kernel K[(j,r), p] = Σ_n W[n,r,j]·a[n,p] as C tiles (A: the
// packed bases, B: the coefficient pairs of 16 positions), then dxp[s, off_j + p] += Σ_r g[r,p]·K[(j,r), p] as in
// scatter_pairs (the same exact products and float32 sums).
template <int GC>
void scatter_tiles(const uint32_t* a2, int64_t n2count, const uint32_t* at, int64_t mt, int64_t kt, const float* g0,
                   const int64_t* off, float* dx0, int64_t len, int64_t J, bool accumulate) {
  alignas(64) uint32_t stage[kMaxKTiles][kTileSize] = {};
  alignas(64) float cbuf[kCTiles][kTileSize];
  const bool direct = n2count % kTileRows == 0;  // whole tiles of coefficient pairs: loaded in place
  for (int64_t p = 0; p < len; p += kTileRows) {
    if (direct) {
      _tile_loadd(6, a2 + p, len * 4);
      if (kt > 1) _tile_loadd(7, a2 + kTileRows * len + p, len * 4);
    } else {  // zero rows past the pairs
      load_b_tiles(stage, n2count, kt, [&](int64_t n2) { return a2 + n2 * len + p; });
    }
    __m512 g[GC];
    for (int r = 0; r < GC; ++r) g[r] = _mm512_loadu_ps(g0 + r * len + p);
    row_groups<GC>(at, mt, kt, J, cbuf, [&](int64_t j, const float* rows) {
      const __m512 s = weighted_rows<GC>(rows, g);
      float* dst = dx0 + off[j] + p;
      _mm512_storeu_ps(dst, accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst), s) : s);
    });
  }
}

// grad_w on tiles over one chunk: dwq[t, n] += Σ_p v[t,p]·a[n,p] for the rows t (A: v rows, 32 positions per
// tile row, rows padded to whole tiles with zeros) and the np bases (B: the pairs of consecutive positions at, np
// columns); 2×2 C tiles at a time, accumulated in dwq (rows × np float32). len is a multiple of 32.
inline void accumulate_tiles(const uint16_t* v, int64_t vs, int64_t rows, const uint32_t* at, int64_t np,
                             int64_t len, float* dwq) {
  const int64_t lc = np * 4, lv = vs * 2;  // byte strides of dwq and at rows, and of v rows
  for (int64_t m = 0; m < rows; m += 2 * kTileRows) {
    const bool m2 = m + kTileRows < rows;
    float* c0 = dwq + m * np;
    float* c2 = c0 + kTileRows * np;
    for (int64_t n = 0; n < np; n += 2 * kTileWords) {
      const bool n2 = n + kTileWords < np;
      _tile_loadd(0, c0 + n, lc);
      if (n2) _tile_loadd(1, c0 + n + kTileWords, lc);
      if (m2) _tile_loadd(2, c2 + n, lc);
      if (m2 && n2) _tile_loadd(3, c2 + n + kTileWords, lc);
      for (int64_t p = 0; p < len; p += 2 * kTileRows) {
        _tile_loadd(4, v + m * vs + p, lv);
        if (m2) _tile_loadd(5, v + (m + kTileRows) * vs + p, lv);
        _tile_loadd(6, at + p / 2 * np + n, lc);
        if (n2) _tile_loadd(7, at + p / 2 * np + n + kTileWords, lc);
        _tile_dpbf16ps(0, 4, 6);
        if (n2) _tile_dpbf16ps(1, 4, 7);
        if (m2) _tile_dpbf16ps(2, 5, 6);
        if (m2 && n2) _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0 + n, lc);
      if (n2) _tile_stored(1, c0 + n + kTileWords, lc);
      if (m2) _tile_stored(2, c2 + n, lc);
      if (m2 && n2) _tile_stored(3, c2 + n + kTileWords, lc);
    }
  }
}
#else
inline bool amx_grad_handles(const Dims&) { return false; }
template <bool Grad> bool amx_call(const Bf16Pair*, const int64_t*, const float*, const BasesSource&, const float*,
                                   float*, const Dims&, int64_t, int64_t, int) {
  return false;
}
#endif

// grad_x in bf16 without rounding a product: dxp[s, off_j + p] += Σ_r g[r,p] · K[r,j,p] with the fused kernel
// K[r,j,p] = Σ_n a[n,p] · W[n,r,j] summed over basis pairs (a and W are bf16, so each product is exact in float32)
// for JB taps × GC rows × PB position vectors. a2: the coefficient pairs (n = 2·n2, 2·n2 + 1) of one image, wp the
// basis pairs of the group at [j][r][n2].
template <int JB, int GC, int PB>
inline void scatter_pairs_block(const uint32_t* a2, int64_t n2count, const uint32_t* wp, const float* g0,
                                const int64_t* off, float* dx0, int64_t len, int64_t p, bool accumulate) {
  __m512 k[JB][GC][PB];
  for (int jj = 0; jj < JB; ++jj)
    for (int r = 0; r < GC; ++r)
      for (int i = 0; i < PB; ++i) k[jj][r][i] = _mm512_setzero_ps();
  for (int64_t n2 = 0; n2 < n2count; ++n2) {
    __m512bh u[PB];
    for (int i = 0; i < PB; ++i) u[i] = load_pairs(a2 + n2 * len + p + i * 16);
    for (int jj = 0; jj < JB; ++jj)
      for (int r = 0; r < GC; ++r) {
        const __m512bh w = splat_pair(wp[(jj * GC + r) * n2count + n2]);
        for (int i = 0; i < PB; ++i) k[jj][r][i] = _mm512_dpbf16_ps(k[jj][r][i], u[i], w);
      }
  }
  for (int i = 0; i < PB; ++i) {
    Vec<float> g[GC];
    for (int r = 0; r < GC; ++r) g[r] = load(g0 + r * len + p + i * 16);
    for (int jj = 0; jj < JB; ++jj) {
      Vec<float> s = g[0] * (Vec<float>)k[jj][0][i];
      for (int r = 1; r < GC; ++r) s += g[r] * (Vec<float>)k[jj][r][i];
      float* dst = dx0 + off[jj] + p + i * 16;
      store(dst, accumulate ? load(dst) + s : s);
    }
  }
}

// grad_x in bf16 over one image's positions: position blocks outside and taps inside, so a block's coefficient
// pairs stay in L1 for all taps. JB taps × GC rows × PB vectors = 24 accumulators; J = GC·k² is a multiple of JB.
template <int GC>
inline void scatter_pairs(const uint32_t* a2, int64_t n2count, const uint32_t* wp, const float* g0,
                          const int64_t* off, float* dx0, int64_t len, int64_t J, bool accumulate) {
  constexpr int JB = GC == 2 ? 2 : 1, PB = 24 / (JB * GC);
  int64_t p = 0;
  for (; p + PB * 16 <= len; p += PB * 16)
    for (int64_t j = 0; j < J; j += JB)
      scatter_pairs_block<JB, GC, PB>(a2, n2count, wp + j * GC * n2count, g0, off + j, dx0, len, p, accumulate);
  for (; p < len; p += 16)
    for (int64_t j = 0; j < J; j += JB)
      scatter_pairs_block<JB, GC, 1>(a2, n2count, wp + j * GC * n2count, g0, off + j, dx0, len, p, accumulate);
}

// grad_w in bf16: dwq[t, n] += Σ_p a[n,p] · v[t,p] over position pairs for RB rows t = (r, j) × NB vectors of
// bases n. at2 rows (one per position pair) hold (a[n, 2·p2], a[n, 2·p2 + 1]) pairs, v rows the products
// v[t,p] = g[r,p]·u[j,p] in bf16, so a pair of consecutive values is one 32-bit broadcast.
template <int RB, int NB>
inline void accumulate_pairs(const uint32_t* at2, int64_t at_stride, int64_t pairs, const uint16_t* v,
                             int64_t v_stride, float* dwq, int64_t dw_stride) {
  __m512 acc[RB][NB];
  for (int t = 0; t < RB; ++t)
    for (int k = 0; k < NB; ++k) acc[t][k] = _mm512_loadu_ps(dwq + t * dw_stride + k * 16);
  for (int64_t p2 = 0; p2 < pairs; ++p2) {
    __m512bh av[NB];
    for (int k = 0; k < NB; ++k) av[k] = load_pairs(at2 + p2 * at_stride + k * 16);
    for (int t = 0; t < RB; ++t) {
      uint32_t bits;
      std::memcpy(&bits, v + t * v_stride + 2 * p2, sizeof bits);
      const __m512bh u = splat_pair(bits);
      for (int k = 0; k < NB; ++k) acc[t][k] = _mm512_dpbf16_ps(acc[t][k], av[k], u);
    }
  }
  for (int t = 0; t < RB; ++t)
    for (int k = 0; k < NB; ++k) _mm512_storeu_ps(dwq + t * dw_stride + k * 16, acc[t][k]);
}

// 12 rows × 2 vectors of bases = 24 accumulators (32 bases); single rows finish the GC·k² rows of other k.
template <int NB>
inline void accumulate_pair_rows(const uint32_t* at2, int64_t at_stride, int64_t pairs, const uint16_t* v,
                                 int64_t v_stride, int64_t rows, float* dwq, int64_t dw_stride) {
  constexpr int RB = 12;
  int64_t t = 0;
  for (; t + RB <= rows; t += RB)
    accumulate_pairs<RB, NB>(at2, at_stride, pairs, v + t * v_stride, v_stride, dwq + t * dw_stride, dw_stride);
  for (; t < rows; ++t)
    accumulate_pairs<1, NB>(at2, at_stride, pairs, v + t * v_stride, v_stride, dwq + t * dw_stride, dw_stride);
}

// grad_x_w with bf16 operands and float32 sums, tasks and outputs as in grad_x_w. xp holds the input in bf16
// pairs of in-channels as the forward reads it (poff: its pair-tap offsets), dxp float32 planes of the same
// stride (off: their tap offsets); gp is float32 holding bf16 values, w the bases rounded to bf16 as the forward
// applied them; a2 (B, ⌈N/2⌉, Lo) holds the coefficient pairs of consecutive bases, at2 (B, Lo/2, Np) those of
// consecutive positions (bases zero-padded to Np, a multiple of 16). grad_w's products grad_out·x are rounded to
// bf16 before the sum; grad_x's are exact.
template <int GC>
void grad_x_w_bf16(const Bf16Pair* xp, const int64_t* poff, const int64_t* off, const uint32_t* a2,
                   const uint32_t* at2, int64_t np, const float* gp, const float* w, float* dxp, float* dw,
                   const Dims& d, bool accumulate, int threads) {
  const int64_t G = d.groups(), N = d.nset, N2 = (N + 1) / 2, J = d.taps(), S = d.basis_size(), Lo = d.len;
  const int64_t k2 = d.ksize * d.ksize;
  const int64_t rows = GC * J, chunk = std::min(Lo, kChunk);
  const int64_t vs = chunk + 32;  // one cache line longer than a row (see grad_x_w)
  [[maybe_unused]] const bool tiles = amx_grad_handles(d);
  // grad_x's tiles; grad_w's rows padded to whole tiles
  const int64_t mt = (rows + 15) / 16;
  [[maybe_unused]] const int64_t kt = (N2 + 15) / 16;
#pragma omp parallel num_threads(threads)
  {
#if KBNET_AMX
    std::optional<TileScope> scope;
    if (tiles) scope.emplace();
    Buffer<uint32_t> wt(tiles ? mt * kt * kTileSize : 1);
#endif
    Buffer<uint16_t> v(mt * 16 * vs);
    Buffer<uint32_t> wp(J * GC * N2);
    Buffer<float> dwq(mt * 16 * np);
#pragma omp for schedule(dynamic)
    for (int64_t q = 0; q < G; ++q) {
      for (int64_t j = 0; j < J; ++j)
        for (int r = 0; r < GC; ++r)
          for (int64_t n2 = 0; n2 < N2; ++n2) {
            const float* wn = w + 2 * n2 * S + (q * GC + r) * J + j;
            wp[(j * GC + r) * N2 + n2] = to_bf16(wn[0]) | (2 * n2 + 1 < N ? to_bf16(wn[S]) << 16 : 0u);
          }
#if KBNET_AMX
      if (tiles) pack_grad_x_tiles(wp.data(), rows, N2, kt, wt.data());
#endif
      dwq.zero();
      for (int64_t b = 0; b < d.batch; ++b) {
        const Bf16Pair* x0 = xp + (b * d.channels + q * GC) / 2 * d.chan_stride;
        const float* g0 = gp + (b * d.channels + q * GC) * Lo;
        float* dx0 = dxp + (b * d.channels + q * GC) * d.chan_stride;
#if KBNET_AMX
        if (tiles) scatter_tiles<GC>(a2 + b * N2 * Lo, N2, wt.data(), mt, kt, g0, off, dx0, Lo, J, accumulate);
        else
#endif
          scatter_pairs<GC>(a2 + b * N2 * Lo, N2, wp.data(), g0, off, dx0, Lo, J, accumulate);
        for (int64_t p0 = 0; p0 < Lo; p0 += chunk) {
          const int64_t len = std::min(chunk, Lo - p0);
          for (int64_t j = 0; j < J; ++j) {
            const int64_t s = j / k2;  // in-channel s of tap j: the low (even s) or high half of its pair
            const Bf16Pair* uj = x0 + poff[s / 2 * k2 + j % k2] + p0;
            for (int64_t p = 0; p < len; p += 16) {
              const __m512i pairs = _mm512_loadu_si512(uj + p);
              const __m512 u = _mm512_castsi512_ps(s % 2 ? _mm512_and_si512(pairs, _mm512_set1_epi32(~0xffff))
                                                         : _mm512_slli_epi32(pairs, 16));
              for (int r = 0; r < GC; ++r)
                store_bf16(v.data() + (r * J + j) * vs + p, _mm512_loadu_ps(g0 + r * Lo + p0 + p) * u);
            }
          }
          const uint32_t* at = at2 + (b * Lo + p0) / 2 * np;
#if KBNET_AMX
          if (tiles) {
            accumulate_tiles(v.data(), vs, mt * 16, at, np, len, dwq.data());
            continue;
          }
#endif
          int64_t n = 0;
          for (; n + 32 <= np; n += 32)
            accumulate_pair_rows<2>(at + n, np, len / 2, v.data(), vs, rows, dwq.data() + n, np);
          for (; n < np; n += 16)
            accumulate_pair_rows<1>(at + n, np, len / 2, v.data(), vs, rows, dwq.data() + n, np);
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int r = 0; r < GC; ++r)
          for (int64_t j = 0; j < J; ++j) dw[n * S + (q * GC + r) * J + j] = dwq[(r * J + j) * np + n];
    }
  }
}
template <typename T, int GC> struct GradXWBf16 {
  template <typename... A> static void run(A... args) { grad_x_w_bf16<GC>(args...); }
};
}  // namespace

namespace {
// The bf16 forward (Grad false) or grad_att (Grad true): on AMX tiles packed straight from the bases, else with the
// bases as pairs for vdpbf16ps.
template <bool Grad>
int basis_call(const Bf16Pair* xp, const int64_t* off, const float* vp, const BasesSource& w, const float* bias,
               float* out, const Dims& d, int64_t parts, int64_t qblocks, int threads) {
  if (d.gc == 1) return -1;
  if (amx_call<Grad>(xp, off, vp, w, bias, out, d, parts, qblocks, threads)) return 0;
  auto* pairs = reinterpret_cast<Bf16Pair*>(reused_words<1>(d.nset * d.basis_size() / 2));
  pair_bases(w, d.nset * d.channels, &pairs->bits);
  if (Grad) return dispatch_gc<float, GradAttBf16>(d.gc, xp, off, vp, pairs, bias, out, d, parts, qblocks, threads);
  return dispatch_gc<float, ForwardBf16>(d.gc, xp, off, vp, pairs, bias, out, d, parts, qblocks, threads);
}
}  // namespace

// xp: (B, C/2, chan_stride) pairs, off: the gc/2·k² pair-tap offsets, w: the bases (N, C·gc·k²) in float32 or
// (`w_bf16`) bf16 bits, rounded to bf16 as they are read; the rest float32.
extern "C" int kba_forward_bf16(const Bf16Pair* xp, const int64_t* off, const float* ap, const void* w,
                                int64_t w_bf16, const float* bias, float* out, KBA_DIMS_ARGS, int64_t parts,
                                int64_t qblocks, int threads) {
  const BasesSource bases{w, w_bf16 != 0, gc, ksize * ksize};
  return basis_call<false>(xp, off, ap, bases, bias, out, KBA_DIMS, parts, qblocks, threads);
}
extern "C" int kba_grad_att_bf16(const Bf16Pair* xp, const int64_t* off, const float* gp, const void* w,
                                 int64_t w_bf16, const float* bias, float* dpart, KBA_DIMS_ARGS, int64_t parts,
                                 int64_t qblocks, int threads) {
  const BasesSource bases{w, w_bf16 != 0, gc, ksize * ksize};
  return basis_call<true>(xp, off, gp, bases, bias, dpart, KBA_DIMS, parts, qblocks, threads);
}
// xp: pairs as in kba_forward_bf16 (poff their offsets), dxp: (B, C, chan_stride) float32 (off its offsets),
// a2 and at2: coefficient pairs (see grad_x_w_bf16), gp: float32 of bf16 values, w: float32 bf16-rounded bases.
extern "C" int kba_grad_x_w_bf16(const Bf16Pair* xp, const int64_t* poff, const int64_t* off, const uint32_t* a2,
                                 const uint32_t* at2, int64_t np, const float* gp, const float* w, float* dxp,
                                 float* dw, KBA_DIMS_ARGS, int64_t accumulate, int threads) {
  if (gc == 1) return -1;
  return dispatch_gc<float, GradXWBf16>(gc, xp, poff, off, a2, at2, np, gp, w, dxp, dw, KBA_DIMS, accumulate != 0,
                                        threads);
}
// The AMX tile products of the bf16 kernels: `enable` 1 or 0 switches them on or off (tests and
// benchmarks compare both paths), -1 leaves them; returns whether they run (the build has AMX and Linux granted
// the tile state).
extern "C" int64_t kba_amx(int64_t enable) {
#if KBNET_AMX
  if (enable >= 0) amx_enabled = enable != 0;
  return amx_enabled && amx_permitted();
#else
  (void)enable;
  return 0;
#endif
}
#endif
