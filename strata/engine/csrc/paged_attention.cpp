// Decode attention straight from the paged KV cache: one query token per sequence,
// keys/values read through the block table, never gathered into a padded copy.
// Grouped-query heads that share a KV head are computed together so K and V are
// read once per KV head. Parallel over (sequence, kv head) on torch's thread pool.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

template <typename T>
static void decode_kernel(const T* q, const T* kc, const T* vc, const int32_t* tables,
                          const int32_t* lens, T* out, int64_t num_seqs, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t slot_stride = num_kv_heads * head_dim;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(group * head_dim), qf(group * head_dim);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t s = work / num_kv_heads, kvh = work % num_kv_heads;
      const int64_t len = lens[s];
      const int32_t* table = tables + s * max_blocks;
      scores.assign(group * len, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const T* qp = q + (s * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = static_cast<float>(qp[d]) * scale;
      }
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        const T* kp = kc + slot * slot_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(kp[d]);
          scores[g * len + p] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * len;
        float mx = -INFINITY;
        for (int64_t p = 0; p < len; ++p) mx = sc[p] > mx ? sc[p] : mx;
        float sum = 0.f;
        for (int64_t p = 0; p < len; ++p) { sc[p] = std::exp(sc[p] - mx); sum += sc[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < len; ++p) sc[p] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        const T* vp = vc + slot * slot_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + p];
          float* ag = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ag[d] += w * static_cast<float>(vp[d]);
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
// context_lens: [S] int32 (tokens to attend, including the current one). Returns [S, H, D].
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor context_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [S,H,D] and caches [slots,KVH,D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  q = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0, "heads must be a multiple of kv heads");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                            S, H, KVH, D, block_size, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
