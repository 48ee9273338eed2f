// The instruction sets the native CPU kernels (kba_cpu.cpp, layer_norm_cpu.cpp) are compiled for, from the build
// target (-march, chosen by kbnet/ops/native.py):
//   KBNET_AVX512       64-byte vectors and 32 vector registers (AVX-512F)
//   KBNET_AVX512_BF16  the bf16 kernels: vdpbf16ps products, vcvtneps2bf16 rounding
//   KBNET_AMX          their AMX-BF16 tile products
// With KBNET_EMULATED_AVX512 (native.py's KBNET_NATIVE_EMULATE_AVX512=1) all three are on for any x86-64 target and
// avx512_emulated.h computes the AVX-512 and AMX intrinsics the kernels use in plain vector code, so that code runs,
// and is tested, on CPUs without those instructions. Slowly: an emulated build is never timed.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(KBNET_EMULATED_AVX512)
#include "avx512_emulated.h"
#define KBNET_AVX512 1
#define KBNET_AVX512_BF16 1
#define KBNET_AMX 1
#else
#ifdef __AVX512F__
#define KBNET_AVX512 1
#else
#define KBNET_AVX512 0
#endif
#ifdef __AVX512BF16__
#define KBNET_AVX512_BF16 1
#else
#define KBNET_AVX512_BF16 0
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KBNET_AMX 1
#else
#define KBNET_AMX 0
#endif
#endif
