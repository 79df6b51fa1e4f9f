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
//
// GGUF K-quants arrive here converted exactly at load time (strata.engine.gguf_blocks):
// Q4_K as Q4_1-style blocks whose d and m are float32 (d * sub-block scale needs more
// mantissa than float16 has); Q5_K as q8 codes 0..31 with float32 d and a minimum m per
// 32; Q6_K as q8 codes -32..31 with a float32 d per 16 inputs. So both ops take float16
// or float32 scales, and q8_linear takes scales per 16 or 32 inputs and an optional m.
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

// A scale as float: the file's float16 or a K-quant's exact float32.
inline float sc(at::Half v) { return static_cast<float>(v); }
inline float sc(float v) { return v; }

// The per-row constant part, sum over blocks of m8 * sx - 8 * d * dx * sum(qx), written
// with the stored m (m8 = m + 8d) as sum of m * sx + d * e8.
// ce scales the centring term: 1 for 4-bit codes centred at 8, 2 for 5-bit ones at 16.
template <typename S>
inline float block_terms(const S* d, const S* m, const float* sx, const float* e8, int64_t nb, float ce = 1.f) {
  float s = 0.f;
  for (int64_t b = 0; b < nb; ++b) s += sc(m[b]) * sx[b] + ce * sc(d[b]) * e8[b];
  return s;
}

#if defined(STRATA_Q4_VNNI)
inline __m512 load16(const at::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

// Scales of the G-input groups of one 64-input chunk (p points at the chunk's first),
// spread over the 16 int32 lanes of a vpdpbusd result (lane l covers inputs 4l..4l+3).
template <int G>
inline __m512 chunk_scales(const at::Half* p) {
  int64_t raw = 0;
  std::memcpy(&raw, p, 64 / G * 2);
  const __m512 v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(raw)));
  return _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 G == 32 ? 3 : 2), v);
}
template <int G>
inline __m512 chunk_scales(const float* p) {
  const __m512 v = _mm512_castps128_ps512(
      G == 32 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))) : _mm_loadu_ps(p));
  return _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 G == 32 ? 3 : 2), v);
}

template <typename S>
inline float block_terms_avx(const S* d, const S* m, const float* sx, const float* e8, int64_t nb, float ce = 1.f) {
  __m512 acc = _mm512_setzero_ps(), cen = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 k = nb - b >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (nb - b)) - 1);
    acc = _mm512_fmadd_ps(load16(m + b, k), _mm512_maskz_loadu_ps(k, sx + b), acc);
    cen = _mm512_fmadd_ps(load16(d + b, k), _mm512_maskz_loadu_ps(k, e8 + b), cen);
  }
  return _mm512_reduce_add_ps(_mm512_fmadd_ps(cen, _mm512_set1_ps(ce), acc));
}

// R rows from r times NT tokens from t0: R*NT independent accumulators.
template <int NT, int R, typename S>
inline void tile_vnni(const uint8_t* qs, const S* d, const S* m, const QuantizedActs& a,
                      int64_t t0, int64_t K, int64_t N, int64_t r, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk;
  const __m512i shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);  // high half: >> 4
  const __m512i nib = _mm512_set1_epi8(0x0f);
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
      wd[i] = chunk_scales<kBlock>(d + (r + i) * nb + 2 * c);
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

template <int NT, typename S>
void rows_vnni(const uint8_t* qs, const S* d, const S* m, const QuantizedActs& a,
               int64_t t0, int64_t K, int64_t N, int64_t r0, int64_t r1, float* y) {
  constexpr int R = NT == 1 ? 4 : 2;
  const int64_t nb = K / kBlock;
  constexpr int64_t kAhead = 4;  // tiles
  {  // the first tiles all at once, so their misses overlap
    const int64_t n = std::min<int64_t>(kAhead * R, r1 - r0);
    prefetch_range(qs + r0 * (K / 2), n * (K / 2));
    prefetch_range(d + r0 * nb, n * nb * sizeof(S));
    prefetch_range(m + r0 * nb, n * nb * sizeof(S));
  }
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const int64_t pf = r + kAhead * R;
    if (pf + R <= r1) {
      prefetch_range(qs + pf * (K / 2), R * (K / 2));
      prefetch_range(d + pf * nb, R * nb * sizeof(S));
      prefetch_range(m + pf * nb, R * nb * sizeof(S));
    }
    tile_vnni<NT, R, S>(qs, d, m, a, t0, K, N, r, y);
  }
  for (; r < r1; ++r) tile_vnni<NT, 1, S>(qs, d, m, a, t0, K, N, r, y);
}

