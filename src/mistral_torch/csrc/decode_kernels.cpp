// The two CPU (AVX2) kernels of a decode step, as torch ops `mistral_torch_cpu::small_linear` and
// `mistral_torch_cpu::decode_attention` (built and registered by mistral_torch/fast.py), and
// `mistral_torch_cpu::decode_step`: a whole batch-1 step over them in one call (fused.py; at the end).
// `small_linear_int8` multiplies int8 weights (quantize.Int8Linear) in integers, x rounded to int16.
// Where the CPU has AVX512-VNNI the integer kernels (int8 weights, an int8 cache's attention) use
// `vpdpbusd`/`vpdpwssd`, with the AVX2 forms' results bit for bit (`use_vnni(false)`: AVX2 only).
//
// small_linear: y = x @ w.t() for a few rows of x (decode: 1 to 8), reading the weight w once;
// given several weights (q/k/v, gate/up), their outputs side by side from one call.
// Decode is a stream over the weights: each element is used once per row, so the kernel's job is
// to keep up with memory. Every weight row is read as chunks of 16 elements, widened to two fp32
// vectors, and multiplied into per-row fp32 accumulators (several independent ones, so that the
// adds do not wait on each other). bf16 is widened without shuffles: a 32-bit lane holding two
// bf16 values gives the even one by a 16-bit left shift and the odd one by masking its low half,
// so x is laid out even/odd per chunk to match. fp16 uses F16C's vcvtph2ps; fp32 is loaded as is.
// On CPUs with AVX512_BF16 (a function compiled for that target, chosen at run time), bf16 weights
// times bf16 x take `vdpbf16ps` instead (8 rows ~2x faster, one row level: memory-bound), and fp32
// weights times 2-8 rows 512-bit FMAs; 2-8 rows take several weight rows a pass there.
//
// decode_attention: one query per row over the cached keys and values; the query heads that share
// a kv head read its keys and values once, widened the same way; softmax in fp32. An int8 cache
// (one fp32 scale per key or value vector) is read with integer arithmetic: the query rounded to
// int8 for the dot products, the softmax weights (times the value scales) rounded to int16 for the
// weighted sum.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // weight elements per step: two AVX2 vectors of fp32
constexpr int kMaxRows = 8;     // rows of x per pass over the weight

// The 16 elements of a chunk of weight row `p` as two fp32 vectors, in the order `arrange_x` puts x.
template <typename T> struct Widen;
template <> struct Widen<float> {
  static constexpr bool kEvenOdd = false;
  static inline void load(const float* p, __m256& a, __m256& b) {
    a = _mm256_loadu_ps(p);
    b = _mm256_loadu_ps(p + 8);
  }
};
template <> struct Widen<at::Half> {
  static constexpr bool kEvenOdd = false;
  static inline void load(const at::Half* p, __m256& a, __m256& b) {
    a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};
template <> struct Widen<int8_t> {
  static constexpr bool kEvenOdd = false;
  static inline void load(const int8_t* p, __m256& a, __m256& b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  }
};
template <> struct Widen<at::BFloat16> {
  static constexpr bool kEvenOdd = true;
  static inline void load(const at::BFloat16* p, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                              // even
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000))));  // odd
  }
};

// The sums of a, b, c and d's 8 lanes each, as one vector of 4.
inline __m128 sum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d | a b c d] halves
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// `count` rows of y (M rows, ldy apart) from as many weight rows (K apart) and M rows of arranged x.
// Up to 4 rows keep two accumulators per row; more would not fit the 16 vector registers.
// Weights are prefetched into L2, once per cache line, except fp32 weights for one row: 1 KB ahead
// for one bf16 row (the hardware prefetcher alone left it at ~20 GB/s over bench-125m's 49 weight
// groups; +8-10 % with it on Zen 3); fp32 weights for one row stream at ~28 GB/s without it and
// gained nothing. For 2-8 rows, where the FMAs take about as long as the stream, 4 KB ahead: on a
// Zen 4, 8 rows 1.6-1.7x fp32 and 1.04-1.10x bf16 over 1 KB ahead (2 KB: 1.37x / 1.08x; 8 KB and
// 16 KB: no better than 4 KB), 4 rows 1.19x / 1.23x, 2 rows 1.05x / 1.09x; 1 KB ahead had given
// +9-30 % for 4 and 8 fp32 rows over none on Zen 3. All measured side by side in one process.
template <typename T, int M>
void rows_kernel(const float* x, const T* w, float* y, int64_t ldy, int64_t K, int64_t count) {
  constexpr int A = M <= 4 ? 2 : 1;
  constexpr int64_t kPrefetch = M > 1 ? 4096 : sizeof(T) == 2 ? 1024 : 0;  // bytes ahead
  constexpr int64_t kLine = std::max<int64_t>(1, 64 / (kChunk * sizeof(T)));  // chunks per cache line
  for (int64_t n = 0; n < count; ++n) {
    const T* row = w + n * K;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < A; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += kChunk) {
      if (kPrefetch && (k / kChunk) % kLine == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetch, _MM_HINT_T1);
      __m256 a, b;
      Widen<T>::load(row + k, a, b);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        acc[m][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xm), acc[m][0]);
        acc[m][A - 1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xm + 8), acc[m][A - 1]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = sum8(A == 2 ? _mm256_add_ps(acc[m][0], acc[m][A - 1]) : acc[m][0]);
  }
}

// On CPUs with AVX512_BF16 (Zen 4, Sapphire Rapids; checked at run time, the rest of this file
// stays AVX2) rows_kernel_avx512 below takes bf16 weights times bf16 x, and fp32 weights times 2-8
// fp32 rows. For bf16, `vdpbf16ps` multiplies 32 bf16 pairs exactly and adds them into 16 fp32
// lanes, so neither the weights nor x are widened, and x is read in bf16, in natural order. Only
// where x is bf16 already (a bf16 model's activations): the products are then those of the widened
// path. Against the widened path over bench-125m's linears (A/B in one process, Zen 4, 2 threads,
// from memory): 8 rows 1.96x (16.4 -> 8.4 ms a step, 190 GFLOP/s), 4 rows 1.09x, one row 1.02x.
bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

// 16 vectors to one whose lane i holds the sum of v[i]'s lanes: 45 shuffles and adds where 16
// separate reductions take ~130.
__attribute__((target("avx512f")))
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // each 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3] of v[2i], v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // each 128-bit lane: a partial sum of each of 4 vectors, in order
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: lanes 0+1 and 2+3 of one 4, then of the next 4
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// The integer form of sum16: lane i of the result holds the sum of v[i]'s lanes.
__attribute__((target("avx512f")))
inline __m512i sum16_epi32(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// AVX512-VNNI (Zen 4, Ice Lake and later): the int8 weights' and the int8 cache's integer dot products.
bool has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

// The int8 kernels take AVX512-VNNI where the CPU has it, unless `use_vnni(false)` (tests and A/B
// runs: the AVX2 forms give the same results bit for bit).
std::atomic<bool> vnni_allowed{true};
bool vnni() { return has_avx512_vnni() && vnni_allowed.load(std::memory_order_relaxed); }
bool use_vnni(bool on) { return vnni_allowed.exchange(on); }

// 64 bytes of weights (or x) and what one instruction does with them, for rows_kernel_avx512:
// bf16 pairs through `vdpbf16ps`, or fp32 through a 512-bit FMA.
template <typename E> struct Wide;
template <> struct Wide<uint16_t> {
  static constexpr int64_t kStep = 32;  // elements per 64 bytes
  __attribute__((target("avx512f,avx512bw,avx512bf16")))
  static inline __m512i load(const uint16_t* p, int64_t left) {  // K: a multiple of 16
    return _mm512_maskz_loadu_epi16(left >= 32 ? __mmask32(0xFFFFFFFF) : __mmask32(0xFFFF), p);
  }
  __attribute__((target("avx512f,avx512bw,avx512bf16")))
  static inline __m512 dot(__m512 acc, __m512i w, __m512i x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
};
template <> struct Wide<float> {
  static constexpr int64_t kStep = 16;
  __attribute__((target("avx512f,avx512bw,avx512bf16")))
  static inline __m512i load(const float* p, int64_t) { return _mm512_loadu_si512(p); }  // K: a multiple of 16
  __attribute__((target("avx512f,avx512bw,avx512bf16")))
  static inline __m512 dot(__m512 acc, __m512i w, __m512i x) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(x), acc);
  }
};

// RR weight rows (K apart, from `row`) times M rows of x into y's columns (M rows, ldy apart): one
// accumulator per pair of rows, stepping through K 64 bytes at a time, summed by sum16. A row's
// result does not depend on RR (the same products in the same order, sum16 reading each
// accumulator alone), so it is the same whichever group a thread's share puts it in.
template <typename E, int M, int RR>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))
inline void weight_rows(const E* x, const E* row, float* y, int64_t ldy, int64_t K) {
  static_assert(M * RR <= 16, "16 accumulators");
  using V = Wide<E>;
  constexpr int64_t kPrefetch = 12 << 10;  // bytes ahead
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += V::kStep) {
    __m512i wv[RR];
    for (int r = 0; r < RR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k) + kPrefetch, _MM_HINT_T1);
      wv[r] = V::load(row + r * K + k, K - k);
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xv = V::load(x + m * K + k, K - k);
      for (int r = 0; r < RR; ++r) acc[m * RR + r] = V::dot(acc[m * RR + r], wv[r], xv);
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum16(acc));
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RR; ++r) y[m * ldy + r] = sums[m * RR + r];
}

