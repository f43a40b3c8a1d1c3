// Vectorisable float math shared by the kernel sources: included inside their anonymous namespaces, after
// <cmath>, <cstdint> and <cstring>.
#pragma once

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by the Cephes expf polynomial
// (about 1 ulp); branch-free so that loops over it vectorise; 0 below -87 (where exp underflows anyway)
inline float Exp(float x) {
  const float xc = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// max and sum of n floats in 16 lanes, so that the loops vectorise (a plain running max/sum does not)
inline float Max16(const float *x, int64_t n) {
  float lane[16];
  int64_t j = 0;
  for (int t = 0; t < 16; ++t) lane[t] = n > 0 ? x[0] : 0.f;
  for (; j + 16 <= n; j += 16)
    for (int t = 0; t < 16; ++t) lane[t] = std::fmax(lane[t], x[j + t]);
  float m = lane[0];
  for (int t = 1; t < 16; ++t) m = std::fmax(m, lane[t]);
  for (; j < n; ++j) m = std::fmax(m, x[j]);
  return m;
}

inline double Sum16(const float *x, int64_t n) {
  float lane[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int t = 0; t < 16; ++t) lane[t] += x[j + t];
  double s = 0.0;
  for (int t = 0; t < 16; ++t) s += lane[t];
  for (; j < n; ++j) s += x[j];
  return s;
}
