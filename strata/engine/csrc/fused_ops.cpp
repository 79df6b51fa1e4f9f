// Small fused element-wise ops that save the engine many tiny torch calls per layer:
// rotary embedding + KV-cache write, residual add + RMSNorm, and SiLU-and-multiply.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <type_traits>

#include "vec.h"

template <typename T, typename C>
static void rope_cache_kernel(T* base, const int64_t* pp, const int64_t* sp, const float* cs, C* kc, C* vc,
                              int64_t T_, int64_t D, int64_t num_heads, int64_t num_kv_heads) {
  const int64_t half = D / 2, width = (num_heads + 2 * num_kv_heads) * D;
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      T* row = base + t * width;
      const float* c = cs + pp[t] * D;
      const float* s = c + half;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        T* x = row + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          x[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          x[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
      const int64_t slot = sp[t];
      if (slot >= 0) {
        const T* k = row + num_heads * D;
        const T* v = k + num_kv_heads * D;
        C* kd = kc + slot * num_kv_heads * D;
        C* vd = vc + slot * num_kv_heads * D;
        for (int64_t i = 0; i < num_kv_heads * D; ++i) {
          kd[i] = static_cast<C>(k[i]);
          vd[i] = static_cast<C>(v[i]);
        }
      }
    }
  });
}

// qkv: [T, (H + 2*KVH) * D], rotated in place (q and k parts, HF rotate-half layout);
// cos_sin: [max_pos, D] float (cos in [:D/2], sin in [D/2:]); positions, slots: [T] int64.
// Writes rotated k and v into k_cache/v_cache [slots, KVH, D] at slots (skipped if slot < 0).
void rope_and_cache_(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                     at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                     int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors required");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, "cos_sin must be float32");
  const int64_t T = qkv.size(0), D = k_cache.size(2);
  const int64_t width = (num_heads + 2 * num_kv_heads) * D;
  TORCH_CHECK(qkv.size(1) == width, "qkv width does not match the head counts");
  auto pos = positions.contiguous();
  auto sl = slots.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const float* cs = cos_sin.data_ptr<float>();
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() ||
                  (k_cache.scalar_type() == at::kHalf && qkv.scalar_type() == at::kFloat),
              "the cache must have qkv's dtype, or be float16 under float32 activations");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache_", [&] {
    if (k_cache.scalar_type() == qkv.scalar_type()) {
      rope_cache_kernel<scalar_t, scalar_t>(qkv.data_ptr<scalar_t>(), pp, sp, cs, k_cache.data_ptr<scalar_t>(),
                                            v_cache.data_ptr<scalar_t>(), T, D, num_heads, num_kv_heads);
    } else {
      rope_cache_kernel<scalar_t, at::Half>(qkv.data_ptr<scalar_t>(), pp, sp, cs, k_cache.data_ptr<at::Half>(),
                                            v_cache.data_ptr<at::Half>(), T, D, num_heads, num_kv_heads);
    }
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
        int64_t i = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          const __m512 one = _mm512_set1_ps(1.f);
          for (; i + 16 <= I; i += 16) {
            const __m512 a = _mm512_loadu_ps(gr + i);
            const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, strata_vec::exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            _mm512_storeu_ps(orow + i, _mm512_mul_ps(_mm512_mul_ps(a, sig), _mm512_loadu_ps(ur + i)));
          }
        }
#endif
        for (; i < I; ++i) {
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
