// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of the depth / skip routers, blocks and layer (see depth_ref.hpp).
#include "reference/depth_ref.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace depth_ref {

// ------------------------------------------------------------------------ layout
int64_t Layout::num_sequences() const {
  return offsets.empty() ? 1 : static_cast<int64_t>(offsets.size()) - 1;
}
int64_t Layout::begin(int64_t s) const { return offsets.empty() ? 0 : offsets[s]; }
int64_t Layout::end(int64_t s) const { return offsets.empty() ? tokens : offsets[s + 1]; }
bool Layout::padded(int64_t t) const { return !padding.empty() && padding[t] != 0; }
int64_t Layout::sequence_of(int64_t t) const {
  for (int64_t s = 0; s < num_sequences(); ++s)
    if (t >= begin(s) && t < end(s)) return s;
  return -1;
}
int64_t Layout::position(int64_t t) const {
  if (!positions.empty()) return positions[t];
  return t - begin(sequence_of(t));
}

int64_t Decision::count_ambiguous() const {
  int64_t n = 0;
  for (uint8_t a : ambiguous) n += a;
  return n;
}

namespace {

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Dot product of row t of x with a weight row, and its magnitude scale sum |w_i x_i|.
void dot(const float* x, const float* w, int64_t d, double& value, double& scale) {
  value = 0;
  scale = 0;
  for (int64_t i = 0; i < d; ++i) {
    value += static_cast<double>(w[i]) * static_cast<double>(x[i]);
    scale += std::fabs(static_cast<double>(w[i]) * static_cast<double>(x[i]));
  }
}

bool near(double a, double b, double scale, double tie_rel) {
  const double m = std::max({std::fabs(a), std::fabs(b), scale});
  return std::fabs(a - b) < tie_rel * m;
}

Decision empty_decision(const Layout& L, int64_t R) {
  Decision d;
  d.selected.assign(L.tokens, 0);
  d.weight.assign(L.tokens, 0.0);
  d.logits.assign(L.tokens * R, 0.0);
  d.ambiguous.assign(L.tokens, 0);
  d.sequence_ambiguous.assign(L.num_sequences(), 0);
  return d;
}

// Capacity selection in one sequence: `must` tokens always selected; the remaining
// `capacity - |must|` (if positive) go to the candidates with the largest `order_score`
// (ties: lower index). Near-tie check on `tie_score` between the last chosen and the first
// unchosen candidate; then every unpadded token of the sequence is marked ambiguous.
void select_capacity(const Layout& L, int64_t s, double ratio, const std::vector<uint8_t>& must,
                     const std::vector<double>& order_score, const std::vector<double>& tie_score,
                     const std::vector<double>& scale, double tie_rel, Decision& dec) {
  std::vector<int64_t> cand;
  int64_t S = 0, kept = 0;
  for (int64_t t = L.begin(s); t < L.end(s); ++t) {
    if (L.padded(t)) continue;
    ++S;
    if (must[t]) {
      dec.selected[t] = 1;
      ++kept;
    } else {
      cand.push_back(t);
    }
  }
  // ROUTING.md section 5: ratio * S snapped to an integer within 1e-9 before the ceiling.
  double x = ratio * static_cast<double>(S);
  if (std::fabs(x - std::round(x)) <= 1e-9) x = std::round(x);
  const int64_t C = static_cast<int64_t>(std::ceil(x));
  int64_t want = std::max<int64_t>(0, std::min<int64_t>(C, S) - kept);
  want = std::min<int64_t>(want, static_cast<int64_t>(cand.size()));
  std::stable_sort(cand.begin(), cand.end(),
                   [&](int64_t a, int64_t b) { return order_score[a] > order_score[b]; });
  for (int64_t i = 0; i < want; ++i) dec.selected[cand[i]] = 1;
  if (want > 0 && want < static_cast<int64_t>(cand.size())) {
    const int64_t a = cand[want - 1], b = cand[want];
    if (near(tie_score[a], tie_score[b], std::max(scale[a], scale[b]), tie_rel)) {
      dec.sequence_ambiguous[s] = 1;
      for (int64_t t = L.begin(s); t < L.end(s); ++t)
        if (!L.padded(t)) dec.ambiguous[t] = 1;
    }
  }
}

void mark_sequences(const Layout& L, Decision& dec) {
  for (int64_t t = 0; t < L.tokens; ++t)
    if (dec.ambiguous[t]) dec.sequence_ambiguous[L.sequence_of(t)] = 1;
}

}  // namespace

