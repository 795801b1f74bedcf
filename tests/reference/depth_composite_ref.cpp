// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of Dr.LLM and Mixture-of-Recursions (see the header).
#include "reference/depth_composite_ref.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace ref_dc {

// ------------------------------------------------------------------------ layout
int64_t Layout::sequences() const {
  return offsets.empty() ? 1 : static_cast<int64_t>(offsets.size()) - 1;
}
int64_t Layout::begin(int64_t s) const { return offsets.empty() ? 0 : offsets[s]; }
int64_t Layout::end(int64_t s) const { return offsets.empty() ? tokens : offsets[s + 1]; }
bool Layout::padded(int64_t t) const { return !padding.empty() && padding[t] != 0; }
int64_t Layout::sequence_of(int64_t t) const {
  for (int64_t s = 0; s < sequences(); ++s)
    if (t >= begin(s) && t < end(s)) return s;
  return -1;
}
int64_t Layout::position(int64_t t) const {
  return positions.empty() ? t - begin(sequence_of(t)) : positions[t];
}

namespace {

Row row_of(const float* x, int64_t t, int64_t d) {
  Row r(d);
  for (int64_t c = 0; c < d; ++c) r[c] = x[t * d + c];
  return r;
}

// y = W v for W [rows, cols] (row-major float), v [cols].
Row matvec(const std::vector<float>& W, int64_t rows, int64_t cols, const Row& v) {
  Row y(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0;
    for (int64_t j = 0; j < cols; ++j) s += static_cast<double>(W[i * cols + j]) * v[j];
    y[i] = s;
  }
  return y;
}

double gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

}  // namespace

// ------------------------------------------------------------------------ blocks
double activate(Act a, double x) {
  switch (a) {
    case Act::silu:
      return x / (1.0 + std::exp(-x));
    case Act::gelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Act::gelu_tanh:
      return gelu_tanh(x);
    case Act::relu:
      return x > 0 ? x : 0.0;
  }
  return x;
}

Block ffn_block(FfnWeights w) {
  return [w](const std::vector<int64_t>& tokens, const Rows& x) {
    Rows out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const Row u = matvec(w.up, w.intermediate, w.hidden, x[i]);
      Row h(w.intermediate);
      if (w.gated) {
        const Row g = matvec(w.gate, w.intermediate, w.hidden, x[i]);
        for (int64_t j = 0; j < w.intermediate; ++j) h[j] = activate(w.act, g[j]) * u[j];
      } else {
        for (int64_t j = 0; j < w.intermediate; ++j) h[j] = activate(w.act, u[j]);
      }
      out.push_back(matvec(w.down, w.hidden, w.intermediate, h));
    }
    return out;
  };
}

Block attention_block(AttentionWeights w, Layout layout) {
  return [w, layout](const std::vector<int64_t>& tokens, const Rows& x) {
    const int64_t d = w.hidden, n = static_cast<int64_t>(tokens.size());
    Rows q(n), k(n), v(n), out(n);
    for (int64_t i = 0; i < n; ++i) {
      q[i] = matvec(w.wq, d, d, x[i]);
      k[i] = matvec(w.wk, d, d, x[i]);
      v[i] = matvec(w.wv, d, d, x[i]);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t si = layout.sequence_of(tokens[i]), pi = layout.position(tokens[i]);
      std::vector<int64_t> seen;
      std::vector<double> score;
      for (int64_t j = 0; j < n; ++j) {
        if (layout.sequence_of(tokens[j]) != si || layout.position(tokens[j]) > pi) continue;
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += q[i][c] * k[j][c];
        seen.push_back(j);
        score.push_back(s / std::sqrt(static_cast<double>(d)));
      }
      double m = -std::numeric_limits<double>::infinity();
      for (double s : score) m = std::max(m, s);
      double sum = 0;
      for (double& s : score) sum += (s = std::exp(s - m));
      Row o(d, 0.0);
      for (size_t a = 0; a < seen.size(); ++a)
        for (int64_t c = 0; c < d; ++c) o[c] += score[a] / sum * v[seen[a]][c];
      out[i] = matvec(w.wo, d, d, o);
    }
    return out;
  };
}

