// Small-batch linear layer straight from 4-bit weight blocks (the GGUF's Q4_1), for decode.
//
// A decode step at small batch reads every weight once per step, so its time is the bytes
// read. Q4_1 keeps 32 weights in 16 bytes of 4-bit codes plus a scale d and a minimum m
// (w = d*q + m); this is what the bundled model's file holds, so computing from the codes
// loses nothing against the dequantized weights and reads a quarter of the fp16 bytes.
//
// Activations are quantized per 32-element block to int8 (scale dx = max|x|/127), as
// llama.cpp does. Writing w = d * (q - 8) + m8 with m8 = m + 8d (codes centred, so the
// activation rounding error is weighted by q - 8, not by q: half the error), a block's
// dot product is
//   sum_j w_j x_j  ~=  d * dx * (sum_j q_j qx_j - 8 sum_j qx_j)  +  m8 * sum_j x_j
// with the integer sum on AVX-512 VNNI (vpdpbusd: 64 unsigned 4-bit codes times 64 signed
// bytes per instruction) and the m8 term from the exact float sum of the block.
//
// Weight layout (prepared at load time, strata.engine.quant.pack_q4_1): per row, per 64
// inputs, 32 bytes where byte i holds input i in its low nibble and input 32+i in its high
// nibble; d and m as float16 [rows, K/32], exactly as the file stores them (20 bytes per
// 32 weights). One 256-bit load and a per-half shift give the
// 64 codes in input order, so the activations need no permutation.
//
// q8_linear does the same for Q8_0 blocks (w = d * q, int8 q; the bundled model's
// embedding, which is also its LM head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define STRATA_Q4_VNNI 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kChunk = 64;  // two blocks per 512-bit step

struct QuantizedActs {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> dxv;  // [M, K/64, 16]: per chunk [dx of block 2c x8, dx of block 2c+1 x8]
  std::vector<float> sx;   // [M, K/32]: exact float sum of each block
  std::vector<float> e8;   // [M, K/32]: 8 * (sx - dx * sum of the block's int8 codes)
};

// Per-block symmetric int8 quantization of x (times col_scale when given).
void quantize_acts(const float* x, const float* col_scale, int64_t M, int64_t K, QuantizedActs& out) {
  const int64_t nb = K / kBlock;
  out.q.resize(M * K);
  out.dxv.resize(M * (K / kChunk) * 16);
  out.sx.resize(M * nb);
  out.e8.resize(M * nb);
  for (int64_t t = 0; t < M; ++t) {
    const float* xr = x + t * K;
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* q = out.q.data() + t * K + b * kBlock;
      int32_t qsum = 0;
      float d, sum;
#if defined(STRATA_Q4_VNNI)
      {
        __m512 v0 = _mm512_loadu_ps(xr + b * kBlock), v1 = _mm512_loadu_ps(xr + b * kBlock + 16);
        if (col_scale) {
          v0 = _mm512_mul_ps(v0, _mm512_loadu_ps(col_scale + b * kBlock));
          v1 = _mm512_mul_ps(v1, _mm512_loadu_ps(col_scale + b * kBlock + 16));
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(q1));
      }
#else
      float tmp[kBlock];
      float amax = 0.f;
      sum = 0.f;
      for (int j = 0; j < kBlock; ++j) {
        float v = xr[b * kBlock + j];
        if (col_scale) v *= col_scale[b * kBlock + j];
        tmp[j] = v;
        amax = std::fmax(amax, std::fabs(v));
        sum += v;
      }
      d = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int j = 0; j < kBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(tmp[j] * inv));
        qsum += q[j];
      }
#endif
      float* dv = out.dxv.data() + (t * (K / kChunk) + b / 2) * 16 + (b % 2) * 8;
      for (int j = 0; j < 8; ++j) dv[j] = d;
      out.sx[t * nb + b] = sum;
      out.e8[t * nb + b] = 8.f * (sum - d * static_cast<float>(qsum));
    }
  }
}

// The per-row constant part, sum over blocks of m8 * sx - 8 * d * dx * sum(qx), written
// with the stored m (m8 = m + 8d) as sum of m * sx + d * e8.
inline float block_terms(const at::Half* d, const at::Half* m, const float* sx, const float* e8, int64_t nb) {
  float s = 0.f;
  for (int64_t b = 0; b < nb; ++b) s += static_cast<float>(m[b]) * sx[b] + static_cast<float>(d[b]) * e8[b];
  return s;
}

