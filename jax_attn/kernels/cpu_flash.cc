// Fused flash attention for x86-64 CPUs (AVX2 + FMA), float32, as XLA FFI custom calls.
//
// jax_attn/kernels/cpu_flash.py compiles this file on first use and registers the three
// handlers below (forward, backward, tangent) with jax.ffi. Layouts are jax.nn's:
// q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], out [B, T, N, Hv] (leading axes before
// B, from vmap, fold into B); lse [B, N, T] is the log-sum-exp of each query row's scaled
// logits (kMasked for a row with nothing to attend).
//
// What a query may attend is one interval of keys per row: the causal limit, a local
// window, and the per-sequence lengths each cut it (bottom-right aligned: query t sits at
// key position t + S - T). No score function: the Python side declines it, and dispatch
// picks another kernel. Two score options (tanh soft-capping, then ALiBi) and the
// library's hash dropout are served here (see "score options and dropout" below).
//
// A boolean mask and an additive bias broadcastable to [B, N, T, S] come as given (any
// axis of size 1 read with stride 0, never broadcast in memory; an empty operand: none).
// They cut single keys out of the intervals: a masked key's logit becomes -inf, as does
// one whose bias is -inf, and every -inf logit gets weight exactly 0. The bias is added
// after the score options, as in the reference.
//
// Block sparsity: a mask_fn's block structure comes as a table of
// (query tile, key tile) pairs, each empty (skipped), full (no per-element work beyond the
// intervals above) or partial, with a bitmask of kTile x kTile bits per partial tile,
// evaluated in JAX on those tiles only (this code cannot call the mask_fn).
//
// Forward: one work item is (batch, query head, tile of kTile query rows); it walks the
// key tiles its rows may see with the online softmax (running max m, sum l, unnormalised
// accumulator). Backward (FlashAttention-2): one work item is (batch, key/value head,
// share of its key tiles); it owns dK, dV of its key tiles and adds its dQ share under a
// lock per query tile; it takes lse's cotangent too. Tangent (forward mode): the forward's
// items, one pass with the given lse. Items run on XLA's intra-op thread pool; an
// exception in any of them (a failed allocation included) becomes the call's error.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Floats = ffi::Buffer<ffi::F32>;
using Lengths = ffi::Buffer<ffi::S32>;
using Seeds = ffi::Buffer<ffi::U32>;
using FloatsOut = ffi::ResultBuffer<ffi::F32>;
using Masks = ffi::Buffer<ffi::PRED>;
using TileTable = ffi::Buffer<ffi::S32>;
using TileBits = ffi::Buffer<ffi::U32>;

namespace {

constexpr int kTile = 64;  // query rows and keys per tile
constexpr float kMasked = -0.7f * 3.4028234663852886e38f;
// A tile table's entries besides a partial tile's bitmask index (>= 0).
constexpr int32_t kTileEmpty = -1, kTileFull = -2;
constexpr int kTileWords = kTile / 32;  // uint32 words of one bitmask row

int64_t RoundUp16(int64_t x) { return (x + 15) / 16 * 16; }

// ---- vector helpers ----------------------------------------------------------------

// e^x for 8 floats: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n in the exponent.
// The clamp bounds, ln 2 split in two (C1 = 0.693359375, C2 = -2.12194440e-4, so n C1 is
// exact) and the polynomial's coefficients are Cephes' expf (S. L. Moshier), as ported to
// SSE/AVX by J. Pommier's sse_mathfun; relative error about 1e-7 on [-87, 88].
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                    _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// e^(x - shift) for 8 logits, exactly 0 where x is -inf (a key the mask or a bias of
// -inf masks; Exp8 alone clamps it to e^-87).
inline __m256 ExpMasked8(__m256 x, __m256 shift) {
  const __m256 masked =
      _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return _mm256_andnot_ps(masked, Exp8(_mm256_sub_ps(x, shift)));
}

inline float HorizontalMax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

inline float HorizontalSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: 8 x 8 blocks
// through registers (the unpack/shuffle/permute transpose of Intel's optimisation manual,
// 11.11), the edges one element at a time.
void Transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
               int64_t dst_stride) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      __m256 r[8], t[8];
      for (int x = 0; x < 8; ++x) r[x] = _mm256_loadu_ps(src + (i + x) * src_stride + j);
      for (int x = 0; x < 8; x += 2) {
        t[x] = _mm256_unpacklo_ps(r[x], r[x + 1]);
        t[x + 1] = _mm256_unpackhi_ps(r[x], r[x + 1]);
      }
      for (int x = 0; x < 8; x += 4) {
        r[x] = _mm256_shuffle_ps(t[x], t[x + 2], 0x44);
        r[x + 1] = _mm256_shuffle_ps(t[x], t[x + 2], 0xEE);
        r[x + 2] = _mm256_shuffle_ps(t[x + 1], t[x + 3], 0x44);
        r[x + 3] = _mm256_shuffle_ps(t[x + 1], t[x + 3], 0xEE);
      }
      for (int x = 0; x < 4; ++x) {
        _mm256_storeu_ps(dst + (j + x) * dst_stride + i,
                         _mm256_permute2f128_ps(r[x], r[x + 4], 0x20));
        _mm256_storeu_ps(dst + (j + x + 4) * dst_stride + i,
                         _mm256_permute2f128_ps(r[x], r[x + 4], 0x31));
      }
    }
    for (; j < cols; ++j)
      for (int64_t x = i; x < i + 8; ++x) dst[j * dst_stride + x] = src[x * src_stride + j];
  }
  for (; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

// C[rows x 16] (+)= A . B over `depth`, rows <= 6 kept in registers. A is [M, depth]
// (A[i, p] = A[i * lda + p]) or, with kTransA, stored transposed (A[p * lda + i]).
template <int kRows, bool kAccumulate, bool kTransA>
inline void MicroKernel(int depth, const float* A, int lda, const float* B, int ldb, float* C,
                        int ldc) {
  __m256 c[kRows][2];
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    c[r][0] = kAccumulate ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
    c[r][1] = kAccumulate ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int p = 0; p < depth; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * ldb), b1 = _mm256_loadu_ps(B + p * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(kTransA ? A + p * lda + r : A + r * lda + p);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(C + r * ldc, c[r][0]);
    _mm256_storeu_ps(C + r * ldc + 8, c[r][1]);
  }
}

// C[M, N] (+)= A[M, depth] . B[depth, N], row-major with leading dimensions, N % 16 == 0
// and M % 2 == 0; with kTransA, A is given as A^T [depth, M].
template <bool kAccumulate, bool kTransA = false>
void Gemm(int M, int N, int depth, const float* A, int lda, const float* B, int ldb, float* C,
          int ldc) {
  // The micro-kernels cover 16 columns and 6, 4 or 2 rows at a time: anything else would
  // be left unwritten (callers round rows up to even and pad widths to 16). A throw, not an
  // assert: an item's exception becomes the call's error (ParallelFor), never an abort.
  if (N % 16 != 0 || M % 2 != 0 || depth < 0)
    throw std::logic_error("cpu_flash: Gemm needs N % 16 == 0, M % 2 == 0, depth >= 0");
  auto a_rows = [&](int i) { return kTransA ? A + i : A + i * lda; };
  for (int j = 0; j < N; j += 16) {
    int i = 0;
    for (; i + 6 <= M; i += 6)
      MicroKernel<6, kAccumulate, kTransA>(depth, a_rows(i), lda, B + j, ldb, C + i * ldc + j,
                                           ldc);
    for (; i + 4 <= M; i += 4)
      MicroKernel<4, kAccumulate, kTransA>(depth, a_rows(i), lda, B + j, ldb, C + i * ldc + j,
                                           ldc);
    for (; i + 2 <= M; i += 2)
      MicroKernel<2, kAccumulate, kTransA>(depth, a_rows(i), lda, B + j, ldb, C + i * ldc + j,
                                           ldc);
  }
}

// ---- the problem -------------------------------------------------------------------

// The call's attributes (jax.ffi.ffi_call keywords).
struct Attributes {
  bool causal;
  float scale;
  int64_t window_left, window_right;  // < 0: unbounded on that side
  float soft_cap;             // > 0: each scaled logit becomes soft_cap * tanh(logit / soft_cap)
  bool alibi;                 // then less slopes[b, n] * |query position - key position|
  bool dropout;               // weights dropped by the hash of (row seed, t, s), kept ones scaled
  int64_t dropout_threshold;  // a weight is kept where its 32-bit hash >= this
  float dropout_scale;        // 1 / (1 - rate)
};

// A mask or bias broadcastable to [B, N, T, S] as given: element (b, n, t, s) at
// data[batch[b] + n * n_stride + t * t_stride + s * s_stride], a stride 0 along each axis
// of size 1 (batch[b] for the folded batch b). `data` null: none came.
template <typename T>
struct Broadcast {
  const T* data = nullptr;
  std::vector<int64_t> batch;
  int64_t n_stride = 0, t_stride = 0, s_stride = 0, size = 0;
  // Whether two folded batches share elements (broadcast over a batch axis).
  bool batch_shared = false;
  int64_t Row(int64_t b, int64_t n, int64_t t) const {
    return batch[b] + n * n_stride + t * t_stride;
  }
};

// The attributes, the shapes (leading axes folded into B), the lengths [B] and the raw
// keys and values.
struct Problem : Attributes {
  int64_t B, T, S, N, K, H, Hv;
  int64_t G() const { return N / K; }
  int64_t Hp() const { return RoundUp16(H); }
  int64_t Hvp() const { return RoundUp16(Hv); }
  int64_t q_tiles() const { return (T + kTile - 1) / kTile; }
  int64_t key_tiles() const { return (S + kTile - 1) / kTile; }
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  const float* k;
  const float* v;
  // [B, N] each: the dropout hash of (b, n) (jax_attn.masks.dropout_row_seeds) and the
  // ALiBi slopes; read only with `dropout` / `alibi`.
  const uint32_t* row_seeds = nullptr;
  const float* slopes = nullptr;
  Broadcast<bool> mask;   // dense mask (true: may attend), or none
  Broadcast<float> bias;  // additive bias, or none
  bool dense() const { return mask.data != nullptr || bias.data != nullptr; }
  // Block sparsity (the sparse handlers; no table otherwise): tile_table [B, table_heads,
  // q_tiles, key_tiles] holds kTileEmpty, kTileFull or the index of the tile's bitmask in
  // tile_bits [B, bit_tiles, kTile, kTileWords] (bit c of row r: key c of the tile allowed).
  const int32_t* tile_table = nullptr;
  const uint32_t* tile_bits = nullptr;
  int64_t table_heads = 1, bit_tiles = 0;

  // Whether query tile qt of batch b, query head n visits key tile kt; *bits: the tile's
  // bitmask where it is partial, nullptr where it is full (or there is no table).
  bool Visits(int64_t b, int64_t n, int64_t qt, int64_t kt, const uint32_t** bits) const {
    *bits = nullptr;
    if (tile_table == nullptr) return true;
    const int64_t h = table_heads == 1 ? 0 : n;
    const int32_t entry = tile_table[((b * table_heads + h) * q_tiles() + qt) * key_tiles() + kt];
    if (entry == kTileEmpty) return false;
    if (entry >= 0) *bits = tile_bits + (b * bit_tiles + entry) * kTile * kTileWords;
    return true;
  }

  // Keys query row t of batch b may attend: [*begin, *end) (empty if begin >= end). The
  // windows are clamped to S + T in Prepare, so no sum here overflows.
  void Keys(int64_t b, int64_t t, int64_t* begin, int64_t* end) const {
    int64_t pos = t + S - T;
    int64_t lo = 0, hi = std::min<int64_t>(S, kv_lengths[b]);
    if (causal) hi = std::min(hi, pos + 1);
    if (window_left >= 0) lo = std::max(lo, pos - window_left);
    if (window_right >= 0) hi = std::min(hi, pos + window_right + 1);
    if (t >= q_lengths[b]) hi = lo;
    *begin = lo, *end = std::max(lo, hi);
  }