// Rows of x (natural order: bf16 with bf16 weights, fp32 with fp32 ones) times `count` weight rows
// with 512-bit instructions, on CPUs with AVX512_BF16. 2-8 rows of x take 16 / M weight rows at a
// time (weight_rows), each x vector loaded once for all of them (one weight row at a time: a load
// per vdpbf16ps, short of this CPU's ~230 GFLOP/s a core from L1); weights prefetched 12 KB ahead
// of each row (4 KB, tuned for one weight row at a time, lands in the next row of the same block:
// 0.87-0.91x). A/B against one weight row at a time (in one process, Zen 4, 2 threads, bench-125m's
// linears, from memory): bf16 8 rows 1.06-1.16x (1.10-1.13x from L3), 4 rows 1.04-1.08x, 2 rows
// level; fp32 against the AVX2 kernel: 8 rows 1.19-1.29x (FMA-bound there on AVX2's 16 registers;
// now at memory speed, as 2 and 4 rows were), 6 rows 1.06x, 2 and 4 level; from L3 fp32 8 rows
// measured 0.92x, but a decode step streams its weights from memory. One bf16 row of x is bound
// by memory: four accumulators over one weight row at a time, 1 KB ahead.
template <typename E, int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void rows_kernel_avx512(const E* x, const E* w, float* y, int64_t ldy, int64_t K, int64_t count) {
  if constexpr (M > 1) {
    constexpr int R = 16 / M;
    int64_t n = 0;
    for (; n + R <= count; n += R) weight_rows<E, M, R>(x, w + n * K, y + n, ldy, K);
    for (; n < count; ++n) weight_rows<E, M, 1>(x, w + n * K, y + n, ldy, K);
  } else {
    using V = Wide<E>;
    constexpr int64_t step = V::kStep;
    constexpr int A = 4;
    for (int64_t n = 0; n < count; ++n) {
      const E* row = w + n * K;
      __m512 acc[A];
      for (int j = 0; j < A; ++j) acc[j] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + step * A <= K; k += step * A) {
        for (int j = 0; j < A; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(row + k + step * j) + 1024, _MM_HINT_T1);
          acc[j] = V::dot(acc[j], V::load(row + k + step * j, step), V::load(x + k + step * j, step));
        }
      }
      for (; k < K; k += step) acc[0] = V::dot(acc[0], V::load(row + k, K - k), V::load(x + k, K - k));
      y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    }
  }
}

// The weights (each K wide) stacked: weight i gives y's columns [starts[i], starts[i + 1]).
template <typename T>
struct Stack {
  std::vector<const T*> weights;
  std::vector<const float*> scales;  // int8 weights: one fp32 scale per output row
  std::vector<int64_t> starts{0};
  void add(const at::Tensor& w, const at::Tensor* scale = nullptr) {
    weights.push_back(w.const_data_ptr<T>());
    scales.push_back(scale ? scale->const_data_ptr<float>() : nullptr);
    starts.push_back(starts.back() + w.size(0));
  }
};

// ---- int8 weights (`quantize.Int8Linear`: one fp32 scale per output row)
// x is rounded to int16 per row (`quantize_rows16`: max |x| / 32767 a unit, finer than bf16 for
// every element above 1/128 of the row's largest), so that each product is an exact integer:
// int8 weights widened to int16 meet x in `vpdpwssd` (AVX512-VNNI: 32 products into 16 lanes) or
// `vpmaddwd` (AVX2: 16 into 8). Sums stay exact in 32 bits over segments of 4096 elements; then
// y = float(sum) * (x's unit * the row's scale). Decode reads 1 byte a weight: at bench-125m a
// quarter of fp32's stream.
constexpr int64_t kInt8Segment = 4096;  // 4096 / 8 lanes x 2 products x 127 x 32767 < 2^31 (AVX2)

template <typename X>
void quantize_rows16(const X* x, int64_t rows, int64_t K, int16_t* x16, float* unit) {
  for (int64_t m = 0; m < rows; ++m) {
    const X* xm = x + m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(static_cast<float>(xm[k])));
    unit[m] = amax / 32767.0f;
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    for (int64_t k = 0; k < K; ++k) x16[m * K + k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(xm[k]) * inv));
  }
}

// RR int8 weight rows (K apart, from `row`; scales `ws`) times M int16 rows of x (units `xu`) into
// y's columns (M rows, ldy apart): one accumulator per pair of rows, 32 elements a step.
template <int M, int RR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
inline void int8_rows_vnni(const int16_t* x, const float* xu, const int8_t* row, const float* ws, float* y, int64_t ldy,
                           int64_t K) {
  static_assert(M * RR <= 16, "16 accumulators");
  constexpr int64_t kPrefetch = 8 << 10;  // bytes ahead
  float total[M * RR] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kInt8Segment) {
    const int64_t k1 = std::min(K, k0 + kInt8Segment);
    __m512i acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      const __mmask32 lanes = k + 32 <= K ? __mmask32(0xFFFFFFFF) : __mmask32(0xFFFF);  // K: a multiple of 16
      __m512i wv[RR];
      for (int r = 0; r < RR; ++r) {
        if (!(k & 63)) _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k) + kPrefetch, _MM_HINT_T1);
        wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lanes, row + r * K + k));
      }
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(lanes, x + m * K + k);
        for (int r = 0; r < RR; ++r) acc[m * RR + r] = _mm512_dpwssd_epi32(acc[m * RR + r], wv[r], xv);
      }
    }
    alignas(64) int32_t sums[16];
    _mm512_store_si512(sums, sum16_epi32(acc));
    for (int i = 0; i < M * RR; ++i) total[i] += static_cast<float>(sums[i]);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RR; ++r) y[m * ldy + r] = total[m * RR + r] * (xu[m] * ws[r]);
}

// int8_rows_vnni with AVX2: 16 elements a step, up to 8 accumulators.
template <int M, int RR>
inline void int8_rows_avx2(const int16_t* x, const float* xu, const int8_t* row, const float* ws, float* y, int64_t ldy,
                           int64_t K) {
  static_assert(M * RR <= 8, "8 accumulators");
  constexpr int64_t kPrefetch = 8 << 10;
  float total[M * RR] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kInt8Segment) {
    const int64_t k1 = std::min(K, k0 + kInt8Segment);
    __m256i acc[M * RR];
    for (int i = 0; i < M * RR; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      for (int r = 0; r < RR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k) + kPrefetch, _MM_HINT_T1);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + r * K + k)));
        for (int m = 0; m < M; ++m)
          acc[m * RR + r] = _mm256_add_epi32(acc[m * RR + r], _mm256_madd_epi16(
              wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k))));
      }
    }
    for (int i = 0; i < M * RR; ++i) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i]);
      int32_t sum = 0;
      for (int j = 0; j < 8; ++j) sum += lanes[j];
      total[i] += static_cast<float>(sum);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RR; ++r) y[m * ldy + r] = total[m * RR + r] * (xu[m] * ws[r]);
}


// `count` int8 weight rows times M rows of x (int16, units xu), two rows at a time: more rows a pass
// (more accumulators) spill their row pointers and fall behind the stream (bench-125m, fp32 model
// with int8 weights, batch 1, Zen 4: 16 rows ~170 tok/s, 8 ~220, 4 ~255, 2 ~290).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void int8_kernel_vnni(const int16_t* x, const float* xu, const int8_t* w, const float* ws, float* y, int64_t ldy,
                      int64_t K, int64_t count) {
  constexpr int RR = 2;
  int64_t n = 0;
  for (; n + RR <= count; n += RR) int8_rows_vnni<M, RR>(x, xu, w + n * K, ws + n, y + n, ldy, K);
  for (; n < count; ++n) int8_rows_vnni<M, 1>(x, xu, w + n * K, ws + n, y + n, ldy, K);
}

template <int M>
void int8_kernel(const int16_t* x, const float* xu, const int8_t* w, const float* ws, float* y, int64_t ldy, int64_t K,
                 int64_t count) {
  if (vnni()) return int8_kernel_vnni<M>(x, xu, w, ws, y, ldy, K, count);
  constexpr int RR = M <= 4 ? 2 : 1;
  int64_t n = 0;
  for (; n + RR <= count; n += RR) int8_rows_avx2<M, RR>(x, xu, w + n * K, ws + n, y + n, ldy, K);
  for (; n < count; ++n) int8_rows_avx2<M, 1>(x, xu, w + n * K, ws + n, y + n, ldy, K);
}

// x: arranged fp32 (rows_kernel; natural order for fp32 weights, as rows_kernel_avx512 reads it), or
// bf16 bits in natural order (rows_kernel_avx512: bf16 weights).
// int8 weights: x is int16 (quantize_rows16) with its units `xu`.
template <typename T, int M, typename X>
void pass(const X* x, const Stack<T>& stack, float* y, int64_t ldy, int64_t K, const float* xu) {
  const auto rows = [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < stack.weights.size(); ++i) {
      const int64_t lo = std::max(n0, stack.starts[i]), hi = std::min(n1, stack.starts[i + 1]);
      if (lo >= hi) continue;
      const T* w = stack.weights[i] + (lo - stack.starts[i]) * K;
      if constexpr (std::is_same_v<T, int8_t>)
        int8_kernel<M>(x, xu, w, stack.scales[i] + (lo - stack.starts[i]), y + lo, ldy, K, hi - lo);
      else if constexpr (std::is_same_v<X, uint16_t>)
        rows_kernel_avx512<uint16_t, M>(x, reinterpret_cast<const uint16_t*>(w), y + lo, ldy, K, hi - lo);
      else if constexpr (std::is_same_v<T, float> && M > 1)  // fp32 x and weights
        has_avx512_bf16() ? rows_kernel_avx512<float, M>(x, w, y + lo, ldy, K, hi - lo)
                          : rows_kernel<T, M>(x, w, y + lo, ldy, K, hi - lo);
      else
        rows_kernel<T, M>(x, w, y + lo, ldy, K, hi - lo);
    }
  };
  const int64_t N = stack.starts.back();
  if constexpr (sizeof(T) <= 2) {
    // 16-bit (and int8) weights: each thread streams its own share in blocks of 64 KB, then takes blocks left
    // in the others' shares, so that no thread waits at the end for a slower one: +8-11 % for a
    // bf16 step (A/B in one process); fp32 weights measured level, and keep the plain split.
    constexpr int kMaxThreads = 64;
    const int64_t block = std::max<int64_t>(1, (int64_t(64) << 10) / (K * int64_t(sizeof(T))));
    const int threads = int(std::min<int64_t>({at::get_num_threads(), (N + block - 1) / block, kMaxThreads}));
    if (threads > 1) {
      struct alignas(64) Next { std::atomic<int64_t> row; };  // one cache line each
      Next next[kMaxThreads];
      const int64_t share = (N + threads - 1) / threads;
      for (int t = 0; t < threads; ++t) next[t].row.store(t * share, std::memory_order_relaxed);
      at::parallel_for(0, threads, 1, [&](int64_t own, int64_t) {
        for (int64_t u = 0; u < threads; ++u) {
          const int64_t t = (own + u) % threads, end = std::min(N, (t + 1) * share);
          for (int64_t n = next[t].row.fetch_add(block, std::memory_order_relaxed); n < end;
               n = next[t].row.fetch_add(block, std::memory_order_relaxed))
            rows(n, std::min(end, n + block));
        }
      });
      return;
    }
  }
  // fp32 (or one thread): one share of the rows per thread, of at least 2^15 weights.
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 15) / K), rows);
}