#if defined(STRATA_Q4_VNNI)
inline __m512 load_half16(const at::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

inline float block_terms_avx(const at::Half* d, const at::Half* m, const float* sx, const float* e8, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 k = nb - b >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (nb - b)) - 1);
    acc = _mm512_fmadd_ps(load_half16(m + b, k), _mm512_maskz_loadu_ps(k, sx + b), acc);
    acc = _mm512_fmadd_ps(load_half16(d + b, k), _mm512_maskz_loadu_ps(k, e8 + b), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// R rows from r times NT tokens from t0: R*NT independent accumulators.
template <int NT, int R>
inline void tile_vnni(const uint8_t* qs, const at::Half* d, const at::Half* m, const QuantizedActs& a,
                      int64_t t0, int64_t K, int64_t N, int64_t r, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk;
  const __m512i shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);  // high half: >> 4
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R][NT];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m512i w[R];
    __m512 wd[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* wr = qs + (r + i) * (K / 2) + c * 32;
      const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr)));
      w[i] = _mm512_and_si512(_mm512_srlv_epi64(raw, shifts), nib);
      int32_t dpair;
      std::memcpy(&dpair, d + (r + i) * nb + 2 * c, 4);
      wd[i] = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dpair))));
    }
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_loadu_si512(a.q.data() + (t0 + t) * K + c * kChunk);
      const __m512 xd = _mm512_loadu_ps(a.dxv.data() + ((t0 + t) * nc + c) * 16);
      for (int i = 0; i < R; ++i) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[i], xv);
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[i], xd), acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t)
      y[(t0 + t) * N + r + i] =
          _mm512_reduce_add_ps(acc[i][t]) +
          block_terms_avx(d + (r + i) * nb, m + (r + i) * nb, a.sx.data() + (t0 + t) * nb,
                          a.e8.data() + (t0 + t) * nb, nb);
}

// Prefetch [p, p + bytes) into L2: the hardware prefetcher stops at each 4 KiB page and
// every projection is a fresh stream, so decode-sized calls never reach full bandwidth
// on their own.
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

template <int NT>
void rows_vnni(const uint8_t* qs, const at::Half* d, const at::Half* m, const QuantizedActs& a,
               int64_t t0, int64_t K, int64_t N, int64_t r0, int64_t r1, float* y) {
  constexpr int R = NT == 1 ? 4 : 2;
  const int64_t nb = K / kBlock;
  constexpr int64_t kAhead = 4;  // tiles
  {  // the first tiles all at once, so their misses overlap
    const int64_t n = std::min<int64_t>(kAhead * R, r1 - r0);
    prefetch_range(qs + r0 * (K / 2), n * (K / 2));
    prefetch_range(d + r0 * nb, n * nb * 2);
    prefetch_range(m + r0 * nb, n * nb * 2);
  }
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const int64_t pf = r + kAhead * R;
    if (pf + R <= r1) {
      prefetch_range(qs + pf * (K / 2), R * (K / 2));
      prefetch_range(d + pf * nb, R * nb * 2);
      prefetch_range(m + pf * nb, R * nb * 2);
    }
    tile_vnni<NT, R>(qs, d, m, a, t0, K, N, r, y);
  }
  for (; r < r1; ++r) tile_vnni<NT, 1>(qs, d, m, a, t0, K, N, r, y);
}

// Q8_0 rows (w = d * q, q int8, per 32 inputs): vpdpbusd wants one unsigned operand, so
// |q| is the unsigned one and q's sign moves onto the activation (llama.cpp's trick).
template <int NT, int R>
inline void tile_q8_vnni(const int8_t* qs, const at::Half* d, const QuantizedActs& a, int64_t t0, int64_t K,
                         int64_t N, int64_t r, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk;
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R][NT];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m512i wabs[R];
    __mmask64 neg[R];
    __m512 wd[R];
    for (int i = 0; i < R; ++i) {
      const __m512i w = _mm512_loadu_si512(qs + (r + i) * K + c * kChunk);
      wabs[i] = _mm512_abs_epi8(w);
      neg[i] = _mm512_movepi8_mask(w);
      int32_t dpair;
      std::memcpy(&dpair, d + (r + i) * nb + 2 * c, 4);
      wd[i] = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dpair))));
    }
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_loadu_si512(a.q.data() + (t0 + t) * K + c * kChunk);
      const __m512 xd = _mm512_loadu_ps(a.dxv.data() + ((t0 + t) * nc + c) * 16);
      for (int i = 0; i < R; ++i) {
        const __m512i xs = _mm512_mask_sub_epi8(xv, neg[i], _mm512_setzero_si512(), xv);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs[i], xs);
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[i], xd), acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < NT; ++t) y[(t0 + t) * N + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

template <int NT>
void rows_q8_vnni(const int8_t* qs, const at::Half* d, const QuantizedActs& a, int64_t t0, int64_t K, int64_t N,
                  int64_t r0, int64_t r1, float* y) {
  constexpr int R = NT == 1 ? 4 : 2;
  const int64_t nb = K / kBlock;
  constexpr int64_t kAhead = 4;
  {
    const int64_t n = std::min<int64_t>(kAhead * R, r1 - r0);
    prefetch_range(qs + r0 * K, n * K);
    prefetch_range(d + r0 * nb, n * nb * 2);
  }
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const int64_t pf = r + kAhead * R;
    if (pf + R <= r1) {
      prefetch_range(qs + pf * K, R * K);
      prefetch_range(d + pf * nb, R * nb * 2);
    }
    tile_q8_vnni<NT, R>(qs, d, a, t0, K, N, r, y);
  }
  for (; r < r1; ++r) tile_q8_vnni<NT, 1>(qs, d, a, t0, K, N, r, y);
}
#endif

