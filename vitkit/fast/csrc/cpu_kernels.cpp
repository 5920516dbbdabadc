// vitkit's CPU bf16 kernels (vitkit/model/cpu_kernels.py). Inference fast path: attention and LayerNorm.
// bf16 training under autocast: attention with its backward (`attention_forward` / `attention_backward`), the
// residual add of an fp32 stream and a bf16 branch, and a LayerNorm that takes fp32 and writes bf16, with its backward.
//
// Attention: softmax(q kᵀ · scale) v straight from the fused qkv projection's output, on oneDNN's brgemm
// micro-kernels (AMX on Sapphire Rapids and later) through ATen's cpublas.
//
// Why not PyTorch's SDPA: its CPU flash kernel slows down at key counts that are not a multiple of 16 (197 keys:
// 5.2-5.4 ms at ViT-S/16 batch 32, 192 keys: 3.7 ms), splits heads out of the qkv tensor through strided views,
// and returns a log-sum-exp nobody reads. Here the keys are zero-padded to a multiple of 16 inside each thread's
// packed copy (the padded columns get probability 0, so the result is exact), and the output is written straight
// into (B, Q, C). Measured in benchmarks/README.md ("What each lever gave").
//
// Layout: qkv (B, N, 3·C) bf16 contiguous, C = heads · head_dim, head_dim 32 or 64. Work items are (image, head,
// query split); a thread packs an (image, head)'s keys and values once, then for each block of up to 64 queries:
// scores = q kᵀ (fp32, brgemm), p = exp(scale · (scores - rowmax)) (bf16), o = p v (fp32, brgemm),
// out = o / rowsum (bf16).
//
// Built by vitkit/model/cpu_kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp
// (without -fopenmp, at::parallel_for compiles to a serial loop).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace cpublas = at::native::cpublas;

constexpr int64_t kQueryBlock = 64;  // query rows per brgemm call
constexpr int64_t kKeyBlock = 64;    // widest packed B block oneDNN's brgemm takes (16, 32, 48 or 64 columns)
constexpr int64_t kKeyAlign = 16;    // keys are zero-padded to a multiple of this

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 16 fp32 lanes -> 16 bf16 at dst (round to nearest even), and back: a bf16 is the high half of an fp32 word.
inline void store_bf16(BFloat16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}
inline __m512 load_bf16(const BFloat16* src) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Keys of one (image, head) as brgemm's B operand of scores = q kᵀ: kᵀ is [head_dim, keys_padded], stored in blocks
// of up to 64 key columns, each block in VNNI order ([head_dim / 2][width][2]: rows 2i and 2i+1 interleaved).
// The pair (k[n][2i], k[n][2i+1]) is one 32-bit word that moves as a whole, so each block is a 32-bit transpose:
// one gather of 16 keys' word i per instruction. Key columns past `keys` are zero.
void pack_keys(const BFloat16* k, int64_t row_stride, int64_t keys, int64_t keys_padded, int64_t head_dim,
               BFloat16* packed) {
  const int64_t pairs = head_dim / 2;
  const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(row_stride / 2)));
  for (int64_t n0 = 0; n0 < keys_padded; n0 += kKeyBlock) {
    const int64_t width = std::min(kKeyBlock, keys_padded - n0);
    uint32_t* dst = reinterpret_cast<uint32_t*>(packed + n0 * head_dim);  // [pairs][width] words
    for (int64_t c = 0; c < width; c += 16) {
      const int64_t n = n0 + c;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, keys - n));
      const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
      const int* src = reinterpret_cast<const int*>(k + std::min(n, keys - 1) * row_stride);
      for (int64_t i = 0; i < pairs; ++i) {
        _mm512_storeu_si512(dst + i * width + c,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows16, src + i, 4));
      }
    }
  }
}