template <typename T, typename X>
void run(const X* x, const Stack<T>& stack, float* y, int64_t rows, int64_t K, const float* xu = nullptr) {
  const int64_t N = stack.starts.back();
  for (int64_t r = 0; r < rows; r += kMaxRows) {
    const X* xr = x + r * K;
    const float* ur = xu ? xu + r : nullptr;
    float* yr = y + r * N;
    switch (std::min<int64_t>(kMaxRows, rows - r)) {
      case 1: pass<T, 1, X>(xr, stack, yr, N, K, ur); break;
      case 2: pass<T, 2, X>(xr, stack, yr, N, K, ur); break;
      case 3: pass<T, 3, X>(xr, stack, yr, N, K, ur); break;
      case 4: pass<T, 4, X>(xr, stack, yr, N, K, ur); break;
      case 5: pass<T, 5, X>(xr, stack, yr, N, K, ur); break;
      case 6: pass<T, 6, X>(xr, stack, yr, N, K, ur); break;
      case 7: pass<T, 7, X>(xr, stack, yr, N, K, ur); break;
      default: pass<T, 8, X>(xr, stack, yr, N, K, ur); break;
    }
  }
}

// y = rows of x (K each, any float dtype) through stacked int8 weights with their scales, in fp32.
template <typename X>
void multiply_int8(const X* x, const Stack<int8_t>& stack, float* y, int64_t rows, int64_t K, int16_t* x16, float* xu) {
  quantize_rows16(x, rows, K, x16, xu);
  run(x16, stack, y, rows, K, xu);
}

// Row-major (rows, K) x of any float dtype to fp32, each chunk of 16 in the order Widen<T> gives the
// weight's elements (even/odd for bf16). A plain loop: at decode sizes ATen ops cost more than it.
// Where element j of an arranged 16-chunk sits in natural order (even/odd: 0,2,..,14,1,3,..,15).
inline int natural(int j, bool even_odd) { return even_odd ? (j % 8) * 2 + j / 8 : j; }

template <typename X>
void arrange_x(const X* x, float* out, int64_t rows, int64_t K, bool even_odd) {
  for (int64_t i = 0; i < rows * K; i += kChunk)
    for (int j = 0; j < kChunk; ++j)
      out[i + j] = static_cast<float>(x[i + natural(j, even_odd)]);
}

// y = rows of x (K each, any float dtype) through the stacked weights, in fp32. bf16 x with bf16
// weights goes to rows_kernel_avx512 where the CPU has AVX512_BF16; otherwise x is arranged into
// `arranged` (rows * K floats) for rows_kernel.
template <typename T, typename X>
void multiply(const X* x, const Stack<T>& stack, float* y, int64_t rows, int64_t K, float* arranged) {
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<X, at::BFloat16>) {
    if (has_avx512_bf16()) return run(reinterpret_cast<const uint16_t*>(x), stack, y, rows, K);
  }
  arrange_x(x, arranged, rows, K, Widen<T>::kEvenOdd);
  run(arranged, stack, y, rows, K);
}

// A calling thread's scratch of at least n elements, kept between calls: a decode step calls the
// kernels ~60 times, and a tensor allocated per call costs about a microsecond.
template <typename E>
E* scratch(std::vector<E>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// fn(x's data, y) computes y in fp32 (out's size) for x of any float dtype; y lands in `out`, which
// has x's dtype: in place for fp32, else rounded from scratch, as F.linear's output is.
template <typename F>
void into_x_dtype(const at::Tensor& x, at::Tensor& out, F fn) {
  static thread_local std::vector<float> y_buffer;
  const int64_t n = out.numel();
  const bool fp32_out = out.scalar_type() == at::kFloat;
  float* yp = fp32_out ? out.mutable_data_ptr<float>() : scratch(y_buffer, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "small_linear", [&] {
    fn(x.const_data_ptr<scalar_t>(), yp);
    if (!fp32_out) {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) op[i] = static_cast<scalar_t>(yp[i]);
    }
  });
}

template <typename T>
void small_linear_typed(const at::Tensor& x, at::TensorList ws, at::Tensor& out, int64_t rows, int64_t K) {
  Stack<T> stack;
  for (const at::Tensor& w : ws) stack.add(w);
  static thread_local std::vector<float> x_buffer;
  float* xp = scratch(x_buffer, rows * K);
  into_x_dtype(x, out, [&](const auto* xd, float* y) { multiply(xd, stack, y, rows, K, xp); });
}

// x @ cat(ws).t(): the weights (same dtype, same K) side by side, as one linear (q/k/v, gate/up).
at::Tensor small_linear(const at::Tensor& x_in, at::TensorList ws) {
  TORCH_CHECK(!ws.empty(), "small_linear: no weights");
  const int64_t K = ws[0].size(-1);
  int64_t N = 0;
  for (const at::Tensor& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "small_linear: weights must be contiguous (N, K) matrices");
    TORCH_CHECK(w.size(1) == K, "small_linear: weights of ", K, " and ", w.size(1), " features cannot be stacked");
    TORCH_CHECK(w.scalar_type() == ws[0].scalar_type(), "small_linear: weights of dtypes ", ws[0].scalar_type(), " and ",
                w.scalar_type(), " cannot be stacked");
    TORCH_CHECK(w.device().is_cpu(), "small_linear: CPU tensors only");
    N += w.size(0);
  }
  TORCH_CHECK(x_in.size(-1) == K, "small_linear: x has ", x_in.size(-1), " features, the weight ", K);
  TORCH_CHECK(K % kChunk == 0, "small_linear: in_features must be a multiple of ", kChunk, ", got ", K);
  TORCH_CHECK(x_in.device().is_cpu(), "small_linear: CPU tensors only");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.numel() / K;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  switch (ws[0].scalar_type()) {
    case at::kFloat: small_linear_typed<float>(x, ws, out, rows, K); break;
    case at::kBFloat16: small_linear_typed<at::BFloat16>(x, ws, out, rows, K); break;
    case at::kHalf: small_linear_typed<at::Half>(x, ws, out, rows, K); break;
    default: TORCH_CHECK(false, "small_linear: weight dtype must be float32, bfloat16 or float16, got ", ws[0].scalar_type());
  }
  return out;
}

// x @ (cat(ws) * cat(scales)[:, None]).t() for int8 weights with one fp32 scale per output row (x's
// dtype out), x rounded to int16 per row (see quantize_rows16).
at::Tensor small_linear_int8(const at::Tensor& x_in, at::TensorList ws, at::TensorList scales) {
  TORCH_CHECK(!ws.empty() && ws.size() == scales.size(), "small_linear_int8: one scale vector per weight");
  const int64_t K = ws[0].size(-1);
  Stack<int8_t> stack;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor &w = ws[i], &sc = scales[i];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar && w.device().is_cpu() && w.size(1) == K,
                "small_linear_int8: weights must be contiguous int8 (N, K) CPU matrices of one K");
    TORCH_CHECK(sc.dim() == 1 && sc.is_contiguous() && sc.scalar_type() == at::kFloat && sc.size(0) == w.size(0),
                "small_linear_int8: scales must be contiguous float32 (N,)");
    stack.add(w, &sc);
  }
  TORCH_CHECK(x_in.size(-1) == K && K % kChunk == 0 && x_in.device().is_cpu(),
              "small_linear_int8: x must have the weights' ", K, " features (a multiple of ", kChunk, ")");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.numel() / K;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = stack.starts.back();
  at::Tensor out = at::empty(out_shape, x.options());
  static thread_local std::vector<int16_t> x_buffer;
  static thread_local std::vector<float> u_buffer;
  int16_t* x16 = scratch(x_buffer, rows * K);
  float* xu = scratch(u_buffer, rows);
  into_x_dtype(x, out, [&](const auto* xd, float* y) { multiply_int8(xd, stack, y, rows, K, x16, xu); });
  return out;
}