// ------------------------------------------------------------------------ routers
Decision mod(const Layout& L, const float* x, const std::vector<float>& w,
             const std::vector<float>& aux, const ModParams& p) {
  const int64_t T = L.tokens, d = L.hidden;
  Decision dec = empty_decision(L, 1);
  std::vector<double> r(T, 0.0), scale(T, 0.0), a(T, 0.0), ascale(T, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (L.padded(t)) continue;
    dot(x + t * d, w.data(), d, r[t], scale[t]);
    dec.logits[t] = r[t];
    if (p.act == Act::raw) dec.weight[t] = r[t];
    if (p.act == Act::sigmoid) dec.weight[t] = sigmoid(r[t]);
    if (p.act == Act::tanh) dec.weight[t] = p.alpha * std::tanh(r[t]);
    if (p.mode == ModMode::aux_predictor && p.mlp_h == 0) dot(x + t * d, aux.data(), d, a[t], ascale[t]);
    if (p.mode == ModMode::aux_predictor && p.mlp_h > 0) {
      a[t] = p.mlp_b2;
      ascale[t] = std::fabs(p.mlp_b2);
      for (int64_t j = 0; j < p.mlp_h; ++j) {
        double u = 0.0, us = 0.0;
        dot(x + t * d, p.mlp_w1.data() + j * d, d, u, us);
        const double hj = std::max(0.0, u + p.mlp_b1[static_cast<size_t>(j)]);
        a[t] += p.mlp_w2[static_cast<size_t>(j)] * hj;
        // scale of the sum: |w2_j| times the hidden unit's own scale
        ascale[t] += std::fabs(p.mlp_w2[static_cast<size_t>(j)]) * (us + std::fabs(p.mlp_b1[static_cast<size_t>(j)]));
      }
    }
  }
  if (p.mode == ModMode::capacity) {
    const std::vector<uint8_t> none(T, 0);
    for (int64_t s = 0; s < L.num_sequences(); ++s)
      select_capacity(L, s, p.ratio, none, r, r, scale, p.tie_rel, dec);
  } else {
    // sigmoid(g) > threshold  <=>  g > ln(threshold / (1 - threshold))
    const double z = std::log(p.threshold / (1.0 - p.threshold));
    for (int64_t t = 0; t < T; ++t) {
      if (L.padded(t)) continue;
      const double g = p.mode == ModMode::threshold ? r[t] : a[t];
      const double gs = p.mode == ModMode::threshold ? scale[t] : ascale[t];
      dec.selected[t] = sigmoid(g) > p.threshold;
      if (near(g, z, gs, p.tie_rel)) dec.ambiguous[t] = 1;
    }
    mark_sequences(L, dec);
  }
  return dec;
}

Decision gamma_mod(const Layout& L, const float* x, const std::vector<float>& W,
                   const GammaParams& p) {
  const int64_t T = L.tokens, d = L.hidden;
  Decision dec = empty_decision(L, 2);
  std::vector<double> prob(T, 0.0), margin(T, 0.0), scale(T, 0.0);
  std::vector<uint8_t> must(T, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (L.padded(t)) continue;
    double l0, l1, s0, s1;
    dot(x + t * d, W.data(), d, l0, s0);
    dot(x + t * d, W.data() + d, d, l1, s1);
    dec.logits[2 * t] = l0;
    dec.logits[2 * t + 1] = l1;
    const double m = std::max(l0, l1);
    prob[t] = std::exp(l1 - m) / (std::exp(l0 - m) + std::exp(l1 - m));  // softmax(...)[1]
    margin[t] = l1 - l0;
    scale[t] = s0 + s1;
    dec.weight[t] = prob[t];
    must[t] = !L.token_types.empty() && L.token_types[t] != 0;
  }
  if (p.phase == GammaPhase::capacity) {
    for (int64_t s = 0; s < L.num_sequences(); ++s)
      select_capacity(L, s, p.ratio, must, prob, margin, scale, p.tie_rel, dec);
  } else {
    const double thr = p.phase == GammaPhase::prefill ? p.prefill_threshold : p.decode_threshold;
    const double z = std::log(thr / (1.0 - thr));
    for (int64_t t = 0; t < T; ++t) {
      if (L.padded(t)) continue;
      // Official gamma-MoD: no must-keep mask at inference (unless asked).
      const bool keep = p.must_keep_at_inference && must[t];
      dec.selected[t] = keep || prob[t] > thr;
      if (!keep && near(margin[t], z, scale[t], p.tie_rel)) dec.ambiguous[t] = 1;
    }
    mark_sequences(L, dec);
  }
  return dec;
}

