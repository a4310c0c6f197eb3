// Conversions between float32 and 8-bit integers, 32 values per AVX2 step, for fxquant's lowered models:
// fxq_quantize_f32: out = round(clamp(zero_point + x * inv_scale, low, high)) (a model input quantized, a float
//   op's result requantized; inv_scale 1, zero point 0: a float result rounded) -- the product rounded before the
//   addition (no fma), rounding half to even, as fxquant's aten form (add, clamp, round, cast: four passes).
// fxq_quantize_nhwc_f32: the same from a contiguous (N, C, H, W) float image into a channels-last byte image (the
//   layout the int8 convolutions read), where aten quantizes and then copies (the copy of a 3-channel 224x224
//   image alone ~130 us).
// fxq_dequantize_8bit: out = (q - zero_point) * scale in float32 (the reference's arithmetic: an exact integer
//   difference, one rounding), where aten converts, subtracts and multiplies.
// Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py), which runs only
// where FBGEMM does (AVX2).
#pragma GCC target("avx2")
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <vector>

#include "fxquant_parallel.h"

namespace {

constexpr std::int64_t kBlock = 16384;  // elements per parallel block

inline std::uint8_t quantize1(float x, float k, float z, float lo, float hi) {
  float v = z + x * k;
  v = v < lo ? lo : (v > hi ? hi : v);
  return static_cast<std::uint8_t>(_mm_cvtss_si32(_mm_set_ss(v)));
}

// n values of x -> out, 32 per step (UNSIGNED: values in 0..255 after the clamp, else -128..127)
template <bool UNSIGNED>
void quantize_run_as(const float* x, std::uint8_t* out, std::int64_t n, float k, float z, float lo, float hi) {
  const __m256 vk = _mm256_set1_ps(k), vz = _mm256_set1_ps(z), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const auto round8 = [&](const float* p) {
    const __m256 v = _mm256_add_ps(vz, _mm256_mul_ps(_mm256_loadu_ps(p), vk));
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, vlo), vhi));  // half to even (MXCSR default)
  };
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the per-lane packing
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w01 = _mm256_packs_epi32(round8(x + i), round8(x + i + 8));
    const __m256i w23 = _mm256_packs_epi32(round8(x + i + 16), round8(x + i + 24));
    const __m256i bytes = UNSIGNED ? _mm256_packus_epi16(w01, w23) : _mm256_packs_epi16(w01, w23);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < n; ++i) out[i] = quantize1(x[i], k, z, lo, hi);
}

// n values of x -> out: uint8 for lo >= 0 (also an int8 range above 0: the same bytes), else int8
inline void quantize_run(const float* x, std::uint8_t* out, std::int64_t n, float k, float z, float lo, float hi) {
  if (lo >= 0.0f) {
    quantize_run_as<true>(x, out, n, k, z, lo, hi);
  } else {
    quantize_run_as<false>(x, out, n, k, z, lo, hi);
  }
}

// dst[p * channels + c] = rows[c * stride + p] for p < count
inline void interleave(const std::uint8_t* rows, std::int64_t stride, std::int64_t channels, std::int64_t count,
                       std::uint8_t* dst) {
  std::int64_t p = 0;
  if (channels == 3) {
    // output byte j of 16-byte chunk k is position (16k + j) / 3 of channel (16k + j) % 3: one shuffle mask per
    // (chunk, channel), 0x80 (zero) where the byte is another channel's
    alignas(16) static constexpr auto masks = [] {
      std::array<std::array<std::array<std::uint8_t, 16>, 3>, 3> m{};
      for (int k = 0; k < 3; ++k) {
        for (int ch = 0; ch < 3; ++ch) {
          for (int j = 0; j < 16; ++j) {
            const int g = 16 * k + j;
            m[k][ch][j] = g % 3 == ch ? static_cast<std::uint8_t>(g / 3) : 0x80;
          }
        }
      }
      return m;
    }();
    for (; p + 16 <= count; p += 16) {
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + p));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + stride + p));
      const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + 2 * stride + p));
      for (int k = 0; k < 3; ++k) {
        const __m128i v = _mm_or_si128(
            _mm_or_si128(_mm_shuffle_epi8(r0, _mm_load_si128(reinterpret_cast<const __m128i*>(masks[k][0].data()))),
                         _mm_shuffle_epi8(r1, _mm_load_si128(reinterpret_cast<const __m128i*>(masks[k][1].data())))),
            _mm_shuffle_epi8(r2, _mm_load_si128(reinterpret_cast<const __m128i*>(masks[k][2].data()))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * p + 16 * k), v);
      }
    }
  }
  for (; p < count; ++p) {
    for (std::int64_t c = 0; c < channels; ++c) dst[p * channels + c] = rows[c * stride + p];
  }
}

