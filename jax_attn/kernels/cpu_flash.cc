// Fused flash attention for x86-64 CPUs (AVX2 + FMA), float32, as XLA FFI custom calls.
//
// jax_attn/kernels/cpu_flash.py compiles this file on first use and registers the two
// handlers below with jax.ffi. Layouts are jax.nn's: q [B, T, N, H], k [B, S, K, H],
// v [B, S, K, Hv], out [B, T, N, Hv] (leading axes before B, from vmap, fold into B);
// lse [B, N, T] is the log-sum-exp of each query row's scaled logits (kMasked for a row
// with nothing to attend).
//
// What a query may attend is one interval of keys per row: the causal limit, a local
// window, and the per-sequence lengths each cut it (bottom-right aligned: query t sits at
// key position t + S - T). No mask array, bias, dropout or score function: the Python
// side declines those, and dispatch picks another kernel.
//
// Forward: one work item is (batch, query head, tile of kTile query rows); it walks the
// key tiles its rows may see with the online softmax (running max m, sum l, unnormalised
// accumulator). Backward (FlashAttention-2): one work item is (batch, key/value head,
// share of its key tiles); it owns dK, dV of its key tiles and adds its dQ share under a
// lock per query tile. Items run on XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Floats = ffi::Buffer<ffi::F32>;
using Lengths = ffi::Buffer<ffi::S32>;
using FloatsOut = ffi::ResultBuffer<ffi::F32>;

namespace {

constexpr int kTile = 64;  // query rows and keys per tile
constexpr float kMasked = -0.7f * 3.4028234663852886e38f;

int64_t RoundUp16(int64_t x) { return (x + 15) / 16 * 16; }

// ---- vector helpers ----------------------------------------------------------------

// e^x for 8 floats: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n in the exponent.
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
};

// The attributes, the shapes (leading axes folded into B) and the lengths [B].
struct Problem : Attributes {
  int64_t B, T, S, N, K, H, Hv;
  int64_t G() const { return N / K; }
  int64_t Hp() const { return RoundUp16(H); }
  int64_t Hvp() const { return RoundUp16(Hv); }
  int64_t q_tiles() const { return (T + kTile - 1) / kTile; }
  const int32_t* q_lengths;
  const int32_t* kv_lengths;

  // Keys query row t of batch b may attend: [*begin, *end) (empty if begin >= end).
  void Keys(int64_t b, int64_t t, int64_t* begin, int64_t* end) const {
    int64_t pos = t + S - T;
    int64_t lo = 0, hi = std::min<int64_t>(S, kv_lengths[b]);
    if (causal) hi = std::min(hi, pos + 1);
    if (window_left >= 0) lo = std::max(lo, pos - window_left);
    if (window_right >= 0) hi = std::min(hi, pos + window_right + 1);
    if (t >= q_lengths[b]) hi = lo;
    *begin = lo, *end = std::max(lo, hi);
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

// ---- running items on XLA's thread pool ----------------------------------------------

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto work = [state, items, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->finished.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == items; });
}

// ---- large buffers kept from call to call ----------------------------------------------

// A fresh buffer of tens of MB per call is mapped from the system anew, and in a process
// that runs other programs between calls its pages faulted in again on every call
// (measured: 12,256 faults and 2.5x the time of a decoding call at B 8, S 1024). Calls
// take their packed keys and backward arrays from here and give them back; up to
// kKeptBytes stay kept for the process's life.
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
  float& operator[](size_t i) { return data[i]; }
  const float& operator[](size_t i) const { return data[i]; }
};

// ---- keys and values laid out once per call -------------------------------------------

// Each (batch, kv head, key tile) as two contiguous zero-padded blocks: K^T [Hp, kTile]
// (keys across, the right operand of q k^T) and V [kTile, Hvp].
struct PackedKV {
  PooledBuffer kt, v;
  int64_t key_tiles;
  const float* KeysT(const Problem& p, int64_t b, int64_t kh, int64_t tile) const {
    return &kt[((b * p.K + kh) * key_tiles + tile) * p.Hp() * kTile];
  }
  const float* Values(const Problem& p, int64_t b, int64_t kh, int64_t tile) const {
    return &v[((b * p.K + kh) * key_tiles + tile) * kTile * p.Hvp()];
  }
};