// Values of one (image, head) as brgemm's B operand of o = p v: [keys_padded, head_dim] in VNNI order (rows n and
// n+1 interleaved element by element, [keys_padded / 2][head_dim][2]); rows past `keys` are zero.
void pack_values(const BFloat16* v, int64_t row_stride, int64_t keys, int64_t keys_padded, int64_t head_dim,
                 BFloat16* packed) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);                     // words 0..15 of rows a, b interleaved
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));  // words 16..31
  for (int64_t n = 0; n < keys_padded; n += 2) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {  // 32 words of each row per step
      const __m512i a = n < keys ? _mm512_loadu_si512(v + n * row_stride + d0) : _mm512_setzero_si512();
      const __m512i b = n + 1 < keys ? _mm512_loadu_si512(v + (n + 1) * row_stride + d0) : _mm512_setzero_si512();
      BFloat16* dst = packed + n * head_dim + 2 * d0;
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// One row of scores (fp32, `keys` long) -> p = exp(scale · (s - max)) as bf16, zeros up to `padded`; returns the
// sum of the fp32 values of p, and the row's max in `row_max`.
float softmax_row(const float* s, int64_t keys, int64_t padded, float scale, BFloat16* p, float& row_max) {
  const int64_t full = keys / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (keys - full)) - 1);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < full; c += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + c));
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + full));
  const float mx = _mm512_reduce_max_ps(vmax);
  row_max = mx;
  const Vec vscale(scale), vshift(-mx * scale);
  Vec vsum(0.f);
  for (int64_t c = 0; c < full; c += 16) {
    const Vec e = at::vec::fmadd(Vec(_mm512_loadu_ps(s + c)), vscale, vshift).exp_u20();
    vsum = vsum + e;
    store_bf16(p + c, e);
  }
  int64_t c = full;
  if (tail) {
    const Vec e0 = at::vec::fmadd(Vec(_mm512_maskz_loadu_ps(tail, s + full)), vscale, vshift).exp_u20();
    const Vec e(_mm512_maskz_mov_ps(tail, e0));  // lanes past `keys` -> 0
    vsum = vsum + e;
    store_bf16(p + c, e);
    c += 16;
  }
  for (; c < padded; c += 16) store_bf16(p + c, _mm512_setzero_ps());
  return _mm512_reduce_add_ps(vsum);
}

// 16 consecutive values as fp32, from bf16 or fp32 (the two LayerNorms' inputs).
inline __m512 load16(const BFloat16* src) { return load_bf16(src); }
inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }

// LayerNorm of `rows` rows of C values (C a multiple of 16) into bf16: each row read three times from L1 (mean,
// variance around the mean, normalise) in fp32; the per-row mean and 1/std are written where mean / rstd are given.
template <typename In>
void normalise_rows(const In* src, int64_t rows, int64_t C, const float* w, const float* b, float eps, BFloat16* dst,
                    float* mean, float* rstd) {
  const float inv_c = 1.f / static_cast<float>(C);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const In* xr = src + r * C;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) acc = _mm512_add_ps(acc, load16(xr + c));
      const float mu = _mm512_reduce_add_ps(acc) * inv_c;
      const __m512 vmu = _mm512_set1_ps(mu);
      acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 d = _mm512_sub_ps(load16(xr + c), vmu);
        acc = _mm512_fmadd_ps(d, d, acc);
      }
      const float rs = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) * inv_c + eps);
      const __m512 vrs = _mm512_set1_ps(rs);
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load16(xr + c), vmu), vrs);
        store_bf16(dst + r * C + c, _mm512_fmadd_ps(xh, _mm512_loadu_ps(w + c), _mm512_loadu_ps(b + c)));
      }
      if (mean) mean[r] = mu;
      if (rstd) rstd[r] = rs;
    }
  });
}

// rows x width scores into an (rows, Np) fp32 buffer: a (row stride lda) times bᵀ, b packed by pack_keys.
void scores_block(const BFloat16* a, int64_t lda, int64_t rows, const BFloat16* b_packed, int64_t Np, int64_t D,
                  float* out) {
  for (int64_t n0 = 0; n0 < Np; n0 += kKeyBlock) {
    const int64_t width = std::min(kKeyBlock, Np - n0);
    cpublas::brgemm(rows, width, D, lda, width, Np, false, a, b_packed + n0 * D, out + n0);
  }
}

// The checks every attention entry point makes of its (B, N, 3·C) qkv; returns head_dim.
int64_t checked_head_dim(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 3 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(),
              "cpu_kernels: qkv must be a contiguous (B, N, 3*C) bf16 CPU tensor");
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, "cpu_kernels: 3*C must split into 3 x heads");
  const int64_t D = qkv.size(2) / 3 / heads;
  TORCH_CHECK(D == 32 || D == 64, "cpu_kernels: head_dim must be 32 or 64, got ", D);
  return D;
}

}  // namespace

