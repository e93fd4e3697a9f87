// Fused Adam-mini step for CPU tensors: one call updates a whole list of parameters.
// Built on first use by blockopt/kernels/adam_mini/cpu.py, which also says which inputs it takes.
//
// Why fused: a step is memory-bound. AdamW moves 7 tensors' worth of bytes per coordinate (read
// p, g, m, v; write p, m, v). Adam-mini needs 5 (read p, g, m; write p, m) when g is still in
// cache for the update after its block's mean(g^2) was taken.
//
// Layout: a tensor is viewed as (outer, units, inner), `units` being its flattened block dims,
// cut into consecutive segments of (n_units, units_per_block) as in its BlockSpec; block b owns
// units [bounds[b], bounds[b + 1]) of every outer index, i.e. in every "row" of units * inner
// elements.
//   outer == 1 (rows, heads, whole, fused row segments, experts): a block is one contiguous run;
//     it is summed (pass 1) and updated (pass 2) back to back, so pass 2 reads g from L1/L2.
//   outer > 1 (columns of an (in, out) weight): every row holds a piece of every block. Pass 1
//     sums g^2 down chunks of whole rows into per-column partial sums (both threads share the
//     tensor); the last chunk in turns them into per-column denominators; pass 2 updates the
//     chunks. Pass 2 reads g again, from L3 only while L3 still holds it: on the 2-core test
//     machine it mostly does not, so this layout moves about 6 tensors' worth, not 5. (Bands of
//     columns would keep g in L2, but their strided rows streamed ~1.5x slower than whole rows.)
//   no segments (coordinate rule): every element is a block, i.e. plain Adam with v per element.
//
// Compressed first moments (momentum_codec 1-3: bf16, int8, int4; kernels/codecs.py holds the
// definitions): m is stepped one codec chunk at a time (256 elements of a row, Note [chunks by
// row]): decoded into a float32 buffer on the stack, updated with p, and encoded back with
// stochastic rounding, in one pass over memory. The random bits are codecs.py's (murmur3's
// finalizer of the element index and the key), the key mixed here from the seed, the salt and
// the step count this call increments, so the codes equal those of the decoded path bit for bit.
//   outer == 1: the tasks' blocks are cut into groups that end where a chunk ends (a row's
//     blocks, or the blocks up to a row's end): a group's sums first, then its chunks.
//   outer > 1: the column sums as above, then the update in element ranges that start and end
//     where chunks do. A layout with one block (the whole rule) is stepped as one contiguous run.
//   per coordinate: chunk-aligned element ranges.
//
// A plain m is in the parameter's dtype, or float32 for a bf16/fp16 parameter (momentum_dtype="float32").
//
// Numerics mirror `_reference_adam_mini` op for op: math in float32 (float64 for float64
// params), rounding once on store, and fma exactly where ATen's vectorised kernels use it (lerp,
// add with alpha). What differs: the summation order of g^2, and sqrt (correctly rounded here;
// ATen's vectorised float sqrt may differ by an ulp).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/bit_cast.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <memory>
#include <thread>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

// Elements per task: contiguous blocks and coordinate runs are batched into tasks of about
// kTaskElements, column-blocked tensors cut into chunks of whole rows of about kChunkElements:
// enough tasks to share out evenly, few enough that scheduling costs nothing.
constexpr int64_t kTaskElements = 1 << 16;
constexpr int64_t kChunkElements = 1 << 18;

// Vectorized<scalar_t>::size() elements as K vectors of the math type (2 for bf16/fp16).
// A short load (count < kSize) zero-fills the rest, which keeps tails out of the sums.
template <typename scalar_t>
struct Pack {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, opmath_t>;
  static constexpr int K = kReduced ? 2 : 1;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();

  static void load(const scalar_t* src, Vec* out, int64_t count) {
    if constexpr (kReduced) {
      std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src, count));
    } else {
      out[0] = Vec::loadu(src, count);
    }
  }
  static void store(scalar_t* dst, const Vec* in, int64_t count) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(in[0], in[1]).store(dst, count);
    } else {
      in[0].store(dst, count);
    }
  }
  // The same for arrays kept in the math type (second moments, per-column scratch).
  static void load_math(const opmath_t* src, Vec* out, int64_t count) {
    for (int k = 0; k < K; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * Vec::size(), 0, Vec::size());
      out[k] = n > 0 ? Vec::loadu(src + k * Vec::size(), n) : Vec(opmath_t(0));
    }
  }
  static void store_math(opmath_t* dst, const Vec* in, int64_t count) {
    for (int k = 0; k < K; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * Vec::size(), 0, Vec::size());
      if (n > 0) in[k].store(dst + k * Vec::size(), n);
    }
  }
  // A first moment in the parameter's dtype (the plain step) or in the math type (a decoded chunk).
  template <typename m_t>
  static void load_m(const m_t* src, Vec* out, int64_t count) {
    if constexpr (std::is_same_v<m_t, scalar_t>) {
      load(src, out, count);
    } else {
      load_math(src, out, count);
    }
  }
  template <typename m_t>
  static void store_m(m_t* dst, const Vec* in, int64_t count) {
    if constexpr (std::is_same_v<m_t, scalar_t>) {
      store(dst, in, count);
    } else {
      store_math(dst, in, count);
    }
  }
};

// One tensor's step constants, cast to the math type the way ATen casts Python scalars.
template <typename opmath_t>
struct Coeffs {
  using Vec = Vectorized<opmath_t>;
  using Bits = std::conditional_t<sizeof(opmath_t) == 4, uint32_t, uint64_t>;
  opmath_t beta2, one_minus_beta2, bc2_sqrt, eps;
  Vec v_decay, v_lerp, v_lerp_small, v_sign, v_step_size, v_beta2, v_one_minus_beta2, v_bc2_sqrt, v_eps;

  Coeffs(double lr, double beta1, double beta2_, double eps_, double wd, double step, bool maximize)
      : beta2(beta2_), one_minus_beta2(1 - beta2_), bc2_sqrt(std::pow(1 - std::pow(beta2_, step), 0.5)), eps(eps_) {
    const opmath_t weight = 1 - beta1;  // m.lerp_(g, 1 - beta1), with ATen's lerp_vec coefficients
    const bool small = std::abs(weight) < opmath_t(0.5);
    v_lerp = Vec(small ? weight : weight - opmath_t(1));
    v_lerp_small = Vec(c10::bit_cast<opmath_t>(small ? ~Bits(0) : Bits(0)));
    v_sign = Vec(maximize ? opmath_t(-0.0) : opmath_t(0.0));  // xor with -0.0 negates
    v_decay = Vec(opmath_t(1 - lr * wd));                       // exactly 1 without decay
    v_step_size = Vec(opmath_t(-lr / (1 - std::pow(beta1, step))));
    v_beta2 = Vec(beta2);
    v_one_minus_beta2 = Vec(one_minus_beta2);
    v_bc2_sqrt = Vec(bc2_sqrt);
    v_eps = Vec(eps);
  }

