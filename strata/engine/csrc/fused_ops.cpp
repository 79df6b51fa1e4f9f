// Small fused element-wise ops that save the engine many tiny torch calls per layer:
// rotary embedding + KV-cache write, residual add + RMSNorm, and SiLU-and-multiply.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>

// qkv: [T, (H + 2*KVH) * D], rotated in place (q and k parts, HF rotate-half layout);
// cos_sin: [max_pos, D] float (cos in [:D/2], sin in [D/2:]); positions, slots: [T] int64.
// Writes rotated k and v into k_cache/v_cache [slots, KVH, D] at slots (skipped if slot < 0).
void rope_and_cache_(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                     at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                     int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors required");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, "cos_sin must be float32");
  const int64_t T = qkv.size(0), D = k_cache.size(2), half = D / 2;
  const int64_t width = (num_heads + 2 * num_kv_heads) * D;
  TORCH_CHECK(qkv.size(1) == width, "qkv width does not match the head counts");
  auto pos = positions.contiguous();
  auto sl = slots.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const float* cs = cos_sin.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache_", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* row = base + t * width;
        const float* c = cs + pp[t] * D;
        const float* s = c + half;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          scalar_t* x = row + h * D;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
            x[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
            x[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
          }
        }
        const int64_t slot = sp[t];
        if (slot >= 0) {
          const scalar_t* k = row + num_heads * D;
          const scalar_t* v = k + num_kv_heads * D;
          std::copy(k, k + num_kv_heads * D, kc + slot * num_kv_heads * D);
          std::copy(v, v + num_kv_heads * D, vc + slot * num_kv_heads * D);
        }
      }
    });
  });
}

// x += residual (in place, x becomes the new residual stream); returns rms_norm(x) * weight.
at::Tensor add_rms_norm_(at::Tensor x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), "contiguous tensors required");
  const int64_t H = x.size(-1), T = x.numel() / H;
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* xr = xp + t * H;
        const scalar_t* rr = rp + t * H;
        float ss = 0.f;
        for (int64_t i = 0; i < H; ++i) {
          const float v = static_cast<float>(xr[i]) + static_cast<float>(rr[i]);
          xr[i] = static_cast<scalar_t>(v);
          const float vr = static_cast<float>(xr[i]);
          ss += vr * vr;
        }
        const float inv = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
        for (int64_t i = 0; i < H; ++i)
          op[t * H + i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv * static_cast<float>(wp[i]));
      }
    });
  });
  return out;
}

// gate_up: [T, 2*I] -> silu(gate) * up: [T, I]
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  auto gu = gate_up.contiguous();
  const int64_t I = gu.size(-1) / 2, T = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = at::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* g = gu.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gr = g + t * 2 * I;
        const scalar_t* ur = gr + I;
        scalar_t* orow = o + t * I;
        for (int64_t i = 0; i < I; ++i) {
          const float a = static_cast<float>(gr[i]);
          orow[i] = static_cast<scalar_t>(a / (1.f + std::exp(-a)) * static_cast<float>(ur[i]));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("rope_and_cache_(Tensor(a!) qkv, Tensor positions, Tensor cos_sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slots, int num_heads, int num_kv_heads) -> ()");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("rope_and_cache_", &rope_and_cache_);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_and_mul", &silu_and_mul);
}
