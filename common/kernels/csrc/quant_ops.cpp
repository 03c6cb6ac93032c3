// Native CPU kernels of the quantized runner (common/kernels): qmatmul, rmsnorm, silu_mul and
// attention. The arithmetic is defined by the torch reference, common/kernels/reference.py; the
// weight layout by common/kernels/packing.py (TiledWeight).
//
// Batch invariance by construction: every output element is computed whole by one thread, in an
// order that depends only on its own row (never on how many rows share the call, nor on the
// thread count). Threads split the work along output columns (qmatmul), rows (rmsnorm,
// silu_mul) or (row, head) pairs (attention), never along a reduction.
//
// Floating point: built with -ffp-contract=off and written with explicit mul/add (intrinsics or
// plain C++), so no product is fused into an add and every operation rounds as the reference
// rounds. One build serves every x86-64 CPU: three code paths, chosen at run time with
// __builtin_cpu_supports (or forced by the caller's `path` argument):
//   "avx512-vnni": qmatmul's vpdpbusd kernel, the rest compiled for AVX-512;
//   "avx2":        the plain C++ bodies compiled with target("avx2") (the compiler vectorizes them);
//   "generic":     the same plain C++ bodies for baseline x86-64 (or any other architecture).
// All paths give the same bits for all four ops: integer sums are exact in any order, the float
// steps are the same IEEE operations in the same order, and silu_mul / attention call the same
// scalar std::exp everywhere.
//
// Written for PipeSpec; the VNNI inner loop follows the idea of ggml's ggml_vec_dot_q4_K_q8_K
// (u8 weight codes x s8 activations with vpdpbusd) but no code is taken from it.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PIPESPEC_X86 1
#else
#define PIPESPEC_X86 0
#endif

#if PIPESPEC_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2")))
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t LANES = 16;   // output columns per tile (one zmm of int32 / float32)
constexpr int64_t MAX_ROWS = 8; // activation rows sharing one pass over a weight tile

// ------------------------------------------------------------------------------------------
// CPU detection
// ------------------------------------------------------------------------------------------

enum Path { GENERIC = 0, AVX2 = 1, VNNI = 2 };
const char* const PATH_NAMES[] = {"generic", "avx2", "avx512-vnni"};

// The best path this CPU runs.
Path best_path() {
#if PIPESPEC_X86
  static const Path best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return VNNI;
    return __builtin_cpu_supports("avx2") ? AVX2 : GENERIC;
  }();
  return best;
#else
  return GENERIC;
#endif
}

// The caller's choice: "" for the best, else a path name this CPU supports.
Path resolve_path(const std::string& name) {
  if (name.empty()) return best_path();
  for (int p = GENERIC; p <= best_path(); ++p)
    if (name == PATH_NAMES[p]) return static_cast<Path>(p);
  TORCH_CHECK(false, "code path '", name, "' is unknown or not supported by this CPU");
  return GENERIC; // not reached
}

void check_cpu_float(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
}

// ------------------------------------------------------------------------------------------
// 1. qmatmul
//
// For x [M, K] and w = s * u + z in groups of G along K (reference.qmatmul):
//   per row and group: amax = max |x|, d = amax / 127, inv = amax > 0 ? (1 / amax) * 127 : 0
//   (torch computes 127.0 / amax as reciprocal(amax) * 127: two roundings, kept here),
//   xq = nearbyint(x * inv) (half to even), xs = sum xq;
//   per output (m, n): acc = 0; for g = 0, 1, ...:
//     i = sum_k xq[m, k] u[n, k] over the group (exact integer),
//     acc = acc + d * ((float)i * s + z * (float)xs), each operation rounded on its own.
//
// Three ways to store s and z (packing.py): float32 per group; factored as the GGUF file has
// them, s = wd * sc and z = wdm * mi with wd, wdm fp16 per super-block of S weights along K and
// sc, mi int8 per group; or block scales (Q4_0, Q5_0, Q8_0), s = wd per group and
// z = s * (-offset). The kernel rebuilds s and z with one float32 mul each (exact: 11
// significant bits times at most 8), then the same arithmetic. Factored weights read 4.625 bits
// per weight at 4-bit g32 S=256 (6 as float32) and 7.125 at 6-bit g16 S=256 (10); block-scaled
// 5.5 at 5-bit g32 and 8.5 at 8-bit g32, as the file.
// ------------------------------------------------------------------------------------------

struct QuantRows {
  std::vector<int8_t> q; // [M, K]
  std::vector<float> d;  // [M, K/G]
  std::vector<float> xs; // [M, K/G], integer valued
};

// One row, plain C++ (the definition).
ALWAYS_INLINE void quantize_row_body(const float* x, int64_t k, int64_t group, int8_t* q,
                                     float* d, float* xs) {
  for (int64_t g = 0; g < k / group; ++g) {
    const float* xg = x + g * group;
    float amax = 0.0f;
    for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < group; ++i) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xg[i] * inv));
      q[g * group + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[g] = amax / 127.0f;
    xs[g] = static_cast<float>(sum);
  }
}