// qkv: (B, N, 3·C) bf16; returns (B, Q, C) bf16: attention of the first Q tokens' queries over all N keys.
// lse: nullptr, or room for (B, heads, Q) fp32 log-sum-exps of the scaled scores (what the backward needs).
static at::Tensor attend(const at::Tensor& qkv, int64_t heads, int64_t queries, double scale, float* lse) {
  const int64_t D = checked_head_dim(qkv, heads);
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK(queries >= 1 && queries <= N, "cpu_kernels: queries must be in 1..N");
  const int64_t Np = round_up(N, kKeyAlign), row = 3 * C;
  const int64_t q_blocks = (queries + kQueryBlock - 1) / kQueryBlock;
  // Split an image's queries over threads only when images x heads are too few to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(q_blocks, std::max<int64_t>(1, (4 * threads + B * heads - 1) / (B * heads)));
  const int64_t blocks_per_split = (q_blocks + splits - 1) / splits;
  auto out = at::empty({B, queries, C}, qkv.options());
  const BFloat16* base = qkv.const_data_ptr<BFloat16>();
  BFloat16* out_data = out.data_ptr<BFloat16>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, B * heads * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<BFloat16> k_packed(Np * D), v_packed(Np * D), p(kQueryBlock * Np);
    std::vector<float> scores(kQueryBlock * Np), o(kQueryBlock * D), inv_sum(kQueryBlock);
    int64_t packed_for = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / splits, split = task % splits, b = bh / heads, h = bh % heads;
      const BFloat16* q = base + b * N * row + h * D;  // k at q + C, v at q + 2C; rows `row` apart
      if (packed_for != bh) {  // a thread's consecutive tasks share an (image, head): pack it once
        pack_keys(q + C, row, N, Np, D, k_packed.data());
        pack_values(q + 2 * C, row, N, Np, D, v_packed.data());
        packed_for = bh;
      }
      const int64_t first = split * blocks_per_split * kQueryBlock;
      const int64_t last = std::min(queries, first + blocks_per_split * kQueryBlock);
      for (int64_t m = first; m < last; m += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, last - m);
        scores_block(q + m * row, row, rows, k_packed.data(), Np, D, scores.data());  // (rows, Np) = q kᵀ
        for (int64_t r = 0; r < rows; ++r) {
          float row_max;
          const float sum = softmax_row(scores.data() + r * Np, N, Np, s, p.data() + r * Np, row_max);
          inv_sum[r] = 1.f / sum;
          if (lse) lse[(b * heads + h) * queries + m + r] = s * row_max + std::log(sum);
        }
        cpublas::brgemm(rows, D, Np, Np, D, D, false, p.data(), v_packed.data(), o.data());  // o (rows, D) = p v
        for (int64_t r = 0; r < rows; ++r) {
          BFloat16* dst = out_data + (b * queries + m + r) * C + h * D;
          const __m512 inv = _mm512_set1_ps(inv_sum[r]);
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + d), inv);
            store_bf16(dst + d, x);
          }
        }
      }
    }
    cpublas::brgemm_release();
  });
  return out;
}

at::Tensor attention(const at::Tensor& qkv, int64_t heads, int64_t queries, double scale) {
  return attend(qkv, heads, queries, scale, nullptr);
}

// Training forward: (B, N, C) output for all N queries, and the (B, heads, N) fp32 log-sum-exps for the backward.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv, int64_t heads, double scale) {
  TORCH_CHECK(qkv.dim() == 3, "cpu_kernels: qkv must be (B, N, 3*C)");
  auto lse = at::empty({qkv.size(0), heads, qkv.size(1)}, qkv.options().dtype(at::kFloat));
  auto out = attend(qkv, heads, qkv.size(1), scale, lse.data_ptr<float>());
  return {out, lse};
}