void Pack(ffi::ThreadPool& pool, const Problem& p, const float* k, const float* v,
          PackedKV& packed) {
  packed.key_tiles = (p.S + kTile - 1) / kTile;
  // Every element is written below, the padding with zeros: no zero-fill first (it cost
  // a pass over tens of MB per decoding call).
  packed.kt = PooledBuffer(p.B * p.K * packed.key_tiles * p.Hp() * kTile, false);
  packed.v = PooledBuffer(p.B * p.K * packed.key_tiles * kTile * p.Hvp(), false);
  const int64_t Hp = p.Hp(), Hvp = p.Hvp();
  ParallelFor(pool, p.B * p.K * packed.key_tiles, [&](int64_t item) {
    const int64_t tile = item % packed.key_tiles, kh = item / packed.key_tiles % p.K;
    const int64_t b = item / packed.key_tiles / p.K, s0 = tile * kTile;
    const int64_t keys = std::min<int64_t>(kTile, p.S - s0);
    float* kt = const_cast<float*>(packed.KeysT(p, b, kh, tile));
    float* vt = const_cast<float*>(packed.Values(p, b, kh, tile));
    for (int64_t c = 0; c < keys; ++c) {
      const float* krow = k + ((b * p.S + s0 + c) * p.K + kh) * p.H;
      for (int64_t h = 0; h < p.H; ++h) kt[h * kTile + c] = krow[h];
      std::memcpy(vt + c * Hvp, v + ((b * p.S + s0 + c) * p.K + kh) * p.Hv,
                  p.Hv * sizeof(float));
      std::fill(vt + c * Hvp + p.Hv, vt + (c + 1) * Hvp, 0.0f);
    }
    for (int64_t h = 0; h < p.H; ++h)
      std::fill(kt + h * kTile + keys, kt + (h + 1) * kTile, 0.0f);
    std::fill(kt + p.H * kTile, kt + Hp * kTile, 0.0f);
    std::fill(vt + keys * Hvp, vt + kTile * Hvp, 0.0f);
  });
}

// ---- forward -------------------------------------------------------------------------

void ForwardItem(const Problem& p, const PackedKV& kv, int64_t item, const float* q,
                 float* out, float* lse) {
  const int64_t tiles = p.q_tiles();
  const int64_t tile = tiles - 1 - item % tiles;  // the longest rows first
  const int64_t n = (item / tiles) % p.N, b = item / tiles / p.N, kh = n / p.G();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  const int64_t t0 = tile * kTile;
  const int rows = static_cast<int>(std::min<int64_t>(kTile, p.T - t0));
  // A short last tile (decoding: one row) multiplies only its own rows, rounded up to
  // the even count Gemm takes.
  const int gemm_rows = (rows + 1) & ~1;
  thread_local std::vector<float> qs, s, acc;
  qs.assign(kTile * Hp, 0.0f);
  s.resize(kTile * kTile);
  acc.assign(kTile * Hvp, 0.0f);
  float m[kTile], l[kTile];
  int64_t row_begin[kTile], row_end[kTile];
  for (int r = 0; r < kTile; ++r) {
    m[r] = kMasked, l[r] = 0.0f, row_begin[r] = row_end[r] = 0;
    if (r >= rows) continue;
    p.Keys(b, t0 + r, &row_begin[r], &row_end[r]);
    const float* src = q + ((b * p.T + t0 + r) * p.N + n) * p.H;
    for (int64_t h = 0; h < p.H; ++h) qs[r * Hp + h] = src[h] * p.scale;
  }
  int64_t begin, end;
  UnionOfRows(row_begin, row_end, kTile, &begin, &end);

  for (int64_t s0 = begin / kTile * kTile; s0 < end; s0 += kTile) {
    const int64_t cols = std::min<int64_t>(kTile, p.S - s0);
    // [kTile, kTile] scaled logits
    Gemm<false>(gemm_rows, kTile, static_cast<int>(p.H), qs.data(), Hp,
                kv.KeysT(p, b, kh, s0 / kTile), kTile, s.data(), kTile);
    for (int r = 0; r < gemm_rows; ++r) {
      float* srow = &s[r * kTile];
      const int64_t lo = std::clamp<int64_t>(row_begin[r] - s0, 0, cols);
      const int64_t hi = std::clamp<int64_t>(row_end[r] - s0, 0, cols);
      if (lo >= hi) {
        std::memset(srow, 0, kTile * sizeof(float));
        continue;
      }
      float row_max = kMasked;
      if (lo == 0 && hi == kTile) {
        __m256 mx = _mm256_loadu_ps(srow);
        for (int c = 8; c < kTile; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(srow + c));
        row_max = HorizontalMax(mx);
      } else {
        for (int64_t c = lo; c < hi; ++c) row_max = std::max(row_max, srow[c]);
      }
      const float m_new = std::max(m[r], row_max);
      const float correction = m[r] == kMasked ? 0.0f : std::exp(m[r] - m_new);
      const __m256 shift = _mm256_set1_ps(m_new);
      for (int c = 0; c < kTile; c += 8)
        _mm256_storeu_ps(srow + c, Exp8(_mm256_sub_ps(_mm256_loadu_ps(srow + c), shift)));
      std::fill(srow, srow + lo, 0.0f);
      std::fill(srow + hi, srow + kTile, 0.0f);
      __m256 sum = _mm256_loadu_ps(srow);
      for (int c = 8; c < kTile; c += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(srow + c));
      l[r] = l[r] * correction + HorizontalSum(sum);
      m[r] = m_new;
      if (correction != 1.0f) {
        const __m256 factor = _mm256_set1_ps(correction);
        float* arow = &acc[r * Hvp];
        for (int h = 0; h < Hvp; h += 8)
          _mm256_storeu_ps(arow + h, _mm256_mul_ps(factor, _mm256_loadu_ps(arow + h)));
      }
    }
    // [kTile, Hvp] += weights . values
    Gemm<true>(gemm_rows, Hvp, kTile, s.data(), kTile, kv.Values(p, b, kh, s0 / kTile), Hvp,
               acc.data(), Hvp);
  }

  for (int r = 0; r < rows; ++r) {
    float* dst = out + ((b * p.T + t0 + r) * p.N + n) * p.Hv;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t h = 0; h < p.Hv; ++h) dst[h] = acc[r * Hvp + h] * inv;
    lse[(b * p.N + n) * p.T + t0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kMasked;
  }
}

