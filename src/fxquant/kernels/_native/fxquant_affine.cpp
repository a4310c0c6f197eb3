// A per-channel affine map of a uint8 image requantized in one pass (an eval-mode batch norm, relu through the
// lower bound): out = round(clamp(x * a[c] + b[c], low, high)), 8 values per AVX2 step (widen to float, multiply,
// add, clamp, round half to even, narrow) -- the float arithmetic of aten's addcmul(b, x, a) followed by round and
// clamp, where aten takes four passes and two float temporaries.
// Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py).
// The library runs only where FBGEMM does (fxq_cpu_supported: AVX2), so this file targets it directly.
#pragma GCC target("avx2")
#include <immintrin.h>
#include <omp.h>

#include <cstdint>

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
#pragma omp parallel for num_threads(threads) if (threads > 1 && rows * width >= 65536) schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    if (channels_last) {
      affine_row<true>(x + r * width, out + r * width, width, a, b, low, high);
    } else {
      affine_row<false>(x + r * width, out + r * width, width, a + r % channels, b + r % channels, low, high);
    }
  }
}

}  // extern "C"