// ---------------------------------------------------------------- decode attention
// exp(x) for 8 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (Cephes' polynomial, ~1 ulp);
// 0 below -87 (masked scores are -inf).
inline __m256 exp8(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

// The lane sums of N vectors into out[0..N), four at a time.
template <int N>
inline void sum8_all(const __m256* v, float* out) {
  int i = 0;
  for (; i + 4 <= N; i += 4) _mm_storeu_ps(out + i, sum8x4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  if (i < N) {
    const __m256 z = _mm256_setzero_ps();
    float rest[4];
    _mm_storeu_ps(rest, sum8x4(v[i], i + 1 < N ? v[i + 1] : z, i + 2 < N ? v[i + 2] : z, z));
    for (int j = 0; i + j < N; ++j) out[i + j] = rest[j];
  }
}

// The G x KS dot products of G queries with KS keys from `s` on, as vectors to be summed across
// lanes (query-major), stored as scores: dot * kscale[s + j] + bias (a null scale is 1), each query's
// running maximum raised to them.
template <typename Q, int G, int KS>
inline void store_scores(const __m256* dots, const float* kscale, int64_t s, int64_t S,
                         const Q* bias, int64_t bias_step, float* scores, float* mx) {
  float sums[G * KS];
  sum8_all<G * KS>(dots, sums);
  for (int j = 0; j < KS; ++j) {
    const float add = static_cast<float>(bias[(s + j) * bias_step]), key = kscale ? kscale[s + j] : 1.0f;
    for (int g = 0; g < G; ++g)
      mx[g] = std::max(mx[g], scores[g * S + s + j] = sums[g * KS + j] * key + add);
  }
}

// The raw dot products of KS keys of an int8 cache (from `s` on) with G queries rounded to int8 (`q8`),
// into `scores` (G rows of S): 32 elements a step, |k| times q with k's sign, pairs summed to 16 bits
// (at most 2 x 128 x 127, no saturation), then to 32 bits. `finish_scores` applies the scales and bias.
template <int G, int KS>
inline void dots_int8(const int8_t* q8, const int8_t* k, int64_t ldk, int64_t s, int64_t S, int64_t D, float* scores) {
  __m256i acc[G * KS];  // query-major
  for (int i = 0; i < G * KS; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t d = 0; d < D; d += 32) {
    for (int j = 0; j < KS; ++j) {
      const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + (s + j) * ldk + d));
      const __m256i ak = _mm256_abs_epi8(kv);
      for (int g = 0; g < G; ++g) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + g * D + d));
        const __m256i p16 = _mm256_maddubs_epi16(ak, _mm256_sign_epi8(qv, kv));
        acc[g * KS + j] = _mm256_add_epi32(acc[g * KS + j], _mm256_madd_epi16(p16, ones));
      }
    }
  }
  __m256 dots[G * KS];
  for (int i = 0; i < G * KS; ++i) dots[i] = _mm256_cvtepi32_ps(acc[i]);
  float sums[G * KS];
  sum8_all<G * KS>(dots, sums);
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < KS; ++j) scores[g * S + s + j] = sums[g * KS + j];
}

// 8 values of type Q as fp32.
template <typename Q> inline __m256 load8(const Q* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <> inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Raw dot products (G rows of S) to scores: dot * qscale[g] * kscale[s] + bias[s]; each query's maximum to mx.
template <typename Q, int G>
void finish_scores(const float* qscale, const float* kscale, const Q* bias, int64_t bias_step, int64_t S, float* scores,
                   float* mx) {
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * S;
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    if (bias_step == 1)
      for (; s + 8 <= S; s += 8) {
        const __m256 x = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(row + s), _mm256_loadu_ps(kscale + s)),
                                         _mm256_set1_ps(qscale[g]), load8<Q>(bias + s));
        _mm256_storeu_ps(row + s, x);
        m8 = _mm256_max_ps(m8, x);
      }
    float m = hmax8(m8);
    for (; s < S; ++s) m = std::max(m, row[s] = row[s] * kscale[s] * qscale[g] + static_cast<float>(bias[s * bias_step]));
    mx[g] = m;
  }
}

// Scores of KS keys from `s` on for the G queries (see `store_scores`). The G x KS dot products
// accumulate side by side in registers (independent chains keep both FMA units busy) and are
// summed across lanes together.
template <typename T, typename Q, int G, int KS>
inline void score_keys(const float* q, const T* k, int64_t ldk, int64_t s, int64_t S, int64_t D, const Q* bias,
                       int64_t bias_step, const float* kscale, float* scores, float* mx) {
  __m256 acc[G * KS];  // query-major
  for (int i = 0; i < G * KS; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += kChunk) {
    for (int j = 0; j < KS; ++j) {
      __m256 a, b;
      Widen<T>::load(k + (s + j) * ldk + d, a, b);
      for (int g = 0; g < G; ++g) {
        acc[g * KS + j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(q + g * D + d), acc[g * KS + j]);
        acc[g * KS + j] = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + g * D + d + 8), acc[g * KS + j]);
      }
    }
  }
  store_scores<Q, G, KS>(acc, kscale, s, S, bias, bias_step, scores, mx);
}

// The weighted sum of S values (rows `ldv` apart) for G queries with weights `w` (G x S) into `out`
// (G x D): one pass over the values, in blocks of keys whose values stay in L1 while each chunk of
// head_dim accumulates in registers.
template <typename T, int G>
void weighted_sum(const float* w, const T* v, int64_t ldv, int64_t S, int64_t D, float* out) {
  constexpr int64_t kKeys = 64;
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
  for (int64_t s0 = 0; s0 < S; s0 += kKeys) {
    const int64_t s1 = std::min(S, s0 + kKeys);
    for (int64_t d = 0; d < D; d += kChunk) {
      __m256 acc[G][2];
      for (int g = 0; g < G; ++g) {
        acc[g][0] = _mm256_loadu_ps(out + g * D + d);
        acc[g][1] = _mm256_loadu_ps(out + g * D + d + 8);
      }
      for (int64_t s = s0; s < s1; ++s) {
        // this chunk of the next block's row into L1 (the last row again at the end): +3-12 %, A/B
        _mm_prefetch(reinterpret_cast<const char*>(v + std::min(s + kKeys, S - 1) * ldv + d), _MM_HINT_T0);
        __m256 a, b;
        Widen<T>::load(v + s * ldv + d, a, b);
        for (int g = 0; g < G; ++g) {
          const __m256 p = _mm256_broadcast_ss(w + g * S + s);
          acc[g][0] = _mm256_fmadd_ps(p, a, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(p, b, acc[g][1]);
        }
      }
      for (int g = 0; g < G; ++g) {
        _mm256_storeu_ps(out + g * D + d, acc[g][0]);
        _mm256_storeu_ps(out + g * D + d + 8, acc[g][1]);
      }
    }
  }
}

// The softmax weights of G queries (`w`, G x S, value scales included; `wmax`: each query's largest)
// rounded to 16-bit integers in units of wmax / 32767 (`unit`), into `w16` (G rows of S2 = S rounded
// up to whole pairs, the pad 0).
template <int G>
void round_weights(const float* w, const float* wmax, int64_t S, int16_t* w16, float* unit) {
  const int64_t S2 = (S + 1) & ~int64_t(1);
  for (int g = 0; g < G; ++g) {
    const float* row = w + g * S;
    unit[g] = wmax[g] / 32767.0f;
    const float inv = wmax[g] > 0.0f ? 32767.0f / wmax[g] : 0.0f;
    int64_t s = 0;
    int16_t* dst = w16 + g * S2;
    for (; s + 16 <= S; s += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + s), _mm256_set1_ps(inv)));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + s + 8), _mm256_set1_ps(inv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));  // packs works per 128-bit lane
    }
    for (; s < S; ++s) dst[s] = static_cast<int16_t>(std::nearbyint(row[s] * inv));
    if (S2 > S) dst[S] = 0;
  }
}

// The weighted sum of an int8 cache's S values for G queries with the weights `round_weights` made
// (`w16`, `unit`). Two keys a step: their values interleaved and widened to 16 bits meet the
// pair of weights in one `vpmaddwd` (8 sums of two products), accumulated in 32 bits: fewer
// instructions and no chains of dependent FMAs, 1.5x faster than fp32 FMAs over widened values
// (measured on L1-resident data). A block of 128 keys cannot overflow (64 pairs x 2 x 32767 x 127 <
// 2^31); each block's sums are added to `out` in fp32.
template <int G>
void weighted_sum_int8(const int16_t* w16, const float* unit, const int8_t* v, int64_t ldv, int64_t S, int64_t D,
                       float* out) {
  const int64_t S2 = (S + 1) & ~int64_t(1);
  constexpr int64_t kKeys = 128;
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
  for (int64_t s0 = 0; s0 < S; s0 += kKeys) {
    const int64_t s1 = std::min(S, s0 + kKeys);
    for (int64_t d = 0; d < D; d += kChunk) {
      __m256i acc[G][2];
      for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_si256();
      const auto two_keys = [&](int64_t s) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + s * ldv + d));
        const __m128i b = s + 1 < s1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + (s + 1) * ldv + d))
                                     : _mm_setzero_si128();
        const __m256i x0 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));  // (a, b) pairs of elements 0-7
        const __m256i x1 = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));  // 8-15
        for (int g = 0; g < G; ++g) {
          int32_t pair;
          std::memcpy(&pair, w16 + g * S2 + s, sizeof pair);
          const __m256i p = _mm256_set1_epi32(pair);
          acc[g][0] = _mm256_add_epi32(acc[g][0], _mm256_madd_epi16(x0, p));
          acc[g][1] = _mm256_add_epi32(acc[g][1], _mm256_madd_epi16(x1, p));
        }
      };
      // The first two passes fetch the next block into L1, a row per step, half the block each:
      // +6-9 % over leaving it to the hardware prefetcher (A/B in one process, caches from memory).
      const int64_t first = s1 + (d / kChunk) * (kKeys / 2);
      const int64_t ahead = d < 2 * kChunk ? std::clamp<int64_t>(S - first, 0, kKeys / 2) : 0;
      int64_t s = s0;
      for (; s < s1 && (s - s0) / 2 < ahead; s += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(v + (first + (s - s0) / 2) * ldv), _MM_HINT_T0);
        two_keys(s);
      }
      for (; s < s1; s += 2) two_keys(s);
      for (int g = 0; g < G; ++g) {
        const __m256 u = _mm256_set1_ps(unit[g]);
        float* o = out + g * D + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[g][0]), u, _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[g][1]), u, _mm256_loadu_ps(o + 8)));
      }
    }
  }
}


