// The recurrence of a dynamically quantized LSTM / GRU layer, as torch.ao's dynamic RNNs compute it on x86: at each
// step the hidden state is quantized per tensor (the qparams of fxquant's observers over the rows that step runs),
// multiplied with the int8 hidden-to-hidden weights in int32 by FBGEMM (fxq_linear_dynamic, bias included) and
// added to the step's input projection (computed for the whole sequence beforehand, the same way); the gates are
// float. Part of fxquant's native library (built with fxquant_native.cpp by fxquant/kernels/native.py).
// (no-trapping-math: lets the gate loops select with blends; it changes no computed value)
#pragma GCC optimize("no-trapping-math")
#include <fbgemm/QuantUtilsAvx2.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" int fxq_linear_dynamic(void* linear, const float* x, float* y, int rows, float scale, int zero_point,
                                  int threads);

namespace {

constexpr float kEps = 1.1920928955078125e-07f;  // float32 epsilon: the smallest scale the observers give

// fxquant.kernels.dynamic.affine_qparams: [lo, hi] widened to include 0, the scale rounded to float32 in two steps,
// the zero point rounded half to even and clamped
void affine_qparams(float lo, float hi, int qmin, int qmax, float* scale, int* zero_point) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  const float range = static_cast<float>(static_cast<double>(hi) - static_cast<double>(lo));
  const float s = std::max(static_cast<float>(static_cast<double>(range) / static_cast<double>(qmax - qmin)), kEps);
  const float ratio = static_cast<float>(static_cast<double>(lo) / static_cast<double>(s));
  const int z = qmin - static_cast<int>(std::nearbyint(ratio));
  *scale = s;
  *zero_point = std::min(std::max(z, qmin), qmax);
}

// e^x within 2 ulp (Cephes' expf reduction and polynomial) written without calls or branches so that the gate loops
// vectorize; |x| is clamped to where float32 e^x is finite and normal
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float round = 12582912.0f;  // 1.5 * 2^23: (t + round) - round rounds t half to even
  const float n = (x * 1.44269504088896341f + round) - round;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// tanh: Cephes' odd polynomial below |x| = 0.625, 1 - 2 / (e^2|x| + 1) above (both computed, one selected)
inline float tanh_approx(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * a) + 1.0f);
  return a < 0.625f ? small : std::copysign(large, x);
}

// one row of an LSTM step: gates (i, f, g, o) = x + y; c = f * c + i * g; h = o * tanh(c) (restrict parameters:
// GCC vectorizes the loop without alias checks)
inline void lstm_row(const float* __restrict xi, const float* __restrict xf, const float* __restrict xg,
                     const float* __restrict xo, const float* __restrict yi, const float* __restrict yf,
                     const float* __restrict yg, const float* __restrict yo, float* __restrict c,
                     float* __restrict h, float* __restrict out, int hidden) {
  for (int j = 0; j < hidden; ++j) {
    const float in_gate = sigmoid(yi[j] + xi[j]);
    const float forget_gate = sigmoid(yf[j] + xf[j]);
    const float cell_gate = tanh_approx(yg[j] + xg[j]);
    const float out_gate = sigmoid(yo[j] + xo[j]);
    const float cy = forget_gate * c[j] + in_gate * cell_gate;
    const float hy = out_gate * tanh_approx(cy);
    c[j] = cy;
    h[j] = hy;
    out[j] = hy;
  }
}

// one row of a GRU step: r = sigmoid(x_r + y_r), z = sigmoid(x_z + y_z), n = tanh(x_n + r * y_n),
// h = (h - n) * z + n
inline void gru_row(const float* __restrict xr, const float* __restrict xz, const float* __restrict xn,
                    const float* __restrict yr, const float* __restrict yz, const float* __restrict yn,
                    float* __restrict h, float* __restrict out, int hidden) {
  for (int j = 0; j < hidden; ++j) {
    const float reset_gate = sigmoid(yr[j] + xr[j]);
    const float input_gate = sigmoid(yz[j] + xz[j]);
    const float new_gate = tanh_approx(xn[j] + yn[j] * reset_gate);
    const float hy = (h[j] - new_gate) * input_gate + new_gate;
    h[j] = hy;
    out[j] = hy;
  }
}