// ------------------------------------------------------------------------ Dr.LLM
DrLlmDecision drllm_decide(const DrLlmParams& p, const float* x, const Layout& L) {
  const int64_t S = L.sequences(), d = p.hidden, H = p.bottleneck;
  DrLlmDecision out;
  for (int64_t s = 0; s < S; ++s) {
    std::vector<int64_t> toks;
    for (int64_t t = L.begin(s); t < L.end(s); ++t)
      if (!L.padded(t)) toks.push_back(t);
    const int64_t n = static_cast<int64_t>(toks.size());
    std::array<double, 3> z{0.0, 0.0, 0.0};
    if (n == 0) {
      out.repeats.push_back(0);
      out.logits.push_back(z);
      out.margin.push_back(std::numeric_limits<double>::infinity());
      out.windows.push_back(0);
      continue;
    }
    const int64_t W = std::min(p.windows, n), len = n / W;
    for (int64_t w = 0; w < W; ++w) {
      Row mean(d, 0.0);
      for (int64_t i = w * len; i < (w + 1) * len; ++i)
        for (int64_t c = 0; c < d; ++c) mean[c] += x[toks[i] * d + c];
      for (double& m : mean) m /= static_cast<double>(len);
      Row h = matvec(p.w0, H, d, mean);
      for (int64_t j = 0; j < H; ++j) h[j] = gelu_tanh(h[j] + p.b0[j]);
      const Row y = matvec(p.w2, 3, H, h);
      for (int a = 0; a < 3; ++a) z[a] += y[a] + p.b2[a];
    }
    for (double& v : z) v /= static_cast<double>(W);
    // The decision values: z, or the official continuous_router_decision blend (parameterlab
    // dr-llm models/modeling_qwen2.py, commit af41f28) of softmax(z) with one-hot choices.
    std::array<double, 3> v = z;
    if (p.penalty) {
      const double m = std::max({z[0], z[1], z[2]});
      double sum = 0.0;
      std::array<double, 3> r{};
      for (int a = 0; a < 3; ++a) sum += (r[a] = std::exp(z[a] - m));
      for (double& q : r) q /= sum;
      const double pp = p.router_penalty;
      for (int a = 0; a < 3; ++a) {
        if (pp <= -0.5) {
          const double t = (pp + 1.0) / 0.5;
          v[a] = (1 - t) * (a == 0) + t * r[a];
        } else if (pp <= 0.5) {
          const double t = pp + 0.5;
          v[a] = (1 - t) * r[a] + t * (a == 1);
        } else {
          const double t = (pp - 0.5) / 0.5;
          v[a] = (1 - t) * (a == 1) + t * (a == 2);
        }
      }
    }
    int best = 0;
    for (int a = 1; a < 3; ++a)
      if (v[a] > v[best]) best = a;
    double margin = std::numeric_limits<double>::infinity();
    for (int a = 0; a < 3; ++a)
      if (a != best) margin = std::min(margin, relative_gap(v[best], v[a]));
    out.repeats.push_back(best);
    out.logits.push_back(z);
    out.margin.push_back(margin);
    out.windows.push_back(W);
  }
  return out;
}

std::vector<double> drllm_forward(const std::vector<int>& repeats, const Block& block,
                                  const float* x, const Layout& L) {
  const int64_t T = L.tokens, d = L.hidden;
  std::vector<double> out(T * d, 0.0);
  // Pass 1: every unpadded token of sequences with repeats >= 1; pass 2: repeats == 2 on x + f(x).
  std::vector<int64_t> first, second;
  for (int64_t s = 0; s < L.sequences(); ++s)
    for (int64_t t = L.begin(s); t < L.end(s); ++t) {
      if (L.padded(t)) continue;
      if (repeats[s] >= 1) first.push_back(t);
      if (repeats[s] == 2) second.push_back(t);
    }
  Rows in;
  for (int64_t t : first) in.push_back(row_of(x, t, d));
  const Rows f1 = block(first, in);
  for (size_t i = 0; i < first.size(); ++i)
    for (int64_t c = 0; c < d; ++c) out[first[i] * d + c] = f1[i][c];
  Rows x1;
  for (int64_t t : second) {
    Row r = row_of(x, t, d);
    for (int64_t c = 0; c < d; ++c) r[c] += out[t * d + c];
    x1.push_back(r);
  }
  const Rows f2 = block(second, x1);
  for (size_t i = 0; i < second.size(); ++i)
    for (int64_t c = 0; c < d; ++c) out[second[i] * d + c] += f2[i][c];
  return out;
}

