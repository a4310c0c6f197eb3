// fxquant's native kernels: int8 convolution through FBGEMM (which torch's CPU library links and exports) and
// single-pass element-wise kernels on uint8 activations, behind a C interface that Python reaches with ctypes.
//
// Everything works on plain buffers: uint8 activations (NHWC / NDHWC for convolutions, i.e. torch's channels-last
// layout), int8 weights, float scales. Built on first use by fxquant/kernels/native.py against the installed
// torch's headers and libtorch_cpu; nothing here touches torch's quantized tensor types.
#include <fbgemm/Fbgemm.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

using fbgemm::QuantizationGranularity;

template <int D>
std::array<int, D> first(const int* values) {
  std::array<int, D> out{};
  std::copy(values, values + D, out.begin());
  return out;
}

// One convolution with its weight packed once; the batch and image size come with each call.
class Convolution {
 public:
  virtual ~Convolution() = default;
  virtual int run(const std::uint8_t* x, std::uint8_t* y, int batch, const int* image, int threads) = 0;
  virtual int input_limit() const = 0;
};

struct Requant {
  std::vector<std::int32_t> column_sums;   // sum of each output channel's weights (times the input zero point)
  std::vector<std::int32_t> weight_zeros;  // zeros: symmetric weights only
  std::vector<float> multiplier;           // input scale * weight scale / output scale
  std::vector<float> input_times_weight;   // input scale * weight scale (fbgemm divides the float bias by it)
  std::vector<float> bias;
  int input_zero = 0, output_zero = 0, low = 0, high = 255;
  bool relu = false, per_channel = false;
  // without VNNI FBGEMM multiplies with vpmaddubsw: two uint8 x int8 products of one output channel summed in
  // int16 (saturating). With every input at most `input_limit` no pair sum can leave int16: the limit is
  // 32767 / (the largest sum of two same-signed weights of one output channel); 255 = no check
  int input_limit = 255;
  std::vector<std::uint8_t> table;  // 256 entries applied to the result (an activation after the conv), or empty

  bool refuses(const std::uint8_t* x, std::size_t count) const;
};