// ---- backward ------------------------------------------------------------------------

// What the backward shares across work items, per (batch, kv head) and its G query heads:
// scale * q [G, T_pad, Hp], dO [G, T_pad, Hvp], delta = rowsum(dO * O) [G, T_pad] and the
// dQ / scale accumulator [G, T_pad, Hp], with one lock per query tile of the accumulator.
struct BackwardShared {
  int64_t T_pad, splits;
  PooledBuffer qs, dos, delta, dqs;
  std::unique_ptr<std::mutex[]> tile_locks;
  BackwardShared(const Problem& p, int64_t splits)
      : T_pad(p.q_tiles() * kTile), splits(splits),
        qs(p.B * p.N * T_pad * p.Hp()), dos(p.B * p.N * T_pad * p.Hvp()),
        delta(p.B * p.N * T_pad), dqs(p.B * p.N * T_pad * p.Hp()),
        tile_locks(new std::mutex[p.B * p.N * p.q_tiles()]) {}
  // Row t of query head n (= kh * G + g) of batch b in a [B, N, T_pad, width] array.
  int64_t Row(const Problem& p, int64_t b, int64_t n, int64_t t) const {
    return (b * p.N + n) * T_pad + t;
  }
};

// Lays out q, dO and delta of batch b, query head n.
void BackwardPrepare(const Problem& p, BackwardShared& w, int64_t b, int64_t n, const float* q,
                     const float* out, const float* d_out) {
  const int64_t Hp = p.Hp(), Hvp = p.Hvp();
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t at = (b * p.T + t) * p.N + n, row = w.Row(p, b, n, t);
    float acc = 0.0f;
    for (int64_t h = 0; h < p.Hv; ++h) {
      acc += out[at * p.Hv + h] * d_out[at * p.Hv + h];
      w.dos[row * Hvp + h] = d_out[at * p.Hv + h];
    }
    w.delta[row] = acc;
    for (int64_t h = 0; h < p.H; ++h) w.qs[row * Hp + h] = q[at * p.H + h] * p.scale;
  }
}

