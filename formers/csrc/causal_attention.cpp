// Causal softmax attention for CPU training, float32: the row blocks of formers' `BlockCausalAttention`
// (formers/nn/attention.py), one (batch, head) pair per task, so that a pair's q, k, v, scores and gradients (about
// 0.5 MiB at 256 tokens, Dh 64) stay in one core's L2 cache from its first matrix product to its last. The
// PyTorch body batches every pair into each matmul and streams all of them through the cache once per matmul.
//
// Built on first use by formers/nn/cpu_kernels.py (g++ -O3 -march=native -fopenmp, linked against torch's own
// libtorch_cpu and libgomp) and called through ctypes; the PyTorch body runs wherever it cannot be built.
// Matrix products go to the BLAS inside libtorch_cpu (MKL's sgemm_, Fortran interface, 32-bit integers), the
// exponentials to MKL's vsExp. The pairs are split over OpenMP threads (torch's own libgomp, so its thread pool),
// inside which MKL runs single-threaded.
//
// Layout: q, k, v, dy, dq, dk, dv are (B, H, N, D) with any strides but a unit stride along D and a stride along N of
// at least D (the BLAS leading dimension; the caller copies other layouts), given as a base pointer and the element
// strides of B, H and N. y is written likewise. P, the probabilities kept for the
// backward, is (B * H, N, N) row-major; only its causal part (row r, columns 0..r, and zeros to the end of r's
// row block) is written or read.
//
// Forward, per pair, per row block [s, e):  S = scale * q[s:e] k[:e]^T;  P = softmax over columns 0..r of row r;
// y[s:e] = P v[:e].  Backward, blocks last first (the last block, which sees every key, writes dk and dv; the
// others add to their leading rows): dv[:e] += P^T dy[s:e];  dP = dy[s:e] v[:e]^T;
// dS = P * (dP - rowsum(dP * P));  dq[s:e] = scale * dS k[:e];  dk[:e] += scale * dS^T q[s:e].

#include <algorithm>
#include <cstdint>
#include <vector>
#include <omp.h>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void vsExp(int n, const float* a, float* r);
}

namespace {

// Row-major C (m x n) = alpha op(A) op(B) + beta C. A row-major matrix read column-major is its transpose, so this
// is the column-major C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&cb, &ca, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

struct Strided {  // a (B, H, N, D) operand: base pointer and element strides of B, H, N (D has stride 1)
  float* p;
  int64_t sb, sh, sn;
  float* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

inline Strided make(float* p, const int64_t* s) { return Strided{p, s[0], s[1], s[2]}; }

// Reductions with 16 independent partial results, which the compiler turns into vector instructions (a single
// running max or sum is a chain of dependent scalar operations, four cycles each).
constexpr int kLanes = 16;

inline float row_max(const float* x, int n) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = x[0];
  int c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = acc[j] > x[c + j] ? acc[j] : x[c + j];
  float m = x[0];
  for (int j = 0; j < kLanes; ++j) m = m > acc[j] ? m : acc[j];
  for (; c < n; ++c) m = m > x[c] ? m : x[c];
  return m;
}

inline float row_dot(const float* x, const float* y, int n) {  // sum of x * y
  float acc[kLanes] = {};
  int c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[c + j] * y[c + j];
  float t = 0.f;
  for (int j = 0; j < kLanes; ++j) t += acc[j];
  for (; c < n; ++c) t += x[c] * y[c];
  return t;
}

inline float row_sum(const float* x, int n) {
  float acc[kLanes] = {};
  int c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[c + j];
  float t = 0.f;
  for (int j = 0; j < kLanes; ++j) t += acc[j];
  for (; c < n; ++c) t += x[c];
  return t;
}

// Softmax over row[0:len] in place; row[len:width] set to 0.
inline void softmax_row(float* row, int len, int width) {
  const float m = row_max(row, len);
  for (int c = 0; c < len; ++c) row[c] -= m;
  vsExp(len, row, row);
  const float inv = 1.f / row_sum(row, len);
  for (int c = 0; c < len; ++c) row[c] *= inv;
  std::fill(row + len, row + width, 0.f);
}

}  // namespace

