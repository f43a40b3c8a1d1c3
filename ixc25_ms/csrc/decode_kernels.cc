// Fused fp32 CPU kernels for one decode step, called by MindSpore Custom "aot" ops (see cpu_kernels.py).
// Every kernel: int f(nparam, params, ndims, shapes, dtypes, stream, extra); inputs first, then outputs;
// contiguous row-major float32 only (the Python side checks); a nonzero return makes MindSpore raise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <vector>

void IxcPoolRun(int nt, const std::function<void(int, int)> &fn);  // quant_kernels.cc's thread pool
int IxcPoolThreads();
int IxcPoolDecodeThreads();
void IxcPackedLinear(const float *x, int64_t M, const int8_t *w, const float *scale, int64_t K, int64_t N, float *y);

namespace {

int64_t Numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

// every parameter float32, except those at int8_at, which are int8 (the packed weights)
bool DtypesAre(int nparam, const char **dtypes, std::initializer_list<int> int8_at = {}) {
  for (int i = 0; i < nparam; ++i) {
    const bool int8 = std::find(int8_at.begin(), int8_at.end(), i) != int8_at.end();
    const bool ok = int8 ? std::strcmp(dtypes[i], "int8") == 0
                         : std::strcmp(dtypes[i], "float32") == 0 || std::strcmp(dtypes[i], "float") == 0;
    if (!ok) return false;
  }
  return true;
}

// y = s * rsqrt(mean(s^2) + eps) * w for one row of h values (sum of squares in double)
inline void NormRow(const float *s, const float *w, float eps, int64_t h, float *y) {
  double ss = 0.0;
  for (int64_t i = 0; i < h; ++i) ss += static_cast<double>(s[i]) * s[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(h) + eps));
  for (int64_t i = 0; i < h; ++i) y[i] = s[i] * r * w[i];
}

#include "vec_math.h"  // Exp

// y = silu(a) * b = a * sigmoid(a) * b over n values (y may be b)
inline void SwiGLURows(const float *a, const float *b, int64_t n, float *y) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] / (1.f + Exp(-a[i])) * b[i];
}

// out (n) = in (d) @ m (d, n): rows of m are contiguous, so the inner loop vectorises
inline void RowTimesMatrix(const float *in, const float *m, int64_t d, int64_t n, float *out) {
  for (int64_t e = 0; e < n; ++e) out[e] = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float a = in[c];
    const float *mr = m + c * n;
    for (int64_t e = 0; e < n; ++e) out[e] += a * mr[e];
  }
}


// the split and RoPE of IxcRopeSplit on raw pointers
inline void RopeSplitRows(const float *qkv, const float *mq, const float *mk, int64_t b, int64_t kvh, int64_t g,
                          int64_t d, float *q, float *k, float *v) {
  for (int64_t bi = 0; bi < b; ++bi) {
    const float *mqb = mq + bi * d * d, *mkb = mk + bi * d * d;
    for (int64_t h = 0; h < kvh; ++h) {
      const float *grp = qkv + (bi * kvh + h) * (g + 2) * d;
      float *qo = q + (bi * kvh + h) * g * d;
      for (int64_t j = 0; j < g; ++j) RowTimesMatrix(grp + j * d, mqb, d, d, qo + j * d);
      RowTimesMatrix(grp + g * d, mkb, d, d, k + (bi * kvh + h) * d);
      std::memcpy(v + (bi * kvh + h) * d, grp + (g + 1) * d, sizeof(float) * d);
    }
  }
}

// s = x + r and y = rms_norm(s) * w over n values in rows of h
inline void AddNormRows(const float *x, const float *r, const float *w, float eps, int64_t h, int64_t n, float *s,
                        float *y) {
  for (int64_t i = 0; i < n; ++i) s[i] = x[i] + r[i];
  for (int64_t row = 0; row < n / h; ++row) NormRow(s + row * h, w, eps, h, y + row * h);
}

}  // namespace