namespace {

// One block of query rows of the backward's elementwise step, in place on fp32 scores s and dp (row stride Np):
//   s <- p = exp(scale · s - lse),  dp <- ds = scale · p · (dp - delta)  (per-row lse and delta; 0 from column
// `valid` on), and ds rounded to bf16 into ds_out. Rows from `rows` to `rows_padded` are zeroed (the transposes read
// whole 16-row tiles).
void softmax_grad_rows(float* s, float* dp, int64_t rows, int64_t rows_padded, int64_t valid, int64_t Np,
                       float scale, const float* lse, const float* delta, BFloat16* ds_out) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows_padded; ++r) {
    const __m512 l = _mm512_set1_ps(r < rows ? lse[r] : 0.f), d = _mm512_set1_ps(r < rows ? delta[r] : 0.f);
    for (int64_t c = 0; c < Np; c += 16) {
      const int64_t n = r < rows ? std::max<int64_t>(0, std::min<int64_t>(16, valid - c)) : 0;
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      __m512 p = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
      if (m) {
        const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + r * Np + c), vscale, l);
        p = _mm512_maskz_mov_ps(m, Vec(x).exp_u20());
        ds = _mm512_mul_ps(_mm512_mul_ps(p, vscale), _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + r * Np + c), d));
      }
      _mm512_storeu_ps(s + r * Np + c, p);
      _mm512_storeu_ps(dp + r * Np + c, ds);
      store_bf16(ds_out + r * Np + c, ds);
    }
  }
}

// Transpose 16 rows of 16 floats in registers (row j of the result = column j of the input): pairs of rows
// interleaved (unpack ps), then pairs of pairs (unpack pd), then the 128-bit lanes put in order (two shuffles).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c, rows 4i..4i+3
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// src: rows_padded (a multiple of 16) x Np fp32, row stride Np -> its transpose in bf16 at dst (row stride ld_dst).
void transpose_to_bf16(const float* src, int64_t rows_padded, int64_t Np, BFloat16* dst, int64_t ld_dst) {
  __m512 r[16];
  for (int64_t r0 = 0; r0 < rows_padded; r0 += 16) {
    for (int64_t c0 = 0; c0 < Np; c0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (r0 + i) * Np + c0);
      transpose16(r);
      for (int j = 0; j < 16; ++j) store_bf16(dst + (c0 + j) * ld_dst + r0, r[j]);
    }
  }
}

// rows x D fp32 (row stride D) -> bf16 rows `stride` apart.
void store_rows(const float* src, int64_t rows, int64_t D, BFloat16* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; d += 16) store_bf16(dst + r * stride + d, _mm512_loadu_ps(src + r * D + d));
}


}  // namespace