// Q8_0 rows (w = d * q, q int8, per 32 inputs): vpdpbusd wants one unsigned operand, so
// |q| is the unsigned one and q's sign moves onto the activation (llama.cpp's trick).
// G is the number of inputs per weight scale (32, or 16 for Q6_K); m, when given, adds a
// minimum per 32 inputs (Q5_K): w = d * q + m, computed as q4_linear does with the codes
// (0..31) centred at 16, which halves the activation rounding error.
template <int NT, int R, typename S, int G>
inline void tile_q8_vnni(const int8_t* qs, const S* d, const S* m, const QuantizedActs& a, int64_t t0, int64_t K,
                         int64_t N, int64_t r, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk, ng = K / G;
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
      wd[i] = chunk_scales<G>(d + (r + i) * ng + c * (kChunk / G));
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
    for (int t = 0; t < NT; ++t)
      y[(t0 + t) * N + r + i] =
          _mm512_reduce_add_ps(acc[i][t]) +
          (m ? block_terms_avx<S>(d + (r + i) * nb, m + (r + i) * nb, a.sx.data() + (t0 + t) * nb,
                                  a.e8.data() + (t0 + t) * nb, nb, 2.f)
             : 0.f);
}

template <int NT, typename S, int G>
void rows_q8_vnni(const int8_t* qs, const S* d, const S* m, const QuantizedActs& a, int64_t t0, int64_t K,
                  int64_t N, int64_t r0, int64_t r1, float* y) {
  constexpr int R = NT == 1 ? 4 : 2;
  const int64_t ng = K / G, nb = K / kBlock;
  constexpr int64_t kAhead = 4;
  {
    const int64_t n = std::min<int64_t>(kAhead * R, r1 - r0);
    prefetch_range(qs + r0 * K, n * K);
    prefetch_range(d + r0 * ng, n * ng * sizeof(S));
    if (m) prefetch_range(m + r0 * nb, n * nb * sizeof(S));
  }
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const int64_t pf = r + kAhead * R;
    if (pf + R <= r1) {
      prefetch_range(qs + pf * K, R * K);
      prefetch_range(d + pf * ng, R * ng * sizeof(S));
      if (m) prefetch_range(m + pf * nb, R * nb * sizeof(S));
    }
    tile_q8_vnni<NT, R, S, G>(qs, d, m, a, t0, K, N, r, y);
  }
  for (; r < r1; ++r) tile_q8_vnni<NT, 1, S, G>(qs, d, m, a, t0, K, N, r, y);
}
#endif

template <typename S>
void rows_scalar(const uint8_t* qs, const S* d, const S* m, const QuantizedActs& a,
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
        s += sc(d[r * nb + b]) * a.dxv[(t * nc + c) * 16 + half * 8] * static_cast<float>(dot);
      }
      y[t * N + r] = s + block_terms(d + r * nb, m + r * nb, a.sx.data() + t * nb, a.e8.data() + t * nb, nb);
    }
  }
}

template <typename S>
void rows_q8_scalar(const int8_t* qs, const S* d, const S* m, int64_t G, const QuantizedActs& a, int64_t M, int64_t K,
                    int64_t N, int64_t r0, int64_t r1, float* y) {
  const int64_t nb = K / kBlock, nc = K / kChunk, ng = K / G;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < M; ++t) {
      float s = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        int32_t dot = 0;
        for (int j = 0; j < G; ++j) dot += qs[r * K + g * G + j] * a.q[t * K + g * G + j];
        const int64_t b = g * G / kBlock;
        s += sc(d[r * ng + g]) * a.dxv[(t * nc + b / 2) * 16 + (b % 2) * 8] * static_cast<float>(dot);
      }
      y[t * N + r] = s + (m ? block_terms<S>(d + r * nb, m + r * nb, a.sx.data() + t * nb, a.e8.data() + t * nb, nb,
                                             2.f)
                            : 0.f);
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