// x (..., H), w (H), eps (1) -> y (..., H)
extern "C" int IxcRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 4 || !DtypesAre(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t h = shapes[0][ndims[0] - 1];
  if (Numel(ndims[1], shapes[1]) != h) return 2;
  const int64_t rows = Numel(ndims[0], shapes[0]) / h;
  for (int64_t r = 0; r < rows; ++r) NormRow(x + r * h, w, eps, h, y + r * h);
  return 0;
}

// x, r (..., H), w (H), eps (1) -> s = x + r, y = rms_norm(s) * w   (the residual add and the next norm)
extern "C" int IxcAddRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 6 || !DtypesAre(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *res = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *s = static_cast<float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  const int64_t h = shapes[0][ndims[0] - 1];
  const int64_t n = Numel(ndims[0], shapes[0]);
  if (Numel(ndims[1], shapes[1]) != n || Numel(ndims[2], shapes[2]) != h) return 2;
  AddNormRows(x, res, w, eps, h, n, s, y);
  return 0;
}

// qkv (B, 1, kvh*(G+2)*d) in the fused layout [q_0 .. q_(G-1), k, v] per KV group, mq/mk (B, d, d)
// -> q (B*kvh, G, d) = q_row @ mq, k (B*kvh, 1, d) = k_row @ mk, v (B*kvh, 1, d) copied:
// the split, RoPE and the softmax scale (folded into mq) in one pass
extern "C" int IxcRopeSplit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 6 || !DtypesAre(nparam, dtypes) || ndims[1] != 3 || ndims[3] != 3) return 1;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *mq = static_cast<const float *>(params[1]);
  const float *mk = static_cast<const float *>(params[2]);
  float *q = static_cast<float *>(params[3]);
  float *k = static_cast<float *>(params[4]);
  float *v = static_cast<float *>(params[5]);
  const int64_t b = shapes[1][0], d = shapes[1][2];
  const int64_t g = shapes[3][1], kvh = shapes[3][0] / b;
  if (Numel(ndims[0], shapes[0]) != b * kvh * (g + 2) * d) return 2;
  RopeSplitRows(qkv, mq, mk, b, kvh, g, d, q, k, v);
  return 0;
}

// a, b (..., I) -> silu(a) * b = a * sigmoid(a) * b
extern "C" int IxcSwiGLU(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 3 || !DtypesAre(nparam, dtypes)) return 1;
  const float *a = static_cast<const float *>(params[0]);
  const float *bb = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  if (Numel(ndims[1], shapes[1]) != n) return 2;
  SwiGLURows(a, bb, n, y);
  return 0;
}

namespace {
// the attention of IxcDecodeAttn on raw pointers (shapes checked by the callers)
void DecodeAttnCore(const float *q, const float *kc, const float *vc, const float *mask, int64_t bk, int64_t g,
                    int64_t d, int64_t c, int64_t b, float *out) {
  const int64_t kvh = bk / b;
  auto head = [&](int64_t i, std::vector<float> &s) {
    const float *qi = q + i * g * d, *k = kc + i * c * d, *v = vc + i * c * d, *m = mask + (i / kvh) * c;
    s.resize(g * c);
    for (int64_t j = 0; j < c; ++j) {  // s[a][j] = q_a . k_j + mask_j
      const float *kr = k + j * d;
      for (int64_t a = 0; a < g; ++a) {
        const float *qa = qi + a * d;
        float acc = 0.f;
        for (int64_t e = 0; e < d; ++e) acc += qa[e] * kr[e];
        s[a * c + j] = acc + m[j];
      }
    }
    for (int64_t a = 0; a < g; ++a) {  // softmax of each query's row
      float *row = s.data() + a * c;
      const float mx = Max16(row, c);
      for (int64_t j = 0; j < c; ++j) row[j] = Exp(row[j] - mx);
      const float inv = static_cast<float>(1.0 / Sum16(row, c));
      for (int64_t j = 0; j < c; ++j) row[j] *= inv;
    }
    float *o = out + i * g * d;
    std::fill(o, o + g * d, 0.f);
    for (int64_t j = 0; j < c; ++j) {  // out[a] = sum_j p[a][j] v_j
      const float *vr = v + j * d;
      for (int64_t a = 0; a < g; ++a) {
        const float p = s[a * c + j];
        float *oa = o + a * d;
        for (int64_t e = 0; e < d; ++e) oa[e] += p * vr[e];
      }
    }
  };
  const int nt = static_cast<int>(std::min<int64_t>(bk, IxcPoolDecodeThreads()));
  IxcPoolRun(nt, [&](int t, int n) {
    std::vector<float> s;
    for (int64_t i = t; i < bk; i += n) head(i, s);
  });
}
}  // namespace