// ---- the int8 cache's attention with AVX512-VNNI (`vnni()`)
// The AVX2 kernels above are bound by instruction count, not memory: over 4096 keys they run as fast
// from L3 as from memory (~16 GB/s of cache read). `vpdpbusd` multiplies 64 bytes by 64 bytes and
// adds each four products into a 32-bit lane; `vpdpwssd` does the same for 32 int16 pairs. Both
// sums are exact, as the AVX2 ones are, so both paths give the same scores and the same weighted
// sums bit for bit (test_int8_decode_attention_vnni_equals_avx2).
// The dot products of KB keys (from `s` on) with G int8 queries, as fp32 into `scores` (G rows of S).
// `vpdpbusd` takes unsigned bytes times signed ones: the keys' sign bit flipped gives k + 128, so
// each sum is q.k + 128 sum(q), and `bias128` (128 sum(q) in lanes g KB .. g KB + KB - 1) comes off.
// G x KB <= 16 accumulators (query-major), summed across lanes together by one sum16_epi32; then
// each query's KB lanes are moved to the front (`front[g]`) and stored with one masked store (a
// scalar store per sum cost more than the dot products).
template <int G, int KB>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
inline void dots_vnni(const int8_t* q8, __m512i bias128, const __m512i* front, const int8_t* k, int64_t ldk, int64_t s,
                      int64_t S, int64_t D, float* scores) {
  static_assert(G * KB <= 16, "16 accumulators");
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t d = 0; d < D; d += 64)
    for (int j = 0; j < KB; ++j) {
      const __m512i kv = _mm512_xor_si512(_mm512_loadu_si512(k + (s + j) * ldk + d), flip);
      for (int g = 0; g < G; ++g)
        acc[g * KB + j] = _mm512_dpbusd_epi32(acc[g * KB + j], kv, _mm512_loadu_si512(q8 + g * D + d));
    }
  const __m512 dots = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum16_epi32(acc), bias128));
  constexpr __mmask16 mask = (1u << KB) - 1;
  for (int g = 0; g < G; ++g)
    _mm512_mask_storeu_ps(scores + g * S + s, mask, g == 0 ? dots : _mm512_permutexvar_ps(front[g], dots));
}

// dots_vnni's constants for KB keys a call: 128 sum(q) per lane, and each query's lanes to the front.
template <int G, int KB>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
inline void dots_vnni_constants(const int32_t* sums, __m512i& bias128, __m512i* front) {
  alignas(64) int32_t bias[16] = {};
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < KB; ++j) bias[g * KB + j] = 128 * sums[g];
  bias128 = _mm512_load_si512(bias);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < G; ++g)
    front[g] = _mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(g * KB)), _mm512_set1_epi32(15));
}

// Every key's raw dot products (D a multiple of 64) as fp32 scores, G rows of S: the values
// dots_int8 stores.
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void scores_vnni(const int8_t* q8, const int8_t* k, int64_t ldk, int64_t S, int64_t D, float* scores) {
  constexpr int KB = 16 / G;
  int32_t sums[G];
  for (int g = 0; g < G; ++g) {
    sums[g] = 0;
    for (int64_t d = 0; d < D; ++d) sums[g] += q8[g * D + d];
  }
  __m512i bias, bias1, front[G], front1[G];
  dots_vnni_constants<G, KB>(sums, bias, front);
  dots_vnni_constants<G, 1>(sums, bias1, front1);
  int64_t s = 0;
  for (; s + KB <= S; s += KB) dots_vnni<G, KB>(q8, bias, front, k, ldk, s, S, D, scores);
  for (; s < S; ++s) dots_vnni<G, 1>(q8, bias1, front1, k, ldk, s, S, D, scores);
}

// weighted_sum_int8's sums (the same int16 weights `w16`, G rows of S2, in units `unit`; the same
// blocks of 128 keys, each added to `out` in fp32) with `vpdpwssd`: two keys' values widened to
// 16 bits and interleaved, (v_s, v_s+1) per 32-bit lane, times the pair of weights (w_s, w_s+1).
// pair_vnni: one pair (the second key zero where `two` is false) into the accumulators of C x 32
// elements of head_dim from `d`; the pair of weights is broadcast once for all of them.
template <int G, int C>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
inline void pair_vnni(const int16_t* w16, int64_t S2, const int8_t* v, int64_t ldv, int64_t s, int64_t d, bool two,
                      __m512i (&lo)[2][G], __m512i (&hi)[2][G]) {
  __m512i x0[C], x1[C];
  for (int c = 0; c < C; ++c) {
    const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + s * ldv + d + 32 * c)));
    const __m512i b = two ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                reinterpret_cast<const __m256i*>(v + (s + 1) * ldv + d + 32 * c)))
                          : _mm512_setzero_si512();
    x0[c] = _mm512_unpacklo_epi16(a, b);
    x1[c] = _mm512_unpackhi_epi16(a, b);
  }
  for (int g = 0; g < G; ++g) {
    int32_t pair;
    std::memcpy(&pair, w16 + g * S2 + s, sizeof pair);
    const __m512i p = _mm512_set1_epi32(pair);
    for (int c = 0; c < C; ++c) {
      lo[c][g] = _mm512_dpwssd_epi32(lo[c][g], x0[c], p);
      hi[c][g] = _mm512_dpwssd_epi32(hi[c][g], x1[c], p);
    }
  }
}

// The keys [s0, s1) of one block over C x 32 elements from `d`; the pass over the first elements
// fetches the rows 128 keys on (the next block) into L1.
template <int G, int C>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
inline void block_vnni(const int16_t* w16, int64_t S2, const int8_t* v, int64_t ldv, int64_t s0, int64_t s1, int64_t S,
                       int64_t d, int64_t D, __m512i (&lo)[2][G], __m512i (&hi)[2][G]) {
  constexpr int64_t kKeys = 128;
  for (int c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) lo[c][g] = hi[c][g] = _mm512_setzero_si512();
  int64_t s = s0;
  const int64_t ahead = d == 0 ? std::min(s1, S - kKeys - 1) : s0;  // pairs whose rows 128 keys on exist
  for (; s + 2 <= s1 && s < ahead; s += 2) {
    for (int64_t line = 0; line < D; line += 64)
      for (int j = 0; j < 2; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(v + (s + j + kKeys) * ldv + line), _MM_HINT_T0);
    pair_vnni<G, C>(w16, S2, v, ldv, s, d, true, lo, hi);
  }
  for (; s + 2 <= s1; s += 2) pair_vnni<G, C>(w16, S2, v, ldv, s, d, true, lo, hi);
  if (s < s1) pair_vnni<G, C>(w16, S2, v, ldv, s, d, false, lo, hi);
}

// Over the keys once per 64 elements of head_dim (D a multiple of 32).
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void weighted_sum_vnni(const int16_t* w16, const float* unit, const int8_t* v, int64_t ldv, int64_t S, int64_t D,
                       float* out) {
  const int64_t S2 = (S + 1) & ~int64_t(1);
  constexpr int64_t kKeys = 128;
  // lanes back to head_dim order: per 128-bit lane L, `lo` holds dims 8L..8L+3 and `hi` 8L+4..8L+7
  const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i last16 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
  for (int64_t s0 = 0; s0 < S; s0 += kKeys) {
    const int64_t s1 = std::min(S, s0 + kKeys);
    for (int64_t d = 0; d < D; d += 64) {
      __m512i lo[2][G], hi[2][G];
      const int C = D - d >= 64 ? 2 : 1;
      if (C == 2)
        block_vnni<G, 2>(w16, S2, v, ldv, s0, s1, S, d, D, lo, hi);
      else
        block_vnni<G, 1>(w16, S2, v, ldv, s0, s1, S, d, D, lo, hi);
      for (int c = 0; c < C; ++c)
        for (int g = 0; g < G; ++g) {
          const __m512 u = _mm512_set1_ps(unit[g]);
          float* o = out + g * D + d + 32 * c;
          const __m512 y0 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo[c][g], first16, hi[c][g]));
          const __m512 y1 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo[c][g], last16, hi[c][g]));
          _mm512_storeu_ps(o, _mm512_fmadd_ps(y0, u, _mm512_loadu_ps(o)));
          _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(y1, u, _mm512_loadu_ps(o + 16)));
        }
    }
  }
}

