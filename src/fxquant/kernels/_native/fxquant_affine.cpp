// Element-wise maps of 8-bit activations in one pass.
//
// fxq_affine_u8: a per-channel affine map of a uint8 image requantized (an eval-mode batch norm, relu through the
// lower bound): out = round(clamp(x * a[c] + b[c], low, high)), 8 values per AVX2 step (widen to float, multiply,
// add, clamp, round half to even, narrow) -- the float arithmetic of aten's addcmul(b, x, a) followed by round and
// clamp, where aten takes four passes and two float temporaries.
// fxq_lookup_u8: a 256-entry byte table applied to each value (an activation / requantization on 8-bit values:
// GELU, hardswish, sigmoid, a change of qparams), where aten widens the indices to int32 or int64 and gathers.
// Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py).
// The library runs only where FBGEMM does (fxq_cpu_supported: AVX2), so this file targets it directly.
#pragma GCC target("avx2")
#include <immintrin.h>
#include <cstdint>

#include "fxquant_parallel.h"

namespace {

inline std::uint8_t affine_one(std::uint8_t x, float a, float b, float low, float high) {
  float v = static_cast<float>(x) * a + b;
  v = v < low ? low : (v > high ? high : v);
  return static_cast<std::uint8_t>(_mm_cvtss_si32(_mm_set_ss(v)));  // round half to even (MXCSR default)
}

// n values of one row; PER_ELEMENT: a / b hold one factor per value (channels-last rows), else one for the row
template <bool PER_ELEMENT>
void affine_row(const std::uint8_t* src, std::uint8_t* dst, std::int64_t n, const float* a, const float* b,
                float low, float high) {
  const __m256 vlow = _mm256_set1_ps(low), vhigh = _mm256_set1_ps(high);
  const __m256 va = _mm256_set1_ps(a[0]), vb = _mm256_set1_ps(b[0]);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    const __m256 ai = PER_ELEMENT ? _mm256_loadu_ps(a + i) : va;
    const __m256 bi = PER_ELEMENT ? _mm256_loadu_ps(b + i) : vb;
    __m256 v = _mm256_add_ps(_mm256_mul_ps(x, ai), bi);  // (no fma: the float kernel rounds the product first)
    v = _mm256_min_ps(_mm256_max_ps(v, vlow), vhigh);
    const __m256i r = _mm256_cvtps_epi32(v);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(words, words));
  }
  for (; i < n; ++i) dst[i] = affine_one(src[i], PER_ELEMENT ? a[i] : a[0], PER_ELEMENT ? b[i] : b[0], low, high);
}

}  // namespace

extern "C" {

// x laid out as (batch, channels, positions) (channels_last = 0) or (batch, positions, channels) (channels_last =
// 1); a, b: one float per channel; 0 <= low <= high <= 255
void fxq_affine_u8(const std::uint8_t* x, std::uint8_t* out, std::int64_t batch, std::int64_t channels,
                   std::int64_t positions, int channels_last, const float* a, const float* b, float low, float high,
                   int threads) {
  const std::int64_t rows = batch * (channels_last ? positions : channels);
  const std::int64_t width = channels_last ? channels : positions;
  fxq::for_each_block(rows, rows * width >= 65536, threads, [&](std::int64_t r) {
    if (channels_last) {
      affine_row<true>(x + r * width, out + r * width, width, a, b, low, high);
    } else {
      affine_row<false>(x + r * width, out + r * width, width, a + r % channels, b + r % channels, low, high);
    }
  });
}

// out[i] = table[x[i] ^ flip] over n bytes (flip = 0x80 for int8 input: the table is indexed by q + 128). 32 bytes
// per step: for each of the 16 rows of 16 entries, vpshufb looks the low nibbles up in that row, and an index whose
// high nibble is not the row's is pushed to 0x80 and up by a saturating add (vpshufb then yields 0), so OR-ing the
// 16 results leaves each byte its own entry
void fxq_lookup_u8(const std::uint8_t* x, std::uint8_t* out, std::int64_t n, const std::uint8_t* table, int flip,
                   int threads) {
  const std::uint8_t f = static_cast<std::uint8_t>(flip);
  __m256i rows[16];
  for (int h = 0; h < 16; ++h) {
    rows[h] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 16 * h)));
  }
  const std::int64_t blocks = (n + 4095) / 4096;
  fxq::for_each_block(blocks, n >= 262144, threads, [&](std::int64_t block) {
    const std::int64_t end = block * 4096 + 4096 < n ? block * 4096 + 4096 : n;
    const __m256i vflip = _mm256_set1_epi8(static_cast<char>(f)), push = _mm256_set1_epi8(0x70);
    std::int64_t i = block * 4096;
    for (; i + 32 <= end; i += 32) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), vflip);
      __m256i r = _mm256_setzero_si256();
      for (int h = 0; h < 16; ++h) {
        const __m256i idx = _mm256_adds_epu8(_mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(h << 4))), push);
        r = _mm256_or_si256(r, _mm256_shuffle_epi8(rows[h], idx));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), r);
    }
    for (; i < end; ++i) out[i] = table[x[i] ^ f];
  });
}

}  // extern "C"
