// Task 1's sliding-window attention as an MLX primitive with a compiled CPU kernel.
//
// The ops version in solutions/week3/sliding.py (`_blocked`) is the reference
// and the book's code; this file is the same algorithm, fused: a query block
// walks the key tiles of its band with an online softmax (FlashAttention's
// loop), so no score ever leaves the thread's cache. Vectorised with GCC/Clang
// vector extensions (AVX2/FMA on x86 with -march=native, NEON on Apple
// Silicon), one query block per task on every core.
//
// Its backward is FlashAttention-2's, limited to the band: the forward also
// writes each row's log-sum-exp, so a key tile's probabilities are recomputed
// (P = exp2(S - lse)) instead of stored; then dV += P^T dO,
// dS = P * (dO V^T - rowsum(dO * O)), dK += dS^T Q * scale, dQ += dS K * scale.
// A task owns a chunk of at least W - 1 keys of one kv head (so it accumulates
// dK and dV for every query head that reads them, GQA included); the query rows
// two chunks touch overlap only for neighbours, so even chunks run first, odd
// ones second, and dQ needs no lock. Memory: O(L * D) beside a few tiles.
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

// C (M x N, row stride ldc) += A (M x K) B (K x N, row stride ldb), where A(i, k) is
// A[i * lda + k], or A[k * lda + i] when TA (A transposed). M a multiple of 4, N of V.
template <bool TA>
void gemm(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int K, int N) {
  for (int i = 0; i < M; i += 4) {
    for (int j = 0; j < N; j += 2 * V) {
      const bool two = j + V < N;
      vf acc[4][2];
      for (int r = 0; r < 4; ++r)
        acc[r][0] = load(C + (i + r) * ldc + j), acc[r][1] = two ? load(C + (i + r) * ldc + j + V) : vf{};
      for (int k = 0; k < K; ++k) {
        vf b0 = load(B + k * ldb + j), b1 = two ? load(B + k * ldb + j + V) : vf{};
        for (int r = 0; r < 4; ++r) {
          vf a = splat(TA ? A[k * lda + i + r] : A[(i + r) * lda + k]);
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int r = 0; r < 4; ++r) {
        store(C + (i + r) * ldc + j, acc[r][0]);
        if (two) store(C + (i + r) * ldc + j + V, acc[r][1]);
      }
    }
  }
}

// Run body(task, buf) for task = 0 .. tasks - 1 on every core, each thread with its own
// scratch buffer of `floats` floats.
template <typename F>
void parallel_for(int tasks, size_t floats, F body) {
  std::atomic<int> next{0};
  auto work = [&] {
    std::vector<float> buf(floats);
    for (int t = next++; t < tasks; t = next++) body(t, buf.data());
  };
  const int threads = std::max(1, std::min<int>(tasks, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct Dims {
  int B, Hq, Hkv, Lq, Lk, D, W;
  float scale;  // times log2(e): exp2 of a score is then the softmax numerator
};

// One query block (rows i0 .. i0 + n - 1 of head (b, h)) against its band.
template <typename T>
void query_block(const T* q, const T* k, const T* v, T* out, float* lse, const Dims& d, int b, int h, int i0,
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
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < d.D; ++c) orow[size_t(r) * d.D + c] = T(O[r * DP + c] / l[r]);
    lse[(size_t(b) * d.Hq + h) * d.Lq + i0 + r] = m[r] + std::log2(l[r]);  // in the scores' log2 units
  }
}

template <typename T>
void sliding_cpu(const T* q, const T* k, const T* v, T* out, float* lse, Dims d) {
  const int blocks = (d.Lq + QB - 1) / QB, DP = round_up(d.D, V);
  const size_t floats = size_t(QB) * DP * 2 + size_t(DP) * KT * 2 + size_t(QB) * KT;  // Q, O, Kt, Vt, S
  parallel_for(d.B * d.Hq * blocks, floats, [&](int t, float* buf) {
    const int blk = t % blocks, h = (t / blocks) % d.Hq, b = t / (blocks * d.Hq);
    query_block(q, k, v, out, lse, d, b, h, blk * QB, buf);
  });
}

// The backward of one key tile (keys k0 .. k0 + nk - 1 of kv head (b, g)) against every query
// row of every query head that sees one of them. dq32 is float32 (B, Hq, Lq, D), added to.
template <typename T>
void key_tile_backward(const T* q, const T* k, const T* v, const float* lse, const float* delta, const T* dout,
                       float* dq32, T* dk, T* dv, const Dims& d, int b, int g, int k0, float* buf) {
  const int DP = round_up(d.D, V), p0 = d.Lk - d.Lq, rep = d.Hq / d.Hkv, nk = std::min(KT, d.Lk - k0);
  const float scale = d.scale / float(M_LOG2E);  // the softmax's scale (d.scale has log2(e) folded in)
  float *Kr = buf, *Kt = Kr + KT * DP, *Vt = Kt + DP * KT, *dK = Vt + DP * KT, *dV = dK + KT * DP;
  float *Q = dV + KT * DP, *dO = Q + QB * DP, *P = dO + QB * DP, *dS = P + QB * KT, *dQ = dS + QB * KT;
  const size_t kv = (size_t(b) * d.Hkv + g) * d.Lk * d.D;
  for (int j = 0; j < KT; ++j) {  // K as rows and transposed, V transposed; zero padding
    for (int c = 0; c < DP; ++c) {
      const bool in = j < nk && c < d.D;
      const float kx = in ? float(k[kv + size_t(k0 + j) * d.D + c]) : 0.0f;
      Kr[j * DP + c] = Kt[c * KT + j] = kx;
      Vt[c * KT + j] = in ? float(v[kv + size_t(k0 + j) * d.D + c]) : 0.0f;
    }
  }
  std::fill(dK, dK + 2 * KT * DP, 0.0f);  // dK and dV
  // Query positions that see a key of the tile: k0 .. k0 + nk - 1 + W - 1, and at least p0.
  const int first = std::max(p0, k0), end = std::min(d.Lk, k0 + nk - 1 + d.W);
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    const size_t head = size_t(b) * d.Hq + h;
    for (int p = first; p < end; p += QB) {
      const int n = std::min(QB, end - p), M = round_up(n, 4), i0 = p - p0;
      std::fill(Q, Q + 2 * QB * DP, 0.0f);  // Q and dO, padded rows and columns zero
      for (int r = 0; r < n; ++r) {
        for (int c = 0; c < d.D; ++c) {
          Q[r * DP + c] = float(q[(head * d.Lq + i0 + r) * d.D + c]);
          dO[r * DP + c] = float(dout[(head * d.Lq + i0 + r) * d.D + c]);
        }
      }
      // P = exp2(S * scale log2(e) - lse) inside the band, 0 outside; dP = dO V^T.
      std::fill(P, P + 2 * QB * KT, 0.0f);  // P and dS (dP is computed into dS)
      gemm<false>(P, KT, Q, DP, Kt, KT, M, d.D, KT);
      gemm<false>(dS, KT, dO, DP, Vt, KT, M, d.D, KT);
      for (int r = 0; r < M; ++r) {
        const int pos = p + r;
        const float l2 = r < n ? lse[head * d.Lq + i0 + r] : 0.0f, dl = r < n ? delta[head * d.Lq + i0 + r] : 0.0f;
        vi j = vi{0, 1, 2, 3, 4, 5, 6, 7} + k0;
        for (int c = 0; c < KT; c += V, j += V) {
          const vi in = (j > pos - d.W) & (j <= pos) & (j < k0 + nk) & (r < n ? -1 : 0);
          const vf pr = in ? exp2v(load(P + r * KT + c) * splat(d.scale) - splat(l2)) : vf{};
          store(P + r * KT + c, pr);
          store(dS + r * KT + c, pr * (load(dS + r * KT + c) - splat(dl)));
        }
      }
      gemm<true>(dV, DP, P, KT, dO, DP, KT, n, DP);  // dV += P^T dO
      gemm<true>(dK, DP, dS, KT, Q, DP, KT, n, DP);  // dK += dS^T Q (times scale below)
      std::fill(dQ, dQ + QB * DP, 0.0f);
      gemm<false>(dQ, DP, dS, KT, Kr, DP, M, nk, DP);  // dQ = dS K
      float* acc = dq32 + (head * d.Lq + i0) * d.D;
      for (int r = 0; r < n; ++r)
        for (int c = 0; c < d.D; ++c) acc[size_t(r) * d.D + c] += dQ[r * DP + c] * scale;
    }
  }
  for (int j = 0; j < nk; ++j) {
    for (int c = 0; c < d.D; ++c) {
      dk[kv + size_t(k0 + j) * d.D + c] = T(dK[j * DP + c] * scale);
      dv[kv + size_t(k0 + j) * d.D + c] = T(dV[j * DP + c]);
    }
  }
}

template <typename T>
void sliding_backward_cpu(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout, T* dq,
                          T* dk, T* dv, Dims d) {
  const size_t rows = size_t(d.B) * d.Hq * d.Lq;
  std::vector<float> delta(rows), dq32(rows * d.D, 0.0f);
  constexpr int R = 256;  // rows per task for the elementwise passes
  const int row_tasks = int((rows + R - 1) / R);
  parallel_for(row_tasks, 0, [&](int t, float*) {  // delta = rowsum(dO * O)
    for (size_t i = size_t(t) * R; i < std::min(rows, size_t(t + 1) * R); ++i) {
      float s = 0.0f;
      for (int c = 0; c < d.D; ++c) s += float(dout[i * d.D + c]) * float(out[i * d.D + c]);
      delta[i] = s;
    }
  });
  const int DP = round_up(d.D, V), C = round_up(std::max(d.W - 1, 1), KT);  // keys per chunk: >= W - 1
  const int chunks = (d.Lk + C - 1) / C, half = (chunks + 1) / 2, heads = d.B * d.Hkv;
  const size_t floats = size_t(KT) * DP * 5 + size_t(QB) * DP * 3 + size_t(QB) * KT * 2;
  for (int parity = 0; parity < 2; ++parity) {  // chunks 0, 2, 4, ... then 1, 3, 5, ...: no two write one dQ row
    const int count = parity ? chunks / 2 : half;
    parallel_for(heads * count, floats, [&](int t, float* buf) {
      const int c = 2 * (t % count) + parity, bg = t / count;
      for (int k0 = c * C; k0 < std::min(d.Lk, (c + 1) * C); k0 += KT)
        key_tile_backward(q, k, v, lse, delta.data(), dout, dq32.data(), dk, dv, d, bg / d.Hkv, bg % d.Hkv, k0, buf);
    });
  }
  parallel_for(row_tasks, 0, [&](int t, float*) {
    for (size_t i = size_t(t) * R * d.D; i < std::min(rows, size_t(t + 1) * R) * d.D; ++i) dq[i] = T(dq32[i]);
  });
}

template <typename F>
void dispatch_dtype(const mx::array& x, F f) {
  switch (x.dtype()) {
    case mx::float32: return f(float{});
    case mx::float16: return f(mx::float16_t{});
    case mx::bfloat16: return f(mx::bfloat16_t{});
    default: return;  // unreachable: sliding_window() checked the dtype
  }
}

class SlidingWindowVJP : public mx::Primitive {
 public:
  SlidingWindowVJP(mx::Stream s, int window, float scale) : mx::Primitive(s), window_(window), scale_(scale) {}

  // inputs: q, k, v, out, lse, d_out; outputs: dq, dk, dv.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& x : inputs) encoder.set_input_array(x);
    for (auto& x : outputs) x.set_data(mx::allocator::malloc(x.nbytes())), encoder.set_output_array(x);
    const auto &q = inputs[0], &k = inputs[1];
    Dims d{int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(k.shape(2)), int(q.shape(3)),
           window_, scale_};
    std::vector<mx::array> in, out;
    for (auto& x : inputs) in.push_back(mx::array::unsafe_weak_copy(x));
    for (auto& x : outputs) out.push_back(mx::array::unsafe_weak_copy(x));
    encoder.dispatch([in = std::move(in), out = std::move(out), d]() mutable {
      dispatch_dtype(in[0], [&](auto zero) {
        using T = decltype(zero);
        sliding_backward_cpu(in[0].data<T>(), in[1].data<T>(), in[2].data<T>(), in[3].data<T>(), in[4].data<float>(),
                             in[5].data<T>(), out[0].data<T>(), out[1].data<T>(), out[2].data<T>(), d);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("longctx's compiled sliding-window kernel runs on the CPU only");
  }

  const char* name() const override { return "LongctxSlidingWindowVJP"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const SlidingWindowVJP&>(other);
    return window_ == o.window_ && scale_ == o.scale_;
  }

 private:
  int window_;
  float scale_;
};

class SlidingWindow : public mx::Primitive {
 public:
  SlidingWindow(mx::Stream s, int window, float scale) : mx::Primitive(s), window_(window), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    auto &out = outputs[0], &lse = outputs[1];  // lse: float32 (B, Hq, Lq), for the backward
    out.set_data(mx::allocator::malloc(out.nbytes()));
    lse.set_data(mx::allocator::malloc(lse.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(q), encoder.set_input_array(k), encoder.set_input_array(v);
    encoder.set_output_array(out), encoder.set_output_array(lse);
    Dims d{int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(k.shape(2)), int(q.shape(3)),
           window_, scale_};
    encoder.dispatch([q = mx::array::unsafe_weak_copy(q), k = mx::array::unsafe_weak_copy(k),
                      v = mx::array::unsafe_weak_copy(v), out = mx::array::unsafe_weak_copy(out),
                      lse = mx::array::unsafe_weak_copy(lse), d]() mutable {
      dispatch_dtype(q, [&](auto zero) {
        using T = decltype(zero);
        sliding_cpu(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<float>(), d);
      });
    });
  }

  // The gradient of the output (the log-sum-exp output is internal: its cotangent is ignored).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    auto s = stream();
    const auto dtype = primals[0].dtype();
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape(), primals[2].shape()}, {dtype, dtype, dtype},
        std::make_shared<SlidingWindowVJP>(s, window_, scale_),
        {primals[0], primals[1], primals[2], outputs[0], outputs[1],
         mx::contiguous(mx::astype(cotangents[0], dtype, s), false, s)});
    std::vector<mx::array> result;
    for (int i : argnums) result.push_back(grads[i]);
    return result;
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
  mx::Shape rows{q.shape(0), q.shape(1), q.shape(2)};
  return mx::array::make_arrays({q.shape(), rows}, {q.dtype(), mx::float32},
                                std::make_shared<SlidingWindow>(s, window, scale * float(M_LOG2E)), inputs)[0];
}

}  // namespace

NB_MODULE(_sliding, m) {
  m.def("sliding_window", &sliding_window, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("window"),
        nb::arg("scale"), "Sliding-window attention on the CPU (see solutions/week3/sliding.py); differentiable.");
}