template <typename S>
void q4_rows(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
             const QuantizedActs& a, bool fast, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const S* dp = d.data_ptr<S>();
  const S* mp = m.data_ptr<S>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
#if defined(STRATA_Q4_VNNI)
    if (fast) {
      int64_t t = 0;
      for (; t + 4 <= M; t += 4) rows_vnni<4, S>(qp, dp, mp, a, t, K, N, r0, r1, yp);
      switch (M - t) {
        case 3: rows_vnni<3, S>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 2: rows_vnni<2, S>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 1: rows_vnni<1, S>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        default: break;
      }
      return;
    }
#endif
    rows_scalar<S>(qp, dp, mp, a, M, K, N, r0, r1, yp);
  });
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const std::optional<at::Tensor>& col_scale, bool vectorized) {
  const QuantizedActs& a = quantized_input(x, col_scale, "q4_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == K / 2, "qs: uint8 [N, K/2]");
  TORCH_CHECK((d.scalar_type() == at::kHalf || d.scalar_type() == at::kFloat) && d.is_contiguous() &&
                  d.dim() == 2 && d.size(0) == N && d.size(1) == K / kBlock,
              "d: float16 or float32 [N, K/32]");
  TORCH_CHECK(m.scalar_type() == d.scalar_type() && m.is_contiguous() && m.sizes() == d.sizes(),
              "m: [N, K/32], the dtype of d");
  at::Tensor y = at::empty({M, N}, x.options());
  const bool fast = vectorized && vnni_available();
  if (d.scalar_type() == at::kHalf) q4_rows<at::Half>(x, qs, d, m, a, fast, y);
  else q4_rows<float>(x, qs, d, m, a, fast, y);
  return y;
}

template <typename S, int G>
void q8_rows(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const S* mp, const QuantizedActs& a,
             bool fast, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const int8_t* qp = qs.data_ptr<int8_t>();
  const S* dp = d.data_ptr<S>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
#if defined(STRATA_Q4_VNNI)
    if (fast) {
      int64_t t = 0;
      for (; t + 4 <= M; t += 4) rows_q8_vnni<4, S, G>(qp, dp, mp, a, t, K, N, r0, r1, yp);
      switch (M - t) {
        case 3: rows_q8_vnni<3, S, G>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 2: rows_q8_vnni<2, S, G>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        case 1: rows_q8_vnni<1, S, G>(qp, dp, mp, a, t, K, N, r0, r1, yp); break;
        default: break;
      }
      return;
    }
#endif
    rows_q8_scalar<S>(qp, dp, mp, G, a, M, K, N, r0, r1, yp);
  });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const std::optional<at::Tensor>& col_scale, bool vectorized, const std::optional<at::Tensor>& m) {
  const QuantizedActs& a = quantized_input(x, col_scale, "q8_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.is_contiguous() && qs.size(1) == K, "qs: int8 [N, K]");
  TORCH_CHECK((d.scalar_type() == at::kHalf || d.scalar_type() == at::kFloat) && d.is_contiguous() &&
                  d.dim() == 2 && d.size(0) == N && (d.size(1) == K / kBlock || d.size(1) == K / 16),
              "d: float16 or float32 [N, K/32] or [N, K/16]");
  const int64_t G = K / d.size(1);
  if (m.has_value())
    TORCH_CHECK(G == kBlock && m->scalar_type() == d.scalar_type() && m->is_contiguous() && m->sizes() == d.sizes(),
                "m: [N, K/32], the dtype of d (minima need scales per 32)");
  at::Tensor y = at::empty({M, N}, x.options());
  const bool fast = vectorized && vnni_available();
  if (d.scalar_type() == at::kHalf) {
    const at::Half* mp = m.has_value() ? m->data_ptr<at::Half>() : nullptr;
    if (G == 16) q8_rows<at::Half, 16>(x, qs, d, mp, a, fast, y);
    else q8_rows<at::Half, 32>(x, qs, d, mp, a, fast, y);
  } else {
    const float* mp = m.has_value() ? m->data_ptr<float>() : nullptr;
    if (G == 16) q8_rows<float, 16>(x, qs, d, mp, a, fast, y);
    else q8_rows<float, 32>(x, qs, d, mp, a, fast, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(strata, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? col_scale, bool vectorized=True) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qs, Tensor d, Tensor? col_scale, bool vectorized=True, Tensor? m=None) -> Tensor");
  m.def("q4_vnni_available() -> bool", &vnni_available);
}

TORCH_LIBRARY_IMPL(strata, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