  // v_b <- beta2 v_b + (1 - beta2) mean_b(g^2); returns sqrt(v_b) / sqrt(bc2) + eps.
  opmath_t block_denom(opmath_t& v, opmath_t sum_sq, int64_t numel) const {
    v = std::fma(sum_sq / opmath_t(numel), one_minus_beta2, v * beta2);
    return std::sqrt(v) / bc2_sqrt + eps;
  }
  // The same per coordinate (plain Adam).
  Vec denom(Vec& v, Vec g) const {
    v = at::vec::fmadd(g * g, v_one_minus_beta2, v * v_beta2);
    return v.sqrt() / v_bc2_sqrt + v_eps;
  }
  // p <- p (1 - lr wd); m <- lerp(m, g, 1 - beta1); p <- p + step_size m / denom.
  void update(Vec& p, Vec& m, Vec g, Vec denom) const {
    g = g ^ v_sign;
    p = p * v_decay;
    m = at::vec::fmadd(v_lerp, g - m, Vec::blendv(g, m, v_lerp_small));
    p = p + v_step_size * m / denom;
  }
};

// Calls body(i, count) on consecutive packs covering [0, n): whole packs with a compile-time
// count (so loads and stores take their unmasked path), then the partial tail.
template <int64_t kSize, typename Body>
C10_ALWAYS_INLINE void for_each_pack(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kSize <= n; i += kSize) body(i, std::integral_constant<int64_t, kSize>{});
  if (i < n) body(i, n - i);
}

// sum(g^2) over a contiguous run. Element i goes to accumulator (i / Vec::size()) % kAccumulators
// whatever the storage dtype, so bf16/fp16 grads sum exactly like the same values in float32.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
opmath_t sum_squares(const scalar_t* g, int64_t n) {
  using P = Pack<scalar_t>;
  using Vec = typename P::Vec;
  constexpr int kAccumulators = 8;  // independent fma chains hide the fma latency
  constexpr int kPacks = kAccumulators / P::K;
  Vec acc[kAccumulators], x[P::K];
  std::fill_n(acc, kAccumulators, Vec(opmath_t(0)));
  int64_t i = 0;
  for (; i + kPacks * P::kSize <= n; i += kPacks * P::kSize) {
    for (int j = 0; j < kPacks; ++j) {
      P::load(g + i + j * P::kSize, x, std::integral_constant<int64_t, P::kSize>{});
      for (int k = 0; k < P::K; ++k) acc[j * P::K + k] = at::vec::fmadd(x[k], x[k], acc[j * P::K + k]);
    }
  }
  for_each_pack<P::kSize>(n - i, [&](int64_t j, auto count) {
    P::load(g + i + j, x, count);
    const int64_t first = j / P::kSize * P::K;
    for (int k = 0; k < P::K; ++k) acc[first + k] = at::vec::fmadd(x[k], x[k], acc[first + k]);
  });
  for (int a = 1; a < kAccumulators; ++a) acc[0] = acc[0] + acc[a];
  return at::vec::vec_reduce_all<opmath_t>([](auto a, auto b) { return a + b; }, acc[0]);
}

// acc[j] += g[j]^2 along one row.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void accumulate_squares(const scalar_t* g, opmath_t* acc, int64_t n) {
  using P = Pack<scalar_t>;
  for_each_pack<P::kSize>(n, [&](int64_t i, auto count) {
    typename P::Vec a[P::K], x[P::K];
    P::load(g + i, x, count);
    P::load_math(acc + i, a, count);
    for (int k = 0; k < P::K; ++k) a[k] = at::vec::fmadd(x[k], x[k], a[k]);
    P::store_math(acc + i, a, count);
  });
}

// Pass 2 over a contiguous run; denom_at(i, out, count) puts the denominators of elements
// i, i + 1, ... into `out`. m is in the parameter's dtype, or float32 (a decoded chunk).
template <typename scalar_t, typename m_t, typename DenomAt>
void update_run(scalar_t* p, const scalar_t* g, m_t* m, int64_t n, const Coeffs<at::opmath_type<scalar_t>>& c,
                DenomAt&& denom_at) {
  using P = Pack<scalar_t>;
  for_each_pack<P::kSize>(n, [&](int64_t i, auto count) {
    typename P::Vec pv[P::K], gv[P::K], mv[P::K], dv[P::K];
    P::load(p + i, pv, count);
    P::load(g + i, gv, count);
    P::load_m(m + i, mv, count);
    denom_at(i, dv, count);
    for (int k = 0; k < P::K; ++k) c.update(pv[k], mv[k], gv[k], dv[k]);
    P::store(p + i, pv, count);
    P::store_m(m + i, mv, count);
  });
}

// Plain Adam (one second moment per element) over a contiguous run.
template <typename scalar_t, typename m_t>
void update_coordinates(scalar_t* p, const scalar_t* g, m_t* m, at::opmath_type<scalar_t>* v, int64_t n,
                        const Coeffs<at::opmath_type<scalar_t>>& c) {
  using P = Pack<scalar_t>;
  for_each_pack<P::kSize>(n, [&](int64_t i, auto count) {
    typename P::Vec pv[P::K], gv[P::K], mv[P::K], vv[P::K];
    P::load(p + i, pv, count);
    P::load(g + i, gv, count);
    P::load_m(m + i, mv, count);
    P::load_math(v + i, vv, count);
    for (int k = 0; k < P::K; ++k) c.update(pv[k], mv[k], gv[k], c.denom(vv[k], gv[k]));
    P::store(p + i, pv, count);
    P::store_m(m + i, mv, count);
    P::store_math(v + i, vv, count);
  });
}