// One query token's attention over the cache, per KV head: q (B*kvh, G, d) scaled and rotated, k/v caches
// (B*kvh, C, d), additive mask (B, 1, 1, C) -> out (B*kvh, G, d). The scores of a head's G queries are made in
// one pass over its keys and the output in one pass over its values (each cache row read once); softmax in
// fp32 with the max subtracted, sums in double. Replaces BatchMatMul, Add, Softmax and BatchMatMul (4 launches).
extern "C" int IxcDecodeAttn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 5 || !DtypesAre(nparam, dtypes) || ndims[0] != 3 || ndims[1] != 3 || ndims[3] != 4) return 1;
  const float *q = static_cast<const float *>(params[0]), *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]), *mask = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const int64_t bk = shapes[0][0], g = shapes[0][1], d = shapes[0][2], c = shapes[1][1], b = shapes[3][0];
  if (shapes[1][0] != bk || shapes[1][2] != d || Numel(ndims[2], shapes[2]) != bk * c * d || b <= 0 ||
      bk % b != 0 || shapes[3][3] != c || Numel(ndims[3], shapes[3]) != b * c)
    return 2;
  DecodeAttnCore(q, kc, vc, mask, bk, g, d, c, b, out);
  return 0;
}

// ------------------------------------------------------------------------------------------ int8 decode blocks
// A decode layer with int8 weights in the packed layout in three launches instead of ten (with the two cache
// writes between them, MindSpore's in-place IndexAdd): the same arithmetic as the separate kernels, in order.
// y (B, 1, H) normed, wqkv int8 packed (N, H), scale (N), mq/mk (B, d, d) -> q (B*kvh, G, d), k, v (B*kvh, 1, d):
// the wqkv mat-vec, then IxcRopeSplit
extern "C" int IxcQkvInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 8 || !DtypesAre(nparam, dtypes, {1}) || ndims[1] != 2 || ndims[3] != 3 || ndims[5] != 3) return 1;
  const int64_t n = shapes[1][0], hdim = shapes[1][1], b = shapes[3][0], d = shapes[3][2];
  const int64_t g = shapes[5][1], kvh = shapes[5][0] / b;
  if (Numel(ndims[0], shapes[0]) != b * hdim || n != kvh * (g + 2) * d || Numel(ndims[2], shapes[2]) != n) return 2;
  std::vector<float> qkv(b * n);
  IxcPackedLinear(static_cast<const float *>(params[0]), b, static_cast<const int8_t *>(params[1]),
                  static_cast<const float *>(params[2]), hdim, n, qkv.data());
  RopeSplitRows(qkv.data(), static_cast<const float *>(params[3]), static_cast<const float *>(params[4]), b, kvh,
                g, d, static_cast<float *>(params[5]), static_cast<float *>(params[6]),
                static_cast<float *>(params[7]));
  return 0;
}

