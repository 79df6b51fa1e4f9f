// Decode attention straight from the paged KV cache: one query token per sequence,
// keys/values read through the block table, never gathered into a padded copy.
// Grouped-query heads that share a KV head are computed together so K and V are
// read once per KV head. Parallel over (sequence, kv head) on torch's thread pool.
// With a sliding window W > 0 each query attends only to its sequence's last W positions
// (keys j with len - W <= j < len, transformers' i - W < j <= i); blocks before the
// window are never read, so the scheduler may have given them back.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__AVX512F__)
// Queries and outputs in fp32, bf16 or fp16 (math in fp32) over a cache of the query's type, or
// fp16 under fp32 queries; head_dim 64 or 128, query group 1-8 (compile-time, so q and the output
// accumulators live in registers). One pass per block of the table: scores of the
// block's keys, an online softmax update (rescale once per block), then the weighted
// sum of the block's values while they are still in L1.
static inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// Sums of 16 vectors at once: out[j] = sum of r[slot(j)]'s lanes, where key j's vector sits in
// slot 4 * (j % 4) + j / 4 (that order makes the transposing adds below land in key order).
// 15 adds and 30 shuffles for 16 keys instead of a 4-step horizontal sum per key.
static inline int reduce_slot(int j) { return 4 * (j & 3) + (j >> 2); }
static inline __m512 reduce16x16(const float* r) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k) {
    const __m512 a = _mm512_load_ps(r + 32 * k), b = _mm512_load_ps(r + 32 * k + 16);
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k)
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xDD));
  const __m512 v0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 v1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  const __m512d d0 = _mm512_castps_pd(v0), d1 = _mm512_castps_pd(v1);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
}

// bf16 keys under bf16 queries: vdpbf16ps multiplies pairs of bf16 exactly into fp32 sums,
// half the instructions of widening to fp32 first. Compiled only where the build's -march has it.
#if defined(__AVX512BF16__)
#define STRATA_DPBF16 1
#endif

