// Structure-guided union-find over a 4-connected token grid (SGUF merge step).
//
// Pure C++ (no Python, no torch): the pybind11 layer in module.cpp converts numpy arrays.
#pragma once

#include <cstdint>
#include <vector>

namespace kawhi {

// Disjoint-set forest with path halving and union by size.
class DisjointSet {
 public:
  explicit DisjointSet(int64_t n);
  int64_t find(int64_t x);
  // Joins the sets of a and b; returns true when they were different sets.
  bool unite(int64_t a, int64_t b);

 private:
  std::vector<int64_t> parent_;
  std::vector<int64_t> size_;
};

// True iff neighbouring patches p and q merge under the SGUF rule:
//   sqrt((lmax_p - lmax_q)^2 + (lmin_p - lmin_q)^2) / max(lmax_p, lmax_q, eps) < delta_s
//   and |light_p - light_q| < delta_l.
bool sguf_should_merge(double lmax_p, double lmax_q, double lmin_p, double lmin_q,
                       double light_p, double light_q, double delta_s, double delta_l,
                       double eps);

// Connected components of the gh x gw patch grid (token r*gw + c) after merging every
// 4-neighbour pair that passes sguf_should_merge. Writes labels[0..gh*gw) numbered 0..C-1 in
// order of each component's first token in raster order; returns C.
int64_t union_find_merge(const double* lam_max, const double* lam_min, const double* lightness,
                         int64_t gh, int64_t gw, double delta_s, double delta_l, double eps,
                         int64_t* labels);

}  // namespace kawhi
