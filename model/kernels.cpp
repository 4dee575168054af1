// Fused CPU kernels for training forja's decoder in fp32: each is one pass over memory where
// eager PyTorch makes several (RMSNorm, SwiGLU and the rotary embedding are chains of
// elementwise kernels there; cross-entropy writes log-softmax, then zero-fills and scatters
// its gradient). Built once by model/kernels.py with torch.utils.cpp_extension and run on
// torch's own thread pool (at::parallel_for), so they share its threads instead of adding some.
//
// Every reduction has a fixed order for a given shape and thread count: results are
// deterministic, which exact resume relies on.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// rows per task so that each task touches at least ~16K floats
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

}  // namespace

// ---- RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), over rows of x (N, D) ----

std::vector<Tensor> rms_norm_fwd(const Tensor& x, const Tensor& w, double eps) {
  check(x, "x");
  check(w, "weight");
  const int64_t N = x.size(0), D = x.size(1);
  Tensor y = at::empty_like(x), rstd = at::empty({N}, x.options());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  float *py = y.data_ptr<float>(), *pr = rstd.data_ptr<float>();
  at::parallel_for(0, N, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = px + i * D;
      float* yi = py + i * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += xi[d] * xi[d];
      const float r = 1.0f / std::sqrt(ss / D + static_cast<float>(eps));
      pr[i] = r;
      for (int64_t d = 0; d < D; ++d) yi[d] = xi[d] * r * pw[d];
    }
  });
  return {y, rstd};
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w; dw = sum over rows of dy * xhat.
std::vector<Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd) {
  check(dy, "grad");
  check(x, "x");
  const int64_t N = x.size(0), D = x.size(1);
  // Rows are cut into a fixed number of blocks whatever the thread count; each block sums its
  // share of dw into its own row, and the rows are added in order afterwards.
  const int64_t blocks = std::min<int64_t>(N, 64), per = (N + blocks - 1) / blocks;
  Tensor dx = at::empty_like(x), partial = at::zeros({blocks, D}, x.options());
  const float *pdy = dy.data_ptr<float>(), *px = x.data_ptr<float>(), *pw = w.data_ptr<float>(),
              *pr = rstd.data_ptr<float>();
  float *pdx = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = pp + b * D;
      for (int64_t i = b * per; i < std::min(N, (b + 1) * per); ++i) {
        const float *dyi = pdy + i * D, *xi = px + i * D;
        float* dxi = pdx + i * D;
        const float r = pr[i];
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          dot += dyi[d] * pw[d] * xi[d];
          acc[d] += dyi[d] * xi[d] * r;
        }
        const float c = dot * r * r / D;
        for (int64_t d = 0; d < D; ++d) dxi[d] = r * (dyi[d] * pw[d] - xi[d] * c);
      }
    }
  });
  return {dx, partial.sum(0)};
}

// ---- SwiGLU: out = silu(gate) * up, from gate_up (N, 2H) = [gate | up] ----

Tensor swiglu_fwd(const Tensor& gu) {
  check(gu, "gate_up");
  const int64_t N = gu.size(0), H = gu.size(1) / 2;
  Tensor out = at::empty({N, H}, gu.options());
  const float* pg = gu.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, N, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *g = pg + i * 2 * H, *u = g + H;
      float* o = po + i * H;
      for (int64_t h = 0; h < H; ++h) o[h] = g[h] * sigmoid(g[h]) * u[h];
    }
  });
  return out;
}

Tensor swiglu_bwd(const Tensor& dout, const Tensor& gu) {
  check(dout, "grad");
  check(gu, "gate_up");
  const int64_t N = gu.size(0), H = gu.size(1) / 2;
  Tensor dgu = at::empty_like(gu);
  const float *pd = dout.data_ptr<float>(), *pg = gu.data_ptr<float>();
  float* pdg = dgu.data_ptr<float>();
  at::parallel_for(0, N, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *g = pg + i * 2 * H, *u = g + H, *d = pd + i * H;
      float *dg = pdg + i * 2 * H, *du = dg + H;
      for (int64_t h = 0; h < H; ++h) {
        const float s = sigmoid(g[h]);
        du[h] = d[h] * g[h] * s;
        dg[h] = d[h] * u[h] * s * (1.0f + g[h] * (1.0f - s));
      }
    }
  });
  return dgu;
}

// ---- Attention inputs: q, k, v out of the fused projection, q and k rotated ----
// qkv (B, T, Hq + 2 Hk, D) as the projection writes it -> q (B, Hq, T, D), k and v (B, Hk, T, D),
// contiguous, each (j, j + D/2) pair of q and k rotated by its position's angle (the Llama layout).
// The backward writes the gradient of qkv in its own layout in one pass: the transposes, the
// concatenations of split and the rotation's backward (the opposite angle) together.

namespace {

inline void rotate(const float* x, const float* c, const float* s, float sign, int64_t half, float* o) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = x[j], x2 = x[j + half];
    o[j] = x1 * c[j] - sign * x2 * s[j];
    o[j + half] = x2 * c[j] + sign * x1 * s[j];
  }
}

}  // namespace