template <int NV, int G, typename QT, typename CT>
static void decode_fast(const QT* q, const CT* kc, const CT* vc, const int32_t* tables,
                        const int32_t* lens, QT* out, int64_t num_seqs, int64_t num_kv_heads,
                       int64_t block_size, int64_t max_blocks, float scale, int64_t q_row,
                       int64_t window) {
  constexpr int64_t D = NV * 16;
  const int64_t slot_stride = num_kv_heads * D;
#if defined(STRATA_DPBF16)
  constexpr bool kDp = std::is_same_v<CT, at::BFloat16> && std::is_same_v<QT, at::BFloat16>;
#else
  constexpr bool kDp = false;
#endif
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(G * block_size + 16);
    alignas(64) float part[G * 256] = {};  // per-key partial products, 16 keys per query head
    for (int64_t work = begin; work < end; ++work) {
      const int64_t s = work / num_kv_heads, kvh = work % num_kv_heads;
      const int64_t len = lens[s];
      const int64_t first = window > 0 && len > window ? len - window : 0;  // first attended position
      const int64_t p_begin = first / block_size * block_size;
      const int32_t* table = tables + s * max_blocks;
      __m512 qv[G][NV], acc[G][NV];
#if defined(STRATA_DPBF16)
      __m512bh qb[G][NV / 2];  // the raw bf16 query (scaled after the dot) for vdpbf16ps
#endif
      float mx[G], sum[G];
      for (int g = 0; g < G; ++g) {
        const QT* qp = q + s * q_row + (kvh * G + g) * D;
        for (int v = 0; v < NV; ++v) {
          qv[g][v] = _mm512_mul_ps(strata_vec::load16(qp + 16 * v), _mm512_set1_ps(scale));
          acc[g][v] = _mm512_setzero_ps();
        }
#if defined(STRATA_DPBF16)
        if constexpr (kDp)
          for (int v = 0; v < NV / 2; ++v) qb[g][v] = (__m512bh)_mm512_loadu_si512(qp + 32 * v);
#endif
        mx[g] = -INFINITY;
        sum[g] = 0.f;
      }
      if (len > 0) {  // the first block's keys (the loop below asks for each next one)
        const CT* k0 = kc + static_cast<int64_t>(table[p_begin / block_size]) * block_size * slot_stride + kvh * D;
        for (int64_t i = first - p_begin; i < std::min(block_size, len - p_begin); ++i)
          prefetch_row(k0 + i * slot_stride, D * sizeof(CT));
      }
      for (int64_t p0 = p_begin; p0 < len; p0 += block_size) {
        const int64_t n = std::min(block_size, len - p0);
        const int64_t i0 = first > p0 ? first - p0 : 0;  // positions before it lie outside the window
        const int64_t base = static_cast<int64_t>(table[p0 / block_size]) * block_size * slot_stride + kvh * D;
        const CT* kb = kc + base;
        const CT* vb = vc + base;
        // This head's rows are D values every slot_stride: a strided walk through blocks
        // scattered over the cache, which the hardware prefetcher does not follow. Ask
        // for this block's values (already asked for after the first block) and the next
        // block's keys and values now, so the misses overlap with the arithmetic instead of
        // stalling it (worth most at high batch, where the cache reads bound the step;
        // measured in docs/results.md).
        for (int64_t i = i0; i < n; ++i) prefetch_row(vb + i * slot_stride, D * sizeof(CT));
        if (p0 + block_size < len) {
          const int64_t nn = std::min(block_size, len - p0 - block_size);
          const int64_t next = static_cast<int64_t>(table[p0 / block_size + 1]) * block_size * slot_stride + kvh * D;
          for (int64_t i = 0; i < nn; ++i) {
            prefetch_row(kc + next + i * slot_stride, D * sizeof(CT));
            prefetch_row(vc + next + i * slot_stride, D * sizeof(CT));
          }
        }
        float bmax[G];
        for (int g = 0; g < G; ++g) bmax[g] = -INFINITY;
        // Scores 16 keys at a time: each key's per-lane products go to a scratch slot, then
        // one transposing reduction gives the 16 scores as a vector.
        for (int64_t c = i0; c < n; c += 16) {
          const int64_t m = std::min<int64_t>(16, n - c);
          for (int64_t j = 0; j < m; ++j) {
            const CT* kp = kb + (c + j) * slot_stride;
            float* slot = part + reduce_slot(static_cast<int>(j)) * 16;
#if defined(STRATA_DPBF16)
            if constexpr (kDp) {
              __m512bh kr[NV / 2];
              for (int v = 0; v < NV / 2; ++v) kr[v] = (__m512bh)_mm512_loadu_si512(kp + 32 * v);
              for (int g = 0; g < G; ++g) {
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[g][0], kr[0]);
                for (int v = 1; v < NV / 2; ++v) a = _mm512_dpbf16_ps(a, qb[g][v], kr[v]);
                _mm512_store_ps(slot + g * 256, a);
              }
              continue;
            }
#endif
            __m512 kv[NV];
            for (int v = 0; v < NV; ++v) kv[v] = strata_vec::load16(kp + 16 * v);
            for (int g = 0; g < G; ++g) {
              __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
              for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(qv[g][v], kv[v], a);
              _mm512_store_ps(slot + g * 256, a);
            }
          }
          const __mmask16 mk = static_cast<__mmask16>((1u << m) - 1);
          for (int g = 0; g < G; ++g) {
            __m512 x = reduce16x16(part + g * 256);
            if constexpr (kDp) x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc.data() + g * block_size + c, mk, x);
            const float xm = _mm512_mask_reduce_max_ps(mk, x);
            bmax[g] = xm > bmax[g] ? xm : bmax[g];
          }
        }
        for (int g = 0; g < G; ++g) {
          float* sg = sc.data() + g * block_size;
          const float nmx = bmax[g] > mx[g] ? bmax[g] : mx[g];
          const float corr = std::exp(mx[g] - nmx);  // 0 on the first block
          mx[g] = nmx;
          const __m512 vm = _mm512_set1_ps(nmx);
          __m512 vs = _mm512_setzero_ps();
          for (int64_t i = i0; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (n - i)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(m, strata_vec::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + i), vm)));
            _mm512_mask_storeu_ps(sg + i, m, e);
            vs = _mm512_add_ps(vs, e);
          }
          sum[g] = sum[g] * corr + _mm512_reduce_add_ps(vs);
          const __m512 vc_ = _mm512_set1_ps(corr);
          for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_mul_ps(acc[g][v], vc_);
        }
        for (int64_t i = i0; i < n; ++i) {
          const CT* vp = vb + i * slot_stride;
          __m512 vv[NV];
          for (int v = 0; v < NV; ++v) vv[v] = strata_vec::load16(vp + 16 * v);
          for (int g = 0; g < G; ++g) {
            const __m512 w = _mm512_set1_ps(sc[g * block_size + i]);
            for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(w, vv[v], acc[g][v]);
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        QT* op = out + (s * num_kv_heads * G + kvh * G + g) * D;
        const __m512 inv = _mm512_set1_ps(1.f / sum[g]);
        for (int v = 0; v < NV; ++v) strata_vec::store16(op + 16 * v, _mm512_mul_ps(acc[g][v], inv));
      }
    }
  });
}

template <int NV, typename QT, typename CT>
static bool decode_fast_group(int64_t group, const QT* q, const CT* kc, const CT* vc,
                              const int32_t* tables, const int32_t* lens, QT* out, int64_t S,
                              int64_t KVH, int64_t bs, int64_t mb, float scale, int64_t q_row,
                              int64_t window) {
  switch (group) {
#define STRATA_G(g) case g: decode_fast<NV, g, QT, CT>(q, kc, vc, tables, lens, out, S, KVH, bs, mb, scale, q_row, window); return true;
    STRATA_G(1) STRATA_G(2) STRATA_G(3) STRATA_G(4) STRATA_G(5) STRATA_G(6) STRATA_G(7) STRATA_G(8)
#undef STRATA_G
    default: return false;
  }
}
#endif