void rows_scalar(const uint8_t* qs, const at::Half* d, const at::Half* m, const QuantizedActs& a,
                 int64_t M, int64_t K, int64_t N, int64_t r0, int64_t r1, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = qs + r * (K / 2);
    for (int64_t t = 0; t < M; ++t) {
      const int8_t* xq = a.q.data() + t * K;
      float s = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c = b / 2, half = b % 2;
        int32_t dot = 0;
        for (int j = 0; j < kBlock; ++j) {
          const uint8_t byte = wr[c * 32 + j];
          const int32_t code = half ? (byte >> 4) : (byte & 0x0f);
          dot += code * xq[b * kBlock + j];
        }
        s += static_cast<float>(d[r * nb + b]) * a.dxv[(t * nc + c) * 16 + half * 8] * static_cast<float>(dot);
      }
      y[t * N + r] = s + block_terms(d + r * nb, m + r * nb, a.sx.data() + t * nb, a.e8.data() + t * nb, nb);
    }
  }
}

void rows_q8_scalar(const int8_t* qs, const at::Half* d, const QuantizedActs& a, int64_t M, int64_t K, int64_t N,
                    int64_t r0, int64_t r1, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < M; ++t) {
      float s = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int j = 0; j < kBlock; ++j) dot += qs[r * K + b * kBlock + j] * a.q[t * K + b * kBlock + j];
        s += static_cast<float>(d[r * nb + b]) * a.dxv[(t * nc + b / 2) * 16 + (b % 2) * 8] * static_cast<float>(dot);
      }
      y[t * N + r] = s;
    }
}

bool vnni_available() {
#if defined(STRATA_Q4_VNNI)
  return true;
#else
  return false;
#endif
}

// The checks both ops make of x and col_scale, then x quantized into per-thread buffers:
// no allocation per call; the workers reach the caller's copy through the reference
// returned, not their own thread_local.
QuantizedActs& quantized_input(const at::Tensor& x, const std::optional<at::Tensor>& col_scale, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kChunk == 0, op, " needs K a multiple of 64, got ", K);
  const float* cs = nullptr;
  if (col_scale.has_value()) {
    TORCH_CHECK(col_scale->scalar_type() == at::kFloat && col_scale->is_contiguous() && col_scale->numel() == K,
                "col_scale: float32 [K]");
    cs = col_scale->data_ptr<float>();
  }
  static thread_local QuantizedActs buffers;
  quantize_acts(x.data_ptr<float>(), cs, x.size(0), K, buffers);
  return buffers;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const std::optional<at::Tensor>& col_scale, bool vectorized) {
  const QuantizedActs& a = quantized_input(x, col_scale, "q4_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == K / 2, "qs: uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N && d.size(1) == K / kBlock,
              "d: float16 [N, K/32]");
  TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.sizes() == d.sizes(), "m: float16 [N, K/32]");
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const bool fast = vectorized && vnni_available();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
#if defined(STRATA_Q4_VNNI)
    if (fast) {
      int64_t t = 0;
      for (; t + 4 <= M; t += 4) rows_vnni<4>(qp, dp, mp, a, t, K, N, r0, r1, yp);
      switch (M - t) {
        case 3: rows_vnni<3>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 2: rows_vnni<2>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 1: rows_vnni<1>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        default: break;
      }
      return;
    }
#endif
    rows_scalar(qp, dp, mp, a, M, K, N, r0, r1, yp);
  });
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const std::optional<at::Tensor>& col_scale, bool vectorized) {
  const QuantizedActs& a = quantized_input(x, col_scale, "q8_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.is_contiguous() && qs.size(1) == K, "qs: int8 [N, K]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N && d.size(1) == K / kBlock,
              "d: float16 [N, K/32]");
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* qp = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const bool fast = vectorized && vnni_available();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
#if defined(STRATA_Q4_VNNI)
    if (fast) {
      int64_t t = 0;
      for (; t + 4 <= M; t += 4) rows_q8_vnni<4>(qp, dp, a, t, K, N, r0, r1, yp);
      switch (M - t) {
        case 3: rows_q8_vnni<3>(qp, dp, a, t, K, N, r0, r1, yp); break;
        case 2: rows_q8_vnni<2>(qp, dp, a, t, K, N, r0, r1, yp); break;
        case 1: rows_q8_vnni<1>(qp, dp, a, t, K, N, r0, r1, yp); break;
        default: break;
      }
      return;
    }
#endif
    rows_q8_scalar(qp, dp, a, M, K, N, r0, r1, yp);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? col_scale, bool vectorized=True) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qs, Tensor d, Tensor? col_scale, bool vectorized=True) -> Tensor");
  m.def("q4_vnni_available() -> bool", &vnni_available);
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