// the largest byte (vectorized)
__attribute__((target_clones("avx2", "default"))) std::uint8_t max_byte(const std::uint8_t* x, std::size_t n) {
  std::uint8_t m = 0;
  for (std::size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The input (count bytes) could saturate FBGEMM's int16 pair sums: above the limit, or a zero point above it (the
// zero point pads convolution images)
bool Requant::refuses(const std::uint8_t* x, std::size_t count) const {
  return input_limit < 255 && (input_zero > input_limit || max_byte(x, count) > input_limit);
}

// part(thread id, thread count) on `threads` OpenMP threads (FBGEMM splits its work by those two numbers)
template <typename F>
void on_threads(int threads, F&& part) {
  if (threads <= 1) {
    part(0, 1);
  } else {
#pragma omp parallel num_threads(threads)
    part(omp_get_thread_num(), omp_get_num_threads());
  }
}

// Calls f.operator()<RELU, granularity>() for the requantization's relu and weight-scale granularity
template <typename F>
int dispatch(const Requant& rq, F&& f) {
  if (rq.relu) {
    return rq.per_channel ? f.template operator()<true, QuantizationGranularity::OUT_CHANNEL>()
                          : f.template operator()<true, QuantizationGranularity::TENSOR>();
  }
  return rq.per_channel ? f.template operator()<false, QuantizationGranularity::OUT_CHANNEL>()
                        : f.template operator()<false, QuantizationGranularity::TENSOR>();
}

// 32767 / the largest sum of two same-signed weights within one output channel (at least 127, at most 255)
int saturation_free_limit(const std::int8_t* weight, int out_channels, int per_output) {
  int worst = 1;
  for (int o = 0; o < out_channels; ++o) {
    int pos[2] = {0, 0}, neg[2] = {0, 0};  // the two largest positive / negative magnitudes
    const std::int8_t* row = weight + static_cast<std::size_t>(o) * per_output;
    for (int j = 0; j < per_output; ++j) {
      int* top = row[j] >= 0 ? pos : neg;
      int v = row[j] >= 0 ? row[j] : -row[j];
      if (v > top[0]) {
        top[1] = top[0];
        top[0] = v;
      } else if (v > top[1]) {
        top[1] = v;
      }
    }
    worst = std::max(worst, std::max(pos[0] + pos[1], neg[0] + neg[1]));
  }
  return std::min(255, 32767 / worst);
}

// fbgemm clamps requantized results to 0..255 (relu: from the output zero point); narrower ranges (reduce_range,
// relu6) and an activation table here, in one pass over the count bytes of y
void finish(const Requant& rq, std::uint8_t* y, std::size_t count) {
  const int floor = rq.relu ? std::max(rq.low, rq.output_zero) : rq.low;
  const bool clamp = floor > (rq.relu ? rq.output_zero : 0) || rq.high < 255;
  const auto lo = static_cast<std::uint8_t>(floor), hi = static_cast<std::uint8_t>(rq.high);
  if (!rq.table.empty()) {
    const std::uint8_t* t = rq.table.data();
    for (std::size_t i = 0; i < count; ++i) {
      std::uint8_t v = y[i];
      v = v < lo ? lo : v;
      y[i] = t[v > hi ? hi : v];
    }
  } else if (clamp) {
    for (std::size_t i = 0; i < count; ++i) {
      std::uint8_t v = y[i];
      v = v < lo ? lo : v;
      y[i] = v > hi ? hi : v;
    }
  }
}

// the requantization constants shared by the static kernels: weight (outputs, per_output) symmetric int8
Requant make_requant(const std::int8_t* weight, int outputs, int per_output, int per_channel, const float* w_scale,
                     float in_scale, int in_zero, float out_scale, int out_zero, const float* bias, int relu, int low,
                     int high, int check_7bit) {
  Requant rq;
  rq.column_sums.resize(outputs);
  for (int o = 0; o < outputs; ++o) {
    const std::int8_t* row = weight + static_cast<std::size_t>(o) * per_output;
    std::int32_t sum = 0;
    for (int j = 0; j < per_output; ++j) sum += row[j];
    rq.column_sums[o] = sum;
  }
  const int scales = per_channel ? outputs : 1;
  rq.weight_zeros.assign(scales, 0);
  for (int o = 0; o < scales; ++o) {
    rq.input_times_weight.push_back(in_scale * w_scale[o]);
    rq.multiplier.push_back(rq.input_times_weight.back() / out_scale);
  }
  if (bias != nullptr) rq.bias.assign(bias, bias + outputs);
  rq.input_zero = in_zero;
  rq.output_zero = out_zero;
  rq.low = low;
  rq.high = high;
  rq.relu = relu != 0;
  rq.per_channel = per_channel != 0;
  rq.input_limit = check_7bit != 0 ? saturation_free_limit(weight, outputs, per_output) : 255;
  return rq;
}

template <int D>
class PackedConvolution final : public Convolution {
 public:
  PackedConvolution(int in_channels, int out_channels, int groups, const int* kernel, const int* stride,
                    const int* pad, const int* dilation, const std::int8_t* weight, Requant requant)
      : in_channels_(in_channels), out_channels_(out_channels), groups_(groups), kernel_(first<D>(kernel)),
        stride_(first<D>(stride)), dilation_(first<D>(dilation)), pad_(first<2 * D>(pad)), rq_(std::move(requant)) {
    std::array<int, D> nominal{};  // packing depends on the geometry, not on the image size
    for (int i = 0; i < D; ++i) nominal[i] = (kernel_[i] - 1) * dilation_[i] + 1 + stride_[i];
    packed_ = std::make_unique<fbgemm::PackWeightsForConv<D>>(params(1, nominal), weight);
  }

  int input_limit() const override { return rq_.input_limit; }

  int run(const std::uint8_t* x, std::uint8_t* y, int batch, const int* image, int threads) override {
    const auto p = params(batch, first<D>(image));
    std::size_t count = static_cast<std::size_t>(batch) * in_channels_;
    for (int i = 0; i < D; ++i) count *= static_cast<std::size_t>(image[i]);
    if (rq_.refuses(x, count)) return 1;
    return dispatch(rq_, [&]<bool RELU, QuantizationGranularity G>() { return go<RELU, G>(p, x, y, threads); });
  }

 private:
  fbgemm::conv_param_t<D> params(int batch, const std::array<int, D>& image) const {
    return fbgemm::conv_param_t<D>(batch, in_channels_, out_channels_, image, groups_, kernel_, stride_, pad_,
                                   dilation_);
  }

  template <bool RELU, QuantizationGranularity G>
  int go(const fbgemm::conv_param_t<D>& p, const std::uint8_t* x, std::uint8_t* y, int threads) {
    using Output = fbgemm::ReQuantizeOutput<RELU, G, float, std::uint8_t, std::int32_t>;
    std::size_t count = static_cast<std::size_t>(p.MB) * out_channels_;
    for (int i = 0; i < D; ++i) count *= static_cast<std::size_t>(p.OUT_DIM[i]);
    thread_local std::vector<std::int32_t> scratch;  // int32 accumulators of the im2col path
    if (scratch.size() < count) scratch.resize(count);
    fbgemm::DoNothing<std::uint8_t, std::uint8_t> done;
    Output output(done, rq_.multiplier.data(), rq_.output_zero, rq_.input_zero, rq_.weight_zeros.data(), nullptr,
                  rq_.column_sums.data(), rq_.bias.empty() ? nullptr : rq_.bias.data(), out_channels_, groups_,
                  rq_.input_times_weight.data());
    std::int32_t* buffer = scratch.data();
    int status = 0;
    if (threads <= 1) {
      status = fbgemm::fbgemmConv<Output, D, std::int32_t>(p, x, *packed_, y, buffer, output, 0, 1);
    } else {
#pragma omp parallel num_threads(threads)
      {
        int s = fbgemm::fbgemmConv<Output, D, std::int32_t>(p, x, *packed_, y, buffer, output, omp_get_thread_num(),
                                                            omp_get_num_threads());
        if (s != 0) {
#pragma omp atomic write
          status = s;
        }
      }
    }
    finish(rq_, y, count);
    return status;
  }

  int in_channels_, out_channels_, groups_;
  std::array<int, D> kernel_, stride_, dilation_;
  std::array<int, 2 * D> pad_;
  Requant rq_;
  std::unique_ptr<fbgemm::PackWeightsForConv<D>> packed_;
};

// A linear layer with symmetric int8 weights packed once, on float input quantized per tensor at run time
// (inside FBGEMM's packing of the activations, as torch.ao's dynamic linear does), float output.
class DynamicLinear {
 public:
  DynamicLinear(int in_features, int out_features, const std::int8_t* weight, int per_channel,
                const float* w_scale, const float* bias, int relu)
      : k_(in_features), n_(out_features), relu_(relu != 0), per_channel_(per_channel != 0) {
    // B = W^T (K x N) from the (N, K) row-major weight
    packed_ = std::make_unique<fbgemm::PackBMatrix<std::int8_t>>(fbgemm::matrix_op_t::Transpose, k_, n_, weight, k_,
                                                                  nullptr, 1);
    column_sums_.resize(n_);
    for (int o = 0; o < n_; ++o) {
      std::int32_t sum = 0;
      for (int j = 0; j < k_; ++j) sum += weight[static_cast<std::size_t>(o) * k_ + j];
      column_sums_[o] = sum;
    }
    const int scales = per_channel_ ? n_ : 1;
    w_scale_.assign(w_scale, w_scale + scales);
    w_zero_.assign(scales, 0);
    if (bias != nullptr) bias_.assign(bias, bias + n_);
  }

  int run(const float* x, float* y, int rows, float scale, int zero_point, int threads) {
    if (relu_) {
      return per_channel_ ? go<true, QuantizationGranularity::OUT_CHANNEL>(x, y, rows, scale, zero_point, threads)
                          : go<true, QuantizationGranularity::TENSOR>(x, y, rows, scale, zero_point, threads);
    }
    return per_channel_ ? go<false, QuantizationGranularity::OUT_CHANNEL>(x, y, rows, scale, zero_point, threads)
                        : go<false, QuantizationGranularity::TENSOR>(x, y, rows, scale, zero_point, threads);
  }

 private:
  template <bool RELU, QuantizationGranularity G>
  int go(const float* x, float* y, int rows, float scale, int zero_point, int threads) {
    thread_local std::vector<std::int32_t> scratch;
    const std::size_t count = static_cast<std::size_t>(rows) * n_;
    if (scratch.size() < count) scratch.resize(count);
    std::int32_t* buffer = scratch.data();
    auto part = [&](int id, int of) {
      fbgemm::PackAWithQuantRowOffset<std::uint8_t> packed_x(fbgemm::matrix_op_t::NoTranspose, rows, k_, x, k_,
                                                              nullptr, scale, zero_point, 1);
      fbgemm::DoNothing<float, float> done;
      fbgemm::ReQuantizeForFloat<RELU, G> output(done, scale, w_scale_.data(), zero_point, w_zero_.data(),
                                                 packed_x.getRowOffsetBuffer(), column_sums_.data(),
                                                 bias_.empty() ? nullptr : bias_.data(), n_);
      fbgemm::fbgemmPacked(packed_x, *packed_, y, buffer, n_, output, id, of);
    };
    on_threads(threads, part);
    return 0;
  }

  int k_, n_;
  bool relu_, per_channel_;
  std::unique_ptr<fbgemm::PackBMatrix<std::int8_t>> packed_;
  std::vector<std::int32_t> column_sums_, w_zero_;
  std::vector<float> w_scale_, bias_;
};

// A static linear layer: uint8 input (rows, in) with its qparams, symmetric int8 weights packed once, uint8 output
// requantized by FBGEMM (relu, the output range clamped as for convolutions).
class StaticLinear {
 public:
  StaticLinear(int in_features, int out_features, const std::int8_t* weight, Requant requant)
      : k_(in_features), n_(out_features), rq_(std::move(requant)) {
    packed_ = std::make_unique<fbgemm::PackBMatrix<std::int8_t>>(fbgemm::matrix_op_t::Transpose, k_, n_, weight, k_,
                                                                  nullptr, 1);
  }

  // 0 on success, 1 when the input (or its zero point) exceeds the int16-safe limit (the caller runs another kernel)
  int run(const std::uint8_t* x, std::uint8_t* y, int rows, int threads) {
    if (rq_.refuses(x, static_cast<std::size_t>(rows) * k_)) return 1;
    return dispatch(rq_, [&]<bool RELU, QuantizationGranularity G>() { return go<RELU, G>(x, y, rows, threads); });
  }

 private:
  template <bool RELU, QuantizationGranularity G>
  int go(const std::uint8_t* x, std::uint8_t* y, int rows, int threads) {
    using Output = fbgemm::ReQuantizeOutput<RELU, G, float, std::uint8_t, std::int32_t>;
    thread_local std::vector<std::int32_t> scratch;
    const std::size_t count = static_cast<std::size_t>(rows) * n_;
    if (scratch.size() < count) scratch.resize(count);
    std::int32_t* buffer = scratch.data();
    auto part = [&](int id, int of) {
      fbgemm::PackAMatrix<std::uint8_t> packed_x(fbgemm::matrix_op_t::NoTranspose, rows, k_, x, k_, nullptr, 1);
      fbgemm::DoNothing<std::uint8_t, std::uint8_t> done;
      Output output(done, rq_.multiplier.data(), rq_.output_zero, rq_.input_zero, rq_.weight_zeros.data(), nullptr,
                    rq_.column_sums.data(), rq_.bias.empty() ? nullptr : rq_.bias.data(), n_, 1,
                    rq_.input_times_weight.data());
      fbgemm::fbgemmPacked(packed_x, *packed_, y, buffer, n_, output, id, of);
    };
    on_threads(threads, part);
    finish(rq_, y, count);
    return 0;
  }

  int k_, n_;
  Requant rq_;
  std::unique_ptr<fbgemm::PackBMatrix<std::int8_t>> packed_;
};

// 1.5 * 2^23: adding it to a float in [-2^22, 2^22] rounds to an integer (half to even) held in the low mantissa
// bits, so the low byte of the sum's bits is the rounded value (two's complement for negative ones)
constexpr float kRound = 12582912.0f;

inline std::uint8_t round_byte(float v) {
  v += kRound;
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<std::uint8_t>(bits);
}

inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

}  // namespace

extern "C" {

int fxq_abi_version() { return 13; }

int fxq_cpu_supported() { return fbgemm::fbgemmSupportedCPU() ? 1 : 0; }

// A convolution of `dims` spatial dimensions with symmetric int8 weights laid out as
// (out_channels, *kernel, in_channels / groups); pad holds the leading pads then the trailing ones.
// w_scale: one value, or one per output channel (per_channel). bias: out_channels floats or null.
// Output: quantize(relu?(conv(dequantize(x)) + bias)) clamped to [low, high]. Null on failure.
// check_7bit: fxq_conv_run returns 1 (and computes nothing) when an input value could make a pair of products
// saturate in int16 (CPUs without VNNI): above 127, or above 32767 / (the largest sum of two same-signed weights
// of one output channel) where that is higher.
// table: null, or 256 uint8 values applied to each result (an activation and requantization after the conv).
void* fxq_conv_create(int dims, int in_channels, int out_channels, int groups, const int* kernel, const int* stride,
                      const int* pad, const int* dilation, const std::int8_t* weight, int per_channel,
                      const float* w_scale, float in_scale, int in_zero, float out_scale, int out_zero,
                      const float* bias, int relu, int low, int high, int check_7bit, const std::uint8_t* table) {
  try {
    int per_output = in_channels / groups;
    for (int i = 0; i < dims; ++i) per_output *= kernel[i];
    Requant rq = make_requant(weight, out_channels, per_output, per_channel, w_scale, in_scale, in_zero, out_scale,
                              out_zero, bias, relu, low, high, check_7bit);
    if (table != nullptr) rq.table.assign(table, table + 256);
    switch (dims) {
      case 1:
        return new PackedConvolution<1>(in_channels, out_channels, groups, kernel, stride, pad, dilation, weight,
                                        std::move(rq));
      case 2:
        return new PackedConvolution<2>(in_channels, out_channels, groups, kernel, stride, pad, dilation, weight,
                                        std::move(rq));
      case 3:
        return new PackedConvolution<3>(in_channels, out_channels, groups, kernel, stride, pad, dilation, weight,
                                        std::move(rq));
      default:
        return nullptr;
    }
  } catch (...) {
    return nullptr;
  }
}

// x: (batch, *image, in_channels) uint8; y: (batch, *out_image, out_channels) uint8. 0 on success, 1 when
// check_7bit refused the input, another value on failure.
int fxq_conv_input_limit(void* conv);
int fxq_conv_run(void* conv, const std::uint8_t* x, std::uint8_t* y, int batch, const int* image, int threads) {
  try {
    return static_cast<Convolution*>(conv)->run(x, y, batch, image, threads);
  } catch (...) {
    return -1;
  }
}

int fxq_conv_input_limit(void* conv) { return static_cast<Convolution*>(conv)->input_limit(); }

void fxq_conv_free(void* conv) { delete static_cast<Convolution*>(conv); }

// weight: (out_features, in_features) int8, symmetric; w_scale: one value or one per output feature; bias: null or
// out_features floats. Null on failure.
void* fxq_linear_create(int in_features, int out_features, const std::int8_t* weight, int per_channel,
                        const float* w_scale, const float* bias, int relu) {
  try {
    return new DynamicLinear(in_features, out_features, weight, per_channel, w_scale, bias, relu);
  } catch (...) {
    return nullptr;
  }
}

// y (rows, out_features) = relu?(dequantize(quantize(x, scale, zero_point)) @ W^T + bias) for float x
// (rows, in_features); the quantization clamps to 0..255 (the caller's range follows from the qparams)
int fxq_linear_dynamic(void* linear, const float* x, float* y, int rows, float scale, int zero_point, int threads) {
  try {
    return static_cast<DynamicLinear*>(linear)->run(x, y, rows, scale, zero_point, threads);
  } catch (...) {
    return -1;
  }
}

void fxq_linear_free(void* linear) { delete static_cast<DynamicLinear*>(linear); }

// A static linear layer (weight (out_features, in_features) int8, symmetric; w_scale one value or one per output
// feature): y = clamp(quantize(relu?(dequantize(x) @ W^T + bias)), low, high) on uint8 x. check_7bit as for
// convolutions. Null on failure.
void* fxq_qlinear_create(int in_features, int out_features, const std::int8_t* weight, int per_channel,
                         const float* w_scale, float in_scale, int in_zero, float out_scale, int out_zero,
                         const float* bias, int relu, int low, int high, int check_7bit) {
  try {
    return new StaticLinear(in_features, out_features, weight,
                            make_requant(weight, out_features, in_features, per_channel, w_scale, in_scale, in_zero,
                                         out_scale, out_zero, bias, relu, low, high, check_7bit));
  } catch (...) {
    return nullptr;
  }
}

// x: (rows, in_features) uint8, y: (rows, out_features) uint8. 0 on success, 1 when check_7bit refused the input.
int fxq_qlinear_run(void* linear, const std::uint8_t* x, std::uint8_t* y, int rows, int threads) {
  try {
    return static_cast<StaticLinear*>(linear)->run(x, y, rows, threads);
  } catch (...) {
    return -1;
  }
}

void fxq_qlinear_free(void* linear) { delete static_cast<StaticLinear*>(linear); }

// out[i] = round(clamp(a[i] * ka + b[i] * kb + c, low, high)) over n elements of the same layout
// (a quantized add: ka = sa / so, kb = sb / so, c = zo - za * ka - zb * kb; relu: low = zo)
__attribute__((target_clones("avx2", "default"))) void fxq_add_u8(const std::uint8_t* a, const std::uint8_t* b,
                                                                   std::uint8_t* out, std::int64_t n, float ka,
                                                                   float kb, float c, float low, float high,
                                                                   int threads) {
  // (the loop written twice: no OpenMP region when serial, see fxquant_parallel.h; no lambda, which a
  // target_clones function would not vectorize)
  if (threads > 1 && n >= 65536) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      out[i] = round_byte(clamp((c + static_cast<float>(a[i]) * ka) + static_cast<float>(b[i]) * kb, low, high));
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      out[i] = round_byte(clamp((c + static_cast<float>(a[i]) * ka) + static_cast<float>(b[i]) * kb, low, high));
    }
  }
}