void quantize_row_generic(const float* x, int64_t k, int64_t group, int8_t* q, float* d,
                          float* xs) {
  quantize_row_body(x, k, group, q, d, xs);
}

#if PIPESPEC_X86
AVX2_TARGET void quantize_row_avx2(const float* x, int64_t k, int64_t group, int8_t* q, float* d,
                                   float* xs) {
  quantize_row_body(x, k, group, q, d, xs);
}

// One row, AVX-512 (same arithmetic: max is exact, x * inv one rounding, round to nearest even).
AVX512_TARGET void quantize_row_avx512(const float* x, int64_t k, int64_t group, int8_t* q,
                                       float* d, float* xs) {
  const int64_t vecs = group / LANES;
  for (int64_t g = 0; g < k / group; ++g) {
    const float* xg = x + g * group;
    __m512 v[2];
    __m512 m = _mm512_setzero_ps();
    for (int64_t j = 0; j < vecs; ++j) {
      v[j] = _mm512_loadu_ps(xg + j * LANES);
      m = _mm512_max_ps(m, _mm512_abs_ps(v[j]));
    }
    const float amax = _mm512_reduce_max_ps(m);
    const float inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t j = 0; j < vecs; ++j) {
      const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[j], vinv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      sum = _mm512_add_epi32(sum, r);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * group + j * LANES),
                       _mm512_cvtepi32_epi8(r));
    }
    d[g] = amax / 127.0f;
    xs[g] = static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
}
#endif

// Every row once per call (not per tile).
QuantRows quantize_rows(const float* x, int64_t m, int64_t k, int64_t group, Path path) {
  QuantRows r;
  const int64_t groups = k / group;
  r.q.resize(m * k);
  r.d.resize(m * groups);
  r.xs.resize(m * groups);
  const int64_t grain = std::max<int64_t>(1, 16384 / k);
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      int8_t* q = r.q.data() + i * k;
      float* d = r.d.data() + i * groups;
      float* xs = r.xs.data() + i * groups;
#if PIPESPEC_X86
      if (path == VNNI) {
        quantize_row_avx512(x + i * k, k, group, q, d, xs);
        continue;
      }
      if (path == AVX2) {
        quantize_row_avx2(x + i * k, k, group, q, d, xs);
        continue;
      }
#endif
      quantize_row_generic(x + i * k, k, group, q, d, xs);
    }
  });
  return r;
}

// What one call to a tile kernel sees: one tile of 16 columns, up to 8 activation rows.
struct TileArgs {
  const uint8_t* codes; // the tile's codes, [K/4, K/8, 5K/32 or 3K/16 loads, 16, 4]
  const float* s;       // the tile's scales [K/G, 16] (float32 layout)
  const float* z;       // the tile's offsets [K/G, 16] (float32 layout)
  const uint16_t* wd;   // factored layout: fp16 scale factors [K/S, 16]
  const uint16_t* wdm;  // fp16 offset factors [K/S, 16]
  const int8_t* sc;     // int8 scale factors [K/G, 16]
  const int8_t* mi;     // int8 offset factors [K/G, 16]
  int64_t per_block;    // groups per super-block (S / G)
  float neg_offset;     // block scales (sc, mi null): z = s * neg_offset, s = wd per group
  const int8_t* xq;     // first row's quantized activations; rows K apart
  const float* d;       // first row's group scales; rows K/G apart
  const float* xs;      // first row's group sums; rows K/G apart
  float* out;           // first row's 16 outputs; rows N apart
  int64_t k, groups, n;
};

#if PIPESPEC_X86
// VNNI: each 32-bit lane of a 64-byte code load holds 4 consecutive k of its column (u8), the
// 4 matching activations (s8) are broadcast, and vpdpbusd adds the 4 products to the lane.
// For 4 bits one load holds 8 k: low nibbles k 8o..8o+3, high nibbles 8o+4..8o+7. For 6 bits
// three loads hold 16 k: their low 4 bits as two 4-bit loads, then their high 2 bits (k 16h + 4i
// + b at bits 2i, 2i+1 of byte b). For 5 bits (groups of 32) five loads hold 32 k: their low 4
// bits as four 4-bit loads, then their fifth bits (k 32h + 4p + b at bit p of byte b).
// How a tile's scales come (TileArgs): float32 s, z; factored; or one float16 scale per group.
enum ScaleKind { FLOAT32_SCALES, FACTORED_SCALES, BLOCK_SCALES };