// Gradient of `attention_forward` (flash-attention style: the probabilities recomputed from the log-sum-exps, so
// nothing N x N is kept from the forward). dout, out: (B, N, C) bf16; qkv: (B, N, 3·C) bf16; lse: (B, heads, N) fp32.
// Returns dqkv (B, N, 3·C) bf16. One (image, head) per task:
//   per block of 64 queries: s = q kᵀ, dp = dout vᵀ, p = exp(scale · s - lse), ds = scale · p ⊙ (dp - delta),
//   dq = ds k; p and ds are also written transposed (keys x queries, bf16; 16 x 16 register transposes);
//   then per block of 64 keys: dv = pᵀ dout, dk = dsᵀ q,
// where delta = rowsum(dout ⊙ out) per query. A first version recomputed sᵀ = k qᵀ and dpᵀ = v doutᵀ for the key
// pass instead of transposing (two more products and a second exp pass): the same bits, 1.23x slower (ViT-S/16
// batch 32: 13.81 vs 11.23 ms; benchmarks/README.md).
at::Tensor attention_backward(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                              const at::Tensor& lse, int64_t heads, double scale) {
  const int64_t D = checked_head_dim(qkv, heads);
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 3 && t->size(0) == B &&
                    t->size(1) == N && t->size(2) == C,
                "cpu_kernels: dout and out must be contiguous (B, N, C) bf16 tensors");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * heads * N,
              "cpu_kernels: lse must be a contiguous (B, heads, N) fp32 tensor");
  const int64_t Np = round_up(N, kKeyAlign), row = 3 * C;
  auto dqkv = at::empty_like(qkv);
  const BFloat16* base = qkv.const_data_ptr<BFloat16>();
  const BFloat16* dout_base = dout.const_data_ptr<BFloat16>();
  const BFloat16* out_base = out.const_data_ptr<BFloat16>();
  const float* lse_base = lse.const_data_ptr<float>();
  BFloat16* dqkv_base = dqkv.data_ptr<BFloat16>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    // packed operands: kT, vT as bᵀ of a score product (pack_keys); kV, qV, gV as the b of a product over N
    std::vector<BFloat16> kT(Np * D), vT(Np * D), kV(Np * D), qV(Np * D), gV(Np * D);
    std::vector<BFloat16> ds(kQueryBlock * Np), pT(Np * Np), dsT(Np * Np);  // pT, dsT: keys x queries
    std::vector<float> s(kQueryBlock * Np), dp(kQueryBlock * Np), acc(kQueryBlock * D), acc2(kQueryBlock * D);
    std::vector<float> delta(Np, 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const BFloat16* q = base + b * N * row + h * D;  // k at q + C, v at q + 2C; rows `row` apart
      const BFloat16* k = q + C;
      const BFloat16* v = q + 2 * C;
      const BFloat16* g = dout_base + b * N * C + h * D;  // rows C apart
      const BFloat16* o = out_base + b * N * C + h * D;
      const float* l = lse_base + task * N;
      BFloat16* dq = dqkv_base + b * N * row + h * D;
      for (int64_t i = 0; i < N; ++i) {
        __m512 acc_v = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
          acc_v = _mm512_fmadd_ps(load_bf16(g + i * C + d), load_bf16(o + i * C + d), acc_v);
        delta[i] = _mm512_reduce_add_ps(acc_v);
      }
      pack_keys(k, row, N, Np, D, kT.data());
      pack_keys(v, row, N, Np, D, vT.data());
      pack_values(k, row, N, Np, D, kV.data());
      pack_values(q, row, N, Np, D, qV.data());
      pack_values(g, C, N, Np, D, gV.data());
      for (int64_t m = 0; m < N; m += kQueryBlock) {  // query-major: dq, and p, ds transposed
        const int64_t rows = std::min(kQueryBlock, N - m), rows_padded = round_up(rows, 16);
        scores_block(q + m * row, row, rows, kT.data(), Np, D, s.data());
        scores_block(g + m * C, C, rows, vT.data(), Np, D, dp.data());
        softmax_grad_rows(s.data(), dp.data(), rows, rows_padded, N, Np, sc, l + m, delta.data() + m, ds.data());
        cpublas::brgemm(rows, D, Np, Np, D, D, false, ds.data(), kV.data(), acc.data());  // dq = ds k
        store_rows(acc.data(), rows, D, dq + m * row, row);
        transpose_to_bf16(s.data(), rows_padded, Np, pT.data() + m, Np);
        transpose_to_bf16(dp.data(), rows_padded, Np, dsT.data() + m, Np);
      }
      for (int64_t m = 0; m < N; m += kQueryBlock) {  // key-major: dk, dv
        const int64_t rows = std::min(kQueryBlock, N - m);
        cpublas::brgemm(rows, D, Np, Np, D, D, false, pT.data() + m * Np, gV.data(), acc.data());    // dv = pᵀ dout
        cpublas::brgemm(rows, D, Np, Np, D, D, false, dsT.data() + m * Np, qV.data(), acc2.data());  // dk = dsᵀ q
        store_rows(acc2.data(), rows, D, dq + C + m * row, row);
        store_rows(acc.data(), rows, D, dq + 2 * C + m * row, row);
      }
    }
    cpublas::brgemm_release();
  });
  return dqkv;
}

// LayerNorm over the last dimension for the same fast path: x (..., C) bf16 -> bf16, fp32 weight and bias (the
// module's own parameters), C a multiple of 16. Each row is read three times from L1 (mean, variance around the
// mean, normalise), all in fp32. ATen's bf16 LayerNorm runs its AVX2 kernel here and spends ~15 µs more per call at
// batch 1 (benchmarks/README.md).
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && C % 16 == 0,
              "cpu layer_norm: x must be a contiguous bf16 CPU tensor whose last dimension is a multiple of 16");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && weight.numel() == C &&
                  bias.numel() == C && weight.is_contiguous() && bias.is_contiguous(),
              "cpu layer_norm: weight and bias must be contiguous fp32 tensors of C elements");
  const int64_t rows = x.numel() / C;
  auto out = at::empty_like(x);
  const BFloat16* src = x.const_data_ptr<BFloat16>();
  BFloat16* dst = out.data_ptr<BFloat16>();
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  normalise_rows(src, rows, C, w, b, static_cast<float>(eps), dst, nullptr, nullptr);
  return out;
}

