// Task 1's sliding-window attention as an MLX primitive with a compiled CPU kernel.
//
// The ops version in solutions/week3/sliding.py (`_blocked`) is the reference
// and the book's code; this file is the same algorithm, fused: a query block
// walks the key tiles of its band with an online softmax (FlashAttention's
// loop), so no score ever leaves the thread's cache. Vectorised with GCC/Clang
// vector extensions (AVX2/FMA on x86 with -march=native, NEON on Apple
// Silicon), one query block per task on every core.
//
// Semantics (the contract of `SlidingWindowAttention`): queries are the last
// Lq of Lk positions; the query at position p sees keys p - W < j <= p; query
// head h reads kv head h / (Hq / Hkv). Accumulation in float32.
// Built and loaded by longctx/native/__init__.py.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

typedef float vf __attribute__((vector_size(32)));  // 8 floats
typedef int vi __attribute__((vector_size(32)));
constexpr int V = 8;    // floats per vector
constexpr int QB = 32;  // query rows per task (a multiple of the micro-kernels' 4)
constexpr int KT = 64;  // keys per tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { vf x; std::memcpy(&x, p, sizeof x); return x; }
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }

// 2^x for x <= 0 (the scores minus their max), to ~1e-7 relative: 2^x = 2^n * 2^f with
// n = round(x), |f| <= 1/2, and 2^f from the degree-7 Taylor series of e^(f ln 2).
inline vf exp2v(vf x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;  // also maps the masked -inf to ~1e-38
  vi n = __builtin_convertvector(x + splat(128.5f), vi) - 128;  // floor(x + 1/2); the 128 keeps it positive
  vf f = (x - __builtin_convertvector(n, vf)) * splat(0.6931471805599453f);
  vf p = splat(1.0f / 5040);
  p = p * f + splat(1.0f / 720);
  p = p * f + splat(1.0f / 120);
  p = p * f + splat(1.0f / 24);
  p = p * f + splat(1.0f / 6);
  p = p * f + splat(0.5f);
  p = p * f + splat(1.0f);
  p = p * f + splat(1.0f);
  return p * (vf)((n + 127) << 23);  // the bit pattern of 2^n
}

struct Dims {
  int B, Hq, Hkv, Lq, Lk, D, W;
  float scale;  // times log2(e): exp2 of a score is then the softmax numerator
};

// One query block (rows i0 .. i0 + n - 1 of head (b, h)) against its band.
template <typename T>
void query_block(const T* q, const T* k, const T* v, T* out, const Dims& d, int b, int h, int i0,
                 float* buf) {
  const int DP = (d.D + V - 1) / V * V, n = std::min(QB, d.Lq - i0), p0 = d.Lk - d.Lq;
  float *Q = buf, *Kt = Q + QB * DP, *Vt = Kt + DP * KT, *S = Vt + KT * DP, *O = S + QB * KT;
  float m[QB], l[QB];
  const size_t kv = (size_t(b) * d.Hkv + h / (d.Hq / d.Hkv)) * d.Lk * d.D;
  const T* qrow = q + ((size_t(b) * d.Hq + h) * d.Lq + i0) * d.D;
  std::fill(Q, Q + QB * DP, 0.0f);
  std::fill(O, O + QB * DP, 0.0f);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < d.D; ++c) Q[r * DP + c] = float(qrow[size_t(r) * d.D + c]) * d.scale;
    m[r] = NEG_INF, l[r] = 0.0f;
  }
  // Keys of the band: from W - 1 before the first row to the last row.
  const int lo = std::max(0, p0 + i0 - d.W + 1), hi = p0 + i0 + n;  // [lo, hi)
  for (int k0 = lo; k0 < hi; k0 += KT) {
    const int nk = std::min(KT, hi - k0);
    for (int j = 0; j < KT; ++j) {  // transpose K into (DP, KT); pad with zeros
      for (int c = 0; c < DP; ++c) {
        float kx = j < nk && c < d.D ? float(k[kv + size_t(k0 + j) * d.D + c]) : 0.0f;
        Kt[c * KT + j] = kx;
        Vt[j * DP + c] = j < nk && c < d.D ? float(v[kv + size_t(k0 + j) * d.D + c]) : 0.0f;
      }
    }
    // S = Q K^T, 4 rows x 16 keys of accumulators at a time.
    for (int r = 0; r < n; r += 4) {
      for (int j = 0; j < KT; j += 2 * V) {
        vf acc[4][2] = {};
        for (int c = 0; c < d.D; ++c) {
          vf k0v = load(Kt + c * KT + j), k1v = load(Kt + c * KT + j + V);
          for (int i = 0; i < 4; ++i) {
            vf a = splat(Q[(r + i) * DP + c]);
            acc[i][0] += a * k0v;
            acc[i][1] += a * k1v;
          }
        }
        for (int i = 0; i < 4; ++i) store(S + (r + i) * KT + j, acc[i][0]), store(S + (r + i) * KT + j + V, acc[i][1]);
      }
    }
    // Online softmax: mask the band's edges, rescale what the row had, exponentiate.
    for (int r = 0; r < n; ++r) {
      const int p = p0 + i0 + r, first = std::max(k0, p - d.W + 1) - k0, last = std::min(k0 + nk - 1, p) - k0;
      float* s = S + r * KT;
      if (first > last) {  // no key of this tile is in the row's window
        std::fill(s, s + KT, 0.0f);
        continue;
      }
      std::fill(s, s + first, NEG_INF);
      std::fill(s + last + 1, s + KT, NEG_INF);
      vf mv = splat(NEG_INF);
      for (int j = 0; j < KT; j += V) mv = mv > load(s + j) ? mv : load(s + j);
      float tile_max = NEG_INF;
      for (int t = 0; t < V; ++t) tile_max = std::max(tile_max, mv[t]);
      const float m_new = std::max(m[r], tile_max), corr = std::exp2(m[r] - m_new);
      vf sum{};
      for (int j = 0; j < KT; j += V) {
        vf e = exp2v(load(s + j) - splat(m_new));
        store(s + j, e);
        sum += e;
      }
      float tile_sum = 0.0f;
      for (int t = 0; t < V; ++t) tile_sum += sum[t];
      l[r] = l[r] * corr + tile_sum;
      m[r] = m_new;
      for (int c = 0; c < DP; c += V) store(O + r * DP + c, load(O + r * DP + c) * splat(corr));
    }
    // O += P V, 4 rows x 16 head-dim columns of accumulators at a time.
    for (int r = 0; r < n; r += 4) {
      for (int c = 0; c < DP; c += 2 * V) {
        const bool two = c + V < DP;
        vf acc[4][2];
        for (int i = 0; i < 4; ++i) acc[i][0] = load(O + (r + i) * DP + c), acc[i][1] = two ? load(O + (r + i) * DP + c + V) : vf{};
        for (int j = 0; j < nk; ++j) {
          vf v0 = load(Vt + j * DP + c), v1 = two ? load(Vt + j * DP + c + V) : vf{};
          for (int i = 0; i < 4; ++i) {
            vf a = splat(S[(r + i) * KT + j]);
            acc[i][0] += a * v0;
            acc[i][1] += a * v1;
          }
        }
        for (int i = 0; i < 4; ++i) {
          store(O + (r + i) * DP + c, acc[i][0]);
          if (two) store(O + (r + i) * DP + c + V, acc[i][1]);
        }
      }
    }
  }
  T* orow = out + ((size_t(b) * d.Hq + h) * d.Lq + i0) * d.D;
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < d.D; ++c) orow[size_t(r) * d.D + c] = T(O[r * DP + c] / l[r]);
}