template <int BITS, int GROUP, int R, ScaleKind SCALES>
AVX512_TARGET void tile_vnni(const TileArgs& a) {
  constexpr int STEPS = GROUP / 4; // vpdpbusd per row and group
  static_assert(BITS != 5 || GROUP == 32, "5-bit codes come in groups of 32");
  constexpr int LOADS = BITS == 8   ? GROUP / 4
                        : BITS == 4 ? GROUP / 8
                        : BITS == 5 ? 5
                                    : GROUP / 16 * 3;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i top = _mm512_set1_epi8(0x30);
  const __m512i fifth = _mm512_set1_epi8(0x10);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 wd = _mm512_setzero_ps(), wdm = _mm512_setzero_ps();
  for (int64_t g = 0, in_block = 0; g < a.groups; ++g) {
    const uint8_t* c = a.codes + g * LOADS * 64;
    __m512i w[STEPS];
    if constexpr (BITS == 6) {
      for (int h = 0; h < GROUP / 16; ++h) {
        const __m512i lo0 = _mm512_loadu_si512(c + 192 * h);
        const __m512i lo1 = _mm512_loadu_si512(c + 192 * h + 64);
        const __m512i hi = _mm512_loadu_si512(c + 192 * h + 128);
        // the high 2 bits of k 16h + 4i + b moved to bits 4, 5 (the 16-bit shifts spill only
        // into bits the mask clears)
        const __m512i h0 = _mm512_and_si512(_mm512_slli_epi16(hi, 4), top);
        const __m512i h1 = _mm512_and_si512(_mm512_slli_epi16(hi, 2), top);
        const __m512i h2 = _mm512_and_si512(hi, top);
        const __m512i h3 = _mm512_and_si512(_mm512_srli_epi16(hi, 2), top);
        w[4 * h] = _mm512_or_si512(_mm512_and_si512(lo0, nibble), h0);
        w[4 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo0, 4), nibble), h1);
        w[4 * h + 2] = _mm512_or_si512(_mm512_and_si512(lo1, nibble), h2);
        w[4 * h + 3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo1, 4), nibble), h3);
      }
    } else if constexpr (BITS == 5) {
      const __m512i hi = _mm512_loadu_si512(c + 256);
      for (int l = 0; l < 4; ++l) {
        const __m512i raw = _mm512_loadu_si512(c + 64 * l);
        w[2 * l] = _mm512_and_si512(raw, nibble);
        w[2 * l + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
      // bit p of the fifth-bit load moved to bit 4 of step p's codes (the 16-bit shifts, at
      // most 4 either way, spill only into bits the mask clears)
      w[0] = _mm512_or_si512(w[0], _mm512_and_si512(_mm512_slli_epi16(hi, 4), fifth));
      w[1] = _mm512_or_si512(w[1], _mm512_and_si512(_mm512_slli_epi16(hi, 3), fifth));
      w[2] = _mm512_or_si512(w[2], _mm512_and_si512(_mm512_slli_epi16(hi, 2), fifth));
      w[3] = _mm512_or_si512(w[3], _mm512_and_si512(_mm512_slli_epi16(hi, 1), fifth));
      w[4] = _mm512_or_si512(w[4], _mm512_and_si512(hi, fifth));
      w[5] = _mm512_or_si512(w[5], _mm512_and_si512(_mm512_srli_epi16(hi, 1), fifth));
      w[6] = _mm512_or_si512(w[6], _mm512_and_si512(_mm512_srli_epi16(hi, 2), fifth));
      w[7] = _mm512_or_si512(w[7], _mm512_and_si512(_mm512_srli_epi16(hi, 3), fifth));
    } else {
      for (int l = 0; l < LOADS; ++l) {
        const __m512i raw = _mm512_loadu_si512(c + 64 * l);
        if constexpr (BITS == 8) {
          w[l] = raw;
        } else {
          w[2 * l] = _mm512_and_si512(raw, nibble);
          w[2 * l + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
        }
      }
    }
    __m512 s, z;
    if constexpr (SCALES == BLOCK_SCALES) { // s = d, z = s * (-offset): exact, as the factors
      s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.wd + g * LANES)));
      z = _mm512_mul_ps(s, _mm512_set1_ps(a.neg_offset));
    } else if constexpr (SCALES == FACTORED_SCALES) {
      if (in_block == 0) { // a new super-block: its 16 fp16 factors -> float32 (exact)
        const int64_t b = g / a.per_block;
        wd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.wd + b * LANES)));
        wdm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.wdm + b * LANES)));
      }
      if (++in_block == a.per_block) in_block = 0;
      const __m512 sc = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.sc + g * LANES))));
      const __m512 mi = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.mi + g * LANES))));
      s = _mm512_mul_ps(wd, sc);
      z = _mm512_mul_ps(wdm, mi);
    } else {
      s = _mm512_loadu_ps(a.s + g * LANES);
      z = _mm512_loadu_ps(a.z + g * LANES);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = a.xq + r * a.k + g * GROUP;
      __m512i i0 = _mm512_setzero_si512();
      __m512i i1 = _mm512_setzero_si512(); // two chains: the integer sum is exact in any order
      for (int p = 0; p < STEPS; p += 2) {
        int32_t x0, x1;
        std::memcpy(&x0, xr + 4 * p, 4);
        std::memcpy(&x1, xr + 4 * p + 4, 4);
        i0 = _mm512_dpbusd_epi32(i0, w[p], _mm512_set1_epi32(x0));
        i1 = _mm512_dpbusd_epi32(i1, w[p + 1], _mm512_set1_epi32(x1));
      }
      const __m512 fi = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
      const __m512 xs = _mm512_set1_ps(a.xs[r * a.groups + g]);
      const __m512 d = _mm512_set1_ps(a.d[r * a.groups + g]);
      const __m512 t = _mm512_add_ps(_mm512_mul_ps(fi, s), _mm512_mul_ps(z, xs));
      acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(d, t));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(a.out + r * a.n, acc[r]);
}