// One kv head of one row: the G query heads that share it (q: G x D, arranged like x above and
// pre-scaled) attend to its S keys/values (rows `ldk` / `ldv` elements apart), with `bias` (S values,
// `bias_step` apart) added to every query's scores. An int8 cache passes the S scales of its keys and
// values (`kscale`, `vscale`; else null) and scratch `w16` (G x (S + 1)). `scores` is scratch (G x S);
// `out` (G x D, arranged) gets the result.
template <typename T, typename Q, int G>
void attend(const float* q, const T* k, const T* v, int64_t ldk, int64_t ldv, int64_t S, int64_t D,
            const Q* bias, int64_t bias_step, const float* kscale, const float* vscale, float* scores, int16_t* w16,
            float* out) {
  // Scores: one pass over the keys, KS at a time (G x KS accumulators fit the 16 vector registers).
  constexpr int KS = G <= 3 ? 4 : G <= 6 ? 2 : 1;
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  int64_t s = 0;
  if constexpr (std::is_same_v<T, int8_t>) {
    if (D % 32 == 0 && D <= 256) {  // integer dot products, the query rounded to int8 too (per query head)
      int8_t q8[G * 256];
      float qs[G];
      for (int g = 0; g < G; ++g) {
        float amax = 0.0f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(q[g * D + d]));
        qs[g] = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int64_t d = 0; d < D; ++d) q8[g * D + d] = static_cast<int8_t>(std::nearbyint(q[g * D + d] * inv));
      }
      constexpr int KI = G <= 2 ? 4 : G <= 4 ? 2 : 1;
      if (D % 64 == 0 && vnni()) {
        scores_vnni<G>(q8, k, ldk, S, D, scores);
        s = S;
      }
      for (; s + KI <= S; s += KI) dots_int8<G, KI>(q8, k, ldk, s, S, D, scores);
      for (; s < S; ++s) dots_int8<G, 1>(q8, k, ldk, s, S, D, scores);
      finish_scores<Q, G>(qs, kscale, bias, bias_step, S, scores, mx);
    }
  }
  for (; s + KS <= S; s += KS) score_keys<T, Q, G, KS>(q, k, ldk, s, S, D, bias, bias_step, kscale, scores, mx);
  for (; s < S; ++s) score_keys<T, Q, G, 1>(q, k, ldk, s, S, D, bias, bias_step, kscale, scores, mx);
  float total[G], wmax[G];
  for (int g = 0; g < G; ++g) {  // softmax numerators, in place (times the value scales of an int8 cache), their sums
    float* row = scores + g * S;
    const float m = mx[g] == -INFINITY ? 0.0f : mx[g];  // every key masked: zero output rather than NaN
    __m256 sum = _mm256_setzero_ps(), top = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), _mm256_set1_ps(m)));
      sum = _mm256_add_ps(sum, e);
      if (vscale) {
        e = _mm256_mul_ps(e, _mm256_loadu_ps(vscale + s));
        top = _mm256_max_ps(top, e);
      }
      _mm256_storeu_ps(row + s, e);
    }
    total[g] = sum8(sum);
    wmax[g] = hmax8(top);
    for (; s < S; ++s) {
      const float e = std::exp(row[s] - m);
      total[g] += e;
      row[s] = vscale ? e * vscale[s] : e;
      wmax[g] = std::max(wmax[g], row[s]);
    }
  }
  if constexpr (std::is_same_v<T, int8_t>) {
    float unit[G];
    round_weights<G>(scores, wmax, S, w16, unit);
    if (D % 32 == 0 && vnni())
      weighted_sum_vnni<G>(w16, unit, v, ldv, S, D, out);
    else
      weighted_sum_int8<G>(w16, unit, v, ldv, S, D, out);
  } else
    weighted_sum<T, G>(scores, v, ldv, S, D, out);
  for (int g = 0; g < G; ++g) {
    const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] *= inv;
  }
}

template <typename T, typename Q>
void attend_any_group(int G, const float* q, const T* k, const T* v, int64_t ldk, int64_t ldv, int64_t S, int64_t D,
                      const Q* bias, int64_t bias_step, const float* kscale, const float* vscale, float* scores,
                      int16_t* w16, float* out) {
  switch (G) {
    case 1: attend<T, Q, 1>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 2: attend<T, Q, 2>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 3: attend<T, Q, 3>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 4: attend<T, Q, 4>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 5: attend<T, Q, 5>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 6: attend<T, Q, 6>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    case 7: attend<T, Q, 7>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
    default: attend<T, Q, 8>(q, k, v, ldk, ldv, S, D, bias, bias_step, kscale, vscale, scores, w16, out); break;
  }
}

// One kv head: its G query heads (`q`, G x D in natural order) over S keys and values (`ldk` / `ldv`
// apart; an int8 cache's scales `ks`, `vs`, else null), plus `bias` (`bias_step` apart), into `dst`
// (G x D). T: the cache's element type; Q: that of q, bias and dst (the same, or any float type over int8).
template <typename T, typename Q>
void attend_head(int G, const Q* q, const T* k, const T* v, int64_t ldk, int64_t ldv, int64_t S, int64_t D,
                 const Q* bias, int64_t bias_step, const float* ks, const float* vs, Q* dst) {
  static thread_local std::vector<float> q_buffer, o_buffer, score_buffer;
  static thread_local std::vector<int16_t> w16_buffer;
  constexpr bool even_odd = Widen<T>::kEvenOdd;
  float* qf = scratch(q_buffer, G * D);
  float* o = scratch(o_buffer, G * D);
  float* scores = scratch(score_buffer, G * S);
  int16_t* w16 = std::is_same_v<T, int8_t> ? scratch(w16_buffer, G * (S + 1)) : nullptr;  // int8 cache
  arrange_x(q, qf, G, D, even_odd);
  const float scale = 1.0f / std::sqrt(float(D));
  for (int64_t i = 0; i < G * D; ++i) qf[i] *= scale;
  attend_any_group<T, Q>(G, qf, k, v, ldk, ldv, S, D, bias, bias_step, ks, vs, scores, w16, o);
  for (int64_t i = 0; i < G * D; i += kChunk)  // back from the arranged order
    for (int j = 0; j < kChunk; ++j) dst[i + natural(j, even_odd)] = static_cast<Q>(o[i + j]);
}

// How many of a row's S slots attention reads: up to its last one not masked (bias -inf), rounded
// up to a multiple of 8 (at most S), so that the vector loops see the same lanes and the result is
// bit for bit the one over all S slots (the few masked slots read must hold finite values, as a
// cache's zero-filled buffers do). A cache's buffers grow ahead of the sequence (256 slots at a
// time, doubling), so their tail is often empty: a step at position 100 reads 104 of 256 slots.
inline int64_t round_keys(int64_t n, int64_t S) { return std::min(S, (n + 7) / 8 * 8); }

template <typename Q>
int64_t unmasked_prefix(const Q* bias, int64_t step, int64_t S) {
  int64_t n = S;
  while (n > 1 && static_cast<float>(bias[(n - 1) * step]) == -INFINITY) --n;
  return round_keys(n, S);
}

template <typename T, typename Q>
void decode_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            const float* ksp, const float* vsp, int64_t ls0, int64_t ls1, at::Tensor& out, int G) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const Q* qp = q.const_data_ptr<Q>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const Q* bp = bias.const_data_ptr<Q>();
  Q* op = out.mutable_data_ptr<Q>();
  std::vector<int64_t> keys(B);  // each row's slots up to its last unmasked one
  for (int64_t b = 0; b < B; ++b) keys[b] = unmasked_prefix(bp + b * bias.stride(0), bias.stride(3), S);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv;
      const int64_t at = b * ls0 + h * ls1;  // this head's scales (int8 cache)
      attend_head<T, Q>(G, qp + (b * Hq + h * G) * D, kp + b * k.stride(0) + h * k.stride(1),
                        vp + b * v.stride(0) + h * v.stride(1), k.stride(2), v.stride(2), keys[b], D,
                        bp + b * bias.stride(0), bias.stride(3), ksp ? ksp + at : nullptr, vsp ? vsp + at : nullptr,
                        op + (b * Hq + h * G) * D);
    }
  });
}

// q (B, Hq, 1, D); k, v (B, Hkv, S, D) with unit stride along D; bias (B, 1, 1, S); for an int8
// cache, k_scale and v_scale (B, Hkv, S) fp32 with unit stride along S.
// Returns softmax(q k^T / sqrt(D) + bias) v as (B, Hq, 1, D), reading K and V once per kv head.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias_in,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q_in.size(2) == 1,
              "decode_attention: q (B, Hq, 1, D) and k, v (B, Hkv, S, D) expected");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D,
              "decode_attention: k and v must have the same (B, Hkv, S, D) layout");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxRows, "decode_attention: ", Hq, " query heads over ",
              Hkv, " kv heads (a group of at most ", kMaxRows, ")");
  TORCH_CHECK(D % kChunk == 0 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: head_dim must be a multiple of ", kChunk,
              " with unit stride");
  const bool int8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (int8 || q_in.scalar_type() == k.scalar_type()),
              "decode_attention: k and v must share q's dtype, or be int8 with scales");
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()) && k_scale.has_value() == v_scale.has_value(),
              "decode_attention: k_scale and v_scale go with int8 keys and values, and only with them");
  const float *ksp = nullptr, *vsp = nullptr;
  int64_t ls0 = 0, ls1 = 0;
  if (int8) {
    const at::Tensor &ks = *k_scale, &vs = *v_scale;
    TORCH_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.dim() == 3 &&
                    ks.sizes() == vs.sizes() && ks.strides() == vs.strides() && ks.size(0) == B && ks.size(1) == Hkv &&
                    ks.size(2) == S && ks.stride(2) == 1,
                "decode_attention: k_scale and v_scale must be float32 (B, Hkv, S) with unit stride along S");
    ksp = ks.const_data_ptr<float>();
    vsp = vs.const_data_ptr<float>();
    ls0 = ks.stride(0);
    ls1 = ks.stride(1);
  }
  const int G = int(Hq / Hkv);
  const at::Tensor q = q_in.contiguous();
  TORCH_CHECK(bias_in.scalar_type() == q_in.scalar_type(), "decode_attention: the bias must have q's dtype");
  const at::Tensor bias = bias_in.expand({B, 1, 1, S});  // a view: read in place, in its dtype
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  const auto attend_as = [&](auto q_type) {  // q's element type; the cache's is q's or int8
    using Q = decltype(q_type);
    if (int8)
      decode_attention_typed<int8_t, Q>(q, k, v, bias, ksp, vsp, ls0, ls1, out, G);
    else
      decode_attention_typed<Q, Q>(q, k, v, bias, nullptr, nullptr, 0, 0, out, G);
  };
  switch (q.scalar_type()) {
    case at::kFloat: attend_as(float{}); break;
    case at::kBFloat16: attend_as(at::BFloat16{}); break;
    case at::kHalf: attend_as(at::Half{}); break;
    default: TORCH_CHECK(false, "decode_attention: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  }
  return out;
}

// ---------------------------------------------------------------- the whole decode step
// decode_step: one token of each of B sequences through every layer and the LM head in a single
// call, op for op what model.py computes (the comments name its lines), rounded to the model's
// dtype W where its ops round: the ~60 kernel calls of a step with no dispatch, allocation or
// framework code between them. Activations live in fp32 scratch holding W-rounded values, a row
// per sequence; the cache (W or int8, `cache.quantize_int8`) is written at each row's slot and read
// as `RollingKVCache` lays it out.

template <typename W> inline float rnd(float x) { return static_cast<float>(static_cast<W>(x)); }

// rnd for 8 floats: bf16 by rounding the bits to nearest even (NaN kept), fp16 through F16C.
template <typename W> inline __m256 rnd8(__m256 x) {
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    const __m256i i = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(i, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))),
                                       _mm256_set1_epi32(int(0xFFFF0000)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  } else if constexpr (std::is_same_v<W, at::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return x;
  }
}