// The register-resident AVX-512 kernel when head_dim and the group fit it; false when it
// does not apply (or the CPU build has no AVX-512), and the portable kernel runs instead.
template <typename QT, typename CT>
static bool decode_fast_any(int64_t D, int64_t group, const QT* q, const CT* kc, const CT* vc,
                            const int32_t* tables, const int32_t* lens, QT* out, int64_t S,
                            int64_t KVH, int64_t bs, int64_t mb, float scale, int64_t q_row,
                            int64_t window) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<QT, double>) {  // no double lanes: the portable kernel
    if (D == 64) return decode_fast_group<4>(group, q, kc, vc, tables, lens, out, S, KVH, bs, mb, scale, q_row, window);
    if (D == 128) return decode_fast_group<8>(group, q, kc, vc, tables, lens, out, S, KVH, bs, mb, scale, q_row, window);
  }
#endif
  return false;
}

template <typename T, typename CT>
static void decode_kernel(const T* q, const CT* kc, const CT* vc, const int32_t* tables,
                          const int32_t* lens, T* out, int64_t num_seqs, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          int64_t max_blocks, float scale, int64_t q_row, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t slot_stride = num_kv_heads * head_dim;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(group * head_dim), qf(group * head_dim);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t s = work / num_kv_heads, kvh = work % num_kv_heads;
      const int64_t len = lens[s];
      const int64_t first = window > 0 && len > window ? len - window : 0;  // first attended position
      const int64_t p_begin = first / block_size * block_size;
      const int32_t* table = tables + s * max_blocks;
      scores.assign(group * len, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const T* qp = q + s * q_row + (kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = static_cast<float>(qp[d]) * scale;
      }
      for (int64_t p0 = p_begin; p0 < len; p0 += block_size) {
        const int64_t n = std::min(block_size, len - p0);
        const CT* kb = kc + static_cast<int64_t>(table[p0 / block_size]) * block_size * slot_stride + kvh * head_dim;
        for (int64_t i = first > p0 ? first - p0 : 0; i < n; ++i) {
          const CT* kp = kb + i * slot_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(kp[d]);
            scores[g * len + p0 + i] = dot;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * len;
        float mx = -INFINITY;
        for (int64_t p = first; p < len; ++p) mx = sc[p] > mx ? sc[p] : mx;
        float sum = 0.f;
        for (int64_t p = first; p < len; ++p) { sc[p] = std::exp(sc[p] - mx); sum += sc[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = first; p < len; ++p) sc[p] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p0 = p_begin; p0 < len; p0 += block_size) {
        const int64_t n = std::min(block_size, len - p0);
        const CT* vb = vc + static_cast<int64_t>(table[p0 / block_size]) * block_size * slot_stride + kvh * head_dim;
        for (int64_t i = first > p0 ? first - p0 : 0; i < n; ++i) {
          const CT* vp = vb + i * slot_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float w = scores[g * len + p0 + i];
            float* ag = acc.data() + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ag[d] += w * static_cast<float>(vp[d]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* op = out + (s * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) op[d] = static_cast<T>(acc[g * head_dim + d]);
      }
    }
  });
}

// q: [S, H, D]; k_cache/v_cache: [slots, KVH, D]; block_tables: [S, max_blocks] int32;
// context_lens: [S] int32 (tokens in context, including the current one); window: attend
// to the last `window` of them only, 0 = all. Returns [S, H, D].
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor context_lens,
                                     int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [S,H,D] and caches [slots,KVH,D]");
  const bool half_cache = k_cache.scalar_type() == at::kHalf && q.scalar_type() == at::kFloat;
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() || half_cache,
              "the cache must have the query's dtype, or be float16 under float32 queries");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  // q may be a row-strided view (the q part of a fused qkv row): heads must be dense.
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0 = no sliding window)");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);
  const int64_t mb = tables.size(1), qr = q.stride(0);
  if (half_cache) {
    const float* qp = q.data_ptr<float>();
    const at::Half* kp = k_cache.data_ptr<at::Half>();
    const at::Half* vp = v_cache.data_ptr<at::Half>();
    float* op = out.data_ptr<float>();
    if (!decode_fast_any(D, H / KVH, qp, kp, vp, tp, lp, op, S, KVH, block_size, mb, sc, qr, window))
      decode_kernel<float, at::Half>(qp, kp, vp, tp, lp, op, S, H, KVH, D, block_size, mb, sc, qr, window);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (!decode_fast_any(D, H / KVH, qp, kp, vp, tp, lp, op, S, KVH, block_size, mb, sc, qr, window)) decode_kernel<scalar_t, scalar_t>(qp, kp, vp, tp, lp, op, S, H, KVH, D, block_size, mb, sc, qr, window);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
