// bf16 <-> float32 conversions shared by the native CPU kernels (kba_cpu.cpp, layer_norm_cpu.cpp).
// bf16 is the upper half of a float32: widening is a shift, narrowing rounds to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 bits to bf16 bits (in the low half), round to nearest even; NaNs stay (quiet) NaN. A select rather than
// a branch, so loops vectorise: for uint32_t or a GCC vector of uint32_t.
template <typename U> inline U bf16_round_bits(U bits) {
  const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded;
}

inline uint32_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bf16_round_bits(bits);
}
