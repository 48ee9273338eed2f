// The channel LayerNorm of channels-last maps on the CPU, forward and backward, built with the KBA kernels by
// kbnet/ops/native.py (one library).
//
// Why a native kernel: under bf16 autocast a LayerNorm2d gets a bf16 map. PyTorch's CPU LayerNorm of a bf16 map
// with float32 affine parameters sums the weight and bias gradients in bf16 (5 % off over a 64² map), so training
// would have to cast the map to float32 and the result back (three more passes over the map each way). Here every
// pixel's C channels, contiguous in a channels-last map, are read from bf16 or float32 storage into float32,
// normalised, and stored back in the storage type; the statistics and the parameter gradients stay float32.
//   x, y, grad_y, grad_x: (rows, C) in storage T (float, or bf16 bits as uint16_t) · weight, bias: (C) float32
//   mean, rstd: (rows) float32, saved by the forward for the backward
// Formula of the official code: y = (x - mean) / sqrt(var + eps) · weight + bias with the biased variance.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"
#include "isa.h"

namespace {

// GCC vector extensions, the width of the build's registers (the library is built with -march=native).
#if KBNET_AVX512
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VecU __attribute__((vector_size(4 * kLanes)));
typedef uint16_t VecH __attribute__((vector_size(2 * kLanes)));

// Loads into float32 and stores from it; bf16 is the upper half of a float32, stored rounded to nearest even
// (NaNs stay NaN).
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline VecF load(const uint16_t* p) {  // one widening load (GCC splits __builtin_convertvector's into halves)
#if KBNET_AVX512
  return reinterpret_cast<VecF>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#elif defined(__AVX2__)
  return reinterpret_cast<VecF>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#else
  VecH h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<VecF>(__builtin_convertvector(h, VecU) << 16);
#endif
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = static_cast<uint16_t>(float_to_bf16(v)); }
inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
inline void store(uint16_t* p, VecF v) {
#if KBNET_AVX512_BF16
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
  const VecH narrow = __builtin_convertvector(bf16_round_bits(reinterpret_cast<VecU>(v)), VecH);
  std::memcpy(p, &narrow, sizeof narrow);
#endif
}
typedef float HalfF __attribute__((vector_size(2 * kLanes)));
inline float sum_lanes(VecF v) {  // a tree of halves: the row's statistics wait on this latency
  HalfF h;
  std::memcpy(&h, &v, sizeof h);
  HalfF hi;
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof h, sizeof hi);
  h += hi;
  float s0 = 0.0f, s1 = 0.0f;
  for (int64_t i = 0; i < kLanes / 2; i += 2) {
    s0 += h[i];
    s1 += h[i + 1];
  }
  return s0 + s1;
}

// A row's statistics: two float32 passes over its C values (in L1), the official code's two-pass variance.
template <typename T> inline void statistics(const T* xr, int64_t c, float eps, float& mean, float& rstd) {
  const int64_t cv = c - c % kLanes;
  VecF s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= cv; i += 2 * kLanes) {
    s0 += load(xr + i);
    s1 += load(xr + i + kLanes);
  }
  if (i < cv) s0 += load(xr + i);
  float sum = sum_lanes(s0 + s1);
  for (i = cv; i < c; ++i) sum += load1(xr + i);
  const float m = sum / static_cast<float>(c);
  VecF q0 = {}, q1 = {};
  for (i = 0; i + 2 * kLanes <= cv; i += 2 * kLanes) {
    const VecF d0 = load(xr + i) - m, d1 = load(xr + i + kLanes) - m;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  if (i < cv) {
    const VecF d = load(xr + i) - m;
    q0 += d * d;
  }
  float sq = sum_lanes(q0 + q1);
  for (i = cv; i < c; ++i) sq += (load1(xr + i) - m) * (load1(xr + i) - m);
  mean = m;
  rstd = 1.0f / std::sqrt(sq / static_cast<float>(c) + eps);
}

template <typename T>
void forward(const T* x, const float* weight, const float* bias, T* y, float* mean, float* rstd, int64_t rows,
             int64_t c, float eps, int threads) {
  const int64_t cv = c - c % kLanes;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * c;
    T* yr = y + r * c;
    float m, rs;
    statistics(xr, c, eps, m, rs);
    for (int64_t i = 0; i < cv; i += kLanes) store(yr + i, (load(xr + i) - m) * rs * load(weight + i) + load(bias + i));
    for (int64_t i = cv; i < c; ++i) store1(yr + i, (load1(xr + i) - m) * rs * weight[i] + bias[i]);
    mean[r] = m;
    rstd[r] = rs;
  }
}

