// Embedding bags over a table of 8-bit or packed 4-bit rows with one float scale and zero point per row, in one
// pass: each looked-up row is dequantized as (q - zero_point) * scale -- the reference module's formula, evaluated
// the same way (no contraction: built with -ffp-contract=off) -- and reduced into its bag in index order, starting
// from zero, as F.embedding_bag reduces a float table. So the result equals F.embedding_bag on the dequantized
// table, while reading a quarter (an eighth) of fp32's bytes per row and none of aten's bookkeeping tensors.
// Weighted sums round like aten's (torch 2.13): one fused multiply-add per element, or a product then a sum when
// the bag has a padding_idx (aten's slower path).
// Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py).
// The library runs only where FBGEMM does (fxq_cpu_supported: AVX2 and FMA), so this file targets them directly.
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum Mode { kSum = 0, kMean = 1, kMax = 2 };
constexpr std::int64_t kAhead = 8;  // rows are random reads: each pass asks for the row this far ahead

struct Table {
  const std::uint8_t* data;
  const float* scale;
  const float* zero_point;
  std::int64_t rows, dim, row_bytes;
};

struct Call {
  Table t;
  const std::int64_t* indices;
  std::int64_t n_indices;
  const float* weights;
  std::int64_t padding_idx;
};

// Eight columns at a time (AVX2) or one (the last dim % 8 columns): the same operations, element by element
struct Wide {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V all(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V larger(V x, V acc) { return _mm256_max_ps(x, acc); }  // x > acc ? x : acc, like the scalar one
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static void store(float* out, V v) { _mm256_storeu_ps(out, v); }
  // columns [col, col + 8) of a row as floats (q, before the dequantization)
  template <int BITS>
  static V load(const std::uint8_t* row, std::int64_t col) {
    __m128i bytes;
    if constexpr (BITS == 8) {
      bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + col));
    } else {
      std::int32_t packed;
      std::memcpy(&packed, row + col / 2, sizeof(packed));
      const __m128i b = _mm_cvtsi32_si128(packed), nibble = _mm_set1_epi8(15);
      bytes = _mm_unpacklo_epi8(_mm_and_si128(b, nibble), _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  }
};

struct Narrow {
  using V = float;
  static constexpr int kLanes = 1;
  static V zero() { return 0.0f; }
  static V all(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V larger(V x, V acc) { return x > acc ? x : acc; }
  static V div(V a, V b) { return a / b; }
  static void store(float* out, V v) { *out = v; }
  template <int BITS>
  static V load(const std::uint8_t* row, std::int64_t col) {
    const int q = BITS == 8 ? row[col] : (row[col >> 1] >> ((col & 1) * 4)) & 15;
    return static_cast<float>(q);
  }
};

// Columns [col, col + N * lanes) of one bag (rows indices[begin:end)) reduced in registers, row by row in index
// order, and stored to out + col. Returns 1 on an index out of range.
template <typename L, int N, int BITS, int MODE, bool WEIGHTED>
int pass(const Call& k, std::int64_t begin, std::int64_t end, std::int64_t col, float* out) {
  using V = typename L::V;
  V acc[N];
  for (int v = 0; v < N; ++v) acc[v] = L::zero();
  std::int64_t count = 0;
  const bool fused = k.padding_idx < 0;  // aten's weighted sum: fused multiply-add unless a padding_idx is given
  for (std::int64_t i = begin; i < end; ++i) {
    const std::int64_t r = k.indices[i];
    if (r < 0 || r >= k.t.rows) return 1;
    if (col == 0 && i + kAhead < k.n_indices) {  // a prefetch never faults, whatever the index
      const std::int64_t ahead = k.indices[i + kAhead];
      __builtin_prefetch(k.t.data + ahead * k.t.row_bytes);
      __builtin_prefetch(k.t.scale + ahead);
      __builtin_prefetch(k.t.zero_point + ahead);
    }
    if (r == k.padding_idx) continue;
    const std::uint8_t* row = k.t.data + r * k.t.row_bytes;
    const V s = L::all(k.t.scale[r]), z = L::all(k.t.zero_point[r]);
    const V w = L::all(WEIGHTED ? k.weights[i] : 1.0f);
    for (int v = 0; v < N; ++v) {
      const V x = L::mul(L::sub(L::template load<BITS>(row, col + v * L::kLanes), z), s);
      if constexpr (MODE == kMax) {
        acc[v] = count == 0 ? x : L::larger(x, acc[v]);
      } else if constexpr (WEIGHTED) {
        acc[v] = fused ? L::fma(w, x, acc[v]) : L::add(acc[v], L::mul(w, x));
      } else {
        acc[v] = L::add(acc[v], x);
      }
    }
    ++count;
  }
  if (MODE == kMean && count > 1) {
    for (int v = 0; v < N; ++v) acc[v] = L::div(acc[v], L::all(static_cast<float>(count)));
  }
  for (int v = 0; v < N; ++v) L::store(out + col + v * L::kLanes, acc[v]);
  return 0;
}

// One bag into out (dim floats): passes of 64, 32, 16 and 8 columns, then single columns
template <int BITS, int MODE, bool WEIGHTED>
int bag(const Call& k, std::int64_t begin, std::int64_t end, float* out) {
  const std::int64_t dim = k.t.dim;
  std::int64_t col = 0;
  int failed = 0;
  for (; dim - col >= 64; col += 64) failed |= pass<Wide, 8, BITS, MODE, WEIGHTED>(k, begin, end, col, out);
  if (dim - col >= 32) failed |= pass<Wide, 4, BITS, MODE, WEIGHTED>(k, begin, end, col, out), col += 32;
  if (dim - col >= 16) failed |= pass<Wide, 2, BITS, MODE, WEIGHTED>(k, begin, end, col, out), col += 16;
  if (dim - col >= 8) failed |= pass<Wide, 1, BITS, MODE, WEIGHTED>(k, begin, end, col, out), col += 8;
  for (; col < dim; ++col) failed |= pass<Narrow, 1, BITS, MODE, WEIGHTED>(k, begin, end, col, out);
  return failed;
}

template <int BITS, int MODE, bool WEIGHTED>
int bags(const Call& k, const std::int64_t* offsets, std::int64_t n_offsets, std::int64_t n_bags,
         std::int64_t bag_len, float* out, int threads) {
  int failed = 0;
  const bool parallel = threads > 1 && n_bags > 1 && k.n_indices * k.t.dim >= (1 << 15);
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static) reduction(| : failed)
  for (std::int64_t b = 0; b < n_bags; ++b) {
    const std::int64_t begin = offsets ? offsets[b] : b * bag_len;
    const std::int64_t end = offsets ? (b + 1 < n_offsets ? offsets[b + 1] : k.n_indices) : begin + bag_len;
    failed |= bag<BITS, MODE, WEIGHTED>(k, begin, end, out + b * k.t.dim);
  }
  return failed;
}

template <int BITS>
int by_mode(const Call& k, int mode, const std::int64_t* offsets, std::int64_t n_offsets, std::int64_t n_bags,
            std::int64_t bag_len, float* out, int threads) {
  switch (mode) {
    case kSum:
      return k.weights ? bags<BITS, kSum, true>(k, offsets, n_offsets, n_bags, bag_len, out, threads)
                       : bags<BITS, kSum, false>(k, offsets, n_offsets, n_bags, bag_len, out, threads);
    case kMean:
      return bags<BITS, kMean, false>(k, offsets, n_offsets, n_bags, bag_len, out, threads);
    case kMax:
      return bags<BITS, kMax, false>(k, offsets, n_offsets, n_bags, bag_len, out, threads);
    default:
      return 3;
  }
}

}  // namespace