// ---- compressed first moments --------------------------------------------------------------
// What codecs.py defines, for the codecs the optimizers use: BFloat16Rounding, and
// ChunkQuantized(bits=8 or 4, chunk=256, power=2) with stochastic rounding. Every float op here
// is the one the Python codec runs (division where it divides, no fma), so the bits agree.
enum Codec : int64_t { kPlain = 0, kBFloat16 = 1, kInt8 = 2, kInt4 = 3 };
constexpr int64_t kCodecChunk = 256;
// What an int code's spare value -L - 1 decodes to (Note [non-finite momenta] in codecs.py).
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// murmur3's 32-bit finalizer
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

constexpr uint32_t kGolden = 0x9E3779B1u;  // codecs._GOLDEN

// StoredMomentum.key: the key of one tensor's rounding at step t (the step count after this step),
// codecs.rounding_key shifted by `offset` elements (a shard that starts there in its whole tensor).
uint32_t rounding_key(int64_t seed, double step, int64_t salt, int64_t offset) {
  const auto t = static_cast<uint32_t>(static_cast<int64_t>(step));
  const uint32_t key = mix32(mix32(mix32(static_cast<uint32_t>(seed)) ^ t) ^ static_cast<uint32_t>(salt));
  return key + static_cast<uint32_t>(offset) * kGolden;
}

// codecs.random_bits of elements first .. first + n - 1 of the flattened tensor.
void random_bits(uint32_t key, int64_t first, int64_t n, uint32_t* out) {
  const uint32_t start = static_cast<uint32_t>(first) * kGolden + key;  // (index * golden + key) mod 2^32
  for (uint32_t j = 0; j < static_cast<uint32_t>(n); ++j) out[j] = mix32(start + j * kGolden);
}

// codecs.uniforms of elements first, first + 1, ... as packs of Vectorized<float>::size():
// (bits >> 8) / 2^24. next() returns the next pack's.
class Uniforms {
 public:
  static constexpr int kSize = Vectorized<float>::size();
  Uniforms(uint32_t key, int64_t first) : input_(static_cast<uint32_t>(first) * kGolden + key) {
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(kSize == 8, "one float lane per 32-bit hash lane");
    lanes_ = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(input_)),
                              _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(kGolden)));
#endif
  }
  Vectorized<float> next() {
#if defined(CPU_CAPABILITY_AVX2)
    // mix32 on 8 lanes (uint32 arithmetic: mullo wraps, srli shifts in zeros)
    __m256i h = lanes_;
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x85EBCA6Bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0xC2B2AE35u)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    lanes_ = _mm256_add_epi32(lanes_, _mm256_set1_epi32(static_cast<int32_t>(kSize * kGolden)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
#else
    alignas(64) float u[kSize];
    for (int j = 0; j < kSize; ++j, input_ += kGolden) u[j] = static_cast<float>(mix32(input_) >> 8) * 0x1p-24f;
    return Vectorized<float>::loadu(u);
#endif
  }

 private:
  uint32_t input_;  // the hash input of the next element: index * golden + key
#if defined(CPU_CAPABILITY_AVX2)
  __m256i lanes_;
#endif
};

// A compressed first moment, laid out by rows of `width` elements (Note [chunks by row]).
struct Stored {
  Codec codec = kPlain;
  void* data = nullptr;     // bf16 values, int8 codes or packed int4 codes
  float* scales = nullptr;  // (rows, chunks_per_row), int8/int4
  int64_t width = 0, chunks_per_row = 0, row_bytes = 0;
  uint32_t key = 0;

  // Decodes elements [x, x + n) (one chunk: column c of row r) into `m`. A code q stands for
  // scale * sign(q) * (|q| / L)^2, computed as the codec does: ((q / L)^2 with q's sign) * scale.
  void decode(int64_t r, int64_t c, int64_t n, float* m) const {
    if (codec == kBFloat16) {
      const auto* src = static_cast<const c10::BFloat16*>(data) + r * width + c;
      for (int64_t j = 0; j < n; ++j) m[j] = static_cast<float>(src[j]);
      return;
    }
    const float scale = scales[r * chunks_per_row + c / kCodecChunk];
    int64_t j = 0;  // (elements done)
    if (codec == kInt8) {
      const auto* q = static_cast<const int8_t*>(data) + r * width + c;
#if defined(CPU_CAPABILITY_AVX2)
      // 8 codes at a time (a scalar loop here does not vectorize: the spare code's select)
      for (; j + 8 <= n; j += 8) {
        const __m256i codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
        decode_pack(codes, 127, scale, m + j);
      }
#endif
      for (; j < n; ++j) {
        const float t = static_cast<float>(q[j]) / 127.0f;
        m[j] = q[j] == -128 ? kNaN : std::copysign(t * t, t) * scale;  // -128: a non-finite value
      }
      return;
    }
    const auto* bytes = static_cast<const uint8_t*>(data) + r * row_bytes + c / 2;  // c is even
#if defined(CPU_CAPABILITY_AVX2)
    // 8 codes (4 bytes) at a time: code i of a little-endian 32-bit word is its bits 4i .. 4i + 3
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; j + 8 <= n; j += 8) {
      uint32_t word;
      std::memcpy(&word, bytes + j / 2, sizeof word);
      const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), shifts),
                                               _mm256_set1_epi32(0xF));
      decode_pack(_mm256_sub_epi32(nibbles, _mm256_set1_epi32(8)), 7, scale, m + j);
    }
#endif
    for (; j + 2 <= n; j += 2) {  // two codes a byte, the lower nibble first
      m[j] = level(bytes[j / 2] & 0xF, scale);
      m[j + 1] = level(bytes[j / 2] >> 4, scale);
    }
    if (j < n) m[j] = level(bytes[j / 2] & 0xF, scale);
  }

#if defined(CPU_CAPABILITY_AVX2)
  // The values of 8 int codes q (the spare code -L - 1 decodes to nan), into out: the scalar
  // loops' ops, ((q / L)^2 with q's sign) * scale, so the same bits.
  static void decode_pack(__m256i codes, int levels, float scale, float* out) {
    using Vec = Vectorized<float>;
    const Vec t = Vec(_mm256_cvtepi32_ps(codes)) / Vec(static_cast<float>(levels));
    const Vec spare(_mm256_castsi256_ps(_mm256_cmpeq_epi32(codes, _mm256_set1_epi32(-levels - 1))));
    Vec::blendv((t * t | (t & Vec(-0.0f))) * Vec(scale), Vec(kNaN), spare).store(out);
  }
