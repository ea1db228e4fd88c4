#include "union_find.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

namespace kawhi {

DisjointSet::DisjointSet(int64_t n) : parent_(static_cast<size_t>(n)), size_(static_cast<size_t>(n), 1) {
  for (int64_t i = 0; i < n; ++i) parent_[static_cast<size_t>(i)] = i;
}

int64_t DisjointSet::find(int64_t x) {
  while (parent_[static_cast<size_t>(x)] != x) {
    int64_t& px = parent_[static_cast<size_t>(x)];
    px = parent_[static_cast<size_t>(px)];  // path halving
    x = px;
  }
  return x;
}

bool DisjointSet::unite(int64_t a, int64_t b) {
  a = find(a);
  b = find(b);
  if (a == b) return false;
  if (size_[static_cast<size_t>(a)] < size_[static_cast<size_t>(b)]) std::swap(a, b);
  parent_[static_cast<size_t>(b)] = a;
  size_[static_cast<size_t>(a)] += size_[static_cast<size_t>(b)];
  return true;
}

bool sguf_should_merge(double lmax_p, double lmax_q, double lmin_p, double lmin_q,
                       double light_p, double light_q, double delta_s, double delta_l,
                       double eps) {
  // Same operation order as the NumPy fallback (kawhi_kernels/regions/union_find.py), and the
  // build disables FMA contraction, so both paths take bit-identical decisions.
  const double dmax = lmax_p - lmax_q;
  const double dmin = lmin_p - lmin_q;
  const double dist = std::sqrt(dmax * dmax + dmin * dmin);
  const double denom = std::max(std::max(lmax_p, lmax_q), eps);
  const double ratio = dist / denom;
  return ratio < delta_s && std::fabs(light_p - light_q) < delta_l;
}

int64_t union_find_merge(const double* lam_max, const double* lam_min, const double* lightness,
                         int64_t gh, int64_t gw, double delta_s, double delta_l, double eps,
                         int64_t* labels) {
  if (gh < 0 || gw < 0) throw std::invalid_argument("grid dimensions must be non-negative");
  const int64_t n = gh * gw;
  DisjointSet dsu(n);
  for (int64_t r = 0; r < gh; ++r) {
    for (int64_t c = 0; c < gw; ++c) {
      const int64_t p = r * gw + c;
      if (c + 1 < gw) {
        const int64_t q = p + 1;
        if (sguf_should_merge(lam_max[p], lam_max[q], lam_min[p], lam_min[q], lightness[p],
                              lightness[q], delta_s, delta_l, eps))
          dsu.unite(p, q);
      }
      if (r + 1 < gh) {
        const int64_t q = p + gw;
        if (sguf_should_merge(lam_max[p], lam_max[q], lam_min[p], lam_min[q], lightness[p],
                              lightness[q], delta_s, delta_l, eps))
          dsu.unite(p, q);
      }
    }
  }
  // Canonical numbering: components in order of their first token in raster order.
  std::vector<int64_t> root_label(static_cast<size_t>(n), -1);
  int64_t next = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t root = dsu.find(p);
    int64_t& lab = root_label[static_cast<size_t>(root)];
    if (lab < 0) lab = next++;
    labels[p] = lab;
  }
  return next;
}

}  // namespace kawhi