// n values (q - zero_point) * scale, 32 per step
template <bool SIGNED>
void dequantize_run(const std::uint8_t* q, float* out, std::int64_t n, float scale, float zero_point) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero_point);
  const auto widen = [](__m128i bytes) {
    return _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
  };
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(widen(lo), vz), vs));
    _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(_mm256_sub_ps(widen(_mm_srli_si128(lo, 8)), vz), vs));
    _mm256_storeu_ps(out + i + 16, _mm256_mul_ps(_mm256_sub_ps(widen(hi), vz), vs));
    _mm256_storeu_ps(out + i + 24, _mm256_mul_ps(_mm256_sub_ps(widen(_mm_srli_si128(hi, 8)), vz), vs));
  }
  for (; i < n; ++i) {
    const float v = SIGNED ? static_cast<float>(static_cast<std::int8_t>(q[i])) : static_cast<float>(q[i]);
    out[i] = (v - zero_point) * scale;
  }
}

}  // namespace

extern "C" {

// x: n float32 values; out: n bytes (uint8 for low >= 0, else int8 as its two's complement bytes)
void fxq_quantize_f32(const float* x, std::uint8_t* out, std::int64_t n, float inv_scale, float zero_point,
                      float low, float high, int threads) {
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  fxq::for_each_block(blocks, n >= 4 * kBlock, threads, [&](std::int64_t b) {
    const std::int64_t start = b * kBlock, count = start + kBlock < n ? kBlock : n - start;
    quantize_run(x + start, out + start, count, inv_scale, zero_point, low, high);
  });
}

// x: (batch, channels, positions) float32, contiguous; out: (batch, positions, channels) bytes. Tiles of kTile
// positions: each channel's run quantized into a buffer, then interleaved (three channels -- RGB images -- by
// byte shuffles, 16 positions per step)
void fxq_quantize_nhwc_f32(const float* x, std::uint8_t* out, std::int64_t batch, std::int64_t channels,
                           std::int64_t positions, float inv_scale, float zero_point, float low, float high,
                           int threads) {
  constexpr std::int64_t kTile = 256;
  constexpr std::int64_t kTilesPerBlock = 16;
  const std::int64_t tiles = (positions + kTile - 1) / kTile;
  const std::int64_t blocks_per_image = (tiles + kTilesPerBlock - 1) / kTilesPerBlock;
  fxq::for_each_block(batch * blocks_per_image, batch * channels * positions >= 4 * kBlock, threads,
                      [&](std::int64_t block) {
    const std::int64_t n = block / blocks_per_image, first = (block % blocks_per_image) * kTilesPerBlock;
    const std::int64_t last = first + kTilesPerBlock < tiles ? first + kTilesPerBlock : tiles;
    std::vector<std::uint8_t> tile(static_cast<std::size_t>(channels * kTile));
    for (std::int64_t t = first; t < last; ++t) {
      const std::int64_t p0 = t * kTile, count = p0 + kTile < positions ? kTile : positions - p0;
      for (std::int64_t c = 0; c < channels; ++c) {
        quantize_run(x + (n * channels + c) * positions + p0, tile.data() + c * kTile, count, inv_scale,
                     zero_point, low, high);
      }
      interleave(tile.data(), kTile, channels, count, out + (n * positions + p0) * channels);
    }
  });
}

// q: n bytes (int8 when is_signed); out: n float32 values (q - zero_point) * scale
void fxq_dequantize_8bit(const std::uint8_t* q, float* out, std::int64_t n, float scale, float zero_point,
                         int is_signed, int threads) {
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  fxq::for_each_block(blocks, n >= 4 * kBlock, threads, [&](std::int64_t b) {
    const std::int64_t start = b * kBlock, end = start + kBlock < n ? start + kBlock : n;
    if (is_signed) {
      dequantize_run<true>(q + start, out + start, end - start, scale, zero_point);
    } else {
      dequantize_run<false>(q + start, out + start, end - start, scale, zero_point);
    }
  });
}

}  // extern "C"