// The residual add of bf16 training under autocast: x (fp32, the residual stream) + y (bf16, a block's branch) ->
// fp32, in one pass. PyTorch's mixed-dtype add first writes y converted to fp32 into a temporary, then adds.
at::Tensor residual_add(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "cpu residual_add: x must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kBFloat16 && y.is_contiguous() && y.sizes() == x.sizes(),
              "cpu residual_add: y must be a contiguous bf16 CPU tensor of x's shape");
  auto out = at::empty_like(x);
  const float* a = x.const_data_ptr<float>();
  const BFloat16* b = y.const_data_ptr<BFloat16>();
  float* o = out.data_ptr<float>();
  const int64_t n = x.numel();
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t i = v * 16, left = std::min<int64_t>(16, n - i);
      if (left == 16) {
        _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(a + i), load_bf16(b + i)));
      } else {  // the tail: masked loads and store
        const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + i));
        const __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        _mm512_mask_storeu_ps(o + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + i), bv));
      }
    }
  });
  return out;
}

// LayerNorm for bf16 training under autocast, where its output feeds a linear: x (rows, C) fp32 -> y bf16, with the
// per-row mean and 1/std (fp32) kept for the backward. Autocast runs LayerNorm in fp32 and the linear then casts its
// fp32 output to bf16: one more pass each way (and the cast's gradient back to fp32 in the backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_train(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && C % 16 == 0,
              "cpu layer_norm_train: x must be a contiguous fp32 CPU tensor whose last dimension is a multiple of 16");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && weight.numel() == C &&
                  bias.numel() == C && weight.is_contiguous() && bias.is_contiguous(),
              "cpu layer_norm_train: weight and bias must be contiguous fp32 tensors of C elements");
  const int64_t rows = x.numel() / C;
  auto y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  auto mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
  const float* src = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  BFloat16* dst = y.data_ptr<BFloat16>();
  float* mean_p = mean.data_ptr<float>();
  float* rstd_p = rstd.data_ptr<float>();
  normalise_rows(src, rows, C, w, b, static_cast<float>(eps), dst, mean_p, rstd_p);
  return {y, mean, rstd};
}

// Its gradient: dy (rows, C) bf16, x fp32 and the kept statistics -> dx fp32, dweight, dbias fp32 (C). Per row, with
// x̂ = (x - mean) · rstd and g = dy · weight: dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)). The weight and bias
// gradients (Σ dy · x̂, Σ dy over rows) are summed per thread, then across threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_train_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                          const at::Tensor& mean,
                                                                          const at::Tensor& rstd,
                                                                          const at::Tensor& weight) {
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && C % 16 == 0 && dy.scalar_type() == at::kBFloat16 &&
                  dy.is_contiguous() && dy.sizes() == x.sizes(),
              "cpu layer_norm_train_backward: dy must be contiguous bf16 and x contiguous fp32, of one shape");
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && weight.numel() == C &&
                  weight.scalar_type() == at::kFloat && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "cpu layer_norm_train_backward: mean and rstd need one fp32 value per row, weight C fp32 values");
  auto dx = at::empty_like(x);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  auto partial = at::zeros({threads, 2, C}, x.options());  // per thread: Σ dy · x̂, Σ dy
  const BFloat16* g_p = dy.const_data_ptr<BFloat16>();
  const float* x_p = x.const_data_ptr<float>();
  const float* mean_p = mean.const_data_ptr<float>();
  const float* rstd_p = rstd.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float* dx_p = dx.data_ptr<float>();
  float* part = partial.data_ptr<float>();
  const float inv_c = 1.f / static_cast<float>(C);
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      float* dw = part + t * 2 * C;
      float* db = dw + C;
      for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r) {
        const float* xr = x_p + r * C;
        const BFloat16* gr = g_p + r * C;
        const __m512 mu = _mm512_set1_ps(mean_p[r]), rs = _mm512_set1_ps(rstd_p[r]);
        __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 16) {
          const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + c), mu), rs);
          const __m512 d = load_bf16(gr + c);
          const __m512 g = _mm512_mul_ps(d, _mm512_loadu_ps(w + c));
          sum_g = _mm512_add_ps(sum_g, g);
          sum_gx = _mm512_fmadd_ps(g, xh, sum_gx);
          _mm512_storeu_ps(dw + c, _mm512_fmadd_ps(d, xh, _mm512_loadu_ps(dw + c)));
          _mm512_storeu_ps(db + c, _mm512_add_ps(d, _mm512_loadu_ps(db + c)));
        }
        const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) * inv_c);
        const __m512 bb = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) * inv_c);
        for (int64_t c = 0; c < C; c += 16) {
          const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + c), mu), rs);
          const __m512 g = _mm512_mul_ps(load_bf16(gr + c), _mm512_loadu_ps(w + c));
          const __m512 v = _mm512_sub_ps(_mm512_sub_ps(g, a), _mm512_mul_ps(xh, bb));
          _mm512_storeu_ps(dx_p + r * C + c, _mm512_mul_ps(v, rs));
        }
      }
    }
  });
  auto sums = partial.sum(0);  // (2, C)
  return {dx, sums[0].contiguous(), sums[1].contiguous()};
}