template <int BITS, int GROUP, ScaleKind SCALES>
void tile_vnni_rows(const TileArgs& a, int64_t rows) {
  switch (rows) {
    case 1: return tile_vnni<BITS, GROUP, 1, SCALES>(a);
    case 2: return tile_vnni<BITS, GROUP, 2, SCALES>(a);
    case 3: return tile_vnni<BITS, GROUP, 3, SCALES>(a);
    case 4: return tile_vnni<BITS, GROUP, 4, SCALES>(a);
    case 5: return tile_vnni<BITS, GROUP, 5, SCALES>(a);
    case 6: return tile_vnni<BITS, GROUP, 6, SCALES>(a);
    case 7: return tile_vnni<BITS, GROUP, 7, SCALES>(a);
    default: return tile_vnni<BITS, GROUP, 8, SCALES>(a);
  }
}

template <int BITS, int GROUP>
void tile_vnni_layout(const TileArgs& a, int64_t rows) {
  if (a.s != nullptr) return tile_vnni_rows<BITS, GROUP, FLOAT32_SCALES>(a, rows);
  if (a.sc == nullptr) return tile_vnni_rows<BITS, GROUP, BLOCK_SCALES>(a, rows);
  return tile_vnni_rows<BITS, GROUP, FACTORED_SCALES>(a, rows);
}
#endif