  // The intervals of the `rows` rows of query tile t0 / kTile (zeros for rows past T).
  int64_t TileRows(int64_t b, int64_t t0, int64_t* row_begin, int64_t* row_end) const {
    const int64_t rows = std::min<int64_t>(kTile, T - t0);
    for (int64_t r = 0; r < kTile; ++r) {
      row_begin[r] = row_end[r] = 0;
      if (r < rows) Keys(b, t0 + r, &row_begin[r], &row_end[r]);
    }
    return rows;
  }
};

// The union [*begin, *end) of `rows` rows' key intervals (empty rows left out): the key
// tiles a query tile visits, since causal, window and lengths give each row one interval.
void UnionOfRows(const int64_t* row_begin, const int64_t* row_end, int64_t rows,
                 int64_t* begin, int64_t* end) {
  *begin = INT64_MAX, *end = INT64_MIN;
  for (int64_t r = 0; r < rows; ++r)
    if (row_begin[r] < row_end[r])
      *begin = std::min(*begin, row_begin[r]), *end = std::max(*end, row_end[r]);
  if (*begin >= *end) *begin = *end = 0;
}

// ---- dense masks and bias --------------------------------------------------------------

// Adds `layout`'s elements at `data` (a bias or its tangent) to the logits s [rows, width]
// of rows t0.. of (b, n) over keys [s0, s0 + cols).
void AddBias(const Broadcast<float>& layout, const float* data, int64_t b, int64_t n,
             int64_t t0, int rows, int64_t s0, int64_t cols, float* s, int width) {
  for (int r = 0; r < rows; ++r) {
    float* srow = s + r * width;
    const float* brow = data + layout.Row(b, n, t0 + r) + s0 * layout.s_stride;
    if (layout.s_stride) {
      for (int64_t c = 0; c < cols; ++c) srow[c] += brow[c];
    } else {
      const float x = brow[0];
      for (int64_t c = 0; c < cols; ++c) srow[c] += x;
    }
  }
}

// The bias added to the logits s [rows, width] (rows t0.. of (b, n), keys [s0, s0 + cols))
// and the keys the mask leaves out set to -inf, which the exponentials then weigh 0.
void ApplyDense(const Problem& p, int64_t b, int64_t n, int64_t t0, int rows, int64_t s0,
                int64_t cols, float* s, int width) {
  if (p.bias.data) AddBias(p.bias, p.bias.data, b, n, t0, rows, s0, cols, s, width);
  if (!p.mask.data) return;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* srow = s + r * width;
    const bool* mrow = p.mask.data + p.mask.Row(b, n, t0 + r) + s0 * p.mask.s_stride;
    if (p.mask.s_stride) {
      for (int64_t c = 0; c < cols; ++c) srow[c] = mrow[c] ? srow[c] : minus_inf;
    } else if (!mrow[0]) {
      std::fill(srow, srow + cols, minus_inf);
    }
  }
}

// Whether the mask leaves rows t0.. of (b, n) no key of [s0, s0 + cols): a tile to skip
// (key padding leaves whole key tiles so).
bool MaskedTile(const Problem& p, int64_t b, int64_t n, int64_t t0, int rows, int64_t s0,
                int64_t cols) {
  if (!p.mask.data) return false;
  const int row_count = p.mask.t_stride ? rows : 1;
  const int64_t col_count = p.mask.s_stride ? cols : 1;
  for (int r = 0; r < row_count; ++r) {
    const bool* mrow = p.mask.data + p.mask.Row(b, n, t0 + r) + s0 * p.mask.s_stride;
    bool any = false;
    for (int64_t c = 0; c < col_count; ++c) any |= mrow[c];
    if (any) return false;
  }
  return true;
}

// Whether query tile `tile` (its first `rows` rows) of (b, n) skips key tile `key_tile`:
// the dense mask leaves it no key, or the tile table marks it empty; else *bits is the
// tile's bitmask where it is partial (Problem::Visits).
bool SkipsKeyTile(const Problem& p, int64_t b, int64_t n, int64_t tile, int rows,
                  int64_t key_tile, const uint32_t** bits) {
  const int64_t s0 = key_tile * kTile;
  if (MaskedTile(p, b, n, tile * kTile, rows, s0, std::min<int64_t>(kTile, p.S - s0))) {
    *bits = nullptr;
    return true;
  }
  return !p.Visits(b, n, tile, key_tile, bits);
}

// Adds dS [rows, width] (the logits' gradient, which is the bias') of rows t0.. of (b, n),
// keys [s0, s0 + cols), into `dbias` laid out as the bias: summed over its broadcast axes.
void AddBiasGradient(const Problem& p, float* dbias, int64_t b, int64_t n, int64_t t0, int rows,
                     int64_t s0, int64_t cols, const float* ds, int width) {
  for (int r = 0; r < rows; ++r) {
    const float* src = ds + r * width;
    float* dst = dbias + p.bias.Row(b, n, t0 + r) + s0 * p.bias.s_stride;
    if (p.bias.s_stride) {
      for (int64_t c = 0; c < cols; ++c) dst[c] += src[c];
    } else {
      float sum = 0.0f;
      for (int64_t c = 0; c < cols; ++c) sum += src[c];
      dst[0] += sum;
    }
  }
}

// ---- block sparsity: partial tiles' bitmasks ------------------------------------------

// The 8 bits of `byte` as a mask of 8 floats (all ones where the bit is set).
inline __m256 ByteMask(uint32_t byte) {
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), select);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, select));
}

// A bitmask row (kTileWords words) as one 64-bit word: bit c for key c of the tile.
inline uint64_t RowBits(const uint32_t* words) {
  return words[0] | static_cast<uint64_t>(words[1]) << 32;
}

// Zeroes the weights of a row of `width` (a multiple of 8) whose keys `bits` leaves out.
inline void ZeroMasked(float* row, uint64_t bits, int width) {
  for (int c = 0; c < width; c += 8)
    _mm256_storeu_ps(row + c, _mm256_and_ps(ByteMask((bits >> c) & 0xFFu),
                                            _mm256_loadu_ps(row + c)));
}

inline void ZeroMasked(float* row, const uint32_t* words, int width) {
  ZeroMasked(row, RowBits(words), width);
}

// ---- running items on XLA's thread pool ----------------------------------------------

// How many threads run a ParallelFor of `items` items: the calling thread and up to
// num_threads() - 1 of the pool's. Scratch is allocated per worker before items start.
int64_t Workers(ffi::ThreadPool& pool, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
}

// Runs body(worker, item) for every item in [0, items), worker in [0, Workers(pool, items)).
// An exception thrown by an item (std::bad_alloc included) must not reach a pool thread's
// edge (std::terminate) nor unwind the calling thread while pool threads still run items
// on its stack: each item's is caught, later items are skipped, and the first one is
// rethrown here once every item has finished or been skipped.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex mu;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto work = [state, items, &body](int64_t worker) {
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      if (!state->failed.load()) {
        try {
          body(worker, i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(state->mu);
          if (!state->error) state->error = std::current_exception();
          state->failed = true;
        }
      }
      if (state->done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->finished.notify_all();
      }
    }
  };
  const int64_t helpers = Workers(pool, items) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    try {
      pool.Schedule([work, h] { work(h + 1); });
    } catch (...) {  // the task's copy could not be allocated: fewer helpers
      break;
    }
  }
  work(0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == items; });
  if (state->error) std::rethrow_exception(state->error);
}

// The test switch JAX_ATTN_CPU_FLASH_FAIL_ALLOC: "scratch" fails the call's up-front
// allocation, "item" makes every third work item throw std::bad_alloc (on pool threads
// and the calling thread alike); the tests check either becomes a Python exception.
bool FailAllocation(const char* where) {
  const char* value = std::getenv("JAX_ATTN_CPU_FLASH_FAIL_ALLOC");
  return value != nullptr && std::strcmp(value, where) == 0;
}

void MaybeFailItem(bool fail, int64_t item) {
  if (fail && item % 3 == 1) throw std::bad_alloc();
}

// ---- large buffers kept from call to call ----------------------------------------------

// A fresh buffer of tens of MB per call is mapped from the system anew, and in a process
// that runs other programs between calls its pages fault in again on every call (the
// measurement is in docs/performance.md). Calls take their packed keys and backward
// arrays from here and give them back; up to kKeptBytes stay kept for the process's life.
class BufferPool {
 public:
  // A buffer of `size` floats, a kept one if one is large enough; zero-filled, or with
  // whatever a kept one held where `zeroed` is false (the caller writes every element).
  std::vector<float> Take(size_t size, bool zeroed) {
    std::vector<float> buffer;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->capacity() >= size && (best == kept_.end() || it->capacity() < best->capacity()))
          best = it;
      if (best != kept_.end()) {
        kept_bytes_ -= best->capacity() * sizeof(float);
        buffer = std::move(*best);
        kept_.erase(best);
      }
    }
    if (zeroed)
      buffer.assign(size, 0.0f);
    else
      buffer.resize(size);
    return buffer;
  }

  void Give(std::vector<float>&& buffer) {
    const size_t bytes = buffer.capacity() * sizeof(float);
    std::lock_guard<std::mutex> lock(mu_);
    if (bytes == 0 || kept_bytes_ + bytes > kKeptBytes) return;  // freed with `buffer`
    kept_bytes_ += bytes;
    kept_.push_back(std::move(buffer));
  }

 private:
  static constexpr size_t kKeptBytes = size_t{256} << 20;
  std::mutex mu_;
  std::vector<std::vector<float>> kept_;
  size_t kept_bytes_ = 0;
};

BufferPool& Buffers() {
  static BufferPool* pool = new BufferPool;  // never destroyed: no exit-time ordering
  return *pool;
}

// A buffer from the pool for the scope of one call.
struct PooledBuffer {
  std::vector<float> data;
  PooledBuffer() = default;
  explicit PooledBuffer(size_t size, bool zeroed = true) : data(Buffers().Take(size, zeroed)) {}
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;
  PooledBuffer& operator=(PooledBuffer&& other) {
    std::swap(data, other.data);
    return *this;
  }
  ~PooledBuffer() { Buffers().Give(std::move(data)); }
  // Pointer arithmetic, not operator[]: a zero-sized buffer (H = 0) is never indexed.
  float* at(int64_t i) { return data.data() + i; }
  const float* at(int64_t i) const { return data.data() + i; }
};

// ---- keys and values, one key tile at a time -----------------------------------------

// Key tile i holds keys [64 i, 64 i + cols), and the products over it are computed
// width = RoundUp16(cols) columns wide. Where items reuse them (see Pack), each (batch, kv
// head)'s keys and values are laid out once per call: K^T blocks [Hp, width] (keys across, the
// right operand of q k^T) and V rows [cols, Hvp], at key offset 64 i of the pair's slab.
// A single tile (S <= 64) is not packed: each item copies it into its own scratch, so a
// short S costs scratch in proportion to S, not to 64-key tiles.
struct KeyTile {
  const float* kt;  // [Hp, width], zero past cols; nullptr for a RowTile
  const float* v;   // [cols, Hvp], rows v_stride floats apart
  int64_t s0, cols, width;
  int64_t v_stride;
};

struct PackedKV {
  bool packed = false;
  int64_t padded_keys = 0;  // S with the last tile rounded up to 16 keys
  PooledBuffer kt, v;
};

// Floats of a worker's scratch that hold one unpacked key tile.
int64_t TileScratch(const Problem& p) { return kTile * (p.Hp() + p.Hvp()); }

