// Small fused element-wise ops that save the engine many tiny torch calls per layer:
// rotary embedding + KV-cache write, residual add + RMSNorm, and SiLU-and-multiply.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "vec.h"

// Below this many elements an element-wise op runs on one thread: splitting a few
// microseconds of work costs a fork and join, and far more when a neighbour holds a core.
static constexpr int64_t kSerialElems = 1 << 16;

template <typename T, typename C>
static void rope_cache_kernel(T* base, const int64_t* pp, const int64_t* sp, const float* cs, C* kc, C* vc,
                              int64_t T_, int64_t D, int64_t num_heads, int64_t num_kv_heads) {
  const int64_t half = D / 2, width = (num_heads + 2 * num_kv_heads) * D;
  at::parallel_for(0, T_, std::max<int64_t>(16, kSerialElems / ((num_heads + 2 * num_kv_heads) * D)), [&](int64_t b, int64_t e) {
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
    // A decode batch's rows are microseconds of work: split them over threads only when
    // there are enough that the fork and join cost less than the rows.
    at::parallel_for(0, T, std::max<int64_t>(1, kSerialElems / H), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        scalar_t* xr = xp + t * H;
        const scalar_t* rr = rp + t * H;
        scalar_t* orow = op + t * H;
        float ss = 0.f;
        int64_t i = 0;
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<scalar_t, double>) {  // double: the scalar loop (exact)
          __m512 vss = _mm512_setzero_ps();
          for (; i + 16 <= H; i += 16) {
            strata_vec::store16(xr + i, _mm512_add_ps(strata_vec::load16(xr + i), strata_vec::load16(rr + i)));
            const __m512 v = strata_vec::load16(xr + i);  // the stored (rounded) sum, as below
            vss = _mm512_fmadd_ps(v, v, vss);
          }
          ss = _mm512_reduce_add_ps(vss);
        }
#endif
        for (; i < H; ++i) {
          const float v = static_cast<float>(xr[i]) + static_cast<float>(rr[i]);
          xr[i] = static_cast<scalar_t>(v);
          const float vr = static_cast<float>(xr[i]);
          ss += vr * vr;
        }
        const float inv = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
        i = 0;
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<scalar_t, double>) {  // double: the scalar loop (exact)
          const __m512 vinv = _mm512_set1_ps(inv);
          for (; i + 16 <= H; i += 16)
            strata_vec::store16(orow + i, _mm512_mul_ps(_mm512_mul_ps(strata_vec::load16(xr + i), vinv),
                                                        strata_vec::load16(wp + i)));
        }
#endif
        for (; i < H; ++i)
          orow[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv * static_cast<float>(wp[i]));
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
    at::parallel_for(0, T, std::max<int64_t>(1, kSerialElems / (4 * I)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gr = g + t * 2 * I;
        const scalar_t* ur = gr + I;
        scalar_t* orow = o + t * I;
        int64_t i = 0;
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<scalar_t, double>) {  // double: the scalar loop (exact)
          const __m512 one = _mm512_set1_ps(1.f);
          for (; i + 16 <= I; i += 16) {
            const __m512 a = strata_vec::load16(gr + i);
            const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, strata_vec::exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            strata_vec::store16(orow + i, _mm512_mul_ps(_mm512_mul_ps(a, sig), strata_vec::load16(ur + i)));
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

// Row-wise argmax of float32 logits [R, V] -> int64 [R], torch.argmax's answer: the first
// index of the maximum, and where a row holds NaN, the first NaN. torch's CPU reduction reads
// the logits slowly for this shape, and every greedy decode step runs it; this one keeps
// 16 running maxima and their indices per row and runs rows in parallel.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_rows: float32 [R, V]");
  auto x = logits.contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  auto out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = xp + r * V;
      int64_t i = 0;
      float best = -INFINITY;
      int64_t best_i = -1;
      bool nan = false;
#if defined(__AVX512F__)
      if (V >= 16) {
        __m512 vmax = _mm512_loadu_ps(row);
        __m512i vidx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512i cur = _mm512_add_epi32(vidx, _mm512_set1_epi32(16));
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 unord = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
        for (i = 16; i + 16 <= V; i += 16) {
          const __m512 v = _mm512_loadu_ps(row + i);
          const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strictly: first wins
          vmax = _mm512_mask_mov_ps(vmax, gt, v);
          vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
          unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          cur = _mm512_add_epi32(cur, step);
        }
        nan = unord != 0;
        alignas(64) float m[16];
        alignas(64) int32_t id[16];
        _mm512_store_ps(m, vmax);
        _mm512_store_si512(id, vidx);
        for (int l = 0; l < 16; ++l)
          if (m[l] > best || (m[l] == best && id[l] < best_i) || best_i < 0) {
            best = m[l];
            best_i = id[l];
          }
      }
#endif
      for (; i < V; ++i) {
        const float v = row[i];
        if (std::isnan(v)) nan = true;
        if (best_i < 0 || v > best) {
          best = v;
          best_i = i;
        }
      }
      if (nan)  // rare: torch.argmax returns the first NaN
        for (int64_t j = 0; j < V; ++j)
          if (std::isnan(row[j])) {
            best_i = j;
            break;
          }
      op[r] = best_i;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("rope_and_cache_(Tensor(a!) qkv, Tensor positions, Tensor cos_sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slots, int num_heads, int num_kv_heads) -> ()");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("rope_and_cache_", &rope_and_cache_);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax_rows", &argmax_rows);
}
