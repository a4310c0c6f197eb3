// Conversions between float32 and 8-bit integers, 8 values per AVX2 step, for fxquant's lowered models:
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

// n values of x -> out (uint8 when lo >= 0: packs_epi16 saturates signed, so values 128..255 take the unsigned
// pack)
inline void quantize_run(const float* x, std::uint8_t* out, std::int64_t n, float k, float z, float lo, float hi) {
  const __m256 vk = _mm256_set1_ps(k), vz = _mm256_set1_ps(z), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const bool unsigned_out = lo >= 0.0f;
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_add_ps(vz, _mm256_mul_ps(_mm256_loadu_ps(x + i), vk));
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
    const __m256i r = _mm256_cvtps_epi32(v);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    const __m128i bytes = unsigned_out ? _mm_packus_epi16(words, words) : _mm_packs_epi16(words, words);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), bytes);
  }
  for (; i < n; ++i) out[i] = quantize1(x[i], k, z, lo, hi);
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
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero_point);
    std::int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
      const __m256i ints = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(ints), vz), vs));
    }
    for (; i < end; ++i) {
      const float v = is_signed ? static_cast<float>(static_cast<std::int8_t>(q[i])) : static_cast<float>(q[i]);
      out[i] = (v - zero_point) * scale;
    }
  });
}

}  // extern "C"