// Plain C++: the same arithmetic. A group's codes are unpacked once per tile into u[k][lane]
// (shared by the rows of the block); then per row the 16 integer sums and the float epilogue.
ALWAYS_INLINE void tile_plain_body(const TileArgs& a, int64_t rows, int bits, int64_t group) {
  float acc[MAX_ROWS][LANES] = {};
  int32_t u[32][LANES];
  for (int64_t g = 0; g < a.groups; ++g) {
    for (int64_t kk = 0; kk < group; ++kk) {
      const int64_t k = g * group + kk;
      if (bits == 8) {
        const uint8_t* c = a.codes + (k / 4) * LANES * 4 + k % 4;
        for (int64_t j = 0; j < LANES; ++j) u[kk][j] = c[4 * j];
      } else if (bits == 6) { // loads 3h, 3h+1: low 4 bits as 4-bit codes; 3h+2: high 2 bits
        const int64_t h = k / 16, kh = k % 16;
        const uint8_t* lo = a.codes + (3 * h + kh / 8) * LANES * 4 + k % 4;
        const uint8_t* hi = a.codes + (3 * h + 2) * LANES * 4 + k % 4;
        const int shift = (kh % 8) < 4 ? 0 : 4, hshift = 2 * (kh / 4);
        for (int64_t j = 0; j < LANES; ++j)
          u[kk][j] = ((lo[4 * j] >> shift) & 0x0F) | (((hi[4 * j] >> hshift) & 0x03) << 4);
      } else if (bits == 5) { // loads 5h..5h+3: low 4 bits as 4-bit codes; 5h+4: fifth bits
        const int64_t h = k / 32, kh = k % 32;
        const uint8_t* lo = a.codes + (5 * h + kh / 8) * LANES * 4 + k % 4;
        const uint8_t* hi = a.codes + (5 * h + 4) * LANES * 4 + k % 4;
        const int shift = (kh % 8) < 4 ? 0 : 4, hshift = static_cast<int>(kh / 4);
        for (int64_t j = 0; j < LANES; ++j)
          u[kk][j] = ((lo[4 * j] >> shift) & 0x0F) | (((hi[4 * j] >> hshift) & 0x01) << 4);
      } else {
        const uint8_t* c = a.codes + (k / 8) * LANES * 4 + k % 4;
        const int shift = (k % 8) < 4 ? 0 : 4; // low nibbles: k 8o..8o+3; high: 8o+4..8o+7
        for (int64_t j = 0; j < LANES; ++j) u[kk][j] = (c[4 * j] >> shift) & 0x0F;
      }
    }
    float sf[LANES], zf[LANES];
    const float* s = sf;
    const float* z = zf;
    if (a.s == nullptr && a.sc == nullptr) { // block scales: as the VNNI kernel
      for (int64_t j = 0; j < LANES; ++j) {
        sf[j] = c10::detail::fp16_ieee_to_fp32_value(a.wd[g * LANES + j]);
        zf[j] = sf[j] * a.neg_offset;
      }
    } else if (a.s == nullptr) { // factored: the same float32 products as the VNNI kernel
      const int64_t b = g / a.per_block;
      for (int64_t j = 0; j < LANES; ++j) {
        sf[j] = c10::detail::fp16_ieee_to_fp32_value(a.wd[b * LANES + j]) *
                static_cast<float>(a.sc[g * LANES + j]);
        zf[j] = c10::detail::fp16_ieee_to_fp32_value(a.wdm[b * LANES + j]) *
                static_cast<float>(a.mi[g * LANES + j]);
      }
    } else {
      s = a.s + g * LANES;
      z = a.z + g * LANES;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* xr = a.xq + r * a.k + g * group;
      int32_t isum[LANES] = {0};
      for (int64_t kk = 0; kk < group; ++kk) {
        const int32_t xv = xr[kk];
        for (int64_t j = 0; j < LANES; ++j) isum[j] += xv * u[kk][j];
      }
      const float xs = a.xs[r * a.groups + g];
      const float d = a.d[r * a.groups + g];
      for (int64_t j = 0; j < LANES; ++j) {
        const float t = static_cast<float>(isum[j]) * s[j] + z[j] * xs;
        acc[r][j] = acc[r][j] + d * t;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < LANES; ++j) a.out[r * a.n + j] = acc[r][j];
}

void tile_generic(const TileArgs& a, int64_t rows, int bits, int64_t group) {
  tile_plain_body(a, rows, bits, group);
}

#if PIPESPEC_X86
AVX2_TARGET void tile_avx2(const TileArgs& a, int64_t rows, int bits, int64_t group) {
  tile_plain_body(a, rows, bits, group);
}
#endif

void run_tile(const TileArgs& a, int64_t rows, int bits, int64_t group, Path path) {
#if PIPESPEC_X86
  if (path == VNNI) {
    if (bits == 4 && group == 32) return tile_vnni_layout<4, 32>(a, rows);
    if (bits == 4 && group == 16) return tile_vnni_layout<4, 16>(a, rows);
    if (bits == 5) return tile_vnni_layout<5, 32>(a, rows);
    if (bits == 6 && group == 32) return tile_vnni_layout<6, 32>(a, rows);
    if (bits == 6 && group == 16) return tile_vnni_layout<6, 16>(a, rows);
    if (bits == 8 && group == 32) return tile_vnni_layout<8, 32>(a, rows);
    return tile_vnni_layout<8, 16>(a, rows);
  }
  if (path == AVX2) return tile_avx2(a, rows, bits, group);
#endif
  tile_generic(a, rows, bits, group);
}

// The weight's scales as the kernel reads them: float32 s, z, or the factors (the other null).
struct Scales {
  const float* s = nullptr;
  const float* z = nullptr;
  const uint16_t* wd = nullptr;
  const uint16_t* wdm = nullptr;
  const int8_t* sc = nullptr;
  const int8_t* mi = nullptr;
  int64_t superblock = 0;
  float neg_offset = 0.0f; // block scales: wd per group, sc and mi null
};

// 64-byte code loads per tile: 4 k per load (8 bits), 8 (4 bits), 32 per 5 loads (5 bits), 16
// per 3 loads (6 bits).
int64_t loads_per_tile(int64_t k, int64_t bits) {
  return bits == 8 ? k / 4 : bits == 4 ? k / 8 : bits == 5 ? k / 32 * 5 : k / 16 * 3;
}

void check_codes(const torch::Tensor& x, const torch::Tensor& codes, int64_t n, int64_t k,
                 int64_t group, int64_t bits) {
  check_cpu_float(x, "x", 2);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 4,
              "codes must be contiguous uint8 [N/16, K/4, K/8, 5K/32 or 3K/16, 16, 4]");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  TORCH_CHECK(group == 16 || group == 32, "group must be 16 or 32");
  TORCH_CHECK(bits != 5 || group == 32, "5-bit codes come in groups of 32");
  TORCH_CHECK(n % LANES == 0 && k % group == 0, "N must be a multiple of 16, K of the group");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight ", k);
  TORCH_CHECK(codes.size(0) == n / LANES && codes.size(1) == loads_per_tile(k, bits) &&
                  codes.size(2) == LANES && codes.size(3) == 4,
              "codes do not fit the shape");
}

// A tiled [N/16, blocks, 16] tensor of the given type, contiguous.
void check_lanes(const torch::Tensor& t, const char* name, torch::ScalarType type, int64_t tiles,
                 int64_t blocks) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of ", c10::toString(type));
  TORCH_CHECK(t.dim() == 3 && t.size(0) == tiles && t.size(1) == blocks && t.size(2) == LANES,
              name, " does not fit the shape");
}