Decision token_prune(const Layout& L, const float* x, const std::vector<float>& w,
                     const PruneParams& p) {
  const int64_t T = L.tokens, d = L.hidden;
  Decision dec = empty_decision(L, 1);
  std::vector<double> r(T, 0.0), scale(T, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (L.padded(t)) continue;
    dot(x + t * d, w.data(), d, r[t], scale[t]);
    dec.logits[t] = r[t];
    dec.weight[t] = 1.0;
  }
  if (p.has_sparsity) {
    const std::vector<uint8_t> none(T, 0);
    for (int64_t s = 0; s < L.num_sequences(); ++s)
      select_capacity(L, s, 1.0 - p.sparsity, none, r, r, scale, p.tie_rel, dec);
  } else {
    const double z = std::log(p.tau / (1.0 - p.tau));
    for (int64_t t = 0; t < T; ++t) {
      if (L.padded(t)) continue;
      dec.selected[t] = sigmoid(r[t]) > p.tau;
      if (near(r[t], z, scale[t], p.tie_rel)) dec.ambiguous[t] = 1;
    }
    mark_sequences(L, dec);
  }
  return dec;
}

// ------------------------------------------------------------------------ blocks
std::vector<double> ffn_row(const Ffn& f, const float* x) {
  const int64_t d = f.hidden, n = f.intermediate;
  std::vector<double> h(n), y(d, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    double g = 0, u = 0;
    for (int64_t i = 0; i < d; ++i) {
      g += static_cast<double>(f.gate[j * d + i]) * x[i];
      u += static_cast<double>(f.up[j * d + i]) * x[i];
    }
    h[j] = g * sigmoid(g) * u;
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < n; ++j) y[i] += static_cast<double>(f.down[i * n + j]) * h[j];
  return y;
}