template <typename T>
void sliding_cpu(const T* q, const T* k, const T* v, T* out, Dims d) {
  const int blocks = (d.Lq + QB - 1) / QB, tasks = d.B * d.Hq * blocks;
  const int DP = (d.D + V - 1) / V * V;
  const size_t floats = size_t(QB) * DP * 2 + size_t(DP) * KT * 2 + size_t(QB) * KT;  // Q, O, Kt, Vt, S
  std::atomic<int> next{0};
  auto work = [&] {
    std::vector<float> buf(floats);
    for (int t = next++; t < tasks; t = next++) {
      const int blk = t % blocks, h = (t / blocks) % d.Hq, b = t / (blocks * d.Hq);
      query_block(q, k, v, out, d, b, h, blk * QB, buf.data());
    }
  };
  const int threads = std::max(1, std::min<int>(tasks, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

class SlidingWindow : public mx::Primitive {
 public:
  SlidingWindow(mx::Stream s, int window, float scale) : mx::Primitive(s), window_(window), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(q), encoder.set_input_array(k), encoder.set_input_array(v);
    encoder.set_output_array(out);
    Dims d{int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(k.shape(2)), int(q.shape(3)),
           window_, scale_};
    encoder.dispatch([q = mx::array::unsafe_weak_copy(q), k = mx::array::unsafe_weak_copy(k),
                      v = mx::array::unsafe_weak_copy(v), out = mx::array::unsafe_weak_copy(out), d]() mutable {
      switch (q.dtype()) {
        case mx::float32: return sliding_cpu(q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), d);
        case mx::float16:
          return sliding_cpu(q.data<mx::float16_t>(), k.data<mx::float16_t>(), v.data<mx::float16_t>(),
                             out.data<mx::float16_t>(), d);
        case mx::bfloat16:
          return sliding_cpu(q.data<mx::bfloat16_t>(), k.data<mx::bfloat16_t>(), v.data<mx::bfloat16_t>(),
                             out.data<mx::bfloat16_t>(), d);
        default: return;  // unreachable: sliding_window() checked the dtype
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    // On a GPU, solutions/week3/sliding.py launches its mx.fast kernels instead.
    throw std::runtime_error("longctx's compiled sliding-window kernel runs on the CPU only");
  }

  const char* name() const override { return "LongctxSlidingWindow"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const SlidingWindow&>(other);
    return window_ == o.window_ && scale_ == o.scale_;
  }

 private:
  int window_;
  float scale_;
};

// q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D), one dtype; checked by the Python caller.
mx::array sliding_window(const mx::array& q, const mx::array& k, const mx::array& v, int window, float scale) {
  // Checked here, when the graph is built: an exception inside the dispatched task would be lost.
  if (q.dtype() != mx::float32 && q.dtype() != mx::float16 && q.dtype() != mx::bfloat16)
    throw std::invalid_argument("sliding_window: q, k, v must be float32, float16 or bfloat16");
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{mx::contiguous(q, false, s), mx::contiguous(k, false, s), mx::contiguous(v, false, s)};
  return mx::array(q.shape(), q.dtype(), std::make_shared<SlidingWindow>(s, window, scale * float(M_LOG2E)),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_sliding, m) {
  m.def("sliding_window", &sliding_window, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("window"),
        nb::arg("scale"), "Sliding-window attention on the CPU (see solutions/week3/sliding.py).");
}