#endif

  // An int4 code's value, from its nibble (q + 8).
  static float level(int nibble, float scale) {
    const float t = static_cast<float>(nibble - 8) / 7.0f;
    return nibble == 0 ? kNaN : std::copysign(t * t, t) * scale;  // code -8: a non-finite value
  }

  // Encodes `m` (elements [x, x + n), column c of row r) with the codec's stochastic rounding.
  void encode(int64_t r, int64_t c, int64_t n, const float* m) const {
    const int64_t x = r * width + c;
    if (codec == kBFloat16) {
      alignas(64) uint32_t bits[kCodecChunk];
      random_bits(key, x, n, bits);
      // Add the top 16 random bits below the bf16 part and truncate (an inf's lower half is 0: it
      // stays inf); a nan is c10's nan, as it converts.
      auto* dst = static_cast<uint16_t*>(data) + x;
      for (int64_t j = 0; j < n; ++j) {
        const auto value = c10::bit_cast<uint32_t>(m[j]);
        dst[j] = std::isnan(m[j]) ? uint16_t(0x7FC0) : static_cast<uint16_t>((value + (bits[j] >> 16)) >> 16);
      }
      return;
    }
    const int levels = codec == kInt8 ? 127 : 7;
    alignas(64) int32_t q[kCodecChunk];
    const float scale = quantize(m, Uniforms(key, x), n, levels, q);
    scales[r * chunks_per_row + c / kCodecChunk] = scale;
    if (codec == kInt8) {
      auto* dst = static_cast<int8_t*>(data) + x;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<int8_t>(q[j]);
      return;
    }
    auto* dst = static_cast<uint8_t*>(data) + r * row_bytes + c / 2;
    int64_t j = 0;  // (codes done)
#if defined(CPU_CAPABILITY_AVX2)
    // 16 codes into 8 bytes at a time: in each 64-bit lane, (even + 8) | (odd + 8) << 4 in its low byte
    const __m256i eight = _mm256_set1_epi32(8), low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    auto pairs = [&](const int32_t* codes) {
      const __m256i v = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(codes)), eight);
      const __m256i packed = _mm256_or_si256(v, _mm256_srli_epi64(v, 28));  // odd's bits 32.. moved to 4..
      return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(packed, low_dwords));
    };
    for (; j + 16 <= n; j += 16) {
      const __m128i words = _mm_packus_epi32(pairs(q + j), pairs(q + j + 8));  // 8 x u16, each < 256
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + j / 2), _mm_packus_epi16(words, words));
    }
#endif
    for (; j + 2 <= n; j += 2) {  // two codes a byte, the lower nibble first
      dst[j / 2] = static_cast<uint8_t>((q[j] + 8) | ((q[j + 1] + 8) << 4));
    }
    if (j < n) dst[j / 2] = static_cast<uint8_t>((q[j] + 8) | (8 << 4));  // a row's odd end
  }

  // ChunkQuantized.encode of one chunk (Note [finding the level] in codecs.py): its codes into q,
  // returns its scale. A non-finite value gets the spare code -L - 1, and the scale is the maximum
  // of the finite values (Note [non-finite momenta]).
  static float quantize(const float* m, Uniforms uniforms, int64_t n, int levels, int32_t* q) {
    using Vec = Vectorized<float>;
    const Vec infinity(std::numeric_limits<float>::infinity());
    // |x| where finite, else 0 (a nan compares false)
    auto finite_magnitude = [&](Vec x) { return x.abs() & (x.abs() < infinity); };
    Vec absmax(0.0f);
    for_each_pack<Vec::size()>(n, [&](int64_t j, auto count) {
      absmax = at::vec::maximum(absmax, finite_magnitude(Vec::loadu(m + j, count)));  // (a short load pads with 0)
    });
    const float scale = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, absmax);
    const float top = static_cast<float>(levels * levels), safe = scale > 0 ? scale : 1.0f, inv = top / safe;
    const Vec top_level(top), safe_scale(safe), one(1.0f), sign_bit(-0.0f), spare(static_cast<float>(-levels - 1));
    auto encode_as = [&](auto&& level_units) {
      for_each_pack<Vec::size()>(n, [&](int64_t j, auto count) {
        const Vec x = Vec::loadu(m + j, count), finite = x.abs() < infinity, magnitude = x.abs() & finite;
        // |x| in level units (level k at k^2), the chunk's maximum on the top level exactly
        const Vec a = Vec::blendv(level_units(magnitude), top_level, magnitude == safe_scale);
        const Vec k = a.sqrt().floor(), low = k * k;
        // up to level k + 1 with probability (a - k^2) / (2k + 1)
        const Vec level = k + ((uniforms.next() * (k + k + one) < a - low) & one);
        const Vec code = Vec::blendv(spare, level ^ (x & sign_bit), finite);  // with x's sign
        at::vec::convert_to_int_of_same_size(code).store(q + j, count);
      });
    };
    if (std::isfinite(inv)) {
      encode_as([reciprocal = Vec(inv)](Vec magnitude) { return magnitude * reciprocal; });
    } else {  // a scale so small that top / scale overflows
      encode_as([&](Vec magnitude) { return magnitude / safe_scale * top_level; });
    }
    return scale;
  }
};

// Steps elements [begin, end) of a tensor whose first moment is compressed, a chunk at a time:
// decode m into a float32 buffer, update(x, n, m) the parameter and m over elements [x, x + n),
// encode m back. [begin, end) starts and ends where chunks do.
template <typename Update>
void step_chunks(const Stored& stored, int64_t begin, int64_t end, Update&& update) {
  alignas(64) float m[kCodecChunk];
  for (int64_t x = begin; x < end;) {
    const int64_t r = x / stored.width, c = x % stored.width, n = std::min(kCodecChunk, stored.width - c);
    stored.decode(r, c, n, m);
    update(x, n, m);
    stored.encode(r, c, n, m);
    x += n;
  }
}

// Whether element offset x is where a chunk starts (or the tensor ends).
bool chunk_bound(const Stored& stored, int64_t x) {
  return x % stored.width % kCodecChunk == 0;
}

// The first chunk bound at or after x.
int64_t next_chunk_bound(const Stored& stored, int64_t x) {
  const int64_t c = x % stored.width;
  if (c % kCodecChunk == 0) return x;
  return x - c + std::min(stored.width, (c / kCodecChunk + 1) * kCodecChunk);
}