// Rows [begin, end) of a gated product: a position's channels (channels-last) or a channel's positions
static __attribute__((target_clones("avx2", "default"))) void gate_rows(const std::uint8_t* src, std::uint8_t* dst,
                                                                  std::int64_t begin, std::int64_t end,
                                                                  std::int64_t channels, std::int64_t positions,
                                                                  int channels_last, const float* fp,
                                                                  const float* sp, float low, float high) {
  if (channels_last) {
    for (std::int64_t p = begin; p < end; ++p) {
      const std::uint8_t* row = src + p * channels;
      std::uint8_t* o = dst + p * channels;
      for (std::int64_t ch = 0; ch < channels; ++ch) {
        o[ch] = round_byte(clamp(static_cast<float>(row[ch]) * fp[ch] + sp[ch], low, high));
      }
    }
  } else {
    for (std::int64_t ch = begin; ch < end; ++ch) {
      const std::uint8_t* row = src + ch * positions;
      std::uint8_t* o = dst + ch * positions;
      const float fc = fp[ch], sc = sp[ch];
      for (std::int64_t p = 0; p < positions; ++p) {
        o[p] = round_byte(clamp(static_cast<float>(row[p]) * fc + sc, low, high));
      }
    }
  }
}

// A product whose one operand has one value per (batch, channel) (a squeeze-excite gate times a feature map):
// out = round(clamp(big * f + s, low, high)) with f = k * (small - z_small), s = c - z_big * f, for big laid out as
// (batch, channels, positions) (channels_last = 0) or (batch, positions, channels) (channels_last = 1).
void fxq_mul_gate_u8(const std::uint8_t* big, const std::uint8_t* small, std::uint8_t* out, std::int64_t batch,
                     std::int64_t channels, std::int64_t positions, int channels_last, float k, float z_big,
                     float z_small, float c, float low, float high, int threads) {
  std::vector<float> f(channels), s(channels);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t ch = 0; ch < channels; ++ch) {
      f[ch] = k * (static_cast<float>(small[b * channels + ch]) - z_small);
      s[ch] = c - z_big * f[ch];
    }
    const std::uint8_t* src = big + b * channels * positions;
    std::uint8_t* dst = out + b * channels * positions;
    const std::int64_t rows = channels_last ? positions : channels;
    if (threads > 1 && positions * channels >= 65536) {  // (no OpenMP region when serial: fxquant_parallel.h)
#pragma omp parallel for num_threads(threads) schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        gate_rows(src, dst, r, r + 1, channels, positions, channels_last, f.data(), s.data(), low, high);
      }
    } else {
      gate_rows(src, dst, 0, rows, channels, positions, channels_last, f.data(), s.data(), low, high);
    }
  }
}