// One (batch, kv head, split): the key tiles s with s % splits == split (interleaved, so
// that the causal mask leaves each split a similar share). It owns dK, dV of its key tiles
// and adds its dQ share into the shared accumulator under the query tile's lock.
void BackwardItem(const Problem& p, const PackedKV& kv, BackwardShared& w, int64_t item,
                  const float* lse, float* dk, float* dv) {
  const int64_t split = item % w.splits, b = item / w.splits / p.K, kh = item / w.splits % p.K;
  const int64_t G = p.G(), tiles = p.q_tiles();
  const int Hp = static_cast<int>(p.Hp()), Hvp = static_cast<int>(p.Hvp());
  thread_local std::vector<float> vt, kb, prob, dprob, dks, dvs, dq_tile;
  vt.resize(Hvp * kTile), kb.resize(kTile * Hp), prob.resize(kTile * kTile);
  dprob.resize(kTile * kTile), dks.resize(kTile * Hp), dvs.resize(kTile * Hvp);
  dq_tile.resize(kTile * Hp);
  std::vector<int64_t> tile_begin(tiles), tile_end(tiles), row_begin(w.T_pad), row_end(w.T_pad);
  for (int64_t t = 0; t < w.T_pad; ++t) {
    row_begin[t] = row_end[t] = 0;
    if (t < p.T) p.Keys(b, t, &row_begin[t], &row_end[t]);
  }
  for (int64_t i = 0; i < tiles; ++i)
    UnionOfRows(&row_begin[i * kTile], &row_end[i * kTile], kTile, &tile_begin[i],
                &tile_end[i]);

  for (int64_t s0 = split * kTile; s0 < p.S; s0 += w.splits * kTile) {
    const int64_t cols = std::min<int64_t>(kTile, p.S - s0);
    const float* kt = kv.KeysT(p, b, kh, s0 / kTile);
    const float* vb = kv.Values(p, b, kh, s0 / kTile);
    for (int64_t c = 0; c < kTile; ++c) {
      for (int64_t h = 0; h < Hp; ++h) kb[c * Hp + h] = kt[h * kTile + c];
      for (int64_t h = 0; h < Hvp; ++h) vt[h * kTile + c] = vb[c * Hvp + h];
    }
    std::fill(dks.begin(), dks.end(), 0.0f);
    std::fill(dvs.begin(), dvs.end(), 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        if (tile_end[tile] <= s0 || tile_begin[tile] >= s0 + cols) continue;
        const int64_t t0 = tile * kTile, row0 = w.Row(p, b, n, t0);
        const float* q_tile = &w.qs[row0 * Hp];
        const float* do_tile = &w.dos[row0 * Hvp];
        // P = exp(scale q k^T - lse) (zero where masked); dP = dO v^T.
        Gemm<false>(kTile, kTile, static_cast<int>(p.H), q_tile, Hp, kt, kTile, prob.data(),
                    kTile);
        Gemm<false>(kTile, kTile, static_cast<int>(p.Hv), do_tile, Hvp, vt.data(), kTile,
                    dprob.data(), kTile);
        for (int r = 0; r < kTile; ++r) {
          float* prow = &prob[r * kTile];
          float* dprow = &dprob[r * kTile];
          const int64_t lo = std::clamp<int64_t>(row_begin[t0 + r] - s0, 0, cols);
          const int64_t hi = std::clamp<int64_t>(row_end[t0 + r] - s0, 0, cols);
          if (lo >= hi) {
            std::memset(prow, 0, kTile * sizeof(float));
            std::memset(dprow, 0, kTile * sizeof(float));
            continue;
          }
          const __m256 shift = _mm256_set1_ps(lse[(b * p.N + n) * p.T + t0 + r]);
          const __m256 d = _mm256_set1_ps(w.delta[row0 + r]);
          for (int c = 0; c < kTile; c += 8)
            _mm256_storeu_ps(prow + c, Exp8(_mm256_sub_ps(_mm256_loadu_ps(prow + c), shift)));
          std::fill(prow, prow + lo, 0.0f);
          std::fill(prow + hi, prow + kTile, 0.0f);
          // dS = P * (dP - delta), in place of dP
          for (int c = 0; c < kTile; c += 8)
            _mm256_storeu_ps(dprow + c,
                             _mm256_mul_ps(_mm256_loadu_ps(prow + c),
                                           _mm256_sub_ps(_mm256_loadu_ps(dprow + c), d)));
        }
        // dV += P^T dO; dK += dS^T (scale q); dQ / scale += dS k
        Gemm<true, true>(kTile, Hvp, kTile, prob.data(), kTile, do_tile, Hvp, dvs.data(), Hvp);
        Gemm<true, true>(kTile, Hp, kTile, dprob.data(), kTile, q_tile, Hp, dks.data(), Hp);
        Gemm<false>(kTile, Hp, kTile, dprob.data(), kTile, kb.data(), Hp, dq_tile.data(), Hp);
        std::lock_guard<std::mutex> lock(w.tile_locks[row0 / kTile]);
        float* dq_acc = &w.dqs[row0 * Hp];
        for (int64_t i = 0; i < kTile * Hp; i += 8)
          _mm256_storeu_ps(dq_acc + i, _mm256_add_ps(_mm256_loadu_ps(dq_acc + i),
                                                     _mm256_loadu_ps(&dq_tile[i])));
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      std::memcpy(dk + ((b * p.S + s0 + c) * p.K + kh) * p.H, &dks[c * Hp], p.H * sizeof(float));
      std::memcpy(dv + ((b * p.S + s0 + c) * p.K + kh) * p.Hv, &dvs[c * Hvp],
                  p.Hv * sizeof(float));
    }
  }
}