// What pass 1 of a column-blocked tensor hands to its pass 2.
struct ColumnSums {
  int64_t n_chunks, rows_per_chunk;
  std::unique_ptr<std::byte[]> partial;  // n_chunks x row of opmath sums; row 0 ends as the denominators
  std::atomic<int64_t> pending;          // chunks whose sums are not in yet
  std::atomic<bool> ready{false};
};

// One tensor to step, as raw pointers plus its layout.
struct Job {
  int64_t param;  // position in the input lists
  void *p, *m, *v;
  const void* g;
  c10::ScalarType dtype;
  int64_t numel, n_blocks, outer, units, inner;
  const int64_t* bounds;  // n_blocks + 1 unit offsets; nullptr: every element is a block
  double weight_decay, step;
  std::shared_ptr<ColumnSums> columns;  // set when outer > 1
  Stored stored;                        // a compressed first moment (codec kPlain: m is `m`)
  bool m_in_math_type = false;          // m in float32 for a bf16/fp16 parameter
};

// kBlocks: blocks [begin, end) of a contiguous layout (elements for a coordinate layout).
// kSums / kUpdate: pass 1 / pass 2 of chunk `begin` of a column-blocked tensor.
// With a compressed first moment, kBlocks ranges of blocks end where a chunk ends, and
// coordinate and kUpdate tasks are element ranges [begin, end) that start and end at chunks.
struct Task {
  enum Kind { kBlocks, kSums, kUpdate } kind;
  int64_t job, begin, end;
};

struct Hyper {
  double lr, beta1, beta2, eps;
  bool maximize;
};

// Pass 1 of chunk task.begin of a column-blocked tensor: its rows' per-column sums of g^2. The
// last chunk in adds up the chunks, then each block's columns, into per-column denominators.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void column_sums(const Job& job, const Task& task, const Coeffs<opmath_t>& c) {
  ColumnSums& cols = *job.columns;
  const auto* g = static_cast<const scalar_t*>(job.g);
  auto* v = static_cast<opmath_t*>(job.v);
  const int64_t width = job.units * job.inner;
  auto* sums = reinterpret_cast<opmath_t*>(cols.partial.get());
  const int64_t first = task.begin * cols.rows_per_chunk, last = std::min(job.outer, first + cols.rows_per_chunk);
  opmath_t* acc = sums + task.begin * width;
  for (int64_t r = first; r < last; ++r) accumulate_squares(g + r * width, acc, width);
  if (cols.pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  for (int64_t k = 1; k < cols.n_chunks; ++k) {
    for (int64_t j = 0; j < width; ++j) sums[j] += sums[k * width + j];
  }
  for (int64_t b = 0; b < job.n_blocks; ++b) {
    opmath_t* block = sums + job.bounds[b] * job.inner;
    const int64_t n_cols = (job.bounds[b + 1] - job.bounds[b]) * job.inner;
    const opmath_t sum_sq = std::accumulate(block, block + n_cols, opmath_t(0));
    std::fill_n(block, n_cols, c.block_denom(v[b], sum_sq, n_cols * job.outer));
  }
  cols.ready.store(true, std::memory_order_release);
}

// The per-column denominators of a column-blocked tensor, once its pass 1 is done. Update tasks
// come after all sums tasks of their tensor, so the wait is at most one chunk.
template <typename opmath_t>
const opmath_t* wait_for_column_denoms(const Job& job) {
  while (!job.columns->ready.load(std::memory_order_acquire)) std::this_thread::yield();
  return reinterpret_cast<const opmath_t*>(job.columns->partial.get());
}

// A task of a tensor whose first moment is compressed (float32 math: float64 parameters are left
// to the decoded path).
template <typename scalar_t>
void run_compressed_task(const Job& job, const Task& task, const Coeffs<float>& c) {
  using P = Pack<scalar_t>;
  const Stored& stored = job.stored;
  auto* p = static_cast<scalar_t*>(job.p);
  auto* v = static_cast<float*>(job.v);
  const auto* g = static_cast<const scalar_t*>(job.g);
  const int64_t* bounds = job.bounds;
  const int64_t inner = job.inner;

  if (bounds == nullptr) {  // plain Adam
    step_chunks(stored, task.begin, task.end, [&](int64_t x, int64_t n, float* m) {
      update_coordinates(p + x, g + x, m, v + x, n, c);
    });
    return;
  }
  if (task.kind == Task::kBlocks) {
    // Groups of blocks that end where a chunk ends (one block for rows and heads): the group's
    // block sums while its g is in cache, then its chunks, each cut where blocks end.
    std::vector<float> denoms;
    for (int64_t b = task.begin; b < task.end;) {
      int64_t end = b + 1;
      while (end < task.end && !chunk_bound(stored, bounds[end] * inner)) ++end;
      denoms.clear();
      for (int64_t k = b; k < end; ++k) {
        const int64_t lo = bounds[k] * inner, n = (bounds[k + 1] - bounds[k]) * inner;
        denoms.push_back(c.block_denom(v[k], sum_squares(g + lo, n), n));
      }
      int64_t block = b;
      step_chunks(stored, bounds[b] * inner, bounds[end] * inner, [&](int64_t x, int64_t n, float* m) {
        for (int64_t j = 0; j < n;) {
          while (bounds[block + 1] * inner <= x + j) ++block;
          const int64_t piece = std::min(n - j, bounds[block + 1] * inner - (x + j));
          const typename P::Vec denom(denoms[block - b]);
          update_run(p + x + j, g + x + j, m + j, piece, c, [&](int64_t, auto* out, int64_t) {
            for (int k = 0; k < P::K; ++k) out[k] = denom;
          });
          j += piece;
        }
      });
      b = end;
    }
    return;
  }
  if (task.kind == Task::kSums) return column_sums<scalar_t>(job, task, c);
  // An element range of a column-blocked tensor: each chunk cut where the (outer, width) view's rows end.
  const float* denoms = wait_for_column_denoms<float>(job);
  const int64_t width = job.units * inner;
  step_chunks(stored, task.begin, task.end, [&](int64_t x, int64_t n, float* m) {
    for (int64_t j = 0; j < n;) {
      const int64_t column = (x + j) % width, piece = std::min(n - j, width - column);
      update_run(p + x + j, g + x + j, m + j, piece, c,
                 [&](int64_t i, auto* out, int64_t count) { P::load_math(denoms + column + i, out, count); });
      j += piece;
    }
  });
}