// Keys [s0, s0 + cols) of (b, kh) as K^T [Hp, width] and V [cols, Hvp], padding as zeros.
void WriteTile(const Problem& p, int64_t b, int64_t kh, int64_t s0, int64_t cols,
               int64_t width, float* kt, float* vt) {
  const int64_t Hp = p.Hp(), Hvp = p.Hvp();
  Transpose(p.k + ((b * p.S + s0) * p.K + kh) * p.H, p.K * p.H, cols, p.H, kt, width);
  for (int64_t c = 0; c < cols; ++c) {
    if (p.Hv > 0)
      std::memcpy(vt + c * Hvp, p.v + ((b * p.S + s0 + c) * p.K + kh) * p.Hv,
                  p.Hv * sizeof(float));
    std::fill(vt + c * Hvp + p.Hv, vt + (c + 1) * Hvp, 0.0f);
  }
  for (int64_t h = 0; h < p.H; ++h) std::fill(kt + h * width + cols, kt + (h + 1) * width, 0.0f);
  std::fill(kt + p.H * width, kt + Hp * width, 0.0f);
}

KeyTile LoadTile(const Problem& p, const PackedKV& kv, int64_t b, int64_t kh, int64_t tile,
                 float* scratch) {
  KeyTile t;
  t.s0 = tile * kTile;
  t.cols = std::min<int64_t>(kTile, p.S - t.s0);
  t.width = RoundUp16(t.cols);
  t.v_stride = p.Hvp();
  if (kv.packed) {
    t.kt = kv.kt.at(((b * p.K + kh) * kv.padded_keys + t.s0) * p.Hp());
    t.v = kv.v.at(((b * p.K + kh) * p.S + t.s0) * p.Hvp());
  } else {
    WriteTile(p, b, kh, t.s0, t.cols, t.width, scratch, scratch + p.Hp() * kTile);
    t.kt = scratch, t.v = scratch + p.Hp() * kTile;
  }
  return t;
}

// Decoding (one or two query rows against keys read once, unpacked): no transposed copy
// of the tile. Its logits come from k's rows as laid out (RowLogits), and its values are
// read in place where their rows need no zero padding (Hv a multiple of 16), else copied
// into `scratch` [cols, Hvp].
KeyTile RowTile(const Problem& p, int64_t b, int64_t kh, int64_t tile, float* scratch) {
  KeyTile t;
  t.kt = nullptr;
  t.s0 = tile * kTile;
  t.cols = std::min<int64_t>(kTile, p.S - t.s0);
  t.width = RoundUp16(t.cols);
  const float* v = p.v + ((b * p.S + t.s0) * p.K + kh) * p.Hv;
  if (p.Hv == p.Hvp()) {
    t.v = v, t.v_stride = p.K * p.Hv;
    return t;
  }
  const int64_t Hvp = p.Hvp();
  for (int64_t c = 0; c < t.cols; ++c) {
    if (p.Hv > 0) std::memcpy(scratch + c * Hvp, v + c * p.K * p.Hv, p.Hv * sizeof(float));
    std::fill(scratch + c * Hvp + p.Hv, scratch + (c + 1) * Hvp, 0.0f);
  }
  t.v = scratch, t.v_stride = Hvp;
  return t;
}

// The sums of a0..a7's lanes, as one vector (a transposed horizontal sum).
inline __m256 HorizontalSums8(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // each 128-bit lane holds half of every sum: add the low lanes to the high ones
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// s[r, c] = qs_r . k_c for the `rows` query rows of a RowTile (rows up to gemm_rows and
// columns past its keys zero, as a Gemm over the zero-padded K^T leaves them), eight keys
// at a time, each k row read once from memory and contiguously.
void RowLogits(const Problem& p, int64_t b, int64_t kh, const KeyTile& t, const float* qs,
               int Hp, int rows, int gemm_rows, float* s, int width) {
  const int64_t stride = p.K * p.H, H8 = p.H / 8 * 8;
  const float* k = p.k + ((b * p.S + t.s0) * p.K + kh) * p.H;
  for (int r = 0; r < gemm_rows; ++r) {
    float* srow = s + r * width;
    std::fill(srow, srow + width, 0.0f);
    if (r >= rows) continue;
    const float* qr = qs + r * Hp;
    int64_t c = 0;
    for (; c + 8 <= t.cols; c += 8) {
      __m256 dots[8];
      for (int j = 0; j < 8; ++j) dots[j] = _mm256_setzero_ps();
      for (int64_t h = 0; h < H8; h += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + h);
        for (int j = 0; j < 8; ++j)
          dots[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (c + j) * stride + h), dots[j]);
      }
      __m256 sums = HorizontalSums8(dots);
      if (H8 < p.H) {
        alignas(32) float tail[8];
        for (int j = 0; j < 8; ++j) {
          tail[j] = 0.0f;
          for (int64_t h = H8; h < p.H; ++h) tail[j] += qr[h] * k[(c + j) * stride + h];
        }
        sums = _mm256_add_ps(sums, _mm256_load_ps(tail));
      }
      _mm256_storeu_ps(srow + c, sums);
    }
    for (; c < t.cols; ++c) {
      float dot = 0.0f;
      for (int64_t h = 0; h < p.H; ++h) dot += qr[h] * k[c * stride + h];
      srow[c] = dot;
    }
  }
}

// Which key tiles a call's items load: every one (the backward visits each key tile), or
// only those a query row may attend, the keys below a sequence's length (the forward and
// tangent bound their loops by the rows' intervals, which never pass kv_lengths[b]).
enum class Loads { kEvery, kVisited };

// Lays out the keys and values once per call where items reuse them: with more than one
// key tile, and more than one item reading each tile (several query tiles, or the G query
// heads of a kv head with more than two rows each). Decoding (one query tile of one or
// two rows) packs nothing: its forward reads k's and v's rows in place (RowTile), which
// for G query heads costs G reads of a row, measured less than one transposed copy of it
// (docs/performance.md), and its tangent copies each tile into scratch. With Loads::kVisited the tiles past a sequence's length
// are left unwritten, so a step against a long, mostly empty KV cache costs what its
// filled slots cost.
void Pack(ffi::ThreadPool& pool, const Problem& p, PackedKV& kv, Loads loads) {
  const int64_t tiles = p.key_tiles();
  const bool decoding = p.q_tiles() == 1 && p.T <= 2;
  const bool reused = (!decoding && (p.q_tiles() > 1 || p.G() > 1)) || loads == Loads::kEvery;
  kv.packed = tiles > 1 && reused;
  if (!kv.packed) return;
  kv.padded_keys = (tiles - 1) * kTile + RoundUp16(p.S - (tiles - 1) * kTile);
  // Every element an item reads is written below, the padding with zeros: no zero-fill
  // first (a pass over tens of MB per decoding call).
  kv.kt = PooledBuffer(p.B * p.K * kv.padded_keys * p.Hp(), false);
  kv.v = PooledBuffer(p.B * p.K * p.S * p.Hvp(), false);
  ParallelFor(pool, p.B * p.K * tiles, [&](int64_t, int64_t item) {
    const int64_t tile = item % tiles, kh = item / tiles % p.K, b = item / tiles / p.K;
    const int64_t s0 = tile * kTile, cols = std::min<int64_t>(kTile, p.S - s0);
    if (loads == Loads::kVisited && s0 >= p.kv_lengths[b]) return;
    WriteTile(p, b, kh, s0, cols, RoundUp16(cols),
              kv.kt.at(((b * p.K + kh) * kv.padded_keys + s0) * p.Hp()),
              kv.v.at(((b * p.K + kh) * p.S + s0) * p.Hvp()));
  });
}

// ---- score options and dropout ----------------------------------------------------------

// The scores: s = scale q.k, then soft_cap * tanh(s / soft_cap) where soft_cap > 0, then
// less slopes[b, n] * |t + S - T - key| (ALiBi, FlashAttention's sign), in that order, as
// jax_attn.mask_functions.score_options. The weights are the softmax of those, and dropout
// (jax_attn.masks.make_dropout_mask) multiplies each by 0 or 1 / (1 - rate) after the
// softmax: the row sum l and lse are those of the undropped weights.

// MurmurHash3's 32-bit finaliser, as jax_attn.masks._fmix32.
inline uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline __m256i Fmix32x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// tanh for 8 floats as 1 - 2 / (e^2x + 1) (Exp8 clamps, so +-1 at the far ends).
inline __m256 Tanh8(__m256 x) {
  const __m256 e = Exp8(_mm256_add_ps(x, x));
  const __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_sub_ps(_mm256_set1_ps(1.0f),
                       _mm256_div_ps(two, _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

// The score options on one row of scaled logits [0, width) of the key tile at s0, query
// row t of (b, n); with soft-capping, `deriv` gets d score / d logit = 1 - tanh^2 per
// column. Returns whether it wrote `deriv`.
inline bool ScoreRow(const Problem& p, int64_t b, int64_t n, int64_t t, int64_t s0, int width,
                     float* row, float* deriv) {
  if (p.soft_cap > 0.0f) {
    const __m256 cap = _mm256_set1_ps(p.soft_cap), inv = _mm256_set1_ps(1.0f / p.soft_cap);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int c = 0; c < width; c += 8) {
      const __m256 th = Tanh8(_mm256_mul_ps(_mm256_loadu_ps(row + c), inv));
      _mm256_storeu_ps(row + c, _mm256_mul_ps(cap, th));
      if (deriv != nullptr) _mm256_storeu_ps(deriv + c, _mm256_fnmadd_ps(th, th, one));
    }
  }
  if (p.alibi) {
    const __m256 slope = _mm256_set1_ps(p.slopes[b * p.N + n]);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    // query position less key position, exact in float32 below 2^24
    const __m256 base = _mm256_sub_ps(
        _mm256_set1_ps(static_cast<float>(t + p.S - p.T - s0)),
        _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f));
    // no lower than kMasked: slopes large enough to overflow to -inf make no NaN
    const __m256 lowest = _mm256_set1_ps(kMasked);
    for (int c = 0; c < width; c += 8) {
      const __m256 distance =
          _mm256_andnot_ps(sign, _mm256_sub_ps(base, _mm256_set1_ps(static_cast<float>(c))));
      _mm256_storeu_ps(row + c, _mm256_max_ps(lowest, _mm256_fnmadd_ps(slope, distance,
                                                                        _mm256_loadu_ps(row + c))));
    }
  }
  return p.soft_cap > 0.0f && deriv != nullptr;
}

// The score options on rows [0, gemm_rows) of a tile's logits s [gemm_rows, width] (rows
// with no key to attend are left alone: they are zeroed after).
void ScoreTile(const Problem& p, int64_t b, int64_t n, int64_t t0, int64_t s0, int gemm_rows,
               int width, const int64_t* row_begin, const int64_t* row_end, float* s) {
  if (p.soft_cap <= 0.0f && !p.alibi) return;
  for (int r = 0; r < gemm_rows; ++r)
    if (row_begin[r] < row_end[r]) ScoreRow(p, b, n, t0 + r, s0, width, s + r * width, nullptr);
}

// Dropout factors of query row t of (b, n) over keys [s0, s0 + width): 0 where the hash
// of (row seed, t, key) is below the threshold (jax_attn.masks.make_dropout_mask, bit for
// bit), else 1 / (1 - rate).
inline void DropFactors(const Problem& p, int64_t b, int64_t n, int64_t t, int64_t s0,
                        int width, float* factors) {
  const uint32_t row = Fmix32(p.row_seeds[b * p.N + n] ^
                              (static_cast<uint32_t>(t) * 0xC2B2AE3Du));
  const __m256i row_hash = _mm256_set1_epi32(static_cast<int>(row));
  // unsigned bits >= threshold as signed compares, both sides with the top bit flipped
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i threshold = _mm256_set1_epi32(
      static_cast<int>(static_cast<uint32_t>(p.dropout_threshold) ^ 0x80000000u));
  const __m256 scale = _mm256_set1_ps(p.dropout_scale);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c = 0; c < width; c += 8) {
    const __m256i key = _mm256_add_epi32(
        _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(s0 + c))), lanes);
    const __m256i mixed = _mm256_add_epi32(
        _mm256_mullo_epi32(key, _mm256_set1_epi32(static_cast<int>(0x27D4EB2Fu))),
        _mm256_set1_epi32(static_cast<int>(0x165667B1u)));
    const __m256i bits = Fmix32x8(_mm256_xor_si256(row_hash, mixed));
    const __m256i dropped = _mm256_cmpgt_epi32(threshold, _mm256_xor_si256(bits, flip));
    _mm256_storeu_ps(factors + c, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), scale));
  }
}