// out[i] = rnd(f(i)) for i < n, where f8(i) gives 8 values at once and f1(i) one.
template <typename W, typename F8, typename F1>
inline void each(int64_t n, float* out, F8 f8, F1 f1) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, rnd8<W>(f8(i)));
  for (; i < n; ++i) out[i] = rnd<W>(f1(i));
}

// RMSNorm of `rows` rows of n: weight * rms_norm(x.float()).to(W), into `out` (W-rounded).
template <typename W>
void rms_norm(const float* x_rows, const W* weight, int64_t rows, int64_t n, float eps, float* out_rows) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* x = x_rows + b * n;
    float* out = out_rows + b * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
    const float r = 1.0f / std::sqrt(float(ss / n) + eps);
    const __m256 r8 = _mm256_set1_ps(r);
    each<W>(n, out, [&](int64_t i) { return _mm256_mul_ps(load8<W>(weight + i), rnd8<W>(_mm256_mul_ps(_mm256_loadu_ps(x + i), r8))); },
            [&](int64_t i) { return static_cast<float>(weight[i]) * rnd<W>(x[i] * r); });
  }
}

// n floats already rounded to W (`rnd`), stored as W: exact, 8 at a time.
template <typename W>
void to_dtype(const float* x, W* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(x + i)), 16);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), packed);
    }
  } else if constexpr (std::is_same_v<W, at::Half>) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) out[i] = static_cast<W>(x[i]);
}

// `rows` rows of x (n values each) through the weights side by side (`small_linear`'s kernel; int8
// weights, given with their scales: `small_linear_int8`'s), into y (rows x the weights' outputs),
// rounded to W.
template <typename W>
void linear(const float* x, std::initializer_list<const at::Tensor*> ws, std::initializer_list<const at::Tensor*> scales,
            int64_t rows, int64_t n, float* y) {
  static thread_local std::vector<float> x_buffer;
  int64_t N = 0;
  if (*scales.begin()) {  // int8 weights
    static thread_local std::vector<int16_t> x16_buffer;
    static thread_local std::vector<float> unit_buffer;
    Stack<int8_t> stack;
    const at::Tensor* const* scale = scales.begin();
    for (const at::Tensor* w : ws) stack.add(*w, *scale++);
    multiply_int8(x, stack, y, rows, n, scratch(x16_buffer, rows * n), scratch(unit_buffer, rows));
    N = stack.starts.back();
  } else {
    Stack<W> stack;
    for (const at::Tensor* w : ws) stack.add(*w);
    float* xa = scratch(x_buffer, rows * n);
    if (std::is_same_v<W, at::BFloat16> && has_avx512_bf16()) {  // x holds bf16 values: as bf16 (exact), for
      at::BFloat16* xb = reinterpret_cast<at::BFloat16*>(xa);    // multiply's dot path, which arranges nothing
      to_dtype(x, xb, rows * n);
      multiply(xb, stack, y, rows, n, xa);
    } else {
      multiply(x, stack, y, rows, n, xa);
    }
    N = stack.starts.back();
  }
  if constexpr (!std::is_same_v<W, float>)  // fp32: already what F.linear gives
    each<W>(rows * N, y, [&](int64_t i) { return _mm256_loadu_ps(y + i); }, [&](int64_t i) { return y[i]; });
}

// fn(b) for each of `rows` rows, the rows shared between threads where there are several.
template <typename F>
void each_row(int64_t rows, F fn) {
  if (rows == 1) return fn(0);
  at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b);
  });
}

// x += y, rounded to W (a residual add).
template <typename W>
void add(float* x, const float* y, int64_t n) {
  each<W>(n, x, [&](int64_t i) { return _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)); },
          [&](int64_t i) { return x[i] + y[i]; });
}

// apply_rope on `heads` heads of D in place: x * cos + [-x2, x1] * sin, in fp32, rounded to W.
template <typename W>
void rope(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = xh[i], x2 = xh[i + half];
      xh[i] = rnd<W>(x1 * cos[i] + x2 * sin[i]);  // sin's first half is negated
      xh[i + half] = rnd<W>(x2 * cos[i + half] + x1 * sin[i + half]);
    }
  }
}

// One head's new key or value (D values) into its cache slot: as W, or as int8 with its scale.
template <typename W, typename C>
void store(const float* x, int64_t D, C* dst, float* scale) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(x[d]));
    *scale = amax / 127.0f;
    const float inv = *scale > 0.0f ? 1.0f / *scale : 0.0f;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] * inv), -127.0f, 127.0f));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<W>(x[d]);
  }
}

template <typename W, typename C>
void decode_step_typed(const int64_t* tokens, const int64_t* pos, int64_t B, const int64_t* slot_pos, int64_t capacity,
                       int64_t window, const at::Tensor& embed, at::TensorList layers, const at::Tensor& norm,
                       const at::Tensor& lm_head, const float* inv_freq, at::TensorList k_cache, at::TensorList v_cache,
                       at::TensorList k_scale, at::TensorList v_scale, int64_t Hq, float eps, at::TensorList scales,
                       W* logits) {
  // an int8 tensor's scales (`layers`' index, then the embedding's and the LM head's), else null
  const auto scale_of = [&](size_t i) { return scales[i].numel() ? &scales[i] : nullptr; };
  const size_t n_layer_tensors = layers.size();
  const int64_t dim = embed.size(1), Hkv = k_cache[0].size(1), S = k_cache[0].size(2), D = k_cache[0].size(3);
  const int64_t G = Hq / Hkv, hidden = layers[6].size(0), V = lm_head.size(0), qkv_n = (Hq + 2 * Hkv) * D;
  static thread_local std::vector<float> xb, hb, qkvb, gub, yb, cs;
  static thread_local std::vector<W> qw, attn, bias;
  float* x = scratch(xb, B * dim);                                  // the residual stream, a row each
  float* h = scratch(hb, B * std::max({dim, hidden, Hq * D}));      // a linear's input rows (n each)
  float* qkv = scratch(qkvb, B * qkv_n);
  float* gu = scratch(gub, B * 2 * hidden);
  float* y = scratch(yb, B * std::max(dim, V));
  float* cos = scratch(cs, B * 2 * D);  // row b: cos at b * 2D, sin D after it
  W* q = scratch(qw, B * Hq * D);
  W* att = scratch(attn, B * Hq * D);
  W* bias_rows = scratch(bias, B * S);
  std::vector<int64_t> slots(B), keys(B);
  const at::Tensor* embed_scale = scale_of(n_layer_tensors);
  for (int64_t b = 0; b < B; ++b) {
    if (embed_scale) {  // x = embed_tokens(tokens): int8 rows dequantized, (q.float() * scale).to(W)
      const int8_t* e = embed.const_data_ptr<int8_t>() + tokens[b] * dim;
      const float scale = embed_scale->const_data_ptr<float>()[tokens[b]];
      for (int64_t i = 0; i < dim; ++i) x[b * dim + i] = rnd<W>(static_cast<float>(e[i]) * scale);
    } else {
      const W* e = embed.const_data_ptr<W>() + tokens[b] * dim;
      for (int64_t i = 0; i < dim; ++i) x[b * dim + i] = static_cast<float>(e[i]);
    }
    float *c = cos + b * 2 * D, *sn = c + D;
    for (int64_t i = 0; i < D / 2; ++i) {  // rope_cos_sin: the first half of sin negated
      const float f = float(pos[b]) * inv_freq[i];
      c[i] = c[i + D / 2] = std::cos(f);
      sn[i] = -std::sin(f);
      sn[i + D / 2] = std::sin(f);
    }
    slots[b] = pos[b] % capacity;
    keys[b] = 1;  // slots up to the last one seen (`unmasked_prefix`)
    for (int64_t s = 0; s < S; ++s) {  // attention_mask + attention_bias over the slots, this token's included
      const int64_t kp = s == slots[b] ? pos[b] : slot_pos[b * capacity + s];
      const bool seen = kp >= 0 && kp <= pos[b] && (window <= 0 || kp > pos[b] - window);
      bias_rows[b * S + s] = static_cast<W>(seen ? 0.0f : -INFINITY);
      if (seen) keys[b] = s + 1;
    }
    keys[b] = round_keys(keys[b], S);
  }
  const bool int8 = std::is_same_v<C, int8_t>;
  for (size_t l = 0; l * 9 < layers.size(); ++l) {
    const at::Tensor* w = layers.data() + l * 9;  // input norm, q, k, v, o, post norm, gate, up, down
    const auto sc = [&](int i) { return scale_of(l * 9 + i); };
    // h = x + self_attn(input_layernorm(x))
    rms_norm<W>(x, w[0].const_data_ptr<W>(), B, dim, eps, h);
    linear<W>(h, {&w[1], &w[2], &w[3]}, {sc(1), sc(2), sc(3)}, B, dim, qkv);
    C* kc = k_cache[l].mutable_data_ptr<C>();
    C* vc = v_cache[l].mutable_data_ptr<C>();
    float* ks = int8 ? k_scale[l].mutable_data_ptr<float>() : nullptr;
    float* vs = int8 ? v_scale[l].mutable_data_ptr<float>() : nullptr;
    each_row(B, [&](int64_t b) {
      float* r = qkv + b * qkv_n;
      rope<W>(r, Hq + Hkv, D, cos + b * 2 * D, cos + b * 2 * D + D);  // q and k: heads side by side
      to_dtype<W>(r, q + b * Hq * D, Hq * D);
      for (int64_t kv = 0; kv < Hkv; ++kv) {  // step.stored_keys_values: write first
        const int64_t at = (b * Hkv + kv) * S + slots[b];
        store<W, C>(r + (Hq + kv) * D, D, kc + at * D, ks ? ks + at : nullptr);
        store<W, C>(r + (Hq + Hkv + kv) * D, D, vc + at * D, vs ? vs + at : nullptr);
      }
    });
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {  // decode_attention
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hkv, head = t * S;  // (b, kv) is the t-th of the cache's heads
        attend_head<C, W>(int(G), q + t * G * D, kc + head * D, vc + head * D, D, D, keys[b], D, bias_rows + b * S, 1,
                          ks ? ks + head : nullptr, vs ? vs + head : nullptr, att + t * G * D);
      }
    });
    for (int64_t i = 0; i < B * Hq * D; ++i) h[i] = static_cast<float>(att[i]);
    linear<W>(h, {&w[4]}, {sc(4)}, B, Hq * D, y);  // o_proj
    add<W>(x, y, B * dim);
    // x = h + mlp(post_attention_layernorm(h)): down(silu(gate) * up)
    rms_norm<W>(x, w[5].const_data_ptr<W>(), B, dim, eps, h);
    linear<W>(h, {&w[6], &w[7]}, {sc(6), sc(7)}, B, dim, gu);
    each_row(B, [&](int64_t b) {
      const float *gate = gu + b * 2 * hidden, *up = gate + hidden;
      each<W>(hidden, h + b * hidden, [&](int64_t i) {
        const __m256 g = _mm256_loadu_ps(gate + i), one = _mm256_set1_ps(1.0f);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        return _mm256_mul_ps(rnd8<W>(silu), _mm256_loadu_ps(up + i));
      }, [&](int64_t i) { return rnd<W>(gate[i] / (1.0f + std::exp(-gate[i]))) * up[i]; });
    });
    linear<W>(h, {&w[8]}, {sc(8)}, B, hidden, y);
    add<W>(x, y, B * dim);
  }
  rms_norm<W>(x, norm.const_data_ptr<W>(), B, dim, eps, h);  // lm_head(norm(x))
  linear<W>(h, {&lm_head}, {scale_of(n_layer_tensors + 1)}, B, dim, y);
  to_dtype<W>(y, logits, B * V);
}