std::vector<Tensor> qkv_rope_fwd(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t hq, int64_t hk) {
  check(qkv, "qkv");
  check(cos, "cos");
  check(sin, "sin");
  const int64_t B = qkv.size(0), T = qkv.size(1), H = qkv.size(2), D = qkv.size(3), half = D / 2;
  TORCH_CHECK(H == hq + 2 * hk, "qkv must hold n_head + 2 n_kv_head heads");
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(), "cos and sin must be (T, D)");
  Tensor q = at::empty({B, hq, T, D}, qkv.options()), k = at::empty({B, hk, T, D}, qkv.options()),
         v = at::empty({B, hk, T, D}, qkv.options());
  const float *px = qkv.data_ptr<float>(), *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  at::parallel_for(0, B * T, grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const float *c = pc + t * D, *s = ps + t * D;
      for (int64_t h = 0; h < H; ++h) {
        const float* x = px + (r * H + h) * D;
        if (h < hq) {
          rotate(x, c, s, 1.f, half, pq + ((b * hq + h) * T + t) * D);
        } else if (h < hq + hk) {
          rotate(x, c, s, 1.f, half, pk + ((b * hk + h - hq) * T + t) * D);
        } else {
          std::copy(x, x + D, pv + ((b * hk + h - hq - hk) * T + t) * D);
        }
      }
    }
  });
  return {q, k, v};
}

Tensor qkv_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& cos, const Tensor& sin) {
  for (const Tensor* t : {&dq, &dk, &dv})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "gradients must be float32 (B, H, T, D) with a contiguous last dimension");
  const int64_t B = dq.size(0), hq = dq.size(1), hk = dk.size(1), T = dq.size(2), D = dq.size(3), half = D / 2;
  const int64_t H = hq + 2 * hk;
  Tensor dqkv = at::empty({B, T, H, D}, dq.options());
  const float *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float* po = dqkv.data_ptr<float>();
  // the row (b, head, t) of a strided gradient
  auto row = [](const Tensor& g, int64_t b, int64_t head, int64_t t) {
    return g.const_data_ptr<float>() + b * g.stride(0) + head * g.stride(1) + t * g.stride(2);
  };
  at::parallel_for(0, B * T, grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const float *c = pc + t * D, *s = ps + t * D;
      for (int64_t h = 0; h < H; ++h) {
        float* o = po + (r * H + h) * D;
        if (h < hq) {
          rotate(row(dq, b, h, t), c, s, -1.f, half, o);
        } else if (h < hq + hk) {
          rotate(row(dk, b, h - hq, t), c, s, -1.f, half, o);
        } else {
          const float* x = row(dv, b, h - hq - hk, t);
          std::copy(x, x + D, o);
        }
      }
    }
  });
  return dqkv;
}

// ---- Cross-entropy over rows of logits (N, V), mean over targets != ignore_index ----
// The forward keeps only each row's log-sum-exp; the backward writes softmax - onehot in one pass.

std::vector<Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  check(logits, "logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(), "targets must be contiguous int64");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.numel() == N, "one target per row of logits");
  Tensor lse = at::empty({N}, logits.options()), losses = at::empty({N}, logits.options());
  const float* pl = logits.data_ptr<float>();
  const int64_t* pt = targets.data_ptr<int64_t>();
  float *plse = lse.data_ptr<float>(), *ploss = losses.data_ptr<float>();
  std::atomic<int64_t> bad{-1};  // a row whose target is out of range
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = pl + i * V;
      float m = x[0];
      for (int64_t v = 1; v < V; ++v) m = x[v] > m ? x[v] : m;
      float s = 0.f;
      for (int64_t v = 0; v < V; ++v) s += std::exp(x[v] - m);
      const float l = m + std::log(s);
      plse[i] = l;
      const int64_t t = pt[i];
      if (t == ignore_index) {
        ploss[i] = 0.f;
      } else if (t < 0 || t >= V) {
        bad.store(i);
        ploss[i] = 0.f;
      } else {
        ploss[i] = l - x[t];
      }
    }
  });
  TORCH_CHECK(bad.load() < 0, "target ", pt[bad.load()], " at row ", bad.load(), " is out of range for ", V, " classes");
  const int64_t count = targets.ne(ignore_index).sum().item<int64_t>();
  return {losses.sum().div_(static_cast<double>(count)), lse, at::scalar_tensor(count, at::kLong)};
}

Tensor cross_entropy_bwd(const Tensor& grad, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                         int64_t count, int64_t ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor dl = at::empty_like(logits);
  const float scale = grad.item<float>() / static_cast<float>(count);
  const float *pl = logits.data_ptr<float>(), *plse = lse.data_ptr<float>();
  const int64_t* pt = targets.data_ptr<int64_t>();
  float* pd = dl.data_ptr<float>();
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = pl + i * V;
      float* d = pd + i * V;
      const int64_t t = pt[i];
      if (t == ignore_index) {
        std::fill(d, d + V, 0.f);
        continue;
      }
      const float l = plse[i];
      for (int64_t v = 0; v < V; ++v) d[v] = std::exp(x[v] - l) * scale;
      d[t] -= scale;
    }
  });
  return dl;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("qkv_rope_fwd", &qkv_rope_fwd);
  m.def("qkv_rope_bwd", &qkv_rope_bwd);
  m.def("cross_entropy_fwd", &cross_entropy_fwd);
  m.def("cross_entropy_bwd", &cross_entropy_bwd);
}