// q (B*kvh, G, d), k/v caches (B*kvh, C, d), mask (B, 1, 1, C), wo int8 packed (H, heads*d), scale (H),
// s (B, 1, H) the residual, norm weight (H), eps (1) -> s + wo(attention), rms_norm(that) * w:
// IxcDecodeAttn, the wo mat-vec, then IxcAddRmsNorm
extern "C" int IxcAttnOutInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 11 || !DtypesAre(nparam, dtypes, {4})) return 1;
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[3] != 4 || ndims[4] != 2) return 1;
  const int64_t bk = shapes[0][0], g = shapes[0][1], d = shapes[0][2], c = shapes[1][1], b = shapes[3][0];
  const int64_t hdim = shapes[4][0], kin = shapes[4][1];
  if (shapes[1][0] != bk || shapes[1][2] != d || Numel(ndims[2], shapes[2]) != bk * c * d || b <= 0 ||
      bk % b != 0 || shapes[3][3] != c || Numel(ndims[3], shapes[3]) != b * c || kin * b != bk * g * d ||
      Numel(ndims[5], shapes[5]) != hdim || Numel(ndims[6], shapes[6]) != b * hdim ||
      Numel(ndims[7], shapes[7]) != hdim)
    return 2;
  std::vector<float> att(bk * g * d), r(b * hdim);
  DecodeAttnCore(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), static_cast<const float *>(params[3]), bk, g, d, c, b,
                 att.data());
  IxcPackedLinear(att.data(), b, static_cast<const int8_t *>(params[4]), static_cast<const float *>(params[5]), kin,
                  hdim, r.data());
  AddNormRows(static_cast<const float *>(params[6]), r.data(), static_cast<const float *>(params[7]),
              *static_cast<const float *>(params[8]), hdim, b * hdim, static_cast<float *>(params[9]),
              static_cast<float *>(params[10]));
  return 0;
}

// y (B, 1, H) normed, w1/w3 int8 packed (I, H) + scales (I), w2 int8 packed (H, I) + scale (H), s (B, 1, H) the
// residual, norm weight (H), eps (1) -> s + w2(silu(w1 y) * w3 y), rms_norm(that) * w:
// three mat-vecs, IxcSwiGLU and IxcAddRmsNorm
extern "C" int IxcFfnInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 12 || !DtypesAre(nparam, dtypes, {1, 3, 5})) return 1;
  if (ndims[1] != 2 || ndims[3] != 2 || ndims[5] != 2) return 1;
  const int64_t inter = shapes[1][0], hdim = shapes[1][1], b = Numel(ndims[0], shapes[0]) / hdim;
  if (b * hdim != Numel(ndims[0], shapes[0]) || shapes[3][0] != inter || shapes[3][1] != hdim ||
      shapes[5][0] != hdim || shapes[5][1] != inter || Numel(ndims[2], shapes[2]) != inter ||
      Numel(ndims[4], shapes[4]) != inter || Numel(ndims[6], shapes[6]) != hdim ||
      Numel(ndims[7], shapes[7]) != b * hdim || Numel(ndims[8], shapes[8]) != hdim)
    return 2;
  const float *y = static_cast<const float *>(params[0]);
  std::vector<float> a(b * inter), gate(b * inter), f(b * hdim);
  IxcPackedLinear(y, b, static_cast<const int8_t *>(params[1]), static_cast<const float *>(params[2]), hdim, inter,
                  a.data());
  IxcPackedLinear(y, b, static_cast<const int8_t *>(params[3]), static_cast<const float *>(params[4]), hdim, inter,
                  gate.data());
  SwiGLURows(a.data(), gate.data(), b * inter, gate.data());
  IxcPackedLinear(gate.data(), b, static_cast<const int8_t *>(params[5]), static_cast<const float *>(params[6]), inter,
                  hdim, f.data());
  AddNormRows(static_cast<const float *>(params[7]), f.data(), static_cast<const float *>(params[8]),
              *static_cast<const float *>(params[9]), hdim, b * hdim, static_cast<float *>(params[10]),
              static_cast<float *>(params[11]));
  return 0;
}