// Leading dimensions (the batch, and any vmapped axes before it) fold into one batch B.
int64_t Leading(ffi::Span<const int64_t> dims) {
  int64_t product = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) product *= dims[i];
  return product;
}

// Checks the shapes, fills `p` and packs the keys and values into `kv`.
ffi::Error Prepare(ffi::ThreadPool& pool, const Floats& q, const Floats& k, const Floats& v,
                   const Lengths& q_lengths, const Lengths& kv_lengths,
                   const Attributes& attributes, Problem* p, PackedKV* kv) {
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
  p->q_lengths = q_lengths.typed_data(), p->kv_lengths = kv_lengths.typed_data();
  Pack(pool, *p, k.typed_data(), v.typed_data(), *kv);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths q_lengths,
                   Lengths kv_lengths, FloatsOut out, FloatsOut lse, Attributes attributes) {
  Problem p;
  PackedKV kv;
  if (auto error = Prepare(pool, q, k, v, q_lengths, kv_lengths, attributes, &p, &kv);
      error.failure())
    return error;
  const float* qp = q.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, p.B * p.N * p.q_tiles(),
              [&](int64_t item) { ForwardItem(p, kv, item, qp, op, lp); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Floats q, Floats k, Floats v, Lengths q_lengths,
                    Lengths kv_lengths, Floats out, Floats lse, Floats d_out, FloatsOut dq,
                    FloatsOut dk, FloatsOut dv, Attributes attributes) {
  Problem p;
  PackedKV kv;
  if (auto error = Prepare(pool, q, k, v, q_lengths, kv_lengths, attributes, &p, &kv);
      error.failure())
    return error;
  const float *qp = q.typed_data(), *op = out.typed_data(), *lp = lse.typed_data();
  const float* dop = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // Enough items for every thread: few (batch, kv head) pairs split their key tiles.
  const int64_t pairs = p.B * p.K, threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t splits =
      std::clamp<int64_t>((2 * threads + pairs - 1) / std::max<int64_t>(pairs, 1), 1,
                          std::max<int64_t>(kv.key_tiles, 1));
  BackwardShared shared(p, splits);
  ParallelFor(pool, p.B * p.N, [&](int64_t item) {
    BackwardPrepare(p, shared, item / p.N, item % p.N, qp, op, dop);
  });
  ParallelFor(pool, pairs * splits,
              [&](int64_t item) { BackwardItem(p, kv, shared, item, lp, dkp, dvp); });
  ParallelFor(pool, p.B * p.N, [&](int64_t item) {
    const int64_t b = item / p.N, n = item % p.N, Hp = p.Hp();
    for (int64_t t = 0; t < p.T; ++t) {
      float* dst = dqp + ((b * p.T + t) * p.N + n) * p.H;
      const float* src = &shared.dqs[shared.Row(p, b, n, t) * Hp];
      for (int64_t h = 0; h < p.H; ++h) dst[h] = src[h] * p.scale;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Attributes, ::xla::ffi::StructMember<bool>("causal"),
                                      ::xla::ffi::StructMember<float>("scale"),
                                      ::xla::ffi::StructMember<int64_t>("window_left"),
                                      ::xla::ffi::StructMember<int64_t>("window_right"));

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

// (q, k, v, q_lengths, kv_lengths) -> (out, lse)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashForward, Forward,
                              BindInputs()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Attrs<Attributes>());

// (q, k, v, q_lengths, kv_lengths, out, lse, d_out) -> (dq, dk, dv)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnFlashBackward, Backward,
                              BindInputs()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Ret<Floats>()
                                  .Attrs<Attributes>());