// Rows per partial sum of the parameter gradients: each thread adds a block's float32 partials into its totals, so
// no float32 sum runs over more than about kBlock + rows / kBlock terms.
constexpr int64_t kBlock = 64;

template <typename T>
void backward(const T* grad_y, const T* x, const float* weight, const float* mean, const float* rstd, T* grad_x,
              float* grad_weight, float* grad_bias, int64_t rows, int64_t c, int threads) {
  const int64_t cv = c - c % kLanes;
  std::vector<float> totals(static_cast<size_t>(threads) * 2 * c, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> part(2 * c, 0.0f);  // weight then bias
    float* pw = part.data();
    float* pb = pw + c;
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    float* totals_t = totals.data() + 2 * c * t;
    int64_t in_block = 0;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* gr = grad_y + r * c;
      const T* xr = x + r * c;
      T* dr = grad_x + r * c;
      const float m = mean[r], rs = rstd[r];
      VecF s1v = {}, s2v = {};
      for (int64_t i = 0; i < cv; i += kLanes) {
        const VecF gw = load(gr + i) * load(weight + i);
        s1v += gw;
        s2v += gw * (load(xr + i) - m);
      }
      float s1 = sum_lanes(s1v), s2 = sum_lanes(s2v);
      for (int64_t i = cv; i < c; ++i) {
        const float gw = load1(gr + i) * weight[i];
        s1 += gw;
        s2 += gw * (load1(xr + i) - m);
      }
      const float a = s1 / static_cast<float>(c), b = s2 * rs / static_cast<float>(c);
      for (int64_t i = 0; i < cv; i += kLanes) {
        const VecF g = load(gr + i);
        const VecF xhat = (load(xr + i) - m) * rs;
        store(dr + i, rs * (g * load(weight + i) - a - xhat * b));
        store(pw + i, load(pw + i) + g * xhat);
        store(pb + i, load(pb + i) + g);
      }
      for (int64_t i = cv; i < c; ++i) {
        const float g = load1(gr + i);
        const float xhat = (load1(xr + i) - m) * rs;
        store1(dr + i, rs * (g * weight[i] - a - xhat * b));
        pw[i] += g * xhat;
        pb[i] += g;
      }
      if (++in_block == kBlock) {
        for (int64_t i = 0; i < 2 * c; ++i) totals_t[i] += part[i];
        std::fill(part.begin(), part.end(), 0.0f);
        in_block = 0;
      }
    }
    for (int64_t i = 0; i < 2 * c; ++i) totals_t[i] += part[i];
  }
  for (int64_t i = 0; i < c; ++i) {  // in thread order, so a run is reproducible for a given thread count
    float w = 0.0f, b = 0.0f;
    for (int t = 0; t < threads; ++t) {
      w += totals[2 * c * t + i];
      b += totals[2 * c * t + c + i];
    }
    grad_weight[i] = w;
    grad_bias[i] = b;
  }
}

}  // namespace

extern "C" {
void layer_norm_forward_f32(const float* x, const float* weight, const float* bias, float* y, float* mean,
                            float* rstd, int64_t rows, int64_t c, double eps, int threads) {
  forward(x, weight, bias, y, mean, rstd, rows, c, static_cast<float>(eps), threads);
}
void layer_norm_forward_bf16(const uint16_t* x, const float* weight, const float* bias, uint16_t* y, float* mean,
                             float* rstd, int64_t rows, int64_t c, double eps, int threads) {
  forward(x, weight, bias, y, mean, rstd, rows, c, static_cast<float>(eps), threads);
}
void layer_norm_backward_f32(const float* grad_y, const float* x, const float* weight, const float* mean,
                             const float* rstd, float* grad_x, float* grad_weight, float* grad_bias, int64_t rows,
                             int64_t c, int threads) {
  backward(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, rows, c, threads);
}
void layer_norm_backward_bf16(const uint16_t* grad_y, const uint16_t* x, const float* weight, const float* mean,
                              const float* rstd, uint16_t* grad_x, float* grad_weight, float* grad_bias,
                              int64_t rows, int64_t c, int threads) {
  backward(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, rows, c, threads);
}
}