// m_t: the first moment's dtype, the parameter's or (for bf16/fp16 parameters) float32.
template <typename scalar_t, typename m_t>
void run_task(const Job& job, const Task& task, const Hyper& h) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t>;
  const Coeffs<opmath_t> c(h.lr, h.beta1, h.beta2, h.eps, job.weight_decay, job.step, h.maximize);
  auto* p = static_cast<scalar_t*>(job.p);
  auto* m = static_cast<m_t*>(job.m);
  auto* v = static_cast<opmath_t*>(job.v);
  const auto* g = static_cast<const scalar_t*>(job.g);
  const int64_t* bounds = job.bounds;
  if constexpr (std::is_same_v<opmath_t, float>) {
    if (job.stored.codec != kPlain) return run_compressed_task<scalar_t>(job, task, c);
  }

  if (bounds == nullptr) {  // plain Adam: one second moment per coordinate
    const int64_t i = task.begin;
    update_coordinates(p + i, g + i, m + i, v + i, task.end - task.begin, c);
    return;
  }
  if (task.kind == Task::kBlocks) {  // contiguous blocks: both passes while the block is in cache
    for (int64_t b = task.begin; b < task.end; ++b) {
      const int64_t lo = bounds[b] * job.inner, n = (bounds[b + 1] - bounds[b]) * job.inner;
      const typename P::Vec denom(c.block_denom(v[b], sum_squares(g + lo, n), n));
      update_run(p + lo, g + lo, m + lo, n, c, [&](int64_t i, auto* out, int64_t) {
        // Note: pass 2 finds g in cache, so the hardware prefetcher sees no g misses and lets
        // g's stream go cold; fetching the next block's g alongside keeps it busy (measured
        // ~15% faster on one core, ~10% on two).
        if (lo + n + i < job.numel) __builtin_prefetch(g + lo + n + i);
        for (int k = 0; k < P::K; ++k) out[k] = denom;
      });
    }
    return;
  }

  if (task.kind == Task::kSums) return column_sums<scalar_t>(job, task, c);
  const auto* sums = wait_for_column_denoms<opmath_t>(job);
  const int64_t width = job.units * job.inner;
  const int64_t first = task.begin * job.columns->rows_per_chunk;
  const int64_t last = std::min(job.outer, first + job.columns->rows_per_chunk);
  for (int64_t r = first; r < last; ++r) {
    update_run(p + r * width, g + r * width, m + r * width, width, c,
               [&](int64_t i, auto* out, int64_t count) { P::load_math(sums + i, out, count); });
  }
}

// Pass 1 tasks of a column-blocked tensor (chunks of whole rows), and its scratch.
void append_column_sums(Job& job, int64_t index, std::vector<Task>& tasks) {
  const int64_t width = job.units * job.inner;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / width);
  const int64_t n_chunks = (job.outer + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t bytes = n_chunks * width * static_cast<int64_t>(c10::elementSize(at::toOpMathType(job.dtype)));
  job.columns = std::make_shared<ColumnSums>();
  job.columns->n_chunks = n_chunks;
  job.columns->rows_per_chunk = rows_per_chunk;
  job.columns->partial = std::make_unique<std::byte[]>(bytes);  // value-initialised: zero sums
  job.columns->pending = n_chunks;
  for (int64_t k = 0; k < n_chunks; ++k) tasks.push_back({Task::kSums, index, k, k + 1});
}

// The tasks of a job whose first moment is compressed: every update task starts and ends where chunks do.
void append_compressed_tasks(Job& job, int64_t index, std::vector<Task>& tasks) {
  const Stored& stored = job.stored;
  auto ranges = [&](Task::Kind kind, int64_t elements) {
    for (int64_t i = 0; i < job.numel;) {
      const int64_t end = next_chunk_bound(stored, std::min(job.numel, i + elements));
      tasks.push_back({kind, index, i, end});
      i = end;
    }
  };
  if (job.bounds == nullptr) {
    ranges(Task::kBlocks, kTaskElements);
  } else if (job.outer == 1) {
    int64_t begin = 0, elements = 0;
    for (int64_t b = 0; b < job.n_blocks; ++b) {
      elements += (job.bounds[b + 1] - job.bounds[b]) * job.inner;
      const bool bound = chunk_bound(stored, job.bounds[b + 1] * job.inner);
      if ((elements >= kTaskElements && bound) || b + 1 == job.n_blocks) {
        tasks.push_back({Task::kBlocks, index, begin, b + 1});
        begin = b + 1;
        elements = 0;
      }
    }
  } else {
    append_column_sums(job, index, tasks);
    ranges(Task::kUpdate, kChunkElements);
  }
}

// Appends the tasks of job `index` in the order they should run.
void append_tasks(Job& job, int64_t index, std::vector<Task>& tasks) {
  if (job.stored.codec != kPlain) {
    append_compressed_tasks(job, index, tasks);
  } else if (job.bounds == nullptr) {
    for (int64_t i = 0; i < job.numel; i += kTaskElements) {
      tasks.push_back({Task::kBlocks, index, i, std::min(job.numel, i + kTaskElements)});
    }
  } else if (job.outer == 1) {
    int64_t begin = 0, elements = 0;
    for (int64_t b = 0; b < job.n_blocks; ++b) {
      elements += (job.bounds[b + 1] - job.bounds[b]) * job.inner;
      if (elements >= kTaskElements || b + 1 == job.n_blocks) {
        tasks.push_back({Task::kBlocks, index, begin, b + 1});
        begin = b + 1;
        elements = 0;
      }
    }
  } else {
    append_column_sums(job, index, tasks);
    for (int64_t k = 0; k < job.columns->n_chunks; ++k) tasks.push_back({Task::kUpdate, index, k, k + 1});
  }
}

bool is_dense_cpu(const Tensor& t, c10::ScalarType dtype, int64_t numel) {
  return t.defined() && t.device().is_cpu() && t.layout() == c10::kStrided && t.scalar_type() == dtype &&
         t.numel() == numel && t.is_contiguous() && !t.is_neg() && !t.is_conj();
}