// ------------------------------------------------------------------------ MoR
MoRResult mor_forward(const MoRParams& p, const Block& block, const float* x0, const Layout& L,
                      const std::vector<std::vector<uint8_t>>* forced) {
  const int64_t T = L.tokens, d = p.hidden, S = L.sequences(), N = p.num_recursions;
  MoRResult res;
  res.out.assign(T * d, 0.0);
  res.depth.assign(T, 0);
  res.router_weights.assign(T, 0.0);
  res.sequence_gap.assign(S, std::numeric_limits<double>::infinity());
  Rows x(T);
  for (int64_t t = 0; t < T; ++t) x[t] = row_of(x0, t, d);
  std::vector<uint8_t> active(T);
  for (int64_t t = 0; t < T; ++t) active[t] = L.padded(t) ? 0 : 1;

  for (int64_t r = 0; r < N; ++r) {
    std::vector<double> z(T, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      if (!active[t]) continue;
      for (int64_t c = 0; c < d; ++c) z[t] += static_cast<double>(p.theta[r * d + c]) * x[t][c];
    }
    std::vector<uint8_t> chosen(T, 0);
    for (int64_t s = 0; s < S; ++s) {
      std::vector<int64_t> cand;
      int64_t length = 0;
      for (int64_t t = L.begin(s); t < L.end(s); ++t) {
        if (!L.padded(t)) ++length;
        if (active[t]) cand.push_back(t);
      }
      int64_t cap = 0;
      if (length > 0) {
        // cf_r = (N - r) / N exactly (integers), or the given factor.
        // A given factor: cf * length snapped to an integer within 1e-9 (ROUTING.md section 5).
        double x = p.capacity_factors.empty() ? 0.0 : p.capacity_factors[r] * static_cast<double>(length);
        if (std::fabs(x - std::round(x)) <= 1e-9) x = std::round(x);
        cap = p.capacity_factors.empty() ? ((N - r) * length) / N : static_cast<int64_t>(std::floor(x));
        cap = std::max<int64_t>(1, cap);
      }
      const int64_t k = std::min<int64_t>(cap, static_cast<int64_t>(cand.size()));
      std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
      if (k < static_cast<int64_t>(cand.size()) && k > 0)
        res.sequence_gap[s] =
            std::min(res.sequence_gap[s], relative_gap(z[cand[k - 1]], z[cand[k]]));
      for (int64_t i = 0; i < k; ++i) chosen[cand[i]] = 1;
    }
    if (forced != nullptr) chosen = (*forced)[r];
    res.chosen.push_back(chosen);

    std::vector<int64_t> toks;
    Rows in;
    for (int64_t t = 0; t < T; ++t)
      if (chosen[t]) {
        toks.push_back(t);
        in.push_back(x[t]);
      }
    if (toks.empty()) {
      active = chosen;
      continue;
    }
    const Rows f = block(toks, in);
    for (size_t i = 0; i < toks.size(); ++i) {
      const int64_t t = toks[i];
      double a = z[t];
      if (p.act == MoRAct::sigmoid)
        a = 1.0 / (1.0 + std::exp(-z[t]));
      else if (p.act == MoRAct::tanh)
        a = std::tanh(z[t]);
      const double g = p.alpha * a;
      for (int64_t c = 0; c < d; ++c) x[t][c] += g * (f[i][c] + (p.block_residual ? x[t][c] : 0.0));
      ++res.depth[t];
      res.router_weights[t] = g;
    }
    active = chosen;
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c)
      res.out[t * d + c] = x[t][c] - static_cast<double>(x0[t * d + c]);
  return res;
}

// ------------------------------------------------------------------------ comparison
double relative_gap(double a, double b) {
  if (a == b) return 0.0;
  if (std::isinf(a) || std::isinf(b)) return std::numeric_limits<double>::infinity();
  return std::fabs(a - b) / std::max(std::fabs(a), std::fabs(b));
}

std::vector<std::string> compare_values(const std::vector<double>& want, const float* got,
                                        int64_t width, double rel, double floor_frac,
                                        const std::vector<uint8_t>& skip_rows) {
  std::vector<std::string> errs;
  const double floor = floor_frac * max_abs(want);
  for (size_t i = 0; i < want.size(); ++i) {
    const size_t r = i / static_cast<size_t>(width);
    if (!skip_rows.empty() && skip_rows[r]) continue;
    const double g = got[i], w = want[i];
    if (!(std::fabs(g - w) <= rel * std::fabs(w) + floor)) {
      if (errs.size() < 8) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "row %zu col %zu: got %.9g want %.9g (tol %.3g)", r,
                      i % width, g, w, rel * std::fabs(w) + floor);
        errs.emplace_back(buf);
      } else if (errs.size() == 8) {
        errs.emplace_back("...");
      }
    }
  }
  return errs;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

}  // namespace ref_dc
