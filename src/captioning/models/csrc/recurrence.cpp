// The hand-written LSTM and attention-LSTM sequence forwards and their BPTT, step for step the math of
// captioning/models/bptt.py (which documents it), with the per-step loop in C++: at the built-in set's sizes
// a step's work is a few microseconds per op, which the Python interpreter's per-op cost otherwise doubles.
// Built at install (python -m captioning.models.kernels); bptt.py falls back to its Python loops without it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
// the pybind11 glue alone: torch/extension.h (the whole C++ frontend too) made the build 30 s instead of 19
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

namespace {

// The products, as captioning/models/gemm.py takes them: oneDNN's linear (the op torch's compiler uses on CPU)
// where the caller says it is faster (float32 / bfloat16 with oneDNN available), else ATen's BLAS.
struct Gemm {
  bool onednn;
  // below this many multiply-adds a boxed oneDNN call costs more than it saves (measured at N=32, H=128)
  static constexpr int64_t kOnednnMinMacs = int64_t(1) << 22;
  bool use_onednn(const Tensor& a, const Tensor& b) const {
    return onednn && a.size(0) * a.size(1) * b.size(1) >= kOnednnMinMacs;
  }

  // a @ b for a (M, K), b (K, N), either possibly a transposed view
  Tensor mm(const Tensor& a, const Tensor& b) const {
    if (!use_onednn(a, b)) return at::mm(a, b);
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{a, b.t(), c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
  // out = a @ b, out (M, N) contiguous (a slice of a buffer)
  void mm_out(Tensor out, const Tensor& a, const Tensor& b) const {
    if (use_onednn(a, b)) {
      out.copy_(mm(a, b));
    } else {
      at::mm_out(out, a, b);
    }
  }
  // c + a @ b as a new tensor, c (M, N) contiguous
  Tensor addmm(const Tensor& c, const Tensor& a, const Tensor& b) const {
    if (!use_onednn(a, b) || !c.is_contiguous()) return at::addmm(c, a, b);
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
    torch::jit::Stack stack{a, c, b.t(), c10::IValue(), std::string("add")};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
  // out = c + a @ b (c undefined: a @ b) with b's columns shared out between the threads, each block one product on
  // its own thread (see Steps); out (M, N) rows of unit stride. ATen's BLAS only: oneDNN's products started inside
  // the threads' region ran ~200x slower (its own threads on top of ours), so Steps does not split where it is used.
  void addmm_split(Tensor out, const Tensor& c, const Tensor& a, const Tensor& b) const {
    const int64_t cols = b.size(1), blocks = (cols + kColumnBlock - 1) / kColumnBlock;
    const at::ThreadLocalState caller;  // grad mode (off in a Function's forward), autocast: thread-local state
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard as_caller(caller);
      const int64_t j0 = begin * kColumnBlock, width = std::min(cols, end * kColumnBlock) - j0;
      auto block = out.narrow(1, j0, width);
      if (c.defined()) {
        at::addmm_out(block, c.narrow(1, j0, width), a, b.narrow(1, j0, width));
      } else {
        at::mm_out(block, a, b.narrow(1, j0, width));
      }
    });
  }
  static constexpr int64_t kColumnBlock = 64;
  // x @ W + bias, W (K, N), bias (N,)
  Tensor linear(const Tensor& x, const Tensor& W, const Tensor& bias) const {
    if (!use_onednn(x, W)) return at::addmm(bias, x, W);
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, W.t(), bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                            c10::IValue()};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
};

// How a step's work is shared between the threads. A step's product has only N (64) rows: one library call split
// over two threads ran at ~70% of the matmul peak on the 2-core AVX2 machine, while each thread's own product over
// half the columns, on one thread, ran at ~86% (254 -> 215 us at N=64, H=256); and the cell's element work, which
// one thread did while the other waited, is split by rows. Below kMinMacs per step the threads' start costs more.
// at::parallel_for is OpenMP header code: it runs on the calling thread alone unless this file is compiled with
// -fopenmp (kernels.py), and with one thread (torch.set_num_threads(1)) everything runs as one call.
struct Steps {
  // split: each step's product shared out by columns (ATen's BLAS only); rows: the element work by rows, also where
  // the products are oneDNN's own threaded calls (on the AVX-512 machine the second thread otherwise spun in
  // OpenMP's barrier while the first did a step's cell and attention alone)
  bool split, rows_split;
  // the LSTM at N=32, H=128 (2M multiply-adds a step) lost 5% split; the attention LSTM there (4M) gained 13%
  static constexpr int64_t kMinMacs = int64_t(1) << 22;
  Steps(int64_t macs, const Gemm& gemm)
      : split(false),
        rows_split(at::get_num_threads() > 1 && !at::in_parallel_region() && macs >= kMinMacs) {
    split = rows_split && !gemm.onednn;
  }
  Steps() : split(false), rows_split(false) {}
  // a step's c + a @ b (c undefined: a @ b). Split: into out (allocated if undefined), one column block per thread;
  // else the library's one call, as a new tensor (out unused)
  Tensor product(const Gemm& gemm, Tensor out, const Tensor& c, const Tensor& a, const Tensor& b) const {
    if (!split) return c.defined() ? gemm.addmm(c, a, b) : gemm.mm(a, b);
    if (!out.defined()) out = at::empty({a.size(0), b.size(1)}, a.options());
    gemm.addmm_split(out, c, a, b);
    return out;
  }
  // f(begin, end) over the rows [0, N), in one block per thread where split
  template <class F>
  void rows(int64_t N, const F& f) const {
    if (rows_split) {
      at::parallel_for(0, N, 8, f);
    } else {
      f(0, N);
    }
  }
};

constexpr int64_t kSigmoidTanhMinElements = 8192;  // bptt._SIGMOID_TANH_MIN_ELEMENTS

// tanh(t) into out, as 2 sigmoid(2t) - 1 on large CPU tensors (bptt._tanh)
void tanh_into(const Tensor& t, Tensor& out) {
  if (t.numel() >= kSigmoidTanhMinElements) {
    at::mul_out(out, t, 2.0).sigmoid_().mul_(2.0).sub_(1.0);
  } else {
    at::tanh_out(out, t);
  }
}

// exp(x) for float32 in a form the compiler vectorises: 2^k 2^r with k = round(x log2 e), |r| <= 1/2, 2^r by its
// degree-7 Taylor polynomial (relative error < 1e-8 before rounding, below float32's 6e-8).
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 leaves no fraction bits
  const float r = (t - k) * 0.693147180559945309f;  // 2^(t-k) = e^r
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(k) << 23;
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
inline float tanh_f32(float x) { return 2.0f * sigmoid_f32(2.0f * x) - 1.0f; }

// The element loops run on float32 and on bfloat16 storage (what autocast gives on a CPU with bfloat16), always
// computing in float32: one pass per step instead of a dozen bfloat16 ATen ops, each rounding its result.
bool fusable_type(at::ScalarType type) { return type == at::kFloat || type == at::kBFloat16; }
// `t` in `like`'s dtype (float32 or bfloat16), contiguous
bool fusable(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() && fusable_type(t.scalar_type()) && t.is_contiguous();
}
// rows of unit stride, the rows possibly further apart than their length (a narrowed buffer)
bool fusable_rows(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() && fusable_type(t.scalar_type()) && t.dim() == 2 && t.stride(1) == 1;
}
// f(S{}) with S the C++ type of a fusable dtype
template <class F>
void with_storage(at::ScalarType type, const F& f) {
  if (type == at::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}
template <class S>
inline float ld(S v) { return static_cast<float>(v); }
template <class S>
inline S st(float v) { return static_cast<S>(v); }

// One row of the cell; restrict parameters (GCC honours restrict on parameters) let the loop vectorise.
template <class S>
void cell_row(int64_t H, S* __restrict__ ai, S* __restrict__ af, S* __restrict__ ao, S* __restrict__ ag,
              const S* __restrict__ cp, S* __restrict__ cn, S* __restrict__ tc, S* __restrict__ hn) {
  for (int64_t j = 0; j < H; ++j) {
    const float i = sigmoid_f32(ld(ai[j])), f = sigmoid_f32(ld(af[j])), o = sigmoid_f32(ld(ao[j]));
    const float g = tanh_f32(ld(ag[j]));
    ai[j] = st<S>(i);
    af[j] = st<S>(f);
    ao[j] = st<S>(o);
    ag[j] = st<S>(g);
    const float cv = f * ld(cp[j]) + i * g;
    const float tv = tanh_f32(cv);
    cn[j] = st<S>(cv);
    tc[j] = st<S>(tv);
    hn[j] = st<S>(o * tv);
  }
}

template <class S>
void backward_row(int64_t H, const S* __restrict__ gi, const S* __restrict__ gf, const S* __restrict__ go,
                  const S* __restrict__ gg, const S* __restrict__ cp, const S* __restrict__ tc,
                  const S* __restrict__ dh, S* __restrict__ dc, S* __restrict__ dai, S* __restrict__ daf,
                  S* __restrict__ dao, S* __restrict__ dag) {
  for (int64_t j = 0; j < H; ++j) {
    const float i = ld(gi[j]), f = ld(gf[j]), o = ld(go[j]), g = ld(gg[j]), t = ld(tc[j]), d = ld(dh[j]);
    const float dcv = ld(dc[j]) + d * o * (1.0f - t * t);
    dai[j] = st<S>(dcv * g * (i - i * i));
    daf[j] = st<S>(dcv * ld(cp[j]) * (f - f * f));
    dao[j] = st<S>(d * t * (o - o * o));
    dag[j] = st<S>(dcv * i * (1.0f - g * g));
    dc[j] = st<S>(dcv * f);
  }
}

// The cell of bptt._lstm_cell_forward in one pass over the elements (contiguous rows; h's rows may be further
// apart: the attention loop writes them straight into its [h, attn] buffer).
template <class S>
void cell_forward_rows(Tensor& a, const Tensor& c_prev, Tensor& c, Tensor& tanh_c, Tensor& h, int64_t r0,
                       int64_t r1) {
  const int64_t H = c.size(1), ld_h = h.stride(0);
  S* A = a.data_ptr<S>();
  const S* Cp = c_prev.data_ptr<S>();
  S *C = c.data_ptr<S>(), *Tc = tanh_c.data_ptr<S>(), *Hn = h.data_ptr<S>();
  for (int64_t n = r0; n < r1; ++n) {
    S* a_n = A + n * 4 * H;
    cell_row<S>(H, a_n, a_n + H, a_n + 2 * H, a_n + 3 * H, Cp + n * H, C + n * H, Tc + n * H, Hn + n * ld_h);
  }
}

// bptt._LSTMBackwardStep in one pass (contiguous rows)
template <class S>
void backward_step_rows(const Tensor& gates, const Tensor& c_prev, const Tensor& tanh_c, const Tensor& dh,
                        Tensor& dc, Tensor& da, int64_t r0, int64_t r1) {
  const int64_t H = dh.size(1);
  const S *G = gates.data_ptr<S>(), *Cp = c_prev.data_ptr<S>(), *Tc = tanh_c.data_ptr<S>();
  const S* Dh = dh.data_ptr<S>();
  S *Dc = dc.data_ptr<S>(), *Da = da.data_ptr<S>();
  for (int64_t n = r0; n < r1; ++n) {
    const S* g_n = G + n * 4 * H;
    S* da_n = Da + n * 4 * H;
    backward_row<S>(H, g_n, g_n + H, g_n + 2 * H, g_n + 3 * H, Cp + n * H, Tc + n * H, Dh + n * H, Dc + n * H,
                    da_n, da_n + H, da_n + 2 * H, da_n + 3 * H);
  }
}

// bptt._lstm_cell_forward (CPU branch): a (N, 4H) pre-activations -> gate activations in place; c, tanh_c, h
void cell_forward(Tensor& a, const Tensor& c_prev, Tensor c, Tensor tanh_c, Tensor h, const Steps& steps) {
  if (fusable(a, a) && fusable(c_prev, a) && fusable(c, a) && fusable(tanh_c, a) && fusable_rows(h, a)) {
    with_storage(a.scalar_type(), [&](auto tag) {
      using S = decltype(tag);
      steps.rows(c.size(0), [&](int64_t r0, int64_t r1) { cell_forward_rows<S>(a, c_prev, c, tanh_c, h, r0, r1); });
    });
    return;
  }
  const int64_t H = c.size(1);
  auto g = a.narrow(1, 3 * H, H);
  g.mul_(2.0);
  a.sigmoid_();
  g.mul_(2.0).sub_(1.0);
  at::mul_out(c, a.narrow(1, H, H), c_prev);
  c.addcmul_(a.narrow(1, 0, H), g);
  tanh_into(c, tanh_c);
  at::mul_out(h, a.narrow(1, 2 * H, H), tanh_c);
}

// y += a x over n contiguous elements, y in float32
template <class S>
inline void axpy(int64_t n, float a, const S* __restrict__ x, float* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * ld(x[i]);
}

// Per-thread float32 scratch for the attention's sums, `width` floats a thread
struct Scratch {
  std::vector<float> data;
  int64_t width;
  explicit Scratch(int64_t width) : data(static_cast<size_t>(width) * std::max(at::get_num_threads(), 1)),
                                    width(width) {}
  float* here() { return data.data() + width * std::min<int64_t>(at::get_thread_num(), at::get_num_threads() - 1); }
};

// The attention of one step (rnn.dot_product_attention): for every row, scores = h . A / sqrt(H) over the P
// positions, w = softmax(scores), attn = A w. A_flat (N, H, P) and A_T (N, P, H) are the same map in the two
// layouts, so that both sums run along contiguous memory: scores over A's rows, attn over A_T's.
// hx (N, 2H): reads h from [0, H), writes attn into [H, 2H); w (N, P). The sums run in float32 in acc (P + H
// floats); attn is A's average under the float32 weights, w holds them rounded to S.
template <class S>
void attend_rows(Tensor& hx, const Tensor& A_flat, const Tensor& A_T, double scale, Tensor& w, float* acc,
                 int64_t r0, int64_t r1) {
  const int64_t H = A_flat.size(1), P = A_flat.size(2), ld_x = hx.stride(0);
  const S* A = A_flat.data_ptr<S>();
  const S* At = A_T.data_ptr<S>();
  S *X = hx.data_ptr<S>(), *W = w.data_ptr<S>();
  const float s = static_cast<float>(scale);
  float *scores = acc, *attn = acc + P;
  for (int64_t n = r0; n < r1; ++n) {
    const S* h = X + n * ld_x;
    const S* A_n = A + n * H * P;
    const S* At_n = At + n * P * H;
    std::fill(scores, scores + P, 0.0f);
    for (int64_t k = 0; k < H; ++k) axpy(P, ld(h[k]), A_n + k * P, scores);
    float top = -INFINITY;
    for (int64_t p = 0; p < P; ++p) top = std::max(top, scores[p] * s);
    float total = 0.0f;
    for (int64_t p = 0; p < P; ++p) total += (scores[p] = std::exp(scores[p] * s - top));
    S* wn = W + n * P;
    for (int64_t p = 0; p < P; ++p) wn[p] = st<S>(scores[p] /= total);
    std::fill(attn, attn + H, 0.0f);
    for (int64_t p = 0; p < P; ++p) axpy(H, scores[p], At_n + p * H, attn);
    S* attn_n = X + n * ld_x + H;
    for (int64_t k = 0; k < H; ++k) attn_n[k] = st<S>(attn[k]);
  }
}

// The attention's backward for one step: dhx (N, 2H) holds the gradient of [h_{t-1}, attn_t]; dscores (N, P) gets
// the softmax's input gradient (before the 1/sqrt(H)); dh (N, H) = dh_out (the step's own output gradient, or none
// at t = 0) + dhx's h half + scale * A dscores. Rows [r0, r1); acc holds P + H floats.
template <class S>
void attend_backward_rows(const Tensor& dhx, const Tensor& A_flat, const Tensor& A_T, const Tensor& w, double scale,
                          const Tensor* dh_out, Tensor& dscores, Tensor& dh, float* acc, int64_t r0, int64_t r1) {
  const int64_t H = A_flat.size(1), P = A_flat.size(2);
  const S *A = A_flat.data_ptr<S>(), *At = A_T.data_ptr<S>(), *D = dhx.data_ptr<S>();
  const S* Wt = w.data_ptr<S>();
  const S* Do = dh_out ? dh_out->data_ptr<S>() : nullptr;
  S *Ds = dscores.data_ptr<S>(), *Dh = dh.data_ptr<S>();
  const float s = static_cast<float>(scale);
  float *dw = acc, *tmp = acc + P;
  for (int64_t n = r0; n < r1; ++n) {
    const S* dattn = D + n * 2 * H + H;
    const S* dh_rec = D + n * 2 * H;
    const S* wn = Wt + n * P;
    const S* A_n = A + n * H * P;
    const S* At_n = At + n * P * H;
    std::fill(dw, dw + P, 0.0f);
    for (int64_t k = 0; k < H; ++k) axpy(P, ld(dattn[k]), A_n + k * P, dw);
    float dot = 0.0f;
    for (int64_t p = 0; p < P; ++p) dot += dw[p] * ld(wn[p]);
    S* ds_n = Ds + n * P;
    for (int64_t p = 0; p < P; ++p) ds_n[p] = st<S>(dw[p] = (dw[p] - dot) * ld(wn[p]));
    std::fill(tmp, tmp + H, 0.0f);
    for (int64_t p = 0; p < P; ++p) axpy(H, dw[p], At_n + p * H, tmp);
    S* dh_n = Dh + n * H;
    const S* do_n = Do ? Do + n * H : nullptr;
    for (int64_t k = 0; k < H; ++k) dh_n[k] = st<S>((do_n ? ld(do_n[k]) + ld(dh_rec[k]) : ld(dh_rec[k])) + s * tmp[k]);
  }
}

// bptt._LSTMBackwardStep: writes da (N, 4H) from the step's activations; dc becomes the gradient reaching c_{t-1}
struct BackwardStep {
  Tensor dsig, tmp, ones;
  int64_t H;
  explicit BackwardStep(const Tensor& like) {
    H = like.size(1) / 4;
    dsig = at::empty({like.size(0), 3 * H}, like.options());
    tmp = at::empty({like.size(0), H}, like.options());
    ones = at::ones({like.size(0), H}, like.options());
  }
  void operator()(const Tensor& gates, const Tensor& c_prev, const Tensor& tanh_c, const Tensor& dh, Tensor& dc,
                  Tensor da, const Steps& steps) {
    if (fusable(gates, gates) && fusable(c_prev, gates) && fusable(tanh_c, gates) && fusable(dh, gates) &&
        fusable(dc, gates) && fusable(da, gates)) {
      with_storage(gates.scalar_type(), [&](auto tag) {
        using S = decltype(tag);
        steps.rows(dh.size(0), [&](int64_t r0, int64_t r1) {
          backward_step_rows<S>(gates, c_prev, tanh_c, dh, dc, da, r0, r1);
        });
      });
      return;
    }
    auto i = gates.narrow(1, 0, H), f = gates.narrow(1, H, H), o = gates.narrow(1, 2 * H, H);
    auto g = gates.narrow(1, 3 * H, H);
    at::addcmul_out(tmp, ones, tanh_c, tanh_c, -1.0).mul_(o);
    dc.addcmul_(tmp, dh);
    auto sig = gates.narrow(1, 0, 3 * H);
    at::addcmul_out(dsig, sig, sig, sig, -1.0);
    auto da_i = da.narrow(1, 0, H), da_f = da.narrow(1, H, H), da_o = da.narrow(1, 2 * H, H);
    auto da_g = da.narrow(1, 3 * H, H);
    at::mul_out(da_i, dsig.narrow(1, 0, H), g).mul_(dc);
    at::mul_out(da_f, dsig.narrow(1, H, H), c_prev).mul_(dc);
    at::mul_out(da_o, dsig.narrow(1, 2 * H, H), tanh_c).mul_(dh);
    at::addcmul_out(tmp, ones, g, g, -1.0).mul_(i);
    at::mul_out(da_g, tmp, dc);
    dc.mul_(f);
  }
};

}  // namespace

// x_tm (T*N, D) time-major, h0 (N, H) -> hs (T+1, N, H), cs (T+1, N, H), tanh_cs (T, N, H), then the T steps'
// gate activations (N, 4H) (one tensor each, as the products return them: no copy into a buffer)
std::vector<Tensor> lstm_forward(const Tensor& x_tm, const Tensor& h0, const Tensor& Wx, const Tensor& Wh,
                                 const Tensor& b, bool onednn) {
  const Gemm gemm{onednn};
  const int64_t N = h0.size(0), H = h0.size(1), T = x_tm.size(0) / N;
  auto xw = gemm.linear(x_tm, Wx, b).view({T, N, 4 * H});  // every step's x_t Wx + b
  auto hs = at::empty({T + 1, N, H}, h0.options());
  auto cs = at::empty({T + 1, N, H}, h0.options());
  auto tanh_cs = at::empty({T, N, H}, h0.options());
  hs[0].copy_(h0);
  cs[0].zero_();
  const Steps steps(N * H * 4 * H, gemm);
  auto gates = steps.split ? at::empty({T, N, 4 * H}, h0.options()) : Tensor();
  std::vector<Tensor> out{hs, cs, tanh_cs};
  for (int64_t t = 0; t < T; ++t) {
    auto a = steps.product(gemm, steps.split ? gates[t] : Tensor(), xw[t], hs[t], Wh);
    cell_forward(a, cs[t], cs[t + 1], tanh_cs[t], hs[t + 1], steps);
    out.push_back(a);
  }
  return out;
}

// dh_tm (T, N, H) contiguous -> dx_tm (T*N, D), dh0, dWx, dWh, db (undefined where not needed)
std::vector<Tensor> lstm_backward(const Tensor& dh_tm, const Tensor& x_tm, const Tensor& Wx, const Tensor& Wh,
                                  const Tensor& hs, const Tensor& cs, const Tensor& tanh_cs,
                                  const std::vector<Tensor>& gates, std::vector<bool> needs, bool onednn) {
  const Gemm gemm{onednn};
  const int64_t T = static_cast<int64_t>(gates.size()), N = gates[0].size(0), H = hs.size(2);
  auto WhT = Wh.t();
  BackwardStep step(gates[0]);
  const Steps steps(N * H * 4 * H, gemm);
  auto da = at::empty({T, N, 4 * H}, gates[0].options());
  auto dh = dh_tm[T - 1].clone();
  auto dc = at::zeros_like(dh);
  for (int64_t t = T - 1; t >= 0; --t) {
    step(gates[t], cs[t], tanh_cs[t], dh, dc, da[t], steps);
    if (t) dh = steps.product(gemm, dh, dh_tm[t - 1], da[t], WhT);  // da[t] holds all of dh's use: reused if split
  }
  auto da_flat = da.view({T * N, 4 * H});
  Tensor dx, dh0, dWx, dWh, db;
  if (needs[0]) dx = gemm.mm(da_flat, Wx.t());
  if (needs[1]) dh0 = steps.product(gemm, Tensor(), Tensor(), da[0], WhT);
  auto h_prev = hs.narrow(0, 0, T).reshape({T * N, H});
  if (needs[2] && needs[3]) {  // [dWx; dWh] = [x, h_prev]^T da: one product over all steps
    auto dW = gemm.mm(at::cat({x_tm, h_prev}, 1).t(), da_flat);
    dWx = dW.narrow(0, 0, x_tm.size(1));
    dWh = dW.narrow(0, x_tm.size(1), H);
  } else {
    if (needs[2]) dWx = gemm.mm(x_tm.t(), da_flat);
    if (needs[3]) dWh = gemm.mm(h_prev.t(), da_flat);
  }
  if (needs[4]) db = da_flat.sum(0);
  return {dx, dh0, dWx, dWh, db};
}

// x_tm (T*N, D), A_flat (N, H, P) -> hx (T+1, N, 2H), cs (T+1, N, H), tanh_cs (T, N, H), weights (T, N, P),
// then the T steps' gates (N, 4H); W_ha = [Wh; Wattn] (2H, 4H)
std::vector<Tensor> attention_lstm_forward(const Tensor& x_tm, const Tensor& A_flat, const Tensor& Wx,
                                           const Tensor& W_ha, const Tensor& b, bool onednn) {
  const Gemm gemm{onednn};
  const int64_t N = A_flat.size(0), H = A_flat.size(1), P = A_flat.size(2), T = x_tm.size(0) / N;
  const double scale = 1.0 / std::sqrt(static_cast<double>(H));
  auto xw = gemm.linear(x_tm, Wx, b).view({T, N, 4 * H});
  auto hx = at::zeros({T + 1, N, 2 * H}, A_flat.options());
  auto cs = at::empty({T + 1, N, H}, A_flat.options());
  auto weights = at::empty({T, N, P}, A_flat.options());
  auto tanh_cs = at::empty({T, N, H}, A_flat.options());
  auto h_next = at::empty({N, H}, A_flat.options());
  auto h0 = A_flat.mean(2);
  hx[0].narrow(1, 0, H).copy_(h0);
  cs[0].copy_(h0);
  const bool fused = fusable(A_flat, A_flat) && fusable(hx, A_flat);
  Scratch scratch(fused ? P + H : 0);
  auto A_T = fused ? A_flat.transpose(1, 2).contiguous() : A_flat.transpose(1, 2);
  const Steps steps(N * 2 * H * 4 * H, gemm);
  auto gates_buffer = steps.split ? at::empty({T, N, 4 * H}, A_flat.options()) : Tensor();
  std::vector<Tensor> gates;
  for (int64_t t = 0; t < T; ++t) {
    if (fused) {
      auto hx_t = hx[t], w = weights[t];
      with_storage(A_flat.scalar_type(), [&](auto tag) {
        using S = decltype(tag);
        steps.rows(N, [&](int64_t r0, int64_t r1) {
          attend_rows<S>(hx_t, A_flat, A_T, scale, w, scratch.here(), r0, r1);
        });
      });
      auto a = steps.product(gemm, steps.split ? gates_buffer[t] : Tensor(), xw[t], hx_t, W_ha);
      cell_forward(a, cs[t], cs[t + 1], tanh_cs[t], hx[t + 1].narrow(1, 0, H), steps);
      gates.push_back(a);
      continue;
    }
    auto h = hx[t].narrow(1, 0, H), attn = hx[t].narrow(1, H, H);
    auto scores = at::bmm(h.unsqueeze(1), A_flat).squeeze(1).mul_(scale);
    auto w = weights[t];
    at::_softmax_out(w, scores, 1, false);
    attn.copy_(at::bmm(w.unsqueeze(1), A_T).squeeze(1));
    auto a = gemm.addmm(xw[t], hx[t], W_ha);
    cell_forward(a, cs[t], cs[t + 1], tanh_cs[t], h_next, Steps());
    hx[t + 1].narrow(1, 0, H).copy_(h_next);
    gates.push_back(a);
  }
  std::vector<Tensor> out{hx, cs, tanh_cs, weights};
  out.insert(out.end(), gates.begin(), gates.end());
  return out;
}

// bptt._attention_lstm_bptt: hx (>= T, N, 2H) -> dx_tm, dA (N, H, P), dWx, dWh, dWattn, db
std::vector<Tensor> attention_lstm_backward(const Tensor& dh_tm, const Tensor& x_tm, const Tensor& A_flat,
                                            const Tensor& Wx, const Tensor& W_ha, const Tensor& hx_all,
                                            const Tensor& cs, const Tensor& tanh_cs, const Tensor& weights,
                                            const std::vector<Tensor>& gates, std::vector<bool> needs,
                                            bool onednn) {
  const Gemm gemm{onednn};
  const int64_t T = static_cast<int64_t>(gates.size()), N = gates[0].size(0), H = A_flat.size(1);
  const int64_t P = A_flat.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(H));
  auto hx = hx_all.narrow(0, 0, T);
  auto W_haT = W_ha.t();
  BackwardStep step(gates[0]);
  auto da = at::empty({T, N, 4 * H}, gates[0].options());
  auto dhx = at::empty({T, N, 2 * H}, gates[0].options());
  auto dscores = at::empty_like(weights);
  auto dh = dh_tm[T - 1].clone();
  auto dc = at::zeros_like(dh);
  const bool fused = fusable(A_flat, A_flat) && fusable(weights, A_flat) && fusable(dh_tm, A_flat) &&
                     fusable(dh, A_flat);
  auto A_T = fused ? A_flat.transpose(1, 2).contiguous() : A_flat.transpose(1, 2);
  const Steps steps(N * 2 * H * 4 * H, gemm);
  const Steps element_steps = fused ? steps : Steps();
  Scratch scratch(fused ? P + H : 0);
  for (int64_t t = T - 1; t >= 0; --t) {
    step(gates[t], cs[t], tanh_cs[t], dh, dc, da[t], element_steps);
    auto dhx_t = dhx[t];
    if (steps.split) {
      gemm.addmm_split(dhx_t, Tensor(), da[t], W_haT);
    } else {
      gemm.mm_out(dhx_t, da[t], W_haT);
    }
    if (fused) {
      auto dscores_t = dscores[t];
      Tensor dh_out;
      if (t) dh_out = dh_tm[t - 1];
      with_storage(A_flat.scalar_type(), [&](auto tag) {
        using S = decltype(tag);
        steps.rows(N, [&](int64_t r0, int64_t r1) {
          attend_backward_rows<S>(dhx_t, A_flat, A_T, weights[t], scale, t ? &dh_out : nullptr, dscores_t, dh,
                                  scratch.here(), r0, r1);
        });
      });
      continue;
    }
    auto w = weights[t];
    auto dw = at::bmm(dhx_t.narrow(1, H, H).unsqueeze(1), A_flat).squeeze(1);
    dw.sub_((dw * w).sum(1, true)).mul_(w);
    dscores[t].copy_(dw);
    auto dh_attn = at::bmm(dw.unsqueeze(1), A_T).squeeze(1);
    if (t) {
      at::add_out(dh, dh_tm[t - 1], dhx_t.narrow(1, 0, H));
    } else {
      dh.copy_(dhx_t.narrow(1, 0, H));
    }
    dh.add_(dh_attn, scale);
  }
  Tensor dx, dA, dWx, dWh, dWattn, db;
  auto da_flat = da.view({T * N, 4 * H});
  if (needs[1]) {
    dA = at::bmm(dhx.narrow(2, H, H).permute({1, 2, 0}), weights.transpose(0, 1));
    dA.baddbmm_(hx.narrow(2, 0, H).permute({1, 2, 0}), dscores.transpose(0, 1), 1.0, scale);
    dA.add_(((dh + dc) / static_cast<double>(P)).unsqueeze(2));
  }
  if (needs[0]) dx = gemm.mm(da_flat, Wx.t());
  const int64_t D = x_tm.size(1);
  if (needs[2] && (needs[3] || needs[4])) {  // [dWx; dWh; dWattn] = [x, h_prev, attn]^T da in one product
    auto dW = gemm.mm(at::cat({x_tm, hx.reshape({T * N, 2 * H})}, 1).t(), da_flat);
    dWx = dW.narrow(0, 0, D);
    dWh = dW.narrow(0, D, H);
    dWattn = dW.narrow(0, D + H, H);
  } else {
    if (needs[2]) dWx = gemm.mm(x_tm.t(), da_flat);
    if (needs[3] || needs[4]) {
      auto dW_ha = gemm.mm(hx.reshape({T * N, 2 * H}).t(), da_flat);
      dWh = dW_ha.narrow(0, 0, H);
      dWattn = dW_ha.narrow(0, H, H);
    }
  }
  if (needs[5]) db = da_flat.sum(0);
  return {dx, dA, dWx, dWh, dWattn, db};
}

// Whether a step of `macs` multiply-adds is shared between the threads here and now (for the tests): its products,
// its element work by rows
std::pair<bool, bool> splits(int64_t macs, bool onednn) {
  const Steps steps(macs, Gemm{onednn});
  return {steps.split, steps.rows_split};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("splits", &splits);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("attention_lstm_forward", &attention_lstm_forward);
  m.def("attention_lstm_backward", &attention_lstm_backward);
}