// The job for tensor i (contiguous by now). The caller hands in only tensors the kernel takes
// (cpu.py decides, from dtypes, devices and layouts alone, so that a compiled step knows before
// the call); anything else is a bug there, and raises before any tensor is touched. `m`: the first
// moment in the parameter's dtype or the math dtype, or nullptr where it is compressed
// (make_compressed_job).
Job make_job(int64_t i, const Tensor& p, const Tensor& g, const Tensor* m, const Tensor& v, const Tensor& step,
             at::IntArrayRef segments, int64_t outer, int64_t inner, double weight_decay, std::vector<int64_t>& bounds) {
  const auto dtype = p.scalar_type();
  const auto math = at::toOpMathType(dtype);
  const bool supported = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool m_in_math_type = m != nullptr && math != dtype && is_dense_cpu(*m, math, p.numel());
  TORCH_CHECK(supported && is_dense_cpu(p, dtype, p.numel()) && is_dense_cpu(g, dtype, p.numel()) &&
                  (m == nullptr || m_in_math_type || is_dense_cpu(*m, dtype, p.numel())) &&
                  is_dense_cpu(v, math, v.numel()),
              "adam_mini_step: tensor ", i, " must be a CPU tensor of float32, float64, bfloat16 or float16, its "
              "gradient alike, its first moment alike or in the math dtype, and its second moments in the math dtype");
  TORCH_CHECK(step.defined() && step.device().is_cpu() && step.numel() == 1 &&
                  (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
              "adam_mini_step: step ", i, " must be a float32 or float64 CPU scalar");
  Job job{i, p.data_ptr(), m ? m->data_ptr() : nullptr, v.data_ptr(), g.const_data_ptr(), dtype, p.numel(), v.numel(), 1, p.numel(),
          1, nullptr, weight_decay, 0.0, nullptr};
  job.m_in_math_type = m_in_math_type;
  if (segments.empty()) {  // per coordinate
    TORCH_CHECK(v.numel() == p.numel(), "adam_mini_step: a per-coordinate layout needs one second moment per element");
    return job;
  }
  TORCH_CHECK(outer > 0 && inner > 0, "adam_mini_step: outer and inner must be positive");
  bounds.assign(1, 0);
  for (size_t s = 0; s + 1 < segments.size(); s += 2) {
    const int64_t units = segments[s], per_block = segments[s + 1];
    TORCH_CHECK(per_block > 0 && units % per_block == 0, "adam_mini_step: segment (", units, ", ", per_block,
                ") of tensor ", i, " does not split evenly");
    for (int64_t b = 0; b < units / per_block; ++b) bounds.push_back(bounds.back() + per_block);
  }
  TORCH_CHECK(static_cast<int64_t>(bounds.size()) == v.numel() + 1 && bounds.back() * outer * inner == p.numel(),
              "adam_mini_step: the segments of tensor ", i, " do not cover it with one second moment per block");
  job.bounds = bounds.data();
  job.outer = outer;
  job.inner = inner;
  job.units = bounds.back();
  return job;
}

// The job for tensor i whose first moment is stored by `codec` in `m` (bf16 values or codes) and,
// for int8/int4, `scales`; checked against the codec's layout (codecs.py, Note [chunks by row]).
Job make_compressed_job(int64_t i, Codec codec, const Tensor& p, const Tensor& g, const Tensor& m,
                        const Tensor& scales, const Tensor& v, const Tensor& step, at::IntArrayRef segments,
                        int64_t outer, int64_t inner, double weight_decay, std::vector<int64_t>& bounds) {
  const auto dtype = p.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "adam_mini_step: tensor ", i, " with a compressed first moment must be float32, bfloat16 or float16");
  const int64_t numel = p.numel(), rows = p.dim() >= 2 ? p.size(0) : 1, width = numel / rows;
  const int64_t chunks_per_row = (width + kCodecChunk - 1) / kCodecChunk, row_bytes = (width + 1) / 2;
  bool fits = false;
  if (codec == kBFloat16) {
    fits = is_dense_cpu(m, at::kBFloat16, numel);
  } else {
    fits = (codec == kInt8 ? is_dense_cpu(m, at::kChar, numel) : is_dense_cpu(m, at::kByte, rows * row_bytes)) &&
           is_dense_cpu(scales, at::kFloat, rows * chunks_per_row);
  }
  TORCH_CHECK(fits, "adam_mini_step: the compressed first moment of tensor ", i, " must be CPU storage of its "
              "codec for the parameter's shape: bf16 values, or int8 codes (int4: two a byte, uint8) and "
              "float32 scales laid out by row (codecs.ChunkQuantized)");
  Job job = make_job(i, p, g, nullptr, v, step, segments, outer, inner, weight_decay, bounds);
  job.stored = Stored{codec, m.data_ptr(), codec == kBFloat16 ? nullptr : scales.data_ptr<float>(), width,
                      chunks_per_row, row_bytes, 0};
  if (job.bounds != nullptr && job.n_blocks == 1 && job.outer > 1) {  // the whole rule: one contiguous run
    bounds.assign({0, 1});
    job.bounds = bounds.data();
    job.outer = 1;
    job.units = 1;
    job.inner = numel;
  }
  return job;
}

// step += 1 (a float32 or float64 scalar, as torch.optim keeps it) and its new value.
double increment_step(const Tensor& step) {
  if (step.scalar_type() == at::kFloat) return *step.data_ptr<float>() += 1.0f;
  return *step.data_ptr<double>() += 1.0;
}