// Dropout on rows [0, gemm_rows) of a tile's unnormalised weights s [gemm_rows, width].
void DropTile(const Problem& p, int64_t b, int64_t n, int64_t t0, int64_t s0, int gemm_rows,
              int width, const int64_t* row_begin, const int64_t* row_end, float* s) {
  if (!p.dropout) return;
  alignas(32) float factors[kTile];
  for (int r = 0; r < gemm_rows; ++r) {
    if (row_begin[r] >= row_end[r]) continue;
    DropFactors(p, b, n, t0 + r, s0, width, factors);
    float* srow = s + r * width;
    for (int c = 0; c < width; c += 8)
      _mm256_storeu_ps(srow + c,
                       _mm256_mul_ps(_mm256_loadu_ps(srow + c), _mm256_loadu_ps(factors + c)));
  }
}

// ---- forward -------------------------------------------------------------------------

// The (batch, query head, query tile) of a forward or tangent work item: the longest rows
// first (causal), one head's tiles one after another, so that the threads running items
// side by side read the same keys and values.
struct QueryTile {
  int64_t b, n, tile;
};
QueryTile QueryItem(const Problem& p, int64_t item) {
  const int64_t tiles = p.q_tiles();
  return {item / tiles / p.N, (item / tiles) % p.N, tiles - 1 - item % tiles};
}

// Floats of a forward worker's scratch: scale * q [kTile, Hp], logits [kTile, kTile],
// the accumulator [kTile, Hvp] and one key tile.
int64_t ForwardScratch(const Problem& p) {
  return kTile * (p.Hp() + kTile + p.Hvp()) + TileScratch(p);
}

// A forward worker's scratch, as ForwardScratch counts it: scale * q [kTile, Hp], the
// logits [kTile, kTile], the accumulator [kTile, Hvp] and an unpacked key tile.
struct ForwardBuffers {
  float *qs, *s, *acc, *tile;
  ForwardBuffers(float* scratch, int Hp, int Hvp)
      : qs(scratch),
        s(qs + kTile * Hp),
        acc(s + kTile * kTile),
        tile(acc + kTile * Hvp) {}
};

// One row's online-softmax step (Milakov & Gimelshein 2018; FlashAttention-2, Algorithm
// 1) once the max of its logits over the tile, `row_max`, is known: `srow` [width] becomes
// the tile's unnormalised weights, and the row's m, l and accumulator [Hvp] are updated.
// `zero_outside(srow)` zeroes the weights of keys the row may not attend. kWidth: the
// width if known at compile time, else 0.
template <int kWidth, typename ZeroOutside>
inline void OnlineSoftmaxStep(int width_given, float* srow, float row_max, bool dense, float* m,
                              float* l, float* arow, int Hvp, ZeroOutside zero_outside) {
  const int width = kWidth ? kWidth : width_given;
  // m' = max(m, max_j s_j), the running max with this tile's logits
  const float m_new = std::max(*m, row_max);
  // c = e^(m - m'), which rescales what was summed against the old max (0 if none was)
  const float correction = *m == kMasked ? 0.0f : std::exp(*m - m_new);
  // p_j = e^(s_j - m'), the tile's unnormalised weights
  const __m256 shift = _mm256_set1_ps(m_new);
  if (dense) {
    for (int c = 0; c < width; c += 8)
      _mm256_storeu_ps(srow + c, ExpMasked8(_mm256_loadu_ps(srow + c), shift));
  } else {
    for (int c = 0; c < width; c += 8)
      _mm256_storeu_ps(srow + c, Exp8(_mm256_sub_ps(_mm256_loadu_ps(srow + c), shift)));
  }
  zero_outside(srow);
  // l' = c l + sum_j p_j
  __m256 sum = _mm256_loadu_ps(srow);
  for (int c = 8; c < width; c += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(srow + c));
  *l = *l * correction + HorizontalSum(sum);
  *m = m_new;
  // acc' = c acc (the caller then adds p . V); out = acc / l once every tile is seen
  if (correction != 1.0f) {
    const __m256 factor = _mm256_set1_ps(correction);
    for (int h = 0; h < Hvp; h += 8)
      _mm256_storeu_ps(arow + h, _mm256_mul_ps(factor, _mm256_loadu_ps(arow + h)));
  }
}

// One key tile's online-softmax step for rows [0, gemm_rows): the logits in `s`
// [gemm_rows, width] become unnormalised weights (zero outside each row's keys), and each
// row's max m, sum l and accumulator are rescaled. kWidth: the width if known at compile
// time (kTile), else 0 and `width` is used.
template <int kWidth>
void OnlineSoftmaxRows(int width_given, int gemm_rows, const KeyTile& t, const int64_t* row_begin,
                       const int64_t* row_end, float* s, float* m, float* l, float* acc,
                       int Hvp, bool dense = false) {
  const int width = kWidth ? kWidth : width_given;
  for (int r = 0; r < gemm_rows; ++r) {
    float* srow = s + r * width;
    const int64_t lo = std::clamp<int64_t>(row_begin[r] - t.s0, 0, t.cols);
    const int64_t hi = std::clamp<int64_t>(row_end[r] - t.s0, 0, t.cols);
    if (lo >= hi) {
      std::memset(srow, 0, width * sizeof(float));
      continue;
    }
    float row_max = kMasked;
    if (lo == 0 && hi == width) {
      __m256 mx = _mm256_loadu_ps(srow);
      for (int c = 8; c < width; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(srow + c));
      row_max = HorizontalMax(mx);
    } else {
      for (int64_t c = lo; c < hi; ++c) row_max = std::max(row_max, srow[c]);
    }
    OnlineSoftmaxStep<kWidth>(width, srow, row_max, dense, m + r, l + r, acc + r * Hvp, Hvp,
                              [&](float* row) {
                                std::fill(row, row + lo, 0.0f);
                                std::fill(row + hi, row + width, 0.0f);
                              });
  }
}

// OnlineSoftmaxRows on a partial tile: only the keys each row's bitmask row allows
// (`bits`, kTileWords words per row) enter its max and sum; a row with none is untouched.
// `dense`: the logits may hold -inf (a dense mask or bias), which weigh exactly 0.
void OnlineSoftmaxRowsBits(int width, int gemm_rows, const KeyTile& t, const int64_t* row_begin,
                           const int64_t* row_end, const uint32_t* bits, float* s, float* m,
                           float* l, float* acc, int Hvp, bool dense) {
  for (int r = 0; r < gemm_rows; ++r) {
    float* srow = s + r * width;
    const int64_t lo = std::clamp<int64_t>(row_begin[r] - t.s0, 0, t.cols);
    const int64_t hi = std::clamp<int64_t>(row_end[r] - t.s0, 0, t.cols);
    // the row's keys: its bits inside its interval [lo, hi)
    const uint64_t inside = lo >= hi ? 0 : (~uint64_t{0} >> (64 - (hi - lo))) << lo;
    const uint64_t allowed = RowBits(bits + r * kTileWords) & inside;
    if (allowed == 0) {
      std::memset(srow, 0, width * sizeof(float));
      continue;
    }
    __m256 mx = _mm256_set1_ps(kMasked);
    for (int c = 0; c < width; c += 8)
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(kMasked), _mm256_loadu_ps(srow + c),
                                              ByteMask((allowed >> c) & 0xFFu)));
    OnlineSoftmaxStep<0>(width, srow, HorizontalMax(mx), dense, m + r, l + r, acc + r * Hvp,
                         Hvp, [&](float* row) { ZeroMasked(row, allowed, width); });
  }
}

// acc [gemm_rows, Hvp] += weights s [gemm_rows, width] . the tile's values, over the keys
// [begin, end) that some row attends (values of keys no row attends, such as padding, are
// not read).
void AccumulateValues(const KeyTile& t, int64_t begin, int64_t end, int gemm_rows,
                      const float* s, int width, float* acc, int Hvp) {
  const int64_t lo = std::clamp<int64_t>(begin - t.s0, 0, t.cols);
  const int64_t hi = std::clamp<int64_t>(end - t.s0, 0, t.cols);
  const int v_stride = static_cast<int>(t.v_stride);
  Gemm<true>(gemm_rows, Hvp, static_cast<int>(hi - lo), s + lo, width, t.v + lo * v_stride,
             v_stride, acc, Hvp);
}

// One finished row: out = acc / l and lse = m + log l, or zeros and kMasked for a row that
// attended nothing.
void WriteRow(const float* acc, float m, float l, int64_t Hv, float* out, float* lse) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t h = 0; h < Hv; ++h) out[h] = acc[h] * inv;
  *lse = l > 0.0f ? m + std::log(l) : kMasked;
}

void ForwardItem(const Problem& p, const PackedKV& kv, int64_t item, const float* q,
                 float* out, float* lse, float* scratch) {
  const auto [b, n, tile] = QueryItem(p, item);
  const int64_t kh = n / p.G();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  const int64_t t0 = tile * kTile;
  const ForwardBuffers buffers(scratch, Hp, Hvp);
  float *qs = buffers.qs, *s = buffers.s, *acc = buffers.acc, *tile_scratch = buffers.tile;
  float m[kTile], l[kTile];
  int64_t row_begin[kTile], row_end[kTile];
  const int rows = static_cast<int>(p.TileRows(b, t0, row_begin, row_end));
  // A short last tile (decoding: one row) multiplies only its own rows, rounded up to
  // the even count Gemm takes.
  const int gemm_rows = (rows + 1) & ~1;
  std::fill(qs, qs + gemm_rows * Hp, 0.0f);
  std::fill(acc, acc + gemm_rows * Hvp, 0.0f);
  for (int r = 0; r < kTile; ++r) {
    m[r] = kMasked, l[r] = 0.0f;
    if (r >= rows) continue;
    const float* src = q + ((b * p.T + t0 + r) * p.N + n) * p.H;
    for (int64_t h = 0; h < p.H; ++h) qs[r * Hp + h] = src[h] * p.scale;
  }
  int64_t begin, end;
  UnionOfRows(row_begin, row_end, kTile, &begin, &end);

  const bool dense = p.dense();
  // decoding (see Pack): k's and v's rows read in place
  const bool by_rows = !kv.packed && gemm_rows == 2;
  for (int64_t key_tile = begin / kTile; key_tile * kTile < end; ++key_tile) {
    const uint32_t* bits;
    if (SkipsKeyTile(p, b, n, tile, rows, key_tile, &bits)) continue;
    const KeyTile t = by_rows ? RowTile(p, b, kh, key_tile, tile_scratch)
                              : LoadTile(p, kv, b, kh, key_tile, tile_scratch);
    const int width = static_cast<int>(t.width);
    // [gemm_rows, width] scaled logits, the score options, then bias and mask (the
    // reference's order); full tiles with a constant width, so that the loops over it unroll
    if (by_rows)
      RowLogits(p, b, kh, t, qs, Hp, rows, gemm_rows, s, width);
    else if (width == kTile)
      Gemm<false>(gemm_rows, kTile, static_cast<int>(p.H), qs, Hp, t.kt, kTile, s, kTile);
    else
      Gemm<false>(gemm_rows, width, static_cast<int>(p.H), qs, Hp, t.kt, width, s, width);
    ScoreTile(p, b, n, t0, t.s0, gemm_rows, width, row_begin, row_end, s);
    if (dense) ApplyDense(p, b, n, t0, rows, t.s0, t.cols, s, width);
    if (bits != nullptr)
      OnlineSoftmaxRowsBits(width, gemm_rows, t, row_begin, row_end, bits, s, m, l, acc, Hvp,
                            dense);
    else if (width == kTile)
      OnlineSoftmaxRows<kTile>(kTile, gemm_rows, t, row_begin, row_end, s, m, l, acc, Hvp,
                               dense);
    else
      OnlineSoftmaxRows<0>(width, gemm_rows, t, row_begin, row_end, s, m, l, acc, Hvp, dense);
    DropTile(p, b, n, t0, t.s0, gemm_rows, width, row_begin, row_end, s);
    AccumulateValues(t, begin, end, gemm_rows, s, width, acc, Hvp);
  }
  for (int r = 0; r < rows; ++r)
    WriteRow(acc + r * Hvp, m[r], l[r], p.Hv, out + ((b * p.T + t0 + r) * p.N + n) * p.Hv,
             lse + (b * p.N + n) * p.T + t0 + r);
}