std::vector<double> attention(const Attention& a, const float* x, int64_t rows,
                              const std::vector<int64_t>& pos) {
  const int64_t d = a.hidden;
  auto project = [&](const std::vector<float>& W, const double* v, double* out) {
    for (int64_t o = 0; o < d; ++o) {
      double s = 0;
      for (int64_t i = 0; i < d; ++i) s += static_cast<double>(W[o * d + i]) * v[i];
      out[o] = s;
    }
  };
  std::vector<double> xd(x, x + rows * d), q(rows * d), k(rows * d), v(rows * d), y(rows * d, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    project(a.wq, &xd[r * d], &q[r * d]);
    project(a.wk, &xd[r * d], &k[r * d]);
    project(a.wv, &xd[r * d], &v[r * d]);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> score(rows, 0.0);
    double m = -INFINITY;
    for (int64_t j = 0; j < rows; ++j) {
      if (pos[j] > pos[i]) continue;
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += q[i * d + c] * k[j * d + c];
      score[j] = s * scale;
      m = std::max(m, score[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < rows; ++j)
      if (pos[j] <= pos[i]) sum += (score[j] = std::exp(score[j] - m));
    std::vector<double> o(d, 0.0);
    for (int64_t j = 0; j < rows; ++j)
      if (pos[j] <= pos[i])
        for (int64_t c = 0; c < d; ++c) o[c] += score[j] / sum * v[j * d + c];
    project(a.wo, o.data(), &y[i * d]);
  }
  return y;
}

std::vector<double> layer_ffn(const Layout& L, const float* x, const Decision& dec, const Ffn& f) {
  const int64_t d = L.hidden;
  std::vector<double> y(L.tokens * d, 0.0);
  for (int64_t t = 0; t < L.tokens; ++t) {
    if (L.padded(t) || !dec.selected[t]) continue;
    const std::vector<double> o = ffn_row(f, x + t * d);
    for (int64_t c = 0; c < d; ++c) y[t * d + c] = dec.weight[t] * o[c];
  }
  return y;
}

std::vector<double> layer_attention(const Layout& L, const float* x, const Decision& dec,
                                    const Attention& a) {
  const int64_t d = L.hidden;
  std::vector<double> y(L.tokens * d, 0.0);
  for (int64_t s = 0; s < L.num_sequences(); ++s) {
    std::vector<int64_t> toks, pos;
    std::vector<float> rows;
    for (int64_t t = L.begin(s); t < L.end(s); ++t) {
      if (L.padded(t) || !dec.selected[t]) continue;
      toks.push_back(t);
      pos.push_back(L.position(t));
      rows.insert(rows.end(), x + t * d, x + (t + 1) * d);
    }
    if (toks.empty()) continue;
    const std::vector<double> o = attention(a, rows.data(), static_cast<int64_t>(toks.size()), pos);
    for (size_t i = 0; i < toks.size(); ++i)
      for (int64_t c = 0; c < d; ++c) y[toks[i] * d + c] = dec.weight[toks[i]] * o[i * d + c];
  }
  return y;
}

// ------------------------------------------------------------------------ ARank
std::vector<double> singular_values(const std::vector<double>& A, int64_t rows, int64_t cols) {
  // One-sided Jacobi on the columns of B = A (or A^T when rows < cols, so B has m >= n).
  const bool tr = rows < cols;
  const int64_t m = tr ? cols : rows, n = tr ? rows : cols;
  std::vector<double> B(m * n);  // column-major: B[j * m + i]
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      if (tr) {
        B[i * m + j] = A[i * cols + j];
      } else {
        B[j * m + i] = A[i * cols + j];
      }
    }
  for (int sweep = 0; sweep < 100; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        double alpha = 0, beta = 0, gamma = 0;
        for (int64_t i = 0; i < m; ++i) {
          alpha += B[p * m + i] * B[p * m + i];
          beta += B[q * m + i] * B[q * m + i];
          gamma += B[p * m + i] * B[q * m + i];
        }
        if (gamma == 0 || std::fabs(gamma) <= 1e-15 * std::sqrt(alpha * beta)) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (int64_t i = 0; i < m; ++i) {
          const double bp = B[p * m + i], bq = B[q * m + i];
          B[p * m + i] = c * bp - s * bq;
          B[q * m + i] = s * bp + c * bq;
        }
      }
    if (!rotated) break;
  }
  std::vector<double> sv(n);
  for (int64_t j = 0; j < n; ++j) {
    double s = 0;
    for (int64_t i = 0; i < m; ++i) s += B[j * m + i] * B[j * m + i];
    sv[j] = std::sqrt(s);
  }
  std::sort(sv.begin(), sv.end(), std::greater<double>());
  return sv;
}

int64_t matrix_rank(const std::vector<double>& A, int64_t rows, int64_t cols, double eps) {
  const std::vector<double> s = singular_values(A, rows, cols);
  if (s.empty()) return 0;
  const double tol = s[0] * static_cast<double>(std::max(rows, cols)) * eps;
  int64_t r = 0;
  for (double v : s) r += v > tol;
  return r;
}

double arank(const std::vector<double>& maps, int64_t n, int64_t rows, int64_t cols, double eps) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<double> A(maps.begin() + i * rows * cols,
                                maps.begin() + (i + 1) * rows * cols);
    sum += static_cast<double>(matrix_rank(A, rows, cols, eps));
  }
  return sum / static_cast<double>(n);
}

}  // namespace depth_ref
