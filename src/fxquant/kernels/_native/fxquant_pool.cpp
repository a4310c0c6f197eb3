// 2-d max pooling of channels-last (NHWC) uint8 / int8 images in one pass: every output position takes the
// element-wise maximum of the C-byte rows of its window, 32 channels per AVX2 instruction. aten has no vectorized
// channels-last 8-bit kernel (torch 2.13 rejects uint8 images above 255 positions there), so the alternative is a
// widening copy to int16, its pool and a narrowing copy: three passes and a temporary twice the input's size.
// Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py).
// The library runs only where FBGEMM does (fxq_cpu_supported: AVX2), so this file targets it directly.
#pragma GCC target("avx2")
#include <immintrin.h>
#include <cstdint>

#include "fxquant_parallel.h"

namespace {

// The window offsets [first, last) along one dimension whose positions fall inside the image
inline void valid_taps(std::int64_t start, int kernel, int dilation, std::int64_t size, int* first, int* last) {
  int a = 0, b = kernel;
  while (a < b && start + static_cast<std::int64_t>(a) * dilation < 0) ++a;
  while (b > a && start + static_cast<std::int64_t>(b - 1) * dilation >= size) --b;
  *first = a;
  *last = b;
}

template <bool SIGNED>
inline std::uint8_t larger(std::uint8_t a, std::uint8_t b) {
  if constexpr (SIGNED) {
    return static_cast<std::int8_t>(a) > static_cast<std::int8_t>(b) ? a : b;
  } else {
    return a > b ? a : b;
  }
}

template <bool SIGNED>
void pool(const std::uint8_t* x, std::uint8_t* out, std::int64_t batch, std::int64_t channels, std::int64_t height,
          std::int64_t width, std::int64_t out_h, std::int64_t out_w, const int* kernel, const int* stride,
          const int* padding, const int* dilation, int threads) {
  const std::int64_t lines = batch * out_h;
  const bool parallel = threads > 1 && lines > 1 && lines * out_w * channels >= (1 << 16);
  const std::uint8_t lowest = SIGNED ? 0x80 : 0;  // the smallest value: the start of every maximum
  const std::int64_t row_step = static_cast<std::int64_t>(dilation[0]) * width * channels;
  const std::int64_t col_step = static_cast<std::int64_t>(dilation[1]) * channels;
  fxq::for_each_block(lines, parallel, threads, [&](std::int64_t line) {
    const std::int64_t n = line / out_h, oh = line % out_h;
    const std::int64_t h0 = oh * stride[0] - padding[0];
    int i0, i1;
    valid_taps(h0, kernel[0], dilation[0], height, &i0, &i1);
    for (std::int64_t ow = 0; ow < out_w; ++ow) {
      const std::int64_t w0 = ow * stride[1] - padding[1];
      int j0, j1;
      valid_taps(w0, kernel[1], dilation[1], width, &j0, &j1);
      // the window's first valid element; rows i0..i1 and columns j0..j1 from there
      const std::uint8_t* corner = x + ((n * height + h0 + static_cast<std::int64_t>(i0) * dilation[0]) * width + w0 +
                                        static_cast<std::int64_t>(j0) * dilation[1]) * channels;
      std::uint8_t* dst = out + ((n * out_h + oh) * out_w + ow) * channels;
      std::int64_t c = 0;
      for (; c + 32 <= channels; c += 32) {
        __m256i acc = _mm256_set1_epi8(static_cast<char>(lowest));
        for (int i = i0; i < i1; ++i) {
          const std::uint8_t* src = corner + (i - i0) * row_step + c;
          for (int j = j0; j < j1; ++j, src += col_step) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
            acc = SIGNED ? _mm256_max_epi8(acc, v) : _mm256_max_epu8(acc, v);
          }
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), acc);
      }
      for (; c < channels; ++c) {
        std::uint8_t acc = lowest;
        for (int i = i0; i < i1; ++i) {
          const std::uint8_t* src = corner + (i - i0) * row_step + c;
          for (int j = j0; j < j1; ++j, src += col_step) acc = larger<SIGNED>(acc, *src);
        }
        dst[c] = acc;
      }
    }
  });
}

}  // namespace

extern "C" {

// x: (batch, height, width, channels) bytes; out: (batch, out_h, out_w, channels). geometry: kernel, stride,
// padding and dilation, two ints each (height, width). is_signed: int8 values, else uint8.
void fxq_max_pool2d_8bit(const std::uint8_t* x, std::uint8_t* out, std::int64_t batch, std::int64_t channels,
                         std::int64_t height, std::int64_t width, std::int64_t out_h, std::int64_t out_w, int kh,
                         int kw, int sh, int sw, int ph, int pw, int dh, int dw, int is_signed, int threads) {
  const int kernel[2] = {kh, kw}, stride[2] = {sh, sw}, padding[2] = {ph, pw}, dilation[2] = {dh, dw};
  if (is_signed) {
    pool<true>(x, out, batch, channels, height, width, out_h, out_w, kernel, stride, padding, dilation, threads);
  } else {
    pool<false>(x, out, batch, channels, height, width, out_h, out_w, kernel, stride, padding, dilation, threads);
  }
}

}  // extern "C"