extern "C" {

// table: rows x row_bytes (row_bytes = dim for 8 bits, (dim + 1) / 2 for 4 bits: low nibble = even column);
// scale, zero_point: one float per row. Bag b is indices[offsets[b]:offsets[b + 1]] (the last one ends at
// n_indices unless offsets holds n_offsets = n_bags + 1 values: include_last_offset), or
// indices[b * bag_len:(b + 1) * bag_len] when offsets is null. mode: 0 sum, 1 mean, 2 max; weights
// (sum only, may be null): one float per index. padding_idx: a row the bags skip (-1: none). out: n_bags x dim.
// Returns 0, 1 for an index outside [0, rows), 2 for offsets that decrease or leave [0, n_indices], 3 for a bad
// mode or bit width, 4 (declined) for include_last_offset with a last offset other than n_indices.
int fxq_embedding_bag(const std::uint8_t* table, const float* scale, const float* zero_point, std::int64_t rows,
                      std::int64_t dim, int bits, const std::int64_t* indices, std::int64_t n_indices,
                      const std::int64_t* offsets, std::int64_t n_offsets, std::int64_t n_bags, std::int64_t bag_len,
                      int mode,
                      const float* weights, std::int64_t padding_idx, float* out, int threads) {
  if (offsets) {
    // aten reduces a last bag short of the indices' end inconsistently (mean divides by the count to the end, a
    // padded sum runs to the end): 4 declines such calls so that the caller runs aten's own kernel
    if (n_offsets > n_bags && n_bags > 0 && offsets[n_bags] != n_indices) return 4;
    for (std::int64_t b = 0; b < n_bags; ++b) {
      const std::int64_t end = b + 1 < n_offsets ? offsets[b + 1] : n_indices;
      if (offsets[b] < 0 || offsets[b] > end || end > n_indices) return 2;
    }
  }
  const Call k{{table, scale, zero_point, rows, dim, bits == 4 ? (dim + 1) / 2 : dim}, indices, n_indices, weights,
               padding_idx};
  if (bits == 8) return by_mode<8>(k, mode, offsets, n_offsets, n_bags, bag_len, out, threads);
  if (bits == 4) return by_mode<4>(k, mode, offsets, n_offsets, n_bags, bag_len, out, threads);
  return 3;
}

}  // extern "C"