// A global average pool requantized: out[n, c] = round(clamp(b + (sum over positions / positions) * a, low, high))
// for x laid out as (batch, channels, positions) (channels_last = 0) or (batch, positions, channels)
__attribute__((target_clones("avx2", "default"))) void fxq_mean_u8(const std::uint8_t* x, std::uint8_t* out,
                                                                    std::int64_t batch, std::int64_t channels,
                                                                    std::int64_t positions, int channels_last,
                                                                    float a, float b, float low, float high) {
  std::vector<std::int32_t> sums(channels);
  const float count = static_cast<float>(positions);
  for (std::int64_t n = 0; n < batch; ++n) {
    const std::uint8_t* src = x + n * channels * positions;
    std::fill(sums.begin(), sums.end(), 0);
    if (channels_last) {
      for (std::int64_t p = 0; p < positions; ++p) {
        const std::uint8_t* row = src + p * channels;
        for (std::int64_t c = 0; c < channels; ++c) sums[c] += row[c];
      }
    } else {
      for (std::int64_t c = 0; c < channels; ++c) {
        const std::uint8_t* row = src + c * positions;
        std::int32_t acc = 0;
        for (std::int64_t p = 0; p < positions; ++p) acc += row[p];
        sums[c] = acc;
      }
    }
    for (std::int64_t c = 0; c < channels; ++c) {
      const float mean = static_cast<float>(sums[c]) / count;
      out[n * channels + c] = round_byte(clamp(b + mean * a, low, high));
    }
  }
}

}  // extern "C"