// Test hooks: our packings next to oneDNN's own (`cpublas::pack`), for the layouts brgemm reads.
at::Tensor onednn_pack(const at::Tensor& b) {  // b: (K, N) bf16 contiguous, K even, N in {16, 32, 48, 64}
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kBFloat16 && b.is_contiguous(), "onednn_pack: (K, N) bf16");
  auto out = at::zeros_like(b);
  cpublas::pack(b.size(0), b.size(1), b.size(1), b.size(1), at::kBFloat16, at::kBFloat16, b.const_data_ptr(),
                out.data_ptr());
  return out;
}
at::Tensor packed_keys(const at::Tensor& k, int64_t padded) {  // k: (N, D) bf16 -> kᵀ packed, flat
  TORCH_CHECK(k.dim() == 2 && k.scalar_type() == at::kBFloat16 && k.is_contiguous(), "packed_keys: (N, D) bf16");
  auto out = at::empty({padded * k.size(1)}, k.options());
  pack_keys(k.const_data_ptr<BFloat16>(), k.size(1), k.size(0), padded, k.size(1), out.data_ptr<BFloat16>());
  return out;
}
at::Tensor packed_values(const at::Tensor& v, int64_t padded) {  // v: (N, D) bf16 -> v packed, flat
  TORCH_CHECK(v.dim() == 2 && v.scalar_type() == at::kBFloat16 && v.is_contiguous(), "packed_values: (N, D) bf16");
  auto out = at::empty({padded * v.size(1)}, v.options());
  pack_values(v.const_data_ptr<BFloat16>(), v.size(1), v.size(0), padded, v.size(1), out.data_ptr<BFloat16>());
  return out;
}

bool brgemm_available() { return cpublas::could_pack(at::kBFloat16); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "softmax(q k^T scale) v from a (B, N, 3C) bf16 qkv -> (B, Q, C) bf16");
  m.def("attention_forward", &attention_forward, "training forward: (B, N, C) output and (B, heads, N) fp32 lse");
  m.def("attention_backward", &attention_backward, "dqkv (B, N, 3C) bf16 from dout, qkv, out and lse");
  m.def("residual_add", &residual_add, "fp32 x + bf16 y -> fp32, one pass (bf16 training's residual adds)");
  m.def("layer_norm_train", &layer_norm_train, "LayerNorm fp32 x -> bf16 y, mean, rstd (bf16 training)");
  m.def("layer_norm_train_backward", &layer_norm_train_backward, "dx, dweight, dbias of layer_norm_train");
  m.def("layer_norm", &layer_norm, "LayerNorm over the last dim: bf16 x, fp32 weight / bias -> bf16");
  m.def("brgemm_available", &brgemm_available, "whether oneDNN's bf16 brgemm runs on this CPU");
  m.def("onednn_pack", &onednn_pack, "test hook: oneDNN's VNNI packing of a (K, N) bf16 matrix");
  m.def("packed_keys", &packed_keys, "test hook: the kernel's packing of (N, D) keys");
  m.def("packed_values", &packed_values, "test hook: the kernel's packing of (N, D) values");
}