torch::Tensor qmatmul_impl(const torch::Tensor& x, const torch::Tensor& codes, const Scales& sw,
                           int64_t n, int64_t k, int64_t group, int64_t bits,
                           const std::string& path_name) {
  const int64_t tiles = n / LANES, groups = k / group, m = x.size(0);
  const int64_t blocks = sw.superblock ? k / sw.superblock : 0;
  auto out = torch::empty({m, n}, x.options());
  if (m == 0) return out;
  const Path path = resolve_path(path_name);
  const QuantRows qr = quantize_rows(x.data_ptr<float>(), m, k, group, path);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t tile_bytes = loads_per_tile(k, bits) * 64;
  // Enough tiles per task that a thread's share outweighs waking it (~1M multiply-adds, ~10 us):
  // a 256x1536 decode product stays on one thread.
  const int64_t work = k * LANES * std::min<int64_t>(m, MAX_ROWS);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / work);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tg = t * groups * LANES, tb = t * blocks * LANES;
      for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
        const TileArgs a{cp + t * tile_bytes,
                         sw.s ? sw.s + tg : nullptr,
                         sw.z ? sw.z + tg : nullptr,
                         sw.wd ? sw.wd + tb : nullptr,
                         sw.wdm ? sw.wdm + tb : nullptr,
                         sw.sc ? sw.sc + tg : nullptr,
                         sw.mi ? sw.mi + tg : nullptr,
                         sw.superblock / group,
                         sw.neg_offset,
                         qr.q.data() + r0 * k,
                         qr.d.data() + r0 * groups,
                         qr.xs.data() + r0 * groups,
                         op + r0 * n + t * LANES,
                         k,
                         groups,
                         n};
        run_tile(a, std::min(MAX_ROWS, m - r0), static_cast<int>(bits), group, path);
      }
    }
  });
  return out;
}

// Float32 scales and offsets: s, z [N/16, K/G, 16].
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor codes, torch::Tensor s, torch::Tensor z,
                      int64_t n, int64_t k, int64_t group, int64_t bits,
                      const std::string& path_name) {
  check_codes(x, codes, n, k, group, bits);
  check_lanes(s, "s", torch::kFloat32, n / LANES, k / group);
  check_lanes(z, "z", torch::kFloat32, n / LANES, k / group);
  Scales sw;
  sw.s = s.data_ptr<float>();
  sw.z = z.data_ptr<float>();
  return qmatmul_impl(x, codes, sw, n, k, group, bits, path_name);
}

// Factored: s = d * sc, z = dm * mi; d, dm float16 [N/16, K/S, 16], sc, mi int8 [N/16, K/G, 16].
torch::Tensor qmatmul_factored(torch::Tensor x, torch::Tensor codes, torch::Tensor d,
                               torch::Tensor dm, torch::Tensor sc, torch::Tensor mi, int64_t n,
                               int64_t k, int64_t group, int64_t superblock, int64_t bits,
                               const std::string& path_name) {
  check_codes(x, codes, n, k, group, bits);
  TORCH_CHECK(superblock > 0 && superblock % group == 0 && k % superblock == 0,
              "the super-block must be a multiple of the group and divide K");
  check_lanes(d, "d", torch::kFloat16, n / LANES, k / superblock);
  check_lanes(dm, "dm", torch::kFloat16, n / LANES, k / superblock);
  check_lanes(sc, "sc", torch::kInt8, n / LANES, k / group);
  check_lanes(mi, "mi", torch::kInt8, n / LANES, k / group);
  Scales sw;
  sw.wd = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  sw.wdm = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  sw.sc = sc.data_ptr<int8_t>();
  sw.mi = mi.data_ptr<int8_t>();
  sw.superblock = superblock;
  return qmatmul_impl(x, codes, sw, n, k, group, bits, path_name);
}

// Block scales: s = d, z = -offset * d; d float16 [N/16, K/G, 16] (Q4_0, Q5_0, Q8_0).
torch::Tensor qmatmul_block(torch::Tensor x, torch::Tensor codes, torch::Tensor d, double offset,
                            int64_t n, int64_t k, int64_t group, int64_t bits,
                            const std::string& path_name) {
  check_codes(x, codes, n, k, group, bits);
  check_lanes(d, "d", torch::kFloat16, n / LANES, k / group);
  TORCH_CHECK(offset >= 0 && offset < 256 && offset == static_cast<double>(static_cast<int>(offset)),
              "the code offset must be an integer in 0..255");
  Scales sw;
  sw.wd = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  sw.superblock = group;
  sw.neg_offset = -static_cast<float>(offset);
  return qmatmul_impl(x, codes, sw, n, k, group, bits, path_name);
}