// rows [begin, end) of one step: x = the rows' input projections (gx_stride apart), y = their hidden projections
// (packed)
__attribute__((target_clones("avx2", "default"))) void cells(int gru, const float* gx, std::int64_t gx_stride,
                                                              const float* gh, float* h, float* c, float* out,
                                                              std::int64_t out_stride, int begin, int end,
                                                              int hidden) {
  const std::int64_t n = hidden;
  for (int r = begin; r < end; ++r) {
    const float* x = gx + r * gx_stride;
    float* o = out + r * out_stride;
    if (gru) {
      const float* y = gh + r * 3 * n;
      gru_row(x, x + n, x + 2 * n, y, y + n, y + 2 * n, h + r * n, o, hidden);
    } else {
      const float* y = gh + r * 4 * n;
      lstm_row(x, x + n, x + 2 * n, x + 3 * n, y, y + n, y + 2 * n, y + 3 * n, c + r * n, h + r * n, o, hidden);
    }
  }
}

// one step on `rows` rows, on `threads` threads for enough work (no OpenMP region when serial:
// fxquant_parallel.h)
void step_cells(int gru, const float* gx, std::int64_t gx_stride, const float* gh, float* h, float* c, float* out,
                std::int64_t out_stride, int rows, int hidden, int threads) {
  if (threads > 1 && rows > 1 && static_cast<std::int64_t>(rows) * hidden >= 2048) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; ++r) cells(gru, gx, gx_stride, gh, h, c, out, out_stride, r, r + 1, hidden);
  } else {
    cells(gru, gx, gx_stride, gh, h, c, out, out_stride, 0, rows, hidden);
  }
}

}  // namespace

extern "C" {

// Runs one direction of one layer over a (packed) sequence. gx: the input projection (bias b_ih included), one row
// of gx_stride floats per (step, sequence) in step order, 4 * hidden (LSTM, gru = 0) or 3 * hidden (GRU) used;
// batch_sizes[t]: the rows of step t (all equal for a padded batch; non-increasing for a packed one); reverse: steps
// from last to first. h, c (LSTM only): (batch_sizes[0] or the largest, hidden) float state, updated in place: on
// return they hold each sequence's last state. out: one row of out_stride floats per (step, sequence), hidden
// written. hh: an fxq_linear_create handle of the hidden-to-hidden weights (with b_hh). 0 on success.
int fxq_rnn_run(void* hh, int gru, const float* gx, std::int64_t gx_stride, const int* batch_sizes, int steps,
                int hidden, int reverse, float* h, float* c, float* out, std::int64_t out_stride, int qmin, int qmax,
                int threads) {
  try {
    std::vector<std::int64_t> first_row(steps + 1, 0);
    int largest = 0;
    for (int t = 0; t < steps; ++t) {
      first_row[t + 1] = first_row[t] + batch_sizes[t];
      largest = std::max(largest, batch_sizes[t]);
    }
    const int gates = gru ? 3 : 4;
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<std::size_t>(largest) * gates * hidden);
    for (int i = 0; i < steps; ++i) {
      const int t = reverse ? steps - 1 - i : i;
      const int rows = batch_sizes[t];
      if (rows <= 0) continue;
      float lo, hi, scale;
      int zero_point;
      fbgemm::FindMinMax(h, &lo, &hi, static_cast<std::int64_t>(rows) * hidden);
      affine_qparams(lo, hi, qmin, qmax, &scale, &zero_point);
      const int rc = fxq_linear_dynamic(hh, h, scratch.data(), rows, scale, zero_point, threads);
      if (rc != 0) return rc;
      const float* step_gx = gx + first_row[t] * gx_stride;
      float* step_out = out + first_row[t] * out_stride;
      step_cells(gru, step_gx, gx_stride, scratch.data(), h, c, step_out, out_stride, rows, hidden, threads);
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