// Whether a forward of few queries (decoding, speculative decoding, a short chunk of a
// prompt) with GQA has nothing that differs between query heads but q (a dense mask or
// bias, a mask_fn's tiles, dropout, score options): the T queries of a kv head's G query
// heads can then be the rows of one item (GroupedDecodeItem).
bool GroupedDecode(const Problem& p) {
  return p.G() > 1 && p.T * p.G() <= kTile && !p.dense() && p.tile_table == nullptr &&
         !p.dropout && p.soft_cap <= 0.0f && !p.alibi;
}

// ForwardItem for one (batch, kv head) of a GroupedDecode call: the T queries of its G
// query heads are the rows of one query tile (row t G + g: query t of head kh G + g). A
// row's keys depend on its position alone (causal, window, lengths), so each key tile is
// laid out once for all G heads and its logits are one product: the keys are read once,
// not G times.
void GroupedDecodeItem(const Problem& p, const PackedKV& kv, int64_t item, const float* q,
                       float* out, float* lse, float* scratch) {
  const int64_t b = item / p.K, kh = item % p.K, G = p.G();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  const ForwardBuffers buffers(scratch, Hp, Hvp);
  float *qs = buffers.qs, *s = buffers.s, *acc = buffers.acc, *tile_scratch = buffers.tile;
  float m[kTile], l[kTile];
  int64_t row_begin[kTile], row_end[kTile];
  const int rows = static_cast<int>(p.T * G), gemm_rows = (rows + 1) & ~1;
  std::fill(qs, qs + gemm_rows * Hp, 0.0f);
  std::fill(acc, acc + gemm_rows * Hvp, 0.0f);
  for (int r = 0; r < kTile; ++r) {
    m[r] = kMasked, l[r] = 0.0f;
    row_begin[r] = row_end[r] = 0;
    if (r >= rows) continue;
    const int64_t t = r / G, n = kh * G + r % G;
    p.Keys(b, t, &row_begin[r], &row_end[r]);
    const float* src = q + ((b * p.T + t) * p.N + n) * p.H;
    for (int64_t h = 0; h < p.H; ++h) qs[r * Hp + h] = src[h] * p.scale;
  }
  int64_t begin, end;
  UnionOfRows(row_begin, row_end, rows, &begin, &end);
  for (int64_t key_tile = begin / kTile; key_tile * kTile < end; ++key_tile) {
    const KeyTile t = LoadTile(p, kv, b, kh, key_tile, tile_scratch);
    const int width = static_cast<int>(t.width);
    Gemm<false>(gemm_rows, width, static_cast<int>(p.H), qs, Hp, t.kt, width, s, width);
    OnlineSoftmaxRows<0>(width, gemm_rows, t, row_begin, row_end, s, m, l, acc, Hvp);
    AccumulateValues(t, begin, end, gemm_rows, s, width, acc, Hvp);
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t t = r / G, n = kh * G + r % G;
    WriteRow(acc + r * Hvp, m[r], l[r], p.Hv, out + ((b * p.T + t) * p.N + n) * p.Hv,
             lse + (b * p.N + n) * p.T + t);
  }
}

// ---- weights recomputed from the log-sum-exp (backward and tangent) ------------------

// The weights of row r of query tile t0 / kTile of (b, n) over key tile `tile`, recomputed
// in place of its scaled logits `prow` [width]: the score options, then bias and mask (the
// reference's order), then P = e^(s - lse[r]), zero outside the row's keys and where `bits`
// (the tile's bitmask, or nullptr) leaves a key out. A row that sees none of the tile's
// keys gets `prow` and its derivative row `drow` zeroed instead, and its lse is not read
// (a tile's rows past T have none).
enum class RowWeights { kNone, kPlain, kCapped };  // kCapped: `deriv` got 1 - tanh^2
RowWeights RecomputeWeights(const Problem& p, int64_t b, int64_t n, int64_t t0, int r,
                            const int64_t* row_begin, const int64_t* row_end, const KeyTile& tile,
                            int width, const float* lse, const uint32_t* bits, float* prow,
                            float* drow, float* deriv) {
  const int64_t lo = std::clamp<int64_t>(row_begin[r] - tile.s0, 0, tile.cols);
  const int64_t hi = std::clamp<int64_t>(row_end[r] - tile.s0, 0, tile.cols);
  if (lo >= hi) {
    std::memset(prow, 0, width * sizeof(float));
    std::memset(drow, 0, width * sizeof(float));
    return RowWeights::kNone;
  }
  const bool capped = ScoreRow(p, b, n, t0 + r, tile.s0, width, prow, deriv);
  if (p.dense()) ApplyDense(p, b, n, t0 + r, 1, tile.s0, tile.cols, prow, width);
  const __m256 shift = _mm256_set1_ps(lse[r]);
  if (p.dense()) {
    for (int c = 0; c < width; c += 8)
      _mm256_storeu_ps(prow + c, ExpMasked8(_mm256_loadu_ps(prow + c), shift));
  } else {
    for (int c = 0; c < width; c += 8)
      _mm256_storeu_ps(prow + c, Exp8(_mm256_sub_ps(_mm256_loadu_ps(prow + c), shift)));
  }
  std::fill(prow, prow + lo, 0.0f);
  std::fill(prow + hi, prow + width, 0.0f);
  if (bits != nullptr) ZeroMasked(prow, bits + r * kTileWords, width);
  return capped ? RowWeights::kCapped : RowWeights::kPlain;
}

// ---- backward ------------------------------------------------------------------------

// What the backward shares across work items: scale * q [B, N, T, Hp], dO [B, N, T, Hvp],
// delta = rowsum(dO * O) - d_lse [B, N, T] and the dQ / scale accumulator [B, N, T, Hp] (each with
// one spare zero row at the end: a tile's odd row count is multiplied rounded up to even),
// one lock per query tile of the accumulator, and each query tile's key union [B, tiles].
struct BackwardShared {
  int64_t splits;
  PooledBuffer qs, dos, delta, dqs;
  std::unique_ptr<std::mutex[]> tile_locks;
  std::vector<int64_t> tile_begin, tile_end;
  BackwardShared(const Problem& p, int64_t splits)
      : splits(splits), qs((p.B * p.N * p.T + 1) * p.Hp()),
        dos((p.B * p.N * p.T + 1) * p.Hvp()), delta(p.B * p.N * p.T + 1),
        dqs((p.B * p.N * p.T + 1) * p.Hp()), tile_locks(new std::mutex[p.B * p.N * p.q_tiles()]),
        tile_begin(p.B * p.q_tiles()), tile_end(p.B * p.q_tiles()) {}
  // Row t of query head n of batch b in a [B, N, T, width] array.
  int64_t Row(const Problem& p, int64_t b, int64_t n, int64_t t) const {
    return (b * p.N + n) * p.T + t;
  }
};

// Lays out q, dO and delta of batch b, query head n.
void BackwardPrepare(const Problem& p, BackwardShared& w, int64_t b, int64_t n, const float* q,
                     const float* out, const float* d_out, const float* d_lse) {
  const int64_t Hp = p.Hp(), Hvp = p.Hvp();
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t at = (b * p.T + t) * p.N + n, row = w.Row(p, b, n, t);
    float acc = 0.0f;
    for (int64_t h = 0; h < p.Hv; ++h) {
      acc += out[at * p.Hv + h] * d_out[at * p.Hv + h];
      *w.dos.at(row * Hvp + h) = d_out[at * p.Hv + h];
    }
    // lse's cotangent enters as P * d_lse in dS = P * (dP - delta): delta less d_lse
    *w.delta.at(row) = acc - d_lse[(b * p.N + n) * p.T + t];
    for (int64_t h = 0; h < p.H; ++h) *w.qs.at(row * Hp + h) = q[at * p.H + h] * p.scale;
  }
}

// Floats of a backward worker's scratch: keys as rows [kTile, Hp], V^T [Hvp, kTile], P and
// dP [kTile, kTile], dK and dQ tiles [kTile, Hp], the dV tile [kTile, Hvp], one key tile.
int64_t BackwardScratch(const Problem& p) {
  return kTile * (3 * p.Hp() + 2 * p.Hvp() + 2 * kTile) + TileScratch(p);
}