// ------------------------------------------------------------------------------------------
// 2. rmsnorm
//
// ss = 16 lane sums of x * x (lane l adds x[16 i + l] for i = 0, 1, ...), lanes added 0..15;
// mean = ss / (float)K; r = 1 / sqrtf(mean + eps); out = (x * r) * w.
// ------------------------------------------------------------------------------------------

ALWAYS_INLINE void rmsnorm_row_body(const float* x, const float* w, int64_t k, float eps,
                                    float* out) {
  float lanes[LANES] = {0.0f};
  for (int64_t i = 0; i < k; i += LANES)
    for (int64_t l = 0; l < LANES; ++l) lanes[l] = lanes[l] + x[i + l] * x[i + l];
  float ss = lanes[0];
  for (int64_t l = 1; l < LANES; ++l) ss = ss + lanes[l];
  const float mean = ss / static_cast<float>(k);
  const float r = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < k; ++i) out[i] = (x[i] * r) * w[i];
}

void rmsnorm_row_generic(const float* x, const float* w, int64_t k, float eps, float* out) {
  rmsnorm_row_body(x, w, k, eps, out);
}

#if PIPESPEC_X86
AVX2_TARGET void rmsnorm_row_avx2(const float* x, const float* w, int64_t k, float eps,
                                  float* out) {
  rmsnorm_row_body(x, w, k, eps, out);
}

AVX512_TARGET void rmsnorm_row_avx512(const float* x, const float* w, int64_t k, float eps,
                                      float* out) {
  rmsnorm_row_body(x, w, k, eps, out); // the compiler vectorizes the lanes; no reassociation
}
#endif

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor weight, double eps,
                      const std::string& path_name) {
  check_cpu_float(x, "x", 2);
  check_cpu_float(weight, "weight", 1);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % LANES == 0 && weight.size(0) == k, "K must be a multiple of 16 and match");
  auto out = torch::empty_like(x);
  const Path path = resolve_path(path_name);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
#if PIPESPEC_X86
                       if (path == VNNI) {
                         rmsnorm_row_avx512(xp + r * k, wp, k, e, op + r * k);
                         continue;
                       }
                       if (path == AVX2) {
                         rmsnorm_row_avx2(xp + r * k, wp, k, e, op + r * k);
                         continue;
                       }
#endif
                       rmsnorm_row_generic(xp + r * k, wp, k, e, op + r * k);
                     }
                   });
  return out;
}

// ------------------------------------------------------------------------------------------
// 3. silu_mul: out = g / (1 + exp(-g)) * u for gate_up = [g | u], per element, with the same
// scalar std::exp (libm expf) for every element: no vector body and scalar tail to differ.
// ------------------------------------------------------------------------------------------

torch::Tensor silu_mul(torch::Tensor gate_up, const std::string& path_name) {
  resolve_path(path_name); // one body for every path: scalar std::exp per element
  check_cpu_float(gate_up, "gate_up", 2);
  const int64_t m = gate_up.size(0), f = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * f, "gate_up must have an even width");
  auto out = torch::empty({m, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, std::max<int64_t>(1, 8192 / std::max<int64_t>(f, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const float* g = gp + r * 2 * f;
                       const float* u = g + f;
                       float* o = op + r * f;
                       for (int64_t i = 0; i < f; ++i)
                         o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
                     }
                   });
  return out;
}

// ------------------------------------------------------------------------------------------
// 4. attention
//
// Per query row n and head h (KV head h / (H / KVH)), keys j < counts[n] at pool rows
// key_rows[row_start[n] + j]:
//   s_j = dot(q, k_j) * scale, the dot in 16 lanes (lane l adds q[16 i + l] k[16 i + l]) then
//   lanes added 0..15; mx = max s_j; e_j = expf(s_j - mx); den = sum e_j in j order (double);
//   acc = sum e_j v_j in j order (float, per element); out = acc / den.
// ------------------------------------------------------------------------------------------

struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* rows; // this query row's pool rows, counts[n] of them
  int64_t count, kvh, kv_heads, dim;
  float scale;
  float* out;
  float* scores; // scratch, count floats
};

ALWAYS_INLINE void attention_body(const AttnArgs& a) {
  const int64_t stride = a.kv_heads * a.dim;
  float mx = -INFINITY;
  for (int64_t j = 0; j < a.count; ++j) {
    const float* kj = a.k + a.rows[j] * stride + a.kvh * a.dim;
    float lanes[LANES] = {0.0f};
    for (int64_t i = 0; i < a.dim; i += LANES)
      for (int64_t l = 0; l < LANES; ++l) lanes[l] = lanes[l] + a.q[i + l] * kj[i + l];
    float dot = lanes[0];
    for (int64_t l = 1; l < LANES; ++l) dot = dot + lanes[l];
    a.scores[j] = dot * a.scale;
    mx = std::max(mx, a.scores[j]);
  }
  double den = 0.0;
  for (int64_t j = 0; j < a.count; ++j) {
    a.scores[j] = std::exp(a.scores[j] - mx);
    den += a.scores[j];
  }
  for (int64_t i = 0; i < a.dim; ++i) a.out[i] = 0.0f;
  for (int64_t j = 0; j < a.count; ++j) {
    const float* vj = a.v + a.rows[j] * stride + a.kvh * a.dim;
    const float e = a.scores[j];
    for (int64_t i = 0; i < a.dim; ++i) a.out[i] = a.out[i] + e * vj[i];
  }
  const float fden = static_cast<float>(den);
  for (int64_t i = 0; i < a.dim; ++i) a.out[i] = a.out[i] / fden;
}