void adam_mini_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList steps, at::IntArrayRef outer, at::IntArrayRef inner, at::IntArrayRef n_segments,
                    at::IntArrayRef segments, const Tensor& lr_tensor, double beta1, double beta2, double eps,
                    at::ArrayRef<double> weight_decays, bool maximize, int64_t momentum_codec,
                    at::TensorList exp_avg_scales, at::IntArrayRef salts, at::IntArrayRef seeds,
                    at::IntArrayRef offsets) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  outer.size() == n && inner.size() == n && n_segments.size() == n && weight_decays.size() == n,
              "adam_mini_step: every list must have one entry per parameter");
  TORCH_CHECK(2 * std::accumulate(n_segments.begin(), n_segments.end(), int64_t(0)) == static_cast<int64_t>(segments.size()),
              "adam_mini_step: segments must hold two numbers per segment counted in n_segments");
  TORCH_CHECK(momentum_codec >= kPlain && momentum_codec <= kInt4,
              "adam_mini_step: momentum_codec must be 0 (plain), 1 (bfloat16), 2 (int8) or 3 (int4), got ", momentum_codec);
  const auto codec = static_cast<Codec>(momentum_codec);
  const bool quantized = codec == kInt8 || codec == kInt4;
  TORCH_CHECK(exp_avg_scales.size() == (quantized ? n : 0),
              "adam_mini_step: exp_avg_scales must hold one tensor per parameter for int8/int4 momenta, none otherwise");
  TORCH_CHECK(salts.size() == (codec == kPlain ? 0 : n) && seeds.size() == salts.size() && offsets.size() == salts.size(),
              "adam_mini_step: salts, seeds and offsets must hold one number per parameter for a compressed momentum, "
              "none otherwise");
  TORCH_CHECK(lr_tensor.numel() == 1, "adam_mini_step: lr must be a 1-element tensor");
  const double lr = lr_tensor.item<double>();
  // The loops walk dense memory: a tensor that is not contiguous (a transposed parameter, a
  // hand-set gradient) is stepped through a contiguous copy, written back at the end. Rare, and it
  // leaves the choice of this kernel to dtypes and devices, which the caller (and a compiled step,
  // while tracing) knows cheaply.
  std::vector<Tensor> ps(params.begin(), params.end()), gs(grads.begin(), grads.end()),
      ms(exp_avgs.begin(), exp_avgs.end()), scales(exp_avg_scales.begin(), exp_avg_scales.end());
  for (size_t i = 0; i < n; ++i) {
    ps[i] = ps[i].contiguous();
    ms[i] = ms[i].contiguous();
    gs[i] = gs[i].contiguous();
  }
  for (Tensor& s : scales) s = s.contiguous();
  // Validate everything before touching anything: a bad input raises with no state changed.
  std::vector<Job> jobs;
  std::vector<std::vector<int64_t>> bounds(n);  // each tensor's block offsets, from its segments
  jobs.reserve(n);
  for (size_t i = 0, first = 0; i < n; first += 2 * n_segments[i], ++i) {
    const auto tensor_segments = segments.slice(first, 2 * n_segments[i]);
    if (codec == kPlain) {
      jobs.push_back(make_job(static_cast<int64_t>(i), ps[i], gs[i], &ms[i], exp_avg_sqs[i], steps[i], tensor_segments,
                              outer[i], inner[i], weight_decays[i], bounds[i]));
    } else {
      jobs.push_back(make_compressed_job(static_cast<int64_t>(i), codec, ps[i], gs[i], ms[i],
                                         quantized ? scales[i] : Tensor(), exp_avg_sqs[i], steps[i], tensor_segments,
                                         outer[i], inner[i], weight_decays[i], bounds[i]));
    }
  }
  std::vector<Task> tasks;
  for (size_t j = 0; j < jobs.size(); ++j) {
    jobs[j].step = increment_step(steps[jobs[j].param]);
    if (codec != kPlain) jobs[j].stored.key = rounding_key(seeds[j], jobs[j].step, salts[j], offsets[j]);
    append_tasks(jobs[j], static_cast<int64_t>(j), tasks);
  }

  // Tasks are claimed in order, one at a time: a thread that drew small tasks takes more of them,
  // the threads share each column-blocked tensor (its g has the best chance to stay in L3), and every
  // sums task of a tensor is claimed before any of its update tasks.
  const Hyper hyper{lr, beta1, beta2, eps, maximize};
  const auto n_tasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n_tasks; t = next++) {
      const Job& job = jobs[tasks[t].job];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, job.dtype, "adam_mini_step", [&] {
        if (job.m_in_math_type) {
          run_task<scalar_t, at::opmath_type<scalar_t>>(job, tasks[t], hyper);
        } else {
          run_task<scalar_t, scalar_t>(job, tasks[t], hyper);
        }
      });
    }
  });
  for (size_t i = 0; i < n; ++i) {  // the copies' results back into the tensors
    if (!ps[i].is_same(params[i])) params[i].copy_(ps[i]);
    if (!ms[i].is_same(exp_avgs[i])) exp_avgs[i].copy_(ms[i]);
  }
  for (size_t i = 0; i < scales.size(); ++i) {
    if (!scales[i].is_same(exp_avg_scales[i])) exp_avg_scales[i].copy_(scales[i]);
  }
}

// What an in-place op does for autograd: the kernel writes through raw pointers, so bump the
// version counter of every tensor it writes (a backward that saved one of them then refuses to
// run instead of reading new values), then run the kernel.
void adam_mini_step_inplace(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                            at::IntArrayRef outer, at::IntArrayRef inner, at::IntArrayRef n_segments,
                            at::IntArrayRef segments, const Tensor& lr, double beta1, double beta2, double eps,
                            at::ArrayRef<double> weight_decays, bool maximize, int64_t momentum_codec,
                            at::TensorList exp_avg_scales, at::IntArrayRef salts, at::IntArrayRef seeds,
                            at::IntArrayRef offsets) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blockopt::adam_mini_step", "")
                             .typed<decltype(adam_mini_step)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, exp_avgs, exp_avg_sqs, steps, outer,
                  inner, n_segments, segments, lr, beta1, beta2, eps, weight_decays, maximize, momentum_codec,
                  exp_avg_scales, salts, seeds, offsets);
  }
  for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps, exp_avg_scales}) {
    for (const Tensor& t : written) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

// A custom op that torch.compile captures whole: the schema names every list it writes (params,
// exp_avgs, exp_avg_sqs, steps, exp_avg_scales) and it returns nothing, so its fake kernel (cpu.py)
// has nothing to compute. lr is a tensor so that a tensor lr (an LR scheduler's, under
// torch.compile) is read at run time instead of baked into the graph; the rounding keys are mixed
// from the step tensors inside (with each tensor's salt, seed and offset, StoredMomentum.key), so
// no step count is read in Python either. momentum_codec: 0 plain
// (exp_avgs in the parameters' dtype), 1 bfloat16 (exp_avgs: bf16 values), 2 int8 / 3 int4
// (exp_avgs: codes, exp_avg_scales: their scales); one call steps one codec. (A fragment: the
// namespace has Python-defined ops too.)
TORCH_LIBRARY_FRAGMENT(blockopt, m) {
  m.def(
      "adam_mini_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, int[] outer, int[] inner, int[] n_segments, int[] segments, Tensor lr, float beta1, "
      "float beta2, float eps, float[] weight_decays, bool maximize, int momentum_codec, Tensor(e!)[] exp_avg_scales, "
      "int[] salts, int[] seeds, int[] offsets) -> ()");
}

TORCH_LIBRARY_IMPL(blockopt, CompositeExplicitAutograd, m) {
  m.impl("adam_mini_step", &adam_mini_step);
}

TORCH_LIBRARY_IMPL(blockopt, ADInplaceOrView, m) {
  m.impl("adam_mini_step", TORCH_FN(adam_mini_step_inplace));
}