extern "C" {

// ABI 2: the entry points return 0, or 1 where a thread's workspace could not be allocated (nothing thrown through
// C), and clamp `block` to [1, N].
int formers_causal_attention_abi() { return 2; }

// q, k, v, y: base pointers and (B, H, N) strides each (4 x 3 int64 in `strides`).
int formers_causal_attention_fwd(int B, int H, int N, int D, float scale, int block, int threads, float* q,
                                 float* k, float* v, float* y, float* P, const int64_t* strides) {
  if (B <= 0 || H <= 0 || N <= 0 || D <= 0) return 0;
  block = std::max(1, std::min(block, N));
  const Strided Q = make(q, strides), K = make(k, strides + 3), V = make(v, strides + 6), Y = make(y, strides + 9);
  const int64_t pairs = static_cast<int64_t>(B) * H;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t b = i / H, h = i % H;
      const float *qi = Q.at(b, h), *ki = K.at(b, h), *vi = V.at(b, h);
      float* yi = Y.at(b, h);
      float* Pi = P + i * static_cast<int64_t>(N) * N;
      for (int s = 0; s < N; s += block) {
        const int e = std::min(s + block, N);
        float* S = Pi + static_cast<int64_t>(s) * N;
        gemm(false, true, e - s, e, D, scale, qi + s * Q.sn, Q.sn, ki, K.sn, 0.f, S, N);
        for (int r = s; r < e; ++r) softmax_row(S + static_cast<int64_t>(r - s) * N, r + 1, e);
        gemm(false, false, e - s, D, e, 1.f, S, N, vi, V.sn, 0.f, yi + s * Y.sn, Y.sn);
      }
    }
  }
  return 0;
}

// dy, q, k, v, dq, dk, dv: base pointers and (B, H, N) strides each (7 x 3 int64 in `strides`).
int formers_causal_attention_bwd(int B, int H, int N, int D, float scale, int block, int threads, float* dy,
                                 float* q, float* k, float* v, const float* P, float* dq, float* dk, float* dv,
                                 const int64_t* strides) {
  if (B <= 0 || H <= 0 || N <= 0 || D <= 0) return 0;
  block = std::max(1, std::min(block, N));
  int failed = 0;
  const Strided dY = make(dy, strides), Q = make(q, strides + 3), K = make(k, strides + 6), V = make(v, strides + 9),
                dQ = make(dq, strides + 12), dK = make(dk, strides + 15), dV = make(dv, strides + 18);
  const int64_t pairs = static_cast<int64_t>(B) * H;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> work;  // dP, then dS, of one row block
    bool ok = true;
    try {
      work.resize(static_cast<size_t>(block) * N);
    } catch (...) {  // no exception may leave an OpenMP region or a C function
      ok = false;
#pragma omp atomic write
      failed = 1;
    }
    float* W = work.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < pairs; ++i) {
      if (!ok) continue;
      const int64_t b = i / H, h = i % H;
      const float *qi = Q.at(b, h), *ki = K.at(b, h), *vi = V.at(b, h), *dyi = dY.at(b, h);
      float *dqi = dQ.at(b, h), *dki = dK.at(b, h), *dvi = dV.at(b, h);
      const float* Pi = P + i * static_cast<int64_t>(N) * N;
      const int last = ((N - 1) / block) * block;
      for (int s = last; s >= 0; s -= block) {
        const int e = std::min(s + block, N);
        const float beta = e == N ? 0.f : 1.f;
        const float* Pb = Pi + static_cast<int64_t>(s) * N;
        const float* dyb = dyi + s * dY.sn;
        gemm(true, false, e, D, e - s, 1.f, Pb, N, dyb, dY.sn, beta, dvi, dV.sn);
        gemm(false, true, e - s, e, D, 1.f, dyb, dY.sn, vi, V.sn, 0.f, W, N);
        for (int r = s; r < e; ++r) {
          float* w = W + static_cast<int64_t>(r - s) * N;
          const float* p = Pb + static_cast<int64_t>(r - s) * N;
          const float dot = row_dot(w, p, r + 1);
          for (int c = 0; c <= r; ++c) w[c] = p[c] * (w[c] - dot);
          std::fill(w + r + 1, w + e, 0.f);
        }
        gemm(false, false, e - s, D, e, scale, W, N, ki, K.sn, 0.f, dqi + s * dQ.sn, dQ.sn);
        gemm(true, false, e, D, e - s, scale, W, N, qi + s * Q.sn, Q.sn, beta, dki, dK.sn);
      }
    }
  }
  return failed;
}

}  // extern "C"