void attention_generic(const AttnArgs& a) { attention_body(a); }

#if PIPESPEC_X86
AVX2_TARGET void attention_avx2(const AttnArgs& a) { attention_body(a); }
AVX512_TARGET void attention_avx512(const AttnArgs& a) { attention_body(a); }
#endif

torch::Tensor attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor key_rows, torch::Tensor row_start, torch::Tensor counts,
                        double scale, const std::string& path_name) {
  check_cpu_float(q, "q", 3);
  check_cpu_float(k_cache, "k_cache", 3);
  check_cpu_float(v_cache, "v_cache", 3);
  for (const auto* t : {&key_rows, &row_start, &counts})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->dim() == 1,
                "key_rows, row_start and counts must be contiguous int64 vectors");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t pool = k_cache.size(0), kv_heads = k_cache.size(1);
  TORCH_CHECK(dim % LANES == 0 && k_cache.size(2) == dim && v_cache.sizes() == k_cache.sizes(),
              "head size must be a multiple of 16 and match the caches");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(row_start.size(0) == n && counts.size(0) == n, "one start and count per row");
  const int64_t* rows = key_rows.data_ptr<int64_t>();
  const int64_t* starts = row_start.data_ptr<int64_t>();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  const int64_t total = key_rows.size(0);
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(cnt[r] > 0 && starts[r] >= 0 && starts[r] + cnt[r] <= total,
                "row ", r, ": keys out of range");
  for (int64_t i = 0; i < total; ++i)
    TORCH_CHECK(rows[i] >= 0 && rows[i] < pool, "key row out of the pool");
  auto out = torch::empty_like(q);
  const Path path = resolve_path(path_name);
  const int64_t rep = heads / kv_heads;
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n * heads, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> scratch;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = p / heads, h = p % heads;
      scratch.resize(cnt[r]);
      const AttnArgs a{qp + p * dim, kp,  vp, rows + starts[r], cnt[r], h / rep, kv_heads, dim,
                       static_cast<float>(scale), op + p * dim, scratch.data()};
#if PIPESPEC_X86
      if (path == VNNI) {
        attention_avx512(a);
        continue;
      }
      if (path == AVX2) {
        attention_avx2(a);
        continue;
      }
#endif
      attention_generic(a);
    }
  });
  return out;
}

std::string cpu_path() { return PATH_NAMES[best_path()]; }

std::vector<std::string> cpu_paths() {
  std::vector<std::string> names;
  for (int p = GENERIC; p <= best_path(); ++p) names.emplace_back(PATH_NAMES[p]);
  return names;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "PipeSpec's batch-invariant quantized CPU kernels (see common/kernels/reference.py)";
  m.def("qmatmul", &qmatmul, "x [M,K] @ tiled quantized weight -> [M,N]", py::arg("x"),
        py::arg("codes"), py::arg("s"), py::arg("z"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("bits"), py::arg("path") = "");
  m.def("qmatmul_factored", &qmatmul_factored,
        "x [M,K] @ tiled quantized weight with factored scales (s = d * sc, z = dm * mi)",
        py::arg("x"), py::arg("codes"), py::arg("d"), py::arg("dm"), py::arg("sc"),
        py::arg("mi"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("superblock"),
        py::arg("bits"), py::arg("path") = "");
  m.def("qmatmul_block", &qmatmul_block,
        "x [M,K] @ tiled quantized weight with one float16 scale per group (s = d, z = -offset d)",
        py::arg("x"), py::arg("codes"), py::arg("d"), py::arg("offset"), py::arg("n"),
        py::arg("k"), py::arg("group"), py::arg("bits"), py::arg("path") = "");
  m.def("rmsnorm", &rmsnorm, "(x * r) * weight per row", py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("path") = "");
  m.def("silu_mul", &silu_mul, "silu(gate) * up", py::arg("gate_up"),
        py::arg("path") = "");
  m.def("attention", &attention, "per-row causal attention over pooled keys", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("key_rows"), py::arg("row_start"),
        py::arg("counts"), py::arg("scale"), py::arg("path") = "");
  m.def("cpu_path", &cpu_path, "the best code path of this CPU: avx512-vnni, avx2 or generic");
  m.def("cpu_paths", &cpu_paths, "every code path this CPU can run (for tests)");
}