// One (batch, kv head, split): the key tiles s with s % splits == split (interleaved, so
// that the causal mask leaves each split a similar share). It owns dK, dV of its key tiles
// and adds its dQ share into the shared accumulator under the query tile's lock.
// `dbias` (null without a bias): where it adds the bias' gradient, laid out as the bias.
void BackwardItem(const Problem& p, const PackedKV& kv, BackwardShared& w, int64_t item,
                  const float* lse, float* dk, float* dv, float* scratch,
                  float* dbias = nullptr) {
  const int64_t split = item % w.splits, b = item / w.splits / p.K, kh = item / w.splits % p.K;
  const int64_t G = p.G(), tiles = p.q_tiles();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  float* kb = scratch;
  float* vt = kb + kTile * Hp;
  float* prob = vt + Hvp * kTile;
  float* dprob = prob + kTile * kTile;
  float* dks = dprob + kTile * kTile;
  float* dq_tile = dks + kTile * Hp;
  float* dvs = dq_tile + kTile * Hp;
  float* tile_scratch = dvs + kTile * Hvp;
  int64_t row_begin[kTile], row_end[kTile];

  for (int64_t key_tile = split; key_tile < p.key_tiles(); key_tile += w.splits) {
    const KeyTile t = LoadTile(p, kv, b, kh, key_tile, tile_scratch);
    const int width = static_cast<int>(t.width);
    // keys as rows kb [width, Hp] and V^T [Hvp, width], zero past the tile's keys
    Transpose(t.kt, width, Hp, width, kb, Hp);
    Transpose(t.v, Hvp, t.cols, Hvp, vt, width);
    for (int64_t h = 0; h < Hvp; ++h)
      std::fill(vt + h * width + t.cols, vt + (h + 1) * width, 0.0f);
    std::fill(dks, dks + width * Hp, 0.0f);
    std::fill(dvs, dvs + width * Hvp, 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        if (w.tile_end[b * tiles + tile] <= t.s0 || w.tile_begin[b * tiles + tile] >= t.s0 + t.cols)
          continue;
        // the tile table first: a sparse mask skips most pairs, before their rows are read
        const int64_t t0 = tile * kTile;
        const uint32_t* bits;
        if (SkipsKeyTile(p, b, n, tile, static_cast<int>(std::min<int64_t>(kTile, p.T - t0)),
                         key_tile, &bits))
          continue;
        const int64_t row0 = w.Row(p, b, n, t0);
        const int rows = static_cast<int>(p.TileRows(b, t0, row_begin, row_end));
        const int gemm_rows = (rows + 1) & ~1;
        const float* q_tile = w.qs.at(row0 * Hp);
        const float* do_tile = w.dos.at(row0 * Hvp);
        // P = exp(scale q k^T - lse) (zero where masked); dP = dO v^T.
        Gemm<false>(gemm_rows, width, static_cast<int>(p.H), q_tile, Hp, t.kt, width, prob,
                    width);
        Gemm<false>(gemm_rows, width, static_cast<int>(p.Hv), do_tile, Hvp, vt, width, dprob,
                    width);
        for (int r = 0; r < gemm_rows; ++r) {
          float* prow = prob + r * width;
          float* dprow = dprob + r * width;
          alignas(32) float deriv[kTile];
          const RowWeights weights =
              RecomputeWeights(p, b, n, t0, r, row_begin, row_end, t, width,
                               lse + (b * p.N + n) * p.T + t0, bits, prow, dprow, deriv);
          if (weights == RowWeights::kNone) continue;
          const __m256 d = _mm256_set1_ps(*w.delta.at(row0 + r));
          if (p.dropout) {
            // with dropout factors f: dS = P * (f dP - delta), and dV takes f P
            alignas(32) float factors[kTile];
            DropFactors(p, b, n, t0 + r, t.s0, width, factors);
            for (int c = 0; c < width; c += 8) {
              const __m256 f = _mm256_loadu_ps(factors + c), pc = _mm256_loadu_ps(prow + c);
              _mm256_storeu_ps(dprow + c,
                               _mm256_mul_ps(pc, _mm256_fmsub_ps(f, _mm256_loadu_ps(dprow + c), d)));
              _mm256_storeu_ps(prow + c, _mm256_mul_ps(f, pc));
            }
          } else {
            // dS = P * (dP - delta), in place of dP
            for (int c = 0; c < width; c += 8)
              _mm256_storeu_ps(dprow + c,
                               _mm256_mul_ps(_mm256_loadu_ps(prow + c),
                                             _mm256_sub_ps(_mm256_loadu_ps(dprow + c), d)));
          }
          // the bias is added after the soft cap: its gradient is dS before 1 - tanh^2
          if (dbias) AddBiasGradient(p, dbias, b, n, t0 + r, 1, t.s0, t.cols, dprow, width);
          // through the soft cap: dS times 1 - tanh^2
          if (weights == RowWeights::kCapped)
            for (int c = 0; c < width; c += 8)
              _mm256_storeu_ps(dprow + c, _mm256_mul_ps(_mm256_loadu_ps(dprow + c),
                                                        _mm256_loadu_ps(deriv + c)));
        }
        // dV += P^T dO; dK += dS^T (scale q); dQ / scale += dS k (the rows of this tile only)
        Gemm<true, true>(width, Hvp, rows, prob, width, do_tile, Hvp, dvs, Hvp);
        Gemm<true, true>(width, Hp, rows, dprob, width, q_tile, Hp, dks, Hp);
        Gemm<false>(gemm_rows, Hp, width, dprob, width, kb, Hp, dq_tile, Hp);
        std::lock_guard<std::mutex> lock(w.tile_locks[(b * p.N + n) * tiles + tile]);
        float* dq_acc = w.dqs.at(row0 * Hp);
        for (int64_t i = 0; i < rows * Hp; i += 8)
          _mm256_storeu_ps(dq_acc + i, _mm256_add_ps(_mm256_loadu_ps(dq_acc + i),
                                                     _mm256_loadu_ps(dq_tile + i)));
      }
    }
    for (int64_t c = 0; c < t.cols; ++c) {
      if (p.H > 0)
        std::memcpy(dk + ((b * p.S + t.s0 + c) * p.K + kh) * p.H, dks + c * Hp,
                    p.H * sizeof(float));
      if (p.Hv > 0)
        std::memcpy(dv + ((b * p.S + t.s0 + c) * p.K + kh) * p.Hv, dvs + c * Hvp,
                    p.Hv * sizeof(float));
    }
  }
}

// ---- tangent (forward-mode derivative) -------------------------------------------------

// Floats of a tangent worker's scratch: scale * q and scale * dq [kTile, Hp], P and dS
// [kTile, kTile], the accumulator [kTile, Hvp], a key tile and a key tangent tile.
int64_t TangentScratch(const Problem& p) {
  return kTile * (2 * p.Hp() + 2 * kTile + p.Hvp()) + 2 * TileScratch(p);
}

// The JVP of (out, lse) of one (batch, query head, query tile) in direction (dq, dk, dv),
// with P = exp(s - lse) from the given lse (one pass, no rescaling):
// ds = scale (dq k + q dk), mu = sum P ds, d_out = sum P (ds v + dv) - mu out, d_lse = mu.
// `pd` is `p` with the key and value tangents as its keys and values; `kvd` their packing.
// `d_bias` (null: none) is the bias' tangent, laid out as the bias.
void TangentItem(const Problem& p, const PackedKV& kv, const Problem& pd, const PackedKV& kvd,
                 int64_t item, const float* q, const float* dq, const float* out,
                 const float* lse, float* d_out, float* d_lse, float* scratch,
                 const float* d_bias = nullptr) {
  const auto [b, n, tile] = QueryItem(p, item);
  const int64_t kh = n / p.G();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  const int64_t t0 = tile * kTile;
  float* qs = scratch;
  float* dqs = qs + kTile * Hp;
  float* prob = dqs + kTile * Hp;
  float* ds = prob + kTile * kTile;
  float* acc = ds + kTile * kTile;
  float* tile_scratch = acc + kTile * Hvp;
  float* tangent_scratch = tile_scratch + TileScratch(p);
  float mu[kTile], row_lse[kTile];
  int64_t row_begin[kTile], row_end[kTile];
  const int rows = static_cast<int>(p.TileRows(b, t0, row_begin, row_end));
  const int gemm_rows = (rows + 1) & ~1;
  std::fill(qs, qs + gemm_rows * Hp, 0.0f);
  std::fill(dqs, dqs + gemm_rows * Hp, 0.0f);
  std::fill(acc, acc + gemm_rows * Hvp, 0.0f);
  for (int r = 0; r < kTile; ++r) {
    mu[r] = 0.0f, row_lse[r] = 0.0f;
    if (r >= rows) continue;
    const int64_t at = ((b * p.T + t0 + r) * p.N + n) * p.H;
    for (int64_t h = 0; h < p.H; ++h) {
      qs[r * Hp + h] = q[at + h] * p.scale;
      dqs[r * Hp + h] = dq[at + h] * p.scale;
    }
    row_lse[r] = lse[(b * p.N + n) * p.T + t0 + r];
  }
  int64_t begin, end;
  UnionOfRows(row_begin, row_end, kTile, &begin, &end);

  const bool dense = p.dense();
  for (int64_t key_tile = begin / kTile; key_tile * kTile < end; ++key_tile) {
    const uint32_t* bits;
    if (SkipsKeyTile(p, b, n, tile, rows, key_tile, &bits)) continue;
    const KeyTile t = LoadTile(p, kv, b, kh, key_tile, tile_scratch);
    const KeyTile dt = LoadTile(pd, kvd, b, kh, key_tile, tangent_scratch);
    const int width = static_cast<int>(t.width);
    // s = scale q k^T; ds = scale dq k^T + scale q dk^T
    Gemm<false>(gemm_rows, width, static_cast<int>(p.H), qs, Hp, t.kt, width, prob, width);
    Gemm<false>(gemm_rows, width, static_cast<int>(p.H), dqs, Hp, t.kt, width, ds, width);
    Gemm<true>(gemm_rows, width, static_cast<int>(p.H), qs, Hp, dt.kt, width, ds, width);
    for (int r = 0; r < gemm_rows; ++r) {
      float* prow = prob + r * width;
      float* dsrow = ds + r * width;
      alignas(32) float deriv[kTile];
      const RowWeights weights = RecomputeWeights(p, b, n, t0, r, row_begin, row_end, t, width,
                                                  row_lse, bits, prow, dsrow, deriv);
      if (weights == RowWeights::kNone) continue;
      if (weights == RowWeights::kCapped)
        for (int c = 0; c < width; c += 8)  // ds through the soft cap
          _mm256_storeu_ps(dsrow + c,
                           _mm256_mul_ps(_mm256_loadu_ps(dsrow + c), _mm256_loadu_ps(deriv + c)));
      // then ds += the bias' tangent, as the reference adds the bias after the score options
      if (d_bias) AddBias(p.bias, d_bias, b, n, t0 + r, 1, t.s0, t.cols, dsrow, width);
      // P * ds, in place of ds, and its row sum into mu (0 where P is: a masked key's
      // tangent, whatever it holds, does not reach the output)
      __m256 sum = _mm256_setzero_ps();
      for (int c = 0; c < width; c += 8) {
        const __m256 pc = _mm256_loadu_ps(prow + c);
        __m256 x = _mm256_mul_ps(pc, _mm256_loadu_ps(dsrow + c));
        if (dense) x = _mm256_and_ps(_mm256_cmp_ps(pc, _mm256_setzero_ps(), _CMP_NEQ_OQ), x);
        _mm256_storeu_ps(dsrow + c, x);
        sum = _mm256_add_ps(sum, x);
      }
      mu[r] += HorizontalSum(sum);
      if (p.dropout) {
        // mu is over the undropped weights (the softmax's); the output takes f P
        alignas(32) float factors[kTile];
        DropFactors(p, b, n, t0 + r, t.s0, width, factors);
        for (int c = 0; c < width; c += 8) {
          const __m256 f = _mm256_loadu_ps(factors + c);
          _mm256_storeu_ps(prow + c, _mm256_mul_ps(f, _mm256_loadu_ps(prow + c)));
          _mm256_storeu_ps(dsrow + c, _mm256_mul_ps(f, _mm256_loadu_ps(dsrow + c)));
        }
      }
    }
    // acc += (P * ds) . v + P . dv, over the keys some row of the tile attends
    const int64_t lo = std::clamp<int64_t>(begin - t.s0, 0, t.cols);
    const int64_t hi = std::clamp<int64_t>(end - t.s0, 0, t.cols);
    const int depth = static_cast<int>(hi - lo);
    Gemm<true>(gemm_rows, Hvp, depth, ds + lo, width, t.v + lo * Hvp, Hvp, acc, Hvp);
    Gemm<true>(gemm_rows, Hvp, depth, prob + lo, width, dt.v + lo * Hvp, Hvp, acc, Hvp);
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t at = ((b * p.T + t0 + r) * p.N + n) * p.Hv;
    for (int64_t h = 0; h < p.Hv; ++h) d_out[at + h] = acc[r * Hvp + h] - mu[r] * out[at + h];
    d_lse[(b * p.N + n) * p.T + t0 + r] = mu[r];
  }
}

// ---- the bias gradient -----------------------------------------------------------------

