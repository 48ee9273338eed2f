// The AVX-512, AVX512_BF16 and AMX-BF16 intrinsics of the native kernels, computed in GCC vector code that any
// x86-64 CPU runs (included by isa.h in builds with KBNET_EMULATED_AVX512 only).
//
// Why: most machines that run the tests have no AVX-512, bf16 or AMX instructions, so the kernels' 64-byte
// blocking, their bf16 kernels and their tile kernels would otherwise be compiled and run only where such a CPU
// happens to be. Here every intrinsic the kernels call is redefined (a macro over GCC's name, after immintrin.h has
// declared it) by its documented per-lane result: bf16 products are exact in float32, vdpbf16ps adds the two of
// each lane to the accumulator one after the other, odd element first, and a tile product accumulates the pairs
// of k in order, even element first (the order of Intel's pseudo-code), each addition rounded to nearest even.
// Not emulated: the hardware's treatment of subnormals (the instructions flush them to zero, these do not).
#pragma once

#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace kbnet_emulated {

typedef float F32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));

template <typename To, typename From> inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "reinterpreting vectors of one size");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}
// The bf16 elements 2i (low half of 32-bit lane i) and 2i + 1 (high half) as float32.
inline F32x16 even_bf16(U32x16 pairs) { return bits_as<F32x16>(pairs << 16); }
inline F32x16 odd_bf16(U32x16 pairs) { return bits_as<F32x16>(pairs & 0xffff0000u); }

inline __m512 set1_ps(float s) { return s - __m512{}; }
inline __m512 setzero_ps() { return __m512{}; }
inline __m512i set1_epi32(int s) { return bits_as<__m512i>(static_cast<uint32_t>(s) - U32x16{}); }
template <typename V> inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline __m512 loadu_ps(const void* p) { return load<__m512>(p); }
inline __m512i loadu_si512(const void* p) { return load<__m512i>(p); }
inline void storeu_ps(void* p, __m512 v) { std::memcpy(p, &v, sizeof v); }
inline void store_si512(void* p, __m512i v) { std::memcpy(p, &v, sizeof v); }
inline __m512 add_ps(__m512 a, __m512 b) { return a + b; }
inline __m512 mul_ps(__m512 a, __m512 b) { return a * b; }
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {  // one rounding, as vfmadd
  F32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return bits_as<__m512>(r);
}
inline __m512i and_si512(__m512i a, __m512i b) { return a & b; }
inline __m512i slli_epi32(__m512i a, unsigned int count) {
  return bits_as<__m512i>(count > 31 ? U32x16{} : bits_as<U32x16>(a) << count);
}
inline __m512 castsi512_ps(__m512i a) { return bits_as<__m512>(a); }
inline __m512i cvtepu16_epi32(__m256i a) { return bits_as<__m512i>(__builtin_convertvector(bits_as<U16x16>(a), U32x16)); }
inline __m256bh cvtneps_pbh(__m512 a) {
  return bits_as<__m256bh>(__builtin_convertvector(bf16_round_bits(bits_as<U32x16>(a)), U16x16));
}
inline __m512 dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
  const U32x16 ua = bits_as<U32x16>(a), ub = bits_as<U32x16>(b);
  F32x16 s = bits_as<F32x16>(acc);
  s += odd_bf16(ua) * odd_bf16(ub);  // exact products: a fused multiply-add rounds the sum once, as intended
  s += even_bf16(ua) * even_bf16(ub);
  return bits_as<__m512>(s);
}

// AMX: eight tiles of up to 16 rows × 64 bytes per thread (the tile registers are per core), shaped by the
// configuration (palette 1: bytes 16.. the bytes per row of each tile, 48.. its rows).
struct Tiles {
  uint16_t colsb[8];
  uint8_t rows[8];
  alignas(64) uint8_t data[8][16][64];
};
inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}
inline void tile_loadconfig(const void* config) {
  const auto* c = static_cast<const uint8_t*>(config);
  Tiles& t = tiles();
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
  }
  std::memset(t.data, 0, sizeof t.data);
}
inline void tile_release() {
  const uint8_t unconfigured[64] = {};
  tile_loadconfig(unconfigured);
}
inline void tile_loadd(int tile, const void* base, int64_t stride) {
  Tiles& t = tiles();
  std::memset(t.data[tile], 0, sizeof t.data[tile]);
  for (int r = 0; r < t.rows[tile]; ++r)
    std::memcpy(t.data[tile][r], static_cast<const uint8_t*>(base) + r * stride, t.colsb[tile]);
}
inline void tile_stored(int tile, void* base, int64_t stride) {
  const Tiles& t = tiles();
  for (int r = 0; r < t.rows[tile]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, t.data[tile][r], t.colsb[tile]);
}
inline void tile_zero(int tile) { std::memset(tiles().data[tile], 0, sizeof tiles().data[tile]); }
// C[m][n] += Σ_k A[m][2k]·B[k][2n] + A[m][2k+1]·B[k][2n+1]: A rows of bf16 pairs, B rows of pairs (the VNNI layout).
inline void tile_dpbf16ps(int c, int a, int b) {
  Tiles& t = tiles();
  for (int m = 0; m < t.rows[c]; ++m) {
    float row[16];
    std::memcpy(row, t.data[c][m], sizeof row);
    for (int k = 0; k < t.colsb[a] / 4; ++k) {
      uint16_t am[2], bk[32];
      std::memcpy(am, t.data[a][m] + 4 * k, sizeof am);
      std::memcpy(bk, t.data[b][k], sizeof bk);
      for (int n = 0; n < t.colsb[c] / 4; ++n) {
        row[n] += bf16_to_float(am[0]) * bf16_to_float(bk[2 * n]);
        row[n] += bf16_to_float(am[1]) * bf16_to_float(bk[2 * n + 1]);
      }
    }
    std::memcpy(t.data[c][m], row, sizeof row);
  }
}

}  // namespace kbnet_emulated

#define _mm512_set1_ps kbnet_emulated::set1_ps
#define _mm512_setzero_ps kbnet_emulated::setzero_ps
#define _mm512_set1_epi32 kbnet_emulated::set1_epi32
#define _mm512_load_ps kbnet_emulated::loadu_ps
#define _mm512_loadu_ps kbnet_emulated::loadu_ps
#define _mm512_loadu_si512 kbnet_emulated::loadu_si512
#define _mm512_storeu_ps kbnet_emulated::storeu_ps
#define _mm512_store_si512 kbnet_emulated::store_si512
#define _mm512_add_ps kbnet_emulated::add_ps
#define _mm512_mul_ps kbnet_emulated::mul_ps
#define _mm512_fmadd_ps kbnet_emulated::fmadd_ps
#define _mm512_and_si512 kbnet_emulated::and_si512
#define _mm512_slli_epi32 kbnet_emulated::slli_epi32
#define _mm512_castsi512_ps kbnet_emulated::castsi512_ps
#define _mm512_cvtepu16_epi32 kbnet_emulated::cvtepu16_epi32
#define _mm512_cvtneps_pbh kbnet_emulated::cvtneps_pbh
#define _mm512_dpbf16_ps kbnet_emulated::dpbf16_ps
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig kbnet_emulated::tile_loadconfig
#define _tile_release kbnet_emulated::tile_release
#define _tile_loadd kbnet_emulated::tile_loadd
#define _tile_stored kbnet_emulated::tile_stored
#define _tile_zero kbnet_emulated::tile_zero
#define _tile_dpbf16ps kbnet_emulated::tile_dpbf16ps