// The logits (B, 1, V) of `tokens` (B, 1) at positions `pos` (B,), each row's token stored at its
// cache slot pos % capacity, whose other slots hold the positions `slot_pos` (B, capacity; -1:
// empty). `layers`: 9 tensors a layer (input_layernorm, q, k, v, o, post_attention_layernorm, gate,
// up, down weights); k, v: the layers' cache buffers (B, Hkv, S, D), int8 with fp32 scales k_scale,
// v_scale (B, Hkv, S) or of the model's dtype with no scales; window <= 0: none. `scales`: one per
// tensor of `layers`, then the embedding's and the LM head's: for an int8 linear or embedding
// (`quantize.Int8Linear`) its fp32 scales (N,), else an empty tensor. The linears take the B rows
// together (in passes of 8), reading each weight once a pass.
at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& slot_pos, int64_t window,
                       const at::Tensor& embed, at::TensorList layers, const at::Tensor& norm, const at::Tensor& lm_head,
                       const at::Tensor& inv_freq, at::TensorList k, at::TensorList v, at::TensorList k_scale,
                       at::TensorList v_scale, int64_t n_heads, double eps, at::TensorList scales) {
  const auto dtype = norm.scalar_type();
  TORCH_CHECK(!k.empty() && layers.size() == 9 * k.size() && v.size() == k.size(),
              "decode_step: 9 weights and one key and value buffer per layer expected");
  TORCH_CHECK(scales.size() == layers.size() + 2, "decode_step: one scale entry per weight, the embedding and the LM head");
  const auto quantized = [&](const at::Tensor& t, size_t i) {  // an int8 matrix with its (N,) fp32 scales
    const at::Tensor& sc = scales[i];
    if (!sc.numel()) return false;
    TORCH_CHECK(t.scalar_type() == at::kChar && t.dim() == 2 && sc.scalar_type() == at::kFloat && sc.is_contiguous() &&
                    sc.dim() == 1 && sc.size(0) == t.size(0),
                "decode_step: tensor ", i, " has scales: int8 (N, K) with float32 (N,) scales expected");
    return true;
  };
  const bool int8 = k[0].scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? k_scale.size() == k.size() && v_scale.size() == k.size() : k_scale.empty() && v_scale.empty(),
              "decode_step: scales go with an int8 cache, and only with it");
  const int64_t B = k[0].size(0), Hkv = k[0].size(1), S = k[0].size(2), D = k[0].size(3), dim = embed.size(1);
  TORCH_CHECK(n_heads % Hkv == 0 && n_heads / Hkv <= kMaxRows && D % kChunk == 0 && dim % kChunk == 0 &&
                  layers[6].dim() == 2 && layers[6].size(0) % kChunk == 0,
              "decode_step: ", n_heads, " query heads over ", Hkv, " kv heads of ", D, " (head_dim, dim and the FFN's ",
              "hidden size: multiples of ", kChunk, ")");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && slot_pos.scalar_type() == at::kLong &&
                  tokens.is_contiguous() && pos.is_contiguous() && slot_pos.is_contiguous() && tokens.numel() == B &&
                  pos.numel() == B && slot_pos.dim() == 2 && slot_pos.size(0) == B && slot_pos.size(1) >= S,
              "decode_step: int64 tokens (B, 1), positions (B,) and slot positions (B, capacity) expected for the cache's ",
              B, " rows of ", S, " slots");
  TORCH_CHECK(inv_freq.numel() == D / 2 && inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous(),
              "decode_step: ", D / 2, " float32 RoPE frequencies expected");
  const int64_t* tp = tokens.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t capacity = slot_pos.size(1);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= tp[b] && tp[b] < embed.size(0) && 0 <= pp[b] && pp[b] % capacity < S, "decode_step: row ", b,
                "'s token ", tp[b], " or position ", pp[b], " out of range (vocabulary ", embed.size(0), ", ", S,
                " slots allocated of ", capacity, ")");
  for (size_t i = 0; i < layers.size(); ++i)
    TORCH_CHECK((quantized(layers[i], i) || layers[i].scalar_type() == dtype) && layers[i].is_contiguous() &&
                    layers[i].device().is_cpu(),
                "decode_step: weight ", i, " must be a contiguous CPU tensor of the model's dtype (or int8 with scales)");
  for (size_t l = 0; l < k.size(); ++l)  // weights multiplied side by side: q, k, v and gate, up
    TORCH_CHECK(!!scales[l * 9 + 1].numel() == !!scales[l * 9 + 2].numel() &&
                    !!scales[l * 9 + 1].numel() == !!scales[l * 9 + 3].numel() &&
                    !!scales[l * 9 + 6].numel() == !!scales[l * 9 + 7].numel(),
                "decode_step: layer ", l, "'s q/k/v and gate/up weights must be all int8 or all float");
  for (size_t l = 0; l < k.size(); ++l)
    TORCH_CHECK(k[l].is_contiguous() && v[l].is_contiguous() && k[l].sizes() == k[0].sizes() &&
                    v[l].sizes() == k[0].sizes() && k[l].scalar_type() == k[0].scalar_type() &&
                    v[l].scalar_type() == k[0].scalar_type() && (int8 || k[l].scalar_type() == dtype) &&
                    (!int8 || (k_scale[l].is_contiguous() && v_scale[l].is_contiguous() &&
                               k_scale[l].sizes() == k[0].sizes().slice(0, 3) && v_scale[l].sizes() == k_scale[l].sizes())),
                "decode_step: cache buffers must be contiguous (B, Hkv, S, D), of the model's dtype or int8");
  TORCH_CHECK(embed.is_contiguous() && lm_head.is_contiguous() && lm_head.size(1) == dim &&
                  (quantized(embed, layers.size()) || embed.scalar_type() == dtype) &&
                  (quantized(lm_head, layers.size() + 1) || lm_head.scalar_type() == dtype),
              "decode_step: embedding and LM head must be contiguous, of the final norm's dtype (or int8 with scales)");
  at::Tensor logits = at::empty({B, 1, lm_head.size(0)}, norm.options());
  const auto step_as = [&](auto w_type) {
    using W = decltype(w_type);
    const auto go = [&](auto c_type) {
      decode_step_typed<W, decltype(c_type)>(tp, pp, B, slot_pos.const_data_ptr<int64_t>(), capacity, window, embed,
                                             layers, norm, lm_head, inv_freq.const_data_ptr<float>(), k, v, k_scale,
                                             v_scale, n_heads, float(eps), scales, logits.mutable_data_ptr<W>());
    };
    if (int8) go(int8_t{}); else go(W{});
  };
  switch (dtype) {
    case at::kFloat: step_as(float{}); break;
    case at::kBFloat16: step_as(at::BFloat16{}); break;
    case at::kHalf: step_as(at::Half{}); break;
    default: TORCH_CHECK(false, "decode_step: dtype must be float32, bfloat16 or float16, got ", dtype);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY(mistral_torch_cpu, m) {
  m.def("small_linear(Tensor x, Tensor[] ws) -> Tensor");
  m.def("small_linear_int8(Tensor x, Tensor[] ws, Tensor[] scales) -> Tensor");
  m.def("use_vnni(bool on) -> bool", &use_vnni);  // no tensors: a catch-all kernel
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  m.def("decode_step(Tensor tokens, Tensor pos, Tensor slot_pos, int window, Tensor embed, Tensor[] layers, "
        "Tensor norm, Tensor lm_head, Tensor inv_freq, Tensor(a!)[] k, Tensor(b!)[] v, Tensor(c!)[] k_scale, "
        "Tensor(d!)[] v_scale, int n_heads, float eps, Tensor[] scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral_torch_cpu, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("small_linear_int8", &small_linear_int8);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step", &decode_step);
}