// Where the backward's items add the bias gradient. Each item owns the key tiles of one
// (batch, kv head, split); a full-shaped bias has each element in exactly one item's
// tiles, so items add into the result directly. A bias broadcast over the batch, over the
// query heads of several kv heads, or over the keys of several splits has elements that
// several items reach at once: then each worker adds into a zeroed partial of the bias'
// size and the partials are summed at the end. Partials rather than locks: no item waits
// on another and the sum is one pass; they cost (workers - 1) x the bias' size, and a
// broadcast bias is the small one (a full [B, N, T, S] one takes the direct path).
struct BiasGradient {
  float* result = nullptr;  // null: no bias
  int64_t size = 0, copies = 0;
  PooledBuffer partials;
  BiasGradient(const Problem& p, int64_t splits, int64_t workers, float* dbias) {
    if (!p.bias.data) return;
    result = dbias, size = p.bias.size;
    std::fill(result, result + size, 0.0f);
    const bool shared = p.bias.batch_shared || (p.bias.n_stride == 0 && p.K > 1) ||
                        (p.bias.s_stride == 0 && splits > 1);
    if (shared && workers > 1) {
      copies = workers;
      partials = PooledBuffer(workers * size);
    }
  }
  float* For(int64_t worker) {
    if (!result) return nullptr;
    return copies ? partials.at(worker * size) : result;
  }
  void Reduce(ffi::ThreadPool& pool) {
    if (!copies) return;
    constexpr int64_t kChunk = 1 << 14;
    ParallelFor(pool, (size + kChunk - 1) / kChunk, [&](int64_t, int64_t chunk) {
      const int64_t lo = chunk * kChunk, hi = std::min(size, lo + kChunk);
      for (int64_t w = 0; w < copies; ++w) {
        const float* src = partials.at(w * size);
        for (int64_t i = lo; i < hi; ++i) result[i] += src[i];
      }
    });
  }
};

// ---- the handlers ----------------------------------------------------------------------

// Leading dimensions (the batch, and any vmapped axes before it) fold into one batch B.
int64_t Leading(ffi::Span<const int64_t> dims) {
  int64_t product = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) product *= dims[i];
  return product;
}

// Checks the shapes and fills `p`.
ffi::Error Describe(const Floats& q, const Floats& k, const Floats& v, const Lengths& q_lengths,
                    const Lengths& kv_lengths, const Attributes& attributes, Problem* p) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 3 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("cpu_flash: q, k, v must have the same rank >= 3");
  const size_t r = qd.size();
  p->B = Leading(qd), p->T = qd[r - 3], p->N = qd[r - 2], p->H = qd[r - 1];
  p->S = kd[r - 3], p->K = kd[r - 2], p->Hv = vd[r - 1];
  if (Leading(kd) != p->B || Leading(vd) != p->B || vd[r - 3] != p->S || vd[r - 2] != p->K ||
      kd[r - 1] != p->H || p->K == 0 || p->N % p->K != 0 || p->H > 256 || p->Hv > 256 ||
      static_cast<int64_t>(q_lengths.element_count()) != p->B ||
      static_cast<int64_t>(kv_lengths.element_count()) != p->B)
    return ffi::Error::InvalidArgument("cpu_flash: inconsistent q, k, v or lengths shapes");
  static_cast<Attributes&>(*p) = attributes;
  // A window wider than S + T reaches every key, as none does; clamped, the interval sums
  // in Problem::Keys cannot overflow.
  const int64_t reach = p->S + p->T;
  p->window_left = std::min(p->window_left, reach);
  p->window_right = std::min(p->window_right, reach);
  p->q_lengths = q_lengths.typed_data(), p->kv_lengths = kv_lengths.typed_data();
  p->k = k.typed_data(), p->v = v.typed_data();
  return ffi::Error::Success();
}

// Checks the row seeds and slopes ([B, N] each) and puts them in `p`.
ffi::Error DescribeRows(const Seeds& row_seeds, const Floats& slopes, Problem* p) {
  if (static_cast<int64_t>(row_seeds.element_count()) != p->B * p->N ||
      static_cast<int64_t>(slopes.element_count()) != p->B * p->N)
    return ffi::Error::InvalidArgument("cpu_flash: row seeds or slopes mis-sized (want [B, N])");
  p->row_seeds = row_seeds.typed_data(), p->slopes = slopes.typed_data();
  return ffi::Error::Success();
}

// Reads a mask or bias operand into `out`: none if it is empty, else it must have q's rank,
// each leading axis 1 or q's, and its last three N, T, S (each may be 1).
template <typename T>
ffi::Error DescribeBroadcast(ffi::Span<const int64_t> q_dims, ffi::Span<const int64_t> dims,
                             size_t count, const T* data, const Problem& p,
                             Broadcast<T>* out) {
  if (count == 0) return ffi::Error::Success();
  const size_t r = q_dims.size();
  if (dims.size() != r)
    return ffi::Error::InvalidArgument("cpu_flash: mask and bias must have q's rank");
  const int64_t tail[3] = {p.N, p.T, p.S};
  std::vector<int64_t> stride(r);
  int64_t step = 1;
  for (size_t i = r; i-- > 0;) {
    const int64_t want = i + 3 < r ? q_dims[i] : tail[i + 3 - r];
    if (dims[i] != 1 && dims[i] != want)
      return ffi::Error::InvalidArgument("cpu_flash: mask or bias does not broadcast to q's");
    stride[i] = dims[i] == 1 ? 0 : step;
    step *= dims[i];
  }
  out->batch.assign(p.B, 0);
  out->batch_shared = false;
  for (size_t i = 0; i + 3 < r; ++i) out->batch_shared |= dims[i] == 1 && q_dims[i] > 1;
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t rest = b;
    for (size_t i = r - 3; i-- > 0;) {
      out->batch[b] += rest % q_dims[i] * stride[i];
      rest /= q_dims[i];
    }
  }
  out->n_stride = stride[r - 3], out->t_stride = stride[r - 2], out->s_stride = stride[r - 1];
  out->data = data, out->size = static_cast<int64_t>(count);
  return ffi::Error::Success();
}

// Fills `p`'s mask and bias from their operands (empty ones: none).
ffi::Error DescribeDense(const Floats& q, const Masks& mask, const Floats& bias, Problem* p) {
  if (auto error = DescribeBroadcast(q.dimensions(), mask.dimensions(), mask.element_count(),
                                     mask.typed_data(), *p, &p->mask);
      error.failure())
    return error;
  return DescribeBroadcast(q.dimensions(), bias.dimensions(), bias.element_count(),
                           bias.typed_data(), *p, &p->bias);
}

// Whether `out` is [B, T, N, Hv] and `lse` [B, N, T] in element count.
bool Sized(const Problem& p, const Floats& out, const Floats& lse) {
  return static_cast<int64_t>(out.element_count()) == p.B * p.T * p.N * p.Hv &&
         static_cast<int64_t>(lse.element_count()) == p.B * p.N * p.T;
}

// Whether a, b, c have the element counts of x, y, z.
template <typename A, typename B>
bool SameSizes(const A& x, const A& y, const A& z, const B& a, const B& b, const B& c) {
  return x.element_count() == a.element_count() && y.element_count() == b.element_count() &&
         z.element_count() == c.element_count();
}

// Runs a handler's body; an exception that escapes it (a failed allocation of the
// call's scratch, or the first item's, rethrown by ParallelFor after all items stopped)
// becomes the call's error, which JAX raises in Python.
template <typename Body>
ffi::Error Contained(Body body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "cpu_flash: out of memory for the kernel's scratch");
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string("cpu_flash: ") + error.what());
  } catch (...) {
    return ffi::Error::Internal("cpu_flash: unknown exception");
  }
}

// The up-front allocation of `floats` floats of scratch for each of `workers` workers.
PooledBuffer WorkerScratch(int64_t workers, int64_t floats) {
  if (FailAllocation("scratch")) throw std::bad_alloc();
  return PooledBuffer(workers * floats, false);
}

// Checks the table [..., heads, q_tiles, key_tiles] and bitmasks [..., P, kTile * kTileWords]
// (leading axes folding into B, heads 1 or N, every entry empty, full or below P) and puts
// them in `p`; an empty table: no block sparsity.
ffi::Error DescribeTiles(const TileTable& table, const TileBits& bits, Problem* p) {
  if (table.element_count() == 0) return ffi::Error::Success();  // no block sparsity
  auto td = table.dimensions(), bd = bits.dimensions();
  if (td.size() < 4 || bd.size() < 3)
    return ffi::Error::InvalidArgument("cpu_flash: tile table or bitmasks of too low a rank");
  int64_t bits_batch = 1;
  for (size_t i = 0; i + 2 < bd.size(); ++i) bits_batch *= bd[i];
  const size_t r = td.size();
  const int64_t heads = td[r - 3];
  if (Leading(td) != p->B || bits_batch != p->B || (heads != 1 && heads != p->N) ||
      td[r - 2] != p->q_tiles() || td[r - 1] != p->key_tiles() ||
      bd[bd.size() - 1] != kTile * kTileWords)
    return ffi::Error::InvalidArgument("cpu_flash: tile table or bitmasks mis-shaped");
  const int64_t partial = bd[bd.size() - 2];
  const int32_t* entries = table.typed_data();
  for (size_t i = 0; i < table.element_count(); ++i)
    if (entries[i] < kTileFull || entries[i] >= partial)
      return ffi::Error::InvalidArgument("cpu_flash: tile table entry out of range");
  p->tile_table = entries, p->tile_bits = bits.typed_data();
  p->table_heads = heads, p->bit_tiles = partial;
  return ffi::Error::Success();
}

// Checks the operands every handler takes (Describe, DescribeRows, DescribeDense,
// DescribeTiles) and fills `p`.
ffi::Error DescribeCall(const Floats& q, const Floats& k, const Floats& v,
                        const Lengths& q_lengths, const Lengths& kv_lengths,
                        const Seeds& row_seeds, const Floats& slopes, const Masks& mask,
                        const Floats& bias, const TileTable& table, const TileBits& bits,
                        const Attributes& attributes, Problem* p) {
  if (auto error = Describe(q, k, v, q_lengths, kv_lengths, attributes, p); error.failure())
    return error;
  if (auto error = DescribeRows(row_seeds, slopes, p); error.failure()) return error;
  if (auto error = DescribeDense(q, mask, bias, p); error.failure()) return error;
  return DescribeTiles(table, bits, p);
}

// Runs body(item, scratch) for items [0, items), each worker with `per_worker` floats of
// scratch.
template <typename Body>
void RunItems(ffi::ThreadPool& pool, int64_t items, int64_t per_worker, Body body) {
  PooledBuffer scratch = WorkerScratch(Workers(pool, items), per_worker);
  const bool fail = FailAllocation("item");
  ParallelFor(pool, items, [&](int64_t worker, int64_t item) {
    MaybeFailItem(fail, item);
    body(item, scratch.at(worker * per_worker));
  });
}

// RunItems over the forward's and the tangent's work items, one per (batch, query head,
// query tile) (QueryItem).
template <typename Body>
void RunQueryItems(ffi::ThreadPool& pool, const Problem& p, int64_t per_worker, Body body) {
  RunItems(pool, p.B * p.N * p.q_tiles(), per_worker, body);
}

ffi::Error Forward(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths q_lengths,
                   Lengths kv_lengths, Seeds row_seeds, Floats slopes, Masks mask, Floats bias,
                   TileTable table, TileBits bits, FloatsOut out, FloatsOut lse,
                   Attributes attributes) {
  return Contained([&]() -> ffi::Error {
    Problem p;
    if (auto error = DescribeCall(q, k, v, q_lengths, kv_lengths, row_seeds, slopes, mask, bias,
                                  table, bits, attributes, &p);
        error.failure())
      return error;
    if (!Sized(p, *out, *lse))
      return ffi::Error::InvalidArgument("cpu_flash: out or lse mis-sized");
    PackedKV kv;
    Pack(pool, p, kv, Loads::kVisited);
    const float* qp = q.typed_data();
    float *op = out->typed_data(), *lp = lse->typed_data();
    if (GroupedDecode(p)) {
      // one item per (batch, kv head)
      RunItems(pool, p.B * p.K, ForwardScratch(p), [&](int64_t item, float* scratch) {
        GroupedDecodeItem(p, kv, item, qp, op, lp, scratch);
      });
    } else {
      RunQueryItems(pool, p, ForwardScratch(p), [&](int64_t item, float* scratch) {
        ForwardItem(p, kv, item, qp, op, lp, scratch);
      });
    }
    return ffi::Error::Success();
  });
}

ffi::Error Backward(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths q_lengths,
                    Lengths kv_lengths, Floats out, Floats lse, Floats d_out, Floats d_lse,
                    Seeds row_seeds, Floats slopes, Masks mask, Floats bias, TileTable table,
                    TileBits bits, FloatsOut dq, FloatsOut dk, FloatsOut dv, FloatsOut dbias,
                    Attributes attributes) {
  return Contained([&]() -> ffi::Error {
    Problem p;
    if (auto error = DescribeCall(q, k, v, q_lengths, kv_lengths, row_seeds, slopes, mask, bias,
                                  table, bits, attributes, &p);
        error.failure())
      return error;
    if (!Sized(p, out, lse) || !Sized(p, d_out, d_lse) || !SameSizes(q, k, v, *dq, *dk, *dv))
      return ffi::Error::InvalidArgument("cpu_flash: out, lse or their cotangents mis-sized");
    if (dbias->element_count() != bias.element_count())
      return ffi::Error::InvalidArgument("cpu_flash: dbias mis-sized");
    const float *qp = q.typed_data(), *op = out.typed_data(), *lp = lse.typed_data();
    const float *dop = d_out.typed_data(), *dlp = d_lse.typed_data();
    float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
    // Enough items for every thread: few (batch, kv head) pairs split their key tiles.
    const int64_t pairs = p.B * p.K, threads = std::max<int64_t>(1, pool.num_threads());
    const int64_t splits =
        std::clamp<int64_t>((2 * threads + pairs - 1) / std::max<int64_t>(pairs, 1), 1,
                            std::max<int64_t>(p.key_tiles(), 1));
    const int64_t items = pairs * splits, per_worker = BackwardScratch(p);
    PooledBuffer scratch = WorkerScratch(Workers(pool, items), per_worker);
    BiasGradient bias_gradient(p, splits, Workers(pool, items), dbias->typed_data());
    BackwardShared shared(p, splits);
    PackedKV kv;
    Pack(pool, p, kv, Loads::kEvery);
    const int64_t tiles = p.q_tiles();
    ParallelFor(pool, p.B * tiles, [&](int64_t, int64_t item) {
      int64_t row_begin[kTile], row_end[kTile];
      p.TileRows(item / tiles, item % tiles * kTile, row_begin, row_end);
      UnionOfRows(row_begin, row_end, kTile, &shared.tile_begin[item], &shared.tile_end[item]);
    });
    ParallelFor(pool, p.B * p.N, [&](int64_t, int64_t item) {
      BackwardPrepare(p, shared, item / p.N, item % p.N, qp, op, dop, dlp);
    });
    const bool fail = FailAllocation("item");
    ParallelFor(pool, items, [&](int64_t worker, int64_t item) {
      MaybeFailItem(fail, item);
      BackwardItem(p, kv, shared, item, lp, dkp, dvp, scratch.at(worker * per_worker),
                   bias_gradient.For(worker));
    });
    bias_gradient.Reduce(pool);
    ParallelFor(pool, p.B * p.N, [&](int64_t, int64_t item) {
      const int64_t b = item / p.N, n = item % p.N, Hp = p.Hp();
      for (int64_t t = 0; t < p.T; ++t) {
        float* dst = dqp + ((b * p.T + t) * p.N + n) * p.H;
        const float* src = shared.dqs.at(shared.Row(p, b, n, t) * Hp);
        for (int64_t h = 0; h < p.H; ++h) dst[h] = src[h] * p.scale;
      }
    });
    return ffi::Error::Success();
  });
}

ffi::Error Tangent(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths q_lengths,
                   Lengths kv_lengths, Floats out, Floats lse, Floats dq, Floats dk, Floats dv,
                   Seeds row_seeds, Floats slopes, Masks mask, Floats bias, Floats d_bias,
                   TileTable table, TileBits bits, FloatsOut d_out, FloatsOut d_lse,
                   Attributes attributes) {
  return Contained([&]() -> ffi::Error {
    Problem p;
    if (auto error = DescribeCall(q, k, v, q_lengths, kv_lengths, row_seeds, slopes, mask, bias,
                                  table, bits, attributes, &p);
        error.failure())
      return error;
    if (!Sized(p, out, lse) || !Sized(p, *d_out, *d_lse) || !SameSizes(q, k, v, dq, dk, dv))
      return ffi::Error::InvalidArgument("cpu_flash: out, lse or the tangents mis-sized");
    if (d_bias.element_count() != bias.element_count())
      return ffi::Error::InvalidArgument("cpu_flash: the bias tangent mis-sized");
    const float* dbp = p.bias.data ? d_bias.typed_data() : nullptr;
    Problem pd = p;  // the key and value tangents, laid out as the keys and values are
    pd.k = dk.typed_data(), pd.v = dv.typed_data();
    PackedKV kv, kvd;
    Pack(pool, p, kv, Loads::kVisited);
    Pack(pool, pd, kvd, Loads::kVisited);
    const float *qp = q.typed_data(), *dqp = dq.typed_data();
    const float *op = out.typed_data(), *lp = lse.typed_data();
    float *dop = d_out->typed_data(), *dlp = d_lse->typed_data();
    RunQueryItems(pool, p, TangentScratch(p), [&](int64_t item, float* scratch) {
      TangentItem(p, kv, pd, kvd, item, qp, dqp, op, lp, dop, dlp, scratch, dbp);
    });
    return ffi::Error::Success();
  });
}

// ---- the NaN policy's check -----------------------------------------------------------

// Whether floats [x, x + n) hold a NaN or an Inf: x * 0 is NaN exactly there, and a sum
// that meets a NaN stays NaN.
bool HasNonFinite(const float* x, int64_t n) {
  __m256 sum = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), zero, sum);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  bool found = false;
  for (float lane : lanes) found |= lane != lane;
  for (; i < n; ++i) found |= !std::isfinite(x[i]);
  return found;
}

// found[m] = whether q's m-th share, or a key or value the forward may read in the
// sequences of that share, holds a NaN or an Inf. The forward and the tangent read a
// sequence's keys only below its length, rounded up to a whole key tile (Pack with
// Loads::kVisited, and the rows' intervals); what they never read cannot reach an
// output, so a cache's unfilled slots are not scanned. q [M..., B, T, N, H], k, v
// [M..., B, S, K, H(v)] and kv_lengths [M..., B], with M the vmapped axes (found [M...]).
ffi::Error NonFinite(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths kv_lengths,
                     ffi::ResultBuffer<ffi::PRED> found) {
  return Contained([&]() -> ffi::Error {
    const auto dims = k.dimensions();
    const int64_t shares = found->element_count(), sequences = kv_lengths.element_count();
    if (dims.size() < 3 || shares < 1 || sequences % shares != 0 ||
        q.element_count() % shares != 0)
      return ffi::Error::InvalidArgument("cpu_flash non_finite: mis-sized operands");
    const int64_t S = dims[dims.size() - 3];
    const int64_t key_row = k.element_count() / std::max<int64_t>(sequences * S, 1);
    const int64_t value_row = v.element_count() / std::max<int64_t>(sequences * S, 1);
    if (key_row * sequences * S != k.element_count() ||
        value_row * sequences * S != v.element_count())
      return ffi::Error::InvalidArgument("cpu_flash non_finite: k or v mis-sized");
    const int64_t q_share = q.element_count() / shares;
    const int32_t* lengths = kv_lengths.typed_data();
    // items: each sequence's keys and values, then q in chunks of kChunk floats per share
    constexpr int64_t kChunk = 1 << 16;
    const int64_t q_chunks = (q_share + kChunk - 1) / kChunk;
    std::vector<uint8_t> seen(sequences + shares * q_chunks, 0);
    ParallelFor(pool, static_cast<int64_t>(seen.size()), [&](int64_t, int64_t item) {
      if (item < sequences) {
        const int64_t length = std::clamp<int64_t>(lengths[item], 0, S);
        const int64_t keys = std::min<int64_t>(S, (length + kTile - 1) / kTile * kTile);
        seen[item] = HasNonFinite(k.typed_data() + item * S * key_row, keys * key_row) ||
                     HasNonFinite(v.typed_data() + item * S * value_row, keys * value_row);
      } else {
        const int64_t share = (item - sequences) / std::max<int64_t>(q_chunks, 1);
        const int64_t begin = (item - sequences) % q_chunks * kChunk;
        const int64_t n = std::min(kChunk, q_share - begin);
        seen[item] = HasNonFinite(q.typed_data() + share * q_share + begin, n);
      }
    });
    const int64_t per_share = sequences / shares;
    for (int64_t m = 0; m < shares; ++m) {
      bool any = false;
      for (int64_t i = 0; i < per_share; ++i) any |= seen[m * per_share + i] != 0;
      for (int64_t c = 0; c < q_chunks; ++c) any |= seen[sequences + m * q_chunks + c] != 0;
      found->typed_data()[m] = any;
    }
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Attributes, ::xla::ffi::StructMember<bool>("causal"),
                                      ::xla::ffi::StructMember<float>("scale"),
                                      ::xla::ffi::StructMember<int64_t>("window_left"),
                                      ::xla::ffi::StructMember<int64_t>("window_right"),
                                      ::xla::ffi::StructMember<float>("soft_cap"),
                                      ::xla::ffi::StructMember<bool>("alibi"),
                                      ::xla::ffi::StructMember<bool>("dropout"),
                                      ::xla::ffi::StructMember<int64_t>("dropout_threshold"),
                                      ::xla::ffi::StructMember<float>("dropout_scale"));

extern "C" int JaxAttnCpuSupported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// q, k, v and the lengths, first in both handlers' bindings.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Floats>()
      .Arg<Floats>()
      .Arg<Floats>()
      .Arg<Lengths>()
      .Arg<Lengths>();
}

// (q, k, v, q_lengths, kv_lengths, row_seeds, slopes, mask, bias, table, bits) -> (out, lse)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashForward, Forward,
                              BindInputs()
                                  .Arg<Seeds>()
                                  .Arg<Floats>()
                                  .Arg<Masks>()
                                  .Arg<Floats>()
                                  .Arg<TileTable>()
                                  .Arg<TileBits>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Attrs<Attributes>());

// (q, k, v, q_lengths, kv_lengths, out, lse, d_out, d_lse, row_seeds, slopes, mask, bias,
//  table, bits) -> (dq, dk, dv, dbias)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashBackward, Backward,
                              BindInputs()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Seeds>()
                                  .Arg<Floats>()
                                  .Arg<Masks>()
                                  .Arg<Floats>()
                                  .Arg<TileTable>()
                                  .Arg<TileBits>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Attrs<Attributes>());

// (q, k, v, q_lengths, kv_lengths, out, lse, dq, dk, dv, row_seeds, slopes, mask, bias,
//  d_bias, table, bits) -> (d_out, d_lse)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashTangent, Tangent,
                              BindInputs()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Seeds>()
                                  .Arg<Floats>()
                                  .Arg<Masks>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<TileTable>()
                                  .Arg<TileBits>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Attrs<Attributes>());

// (q, k, v, kv_lengths) -> found
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashNonFinite, NonFinite,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Lengths>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());
