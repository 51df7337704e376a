// ANI AEV on the CPU: cell-list neighbour list, forward, and the exact vector-Jacobian product.
// Matches TorchANI 2.9's pyaev (cosine cutoff, 0.25 radial factor, acos(0.95 cos) angle).
// Work is split over centre atoms (at::parallel_for, OpenMP): every pair and triple belongs to
// its centre, so forward rows and backward pair gradients are written without atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

struct Consts {
  double eta_r, eta_a, zeta, rc, ra;
  std::vector<double> shr, sha, cs, sn;
  std::vector<int64_t> triu;
  int64_t ns, n_rs, n_as, n_sec, n_rad, n_ang_block, width;
};

// params: [eta_r, eta_a, zeta, n_rs, n_as, n_sec, radial shifts, angular shifts, cos, sin]
Consts unpack(const Tensor& params, const Tensor& triu, double rc, double ra) {
  Consts k;
  auto p = params.to(at::kDouble).contiguous();
  const double* q = p.data_ptr<double>();
  k.eta_r = q[0]; k.eta_a = q[1]; k.zeta = q[2];
  k.n_rs = (int64_t)q[3]; k.n_as = (int64_t)q[4]; k.n_sec = (int64_t)q[5];
  int64_t o = 6;
  k.shr.assign(q + o, q + o + k.n_rs); o += k.n_rs;
  k.sha.assign(q + o, q + o + k.n_as); o += k.n_as;
  k.cs.assign(q + o, q + o + k.n_sec); o += k.n_sec;
  k.sn.assign(q + o, q + o + k.n_sec);
  auto t = triu.to(at::kLong).contiguous();
  k.ns = t.size(0);
  k.triu.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  k.rc = rc; k.ra = ra;
  k.n_rad = k.ns * k.n_rs;
  k.n_ang_block = k.n_as * k.n_sec;
  k.width = k.n_rad + k.ns * (k.ns + 1) / 2 * k.n_ang_block;
  return k;
}

void inverse3(const double* m, double* inv) {
  double det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6]);
  inv[0] = (m[4] * m[8] - m[5] * m[7]) / det; inv[1] = (m[2] * m[7] - m[1] * m[8]) / det; inv[2] = (m[1] * m[5] - m[2] * m[4]) / det;
  inv[3] = (m[5] * m[6] - m[3] * m[8]) / det; inv[4] = (m[0] * m[8] - m[2] * m[6]) / det; inv[5] = (m[2] * m[3] - m[0] * m[5]) / det;
  inv[6] = (m[3] * m[7] - m[4] * m[6]) / det; inv[7] = (m[1] * m[6] - m[0] * m[7]) / det; inv[8] = (m[0] * m[4] - m[1] * m[3]) / det;
}

// Directed pairs sorted by centre: (offsets (N+1), neighbour j (P), shift (P,3) in positions' dtype).
std::tuple<Tensor, Tensor, Tensor> neighbors(const Tensor& positions, const c10::optional<Tensor>& cell, double cutoff) {
  auto pos = positions.detach().to(at::kDouble).contiguous();
  const int64_t n = pos.size(0);
  const double* x = pos.data_ptr<double>();
  const bool periodic = cell.has_value();
  const double margin = cutoff * (1.0 + 1e-4);
  double box[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, inv[9], origin[3] = {0, 0, 0}, heights[3];
  if (periodic) {
    auto c = cell->detach().to(at::kDouble).contiguous();
    std::copy(c.data_ptr<double>(), c.data_ptr<double>() + 9, box);
    double det = std::abs(box[0] * (box[4] * box[8] - box[5] * box[7]) - box[1] * (box[3] * box[8] - box[5] * box[6]) +
                          box[2] * (box[3] * box[7] - box[4] * box[6]));
    for (int d = 0; d < 3; ++d) {
      const double* a = box + 3 * ((d + 1) % 3);
      const double* b = box + 3 * ((d + 2) % 3);
      double cx = a[1] * b[2] - a[2] * b[1], cy = a[2] * b[0] - a[0] * b[2], cz = a[0] * b[1] - a[1] * b[0];
      heights[d] = det / std::sqrt(cx * cx + cy * cy + cz * cz);
    }
  } else {
    for (int d = 0; d < 3; ++d) {
      double lo = 0, hi = 0;
      for (int64_t a = 0; a < n; ++a) {
        double v = x[3 * a + d];
        if (a == 0 || v < lo) lo = v;
        if (a == 0 || v > hi) hi = v;
      }
      origin[d] = lo;
      heights[d] = std::max(hi - lo, margin) * (1.0 + 1e-6);
      box[4 * d] = heights[d];
    }
  }
  inverse3(box, inv);
  int64_t bins[3], reach[3];
  for (int d = 0; d < 3; ++d) {
    bins[d] = std::max<int64_t>(1, (int64_t)std::floor(2.0 * heights[d] / margin));
    reach[d] = (int64_t)std::ceil(margin * bins[d] / heights[d]);
  }
  // wrapped positions, integer images, bins
  std::vector<double> w(3 * n);
  std::vector<int64_t> image(3 * n), cell_of(n);
  for (int64_t a = 0; a < n; ++a) {
    double r[3] = {x[3 * a] - origin[0], x[3 * a + 1] - origin[1], x[3 * a + 2] - origin[2]};
    double f[3];
    int64_t b[3];
    for (int d = 0; d < 3; ++d) {
      f[d] = r[0] * inv[d] + r[1] * inv[3 + d] + r[2] * inv[6 + d];
      image[3 * a + d] = periodic ? (int64_t)std::floor(f[d]) : 0;
      f[d] -= image[3 * a + d];
      b[d] = std::min<int64_t>(std::max<int64_t>((int64_t)std::floor(f[d] * bins[d]), 0), bins[d] - 1);
    }
    for (int d = 0; d < 3; ++d)
      w[3 * a + d] = x[3 * a + d] - (image[3 * a] * box[d] + image[3 * a + 1] * box[3 + d] + image[3 * a + 2] * box[6 + d]);
    cell_of[a] = (b[0] * bins[1] + b[1]) * bins[2] + b[2];
  }
  const int64_t n_cells = bins[0] * bins[1] * bins[2];
  std::vector<int64_t> start(n_cells + 1, 0), members(n);
  for (int64_t a = 0; a < n; ++a) start[cell_of[a] + 1]++;
  for (int64_t c = 0; c < n_cells; ++c) start[c + 1] += start[c];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < n; ++a) members[fill[cell_of[a]]++] = a;
  }
  const double c2 = cutoff * cutoff;
  // visit(a, fn): every (j, image) within the cutoff of atom a
  auto visit = [&](int64_t a, auto&& fn) {
    int64_t ca = cell_of[a];
    int64_t b0 = ca / (bins[1] * bins[2]), b1 = (ca / bins[2]) % bins[1], b2 = ca % bins[2];
    for (int64_t o0 = -reach[0]; o0 <= reach[0]; ++o0)
      for (int64_t o1 = -reach[1]; o1 <= reach[1]; ++o1)
        for (int64_t o2 = -reach[2]; o2 <= reach[2]; ++o2) {
          int64_t nb[3] = {b0 + o0, b1 + o1, b2 + o2}, im[3] = {0, 0, 0};
          bool ok = true;
          for (int d = 0; d < 3; ++d) {
            if (periodic) {
              im[d] = (nb[d] >= 0) ? nb[d] / bins[d] : -((-nb[d] + bins[d] - 1) / bins[d]);
              nb[d] -= im[d] * bins[d];
            } else if (nb[d] < 0 || nb[d] >= bins[d]) {
              ok = false;
            }
          }
          if (!ok) continue;
          double s[3];
          for (int d = 0; d < 3; ++d) s[d] = im[0] * box[d] + im[1] * box[3 + d] + im[2] * box[6 + d];
          bool self_image = im[0] == 0 && im[1] == 0 && im[2] == 0;
          int64_t c = (nb[0] * bins[1] + nb[1]) * bins[2] + nb[2];
          for (int64_t q = start[c]; q < start[c + 1]; ++q) {
            int64_t j = members[q];
            if (j == a && self_image) continue;
            double v0 = w[3 * j] + s[0] - w[3 * a], v1 = w[3 * j + 1] + s[1] - w[3 * a + 1], v2 = w[3 * j + 2] + s[2] - w[3 * a + 2];
            if (v0 * v0 + v1 * v1 + v2 * v2 <= c2) fn(j, im);
          }
        }
  };
  std::vector<int64_t> count(n + 1, 0);
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      int64_t k = 0;
      visit(a, [&](int64_t, const int64_t*) { ++k; });
      count[a + 1] = k;
    }
  });
  for (int64_t a = 0; a < n; ++a) count[a + 1] += count[a];
  const int64_t n_pairs = count[n];
  auto offsets = at::empty({n + 1}, at::kLong);
  std::copy(count.begin(), count.end(), offsets.data_ptr<int64_t>());
  auto nbr = at::empty({n_pairs}, at::kLong);
  auto shift = at::empty({n_pairs, 3}, at::kDouble);
  int64_t* jp = nbr.data_ptr<int64_t>();
  double* sp = shift.data_ptr<double>();
  // Each centre's neighbours are written sorted by (j, image): the order, and so the float rounding
  // of every AEV sum, depends on the set of pairs only, not on the cells the atoms sat in when the
  // list was built (a Verlet list reused for some steps gives bit-identical results).
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    std::vector<std::array<int64_t, 4>> found;
    for (int64_t a = lo; a < hi; ++a) {
      found.clear();
      visit(a, [&](int64_t j, const int64_t* im) {
        found.push_back({j, im[0] + image[3 * a] - image[3 * j], im[1] + image[3 * a + 1] - image[3 * j + 1],
                         im[2] + image[3 * a + 2] - image[3 * j + 2]});
      });
      std::sort(found.begin(), found.end());
      int64_t k = count[a];
      for (const auto& e : found) {
        jp[k] = e[0];
        for (int d = 0; d < 3; ++d)
          sp[3 * k + d] = periodic ? e[1] * box[d] + e[2] * box[3 + d] + e[3] * box[6 + d] : 0.0;
        ++k;
      }
    }
  });
  return {offsets, nbr, shift.to(positions.scalar_type())};
}

// Kernels compute in the storage type T (float32 for MD, float64 for finite-difference tests).
template <typename T> inline T cut(T d, T rc) { return T(0.5) * std::cos(d * (T(M_PI) / rc)) + T(0.5); }
template <typename T> inline T dcut(T d, T rc) { return T(-0.5) * (T(M_PI) / rc) * std::sin(d * (T(M_PI) / rc)); }

template <typename T> struct Side { int64_t p, s; T v[3], d, f, df; };

template <typename T> inline T norm3(const T* v) { return std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]); }

// The neighbours of one centre inside the angular cutoff.
template <typename T>
void collect(const T* vec, const int64_t* j, const int64_t* sp, int64_t lo, int64_t hi, T ra, std::vector<Side<T>>& out) {
  out.clear();
  for (int64_t p = lo; p < hi; ++p) {
    Side<T> e;
    e.p = p;
    for (int d = 0; d < 3; ++d) e.v[d] = vec[3 * p + d];
    e.d = norm3(e.v);
    if (e.d > ra) continue;
    e.f = cut(e.d, ra); e.df = dcut(e.d, ra); e.s = sp[j[p]];
    out.push_back(e);
  }
}

// Constants in the compute type, sized by the model.
template <typename T> struct KT {
  T eta_r, eta_a, zeta, rc, ra;
  std::vector<T> shr, sha, cs, sn;
  explicit KT(const Consts& k) : eta_r(k.eta_r), eta_a(k.eta_a), zeta(k.zeta), rc(k.rc), ra(k.ra),
      shr(k.shr.begin(), k.shr.end()), sha(k.sha.begin(), k.sha.end()), cs(k.cs.begin(), k.cs.end()), sn(k.sn.begin(), k.sn.end()) {}
};

// Kernels are instantiated for ANI-2x's sizes (16 radial shifts, 8 angular shifts, 4 sections),
// so the compiler unrolls the per-triple loops, and for any sizes (template arguments 0).
// Angle terms of one triple: half[z] = (1 + cos(theta - theta_z)) / 2, an[z] = 2 half^zeta, ex[q] = exp(-eta (mean - shift_q)^2).
template <typename T, int NR, int NA, int NZ>
inline void triple_terms(const Consts& k, const KT<T>& t, T c, T s, T mean, T* half, T* an, T* ex) {
  const int64_t n_rs = NR ? NR : k.n_rs, n_as = NA ? NA : k.n_as, n_sec = NZ ? NZ : k.n_sec;
  (void)n_rs;
#pragma omp simd
  for (int64_t z = 0; z < n_sec; ++z) half[z] = T(0.5) * (T(1) + c * t.cs[z] + s * t.sn[z]);
#pragma omp simd
  for (int64_t z = 0; z < n_sec; ++z) an[z] = T(2) * std::exp(t.zeta * std::log(half[z]));
#pragma omp simd
  for (int64_t q = 0; q < n_as; ++q) ex[q] = std::exp(-t.eta_a * (mean - t.sha[q]) * (mean - t.sha[q]));
}

template <typename T, int NR, int NA, int NZ>
void forward_kernel(const Consts& k, const T* vec, const int64_t* off, const int64_t* j, const int64_t* sp, int64_t n, T* out,
                    T* cache, const int64_t* tri_off) {
  const int64_t n_rs = NR ? NR : k.n_rs, n_as = NA ? NA : k.n_as, n_sec = NZ ? NZ : k.n_sec;
  (void)n_rs;
  const int64_t stride = n_sec + n_as;
  const KT<T> t(k);
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<Side<T>> side;
    std::vector<T> ex(n_as), an(n_sec), half(n_sec), rad(n_rs);
    for (int64_t i = lo; i < hi; ++i) {
      T* row = out + i * k.width;
      std::fill(row, row + k.width, T(0));
      for (int64_t p = off[i]; p < off[i + 1]; ++p) {
        T d = std::sqrt(vec[3 * p] * vec[3 * p] + vec[3 * p + 1] * vec[3 * p + 1] + vec[3 * p + 2] * vec[3 * p + 2]);
        if (d > t.rc) continue;
        T fc = T(0.25) * cut(d, t.rc);
#pragma omp simd
        for (int64_t q = 0; q < n_rs; ++q) rad[q] = std::exp(-t.eta_r * (d - t.shr[q]) * (d - t.shr[q]));
        T* r = row + sp[j[p]] * n_rs;
        for (int64_t q = 0; q < n_rs; ++q) r[q] += rad[q] * fc;
      }
      collect(vec, j, sp, off[i], off[i + 1], t.ra, side);
      T* slot = cache ? cache + tri_off[i] * stride : nullptr;
      for (size_t a = 1; a < side.size(); ++a)
        for (size_t b = 0; b < a; ++b) {
          const Side<T> &A = side[a], &B = side[b];
          T cosv = (A.v[0] * B.v[0] + A.v[1] * B.v[1] + A.v[2] * B.v[2]) / std::max(A.d * B.d, T(1e-10));
          T c = T(0.95) * cosv;
          triple_terms<T, NR, NA, NZ>(k, t, c, std::sqrt(T(1) - c * c), T(0.5) * (A.d + B.d), half.data(), an.data(), ex.data());
          if (slot) {
            std::copy(an.begin(), an.end(), slot);
            std::copy(ex.begin(), ex.end(), slot + n_sec);
            slot += stride;
          }
          T fab = A.f * B.f;
          T* r = row + k.n_rad + k.triu[A.s * k.ns + B.s] * (n_as * n_sec);
          for (int64_t q = 0; q < n_as; ++q) {
            T e = ex[q] * fab;
            for (int64_t z = 0; z < n_sec; ++z) r[q * n_sec + z] += e * an[z];
          }
        }
    }
  });
}

template <typename T, int NR, int NA, int NZ>
void backward_kernel(const Consts& k, const T* g, const T* vec, const int64_t* off, const int64_t* j, const int64_t* sp, int64_t n, T* gv,
                     const T* cache, const int64_t* tri_off) {
  const int64_t n_rs = NR ? NR : k.n_rs, n_as = NA ? NA : k.n_as, n_sec = NZ ? NZ : k.n_sec;
  (void)n_rs;
  const int64_t stride = n_sec + n_as;
  const KT<T> t(k);
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<Side<T>> side;
    std::vector<T> ex(n_as), an(n_sec), half(n_sec), gan(n_sec);
    for (int64_t i = lo; i < hi; ++i) {
      const T* gi = g + i * k.width;
      const int64_t p0 = off[i];
      T* acc = gv + 3 * p0;  // this centre's pairs: written by this thread only
      for (int64_t p = p0; p < off[i + 1]; ++p) {
        T v[3] = {vec[3 * p], vec[3 * p + 1], vec[3 * p + 2]};
        T d = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
        if (d > t.rc) continue;
        T fc = cut(d, t.rc), dfc = dcut(d, t.rc), gd = 0;
        const T* gr = gi + sp[j[p]] * n_rs;
        for (int64_t q = 0; q < n_rs; ++q) {
          T e = T(0.25) * std::exp(-t.eta_r * (d - t.shr[q]) * (d - t.shr[q]));
          gd += gr[q] * e * (fc * T(-2) * t.eta_r * (d - t.shr[q]) + dfc);
        }
        for (int dd = 0; dd < 3; ++dd) acc[3 * (p - p0) + dd] += gd * v[dd] / d;
      }
      collect(vec, j, sp, p0, off[i + 1], t.ra, side);
      const T* slot = cache ? cache + tri_off[i] * stride : nullptr;
      for (size_t a = 1; a < side.size(); ++a)
        for (size_t b = 0; b < a; ++b) {
          const Side<T> &A = side[a], &B = side[b];
          T inv_ab = T(1) / std::max(A.d * B.d, T(1e-10));
          T cosv = (A.v[0] * B.v[0] + A.v[1] * B.v[1] + A.v[2] * B.v[2]) * inv_ab;
          T c = T(0.95) * cosv, s = std::sqrt(T(1) - c * c), mean = T(0.5) * (A.d + B.d), fab = A.f * B.f;
          if (slot) {  // the forward's terms; half is cheap to redo
            for (int64_t z = 0; z < n_sec; ++z) half[z] = T(0.5) * (T(1) + c * t.cs[z] + s * t.sn[z]);
            std::copy(slot, slot + n_sec, an.begin());
            std::copy(slot + n_sec, slot + stride, ex.begin());
            slot += stride;
          } else {
            triple_terms<T, NR, NA, NZ>(k, t, c, s, mean, half.data(), an.data(), ex.data());
          }
          const T* G = gi + k.n_rad + k.triu[A.s * k.ns + B.s] * (n_as * n_sec);
          std::fill(gan.begin(), gan.end(), T(0));
          T g_fab = 0, g_mean = 0;
          for (int64_t q = 0; q < n_as; ++q) {
            T u = 0;
            for (int64_t z = 0; z < n_sec; ++z) {
              u += G[q * n_sec + z] * an[z];
              gan[z] += G[q * n_sec + z] * ex[q];
            }
            u *= ex[q];
            g_fab += u;
            g_mean += u * (mean - t.sha[q]);
          }
          g_mean *= -t.eta_a * fab;
          T g_cos = 0;  // d an / d cos = zeta an / half * (cs - sn c / s) / 2 * 0.95
          for (int64_t z = 0; z < n_sec; ++z) g_cos += gan[z] * an[z] / half[z] * (t.cs[z] - t.sn[z] * c / s);
          g_cos *= T(0.475) * t.zeta * fab;
          T g_da = g_mean + g_fab * A.df * B.f, g_db = g_mean + g_fab * A.f * B.df;
          T ca = (g_da - g_cos * cosv / A.d) / A.d, cb = (g_db - g_cos * cosv / B.d) / B.d, gc = g_cos * inv_ab;
          T* ga = acc + 3 * (A.p - p0);
          T* gb = acc + 3 * (B.p - p0);
          for (int dd = 0; dd < 3; ++dd) {
            ga[dd] += ca * A.v[dd] + gc * B.v[dd];
            gb[dd] += cb * B.v[dd] + gc * A.v[dd];
          }
        }
    }
  });
}

inline bool ani2x_sizes(const Consts& k) { return k.n_rs == 16 && k.n_as == 8 && k.n_sec == 4; }

// First triple of each centre in the order the kernels visit them (N+1 offsets).
template <typename T>
Tensor triple_offsets(const T* vec, const int64_t* off, int64_t n, T ra) {
  auto tri = at::empty({n + 1}, at::kLong);
  int64_t* t = tri.data_ptr<int64_t>();
  t[0] = 0;
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      int64_t m = 0;
      for (int64_t p = off[i]; p < off[i + 1]; ++p) m += norm3(vec + 3 * p) <= ra;
      t[i + 1] = m * (m - 1) / 2;
    }
  });
  for (int64_t i = 0; i < n; ++i) t[i + 1] += t[i];
  return tri;
}

// The AEV; with `keep`, also the per-triple angle/Gaussian terms and triple offsets for the backward.
std::tuple<Tensor, Tensor, Tensor> aev_forward(const Tensor& vectors, const Tensor& offsets, const Tensor& nbr,
                                               const Tensor& species, const Tensor& params, const Tensor& triu,
                                               double rc, double ra, bool keep) {
  Consts k = unpack(params, triu, rc, ra);
  auto vec = vectors.contiguous();
  auto off = offsets.contiguous(), j = nbr.contiguous(), sp = species.to(at::kLong).contiguous();
  const int64_t n = sp.size(0);
  auto out = at::empty({n, k.width}, vectors.options());
  Tensor cache, tri;
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "nnpq_aev_forward", [&] {
    scalar_t* cp = nullptr;
    const int64_t* tp = nullptr;
    if (keep) {
      tri = triple_offsets<scalar_t>(vec.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), n, (scalar_t)ra);
      cache = at::empty({tri[n].item<int64_t>(), k.n_sec + k.n_as}, vectors.options());
      cp = cache.data_ptr<scalar_t>();
      tp = tri.data_ptr<int64_t>();
    }
    auto run = [&](auto kernel) {
      kernel(k, vec.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), j.data_ptr<int64_t>(), sp.data_ptr<int64_t>(), n,
             out.data_ptr<scalar_t>(), cp, tp);
    };
    if (ani2x_sizes(k)) run(forward_kernel<scalar_t, 16, 8, 4>);
    else run(forward_kernel<scalar_t, 0, 0, 0>);
  });
  return {out, cache, tri};
}

Tensor aev_backward(const Tensor& grad, const Tensor& vectors, const Tensor& offsets, const Tensor& nbr,
                    const Tensor& species, const Tensor& params, const Tensor& triu, double rc, double ra,
                    const Tensor& cache, const Tensor& tri) {
  Consts k = unpack(params, triu, rc, ra);
  auto vec = vectors.contiguous();
  auto g = grad.to(vectors.scalar_type()).contiguous();
  auto off = offsets.contiguous(), j = nbr.contiguous(), sp = species.to(at::kLong).contiguous();
  const int64_t n = sp.size(0);
  auto gv = at::zeros_like(vec);
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "nnpq_aev_backward", [&] {
    auto run = [&](auto kernel) {
      kernel(k, g.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), j.data_ptr<int64_t>(),
             sp.data_ptr<int64_t>(), n, gv.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), tri.data_ptr<int64_t>());
    };
    if (ani2x_sizes(k)) run(backward_kernel<scalar_t, 16, 8, 4>);
    else run(backward_kernel<scalar_t, 0, 0, 0>);
  });
  return gv;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AEVFunction : public torch::autograd::Function<AEVFunction> {
  static Tensor forward(AutogradContext* ctx, Tensor vectors, Tensor offsets, Tensor nbr, Tensor species,
                        Tensor params, Tensor triu, double rc, double ra) {
    const bool keep = vectors.requires_grad();
    ctx->saved_data["rc"] = rc;
    ctx->saved_data["ra"] = ra;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, cache, tri] = aev_forward(vectors, offsets, nbr, species, params, triu, rc, ra, keep);
    if (keep) ctx->save_for_backward({vectors, offsets, nbr, species, params, triu, cache, tri});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto gv = aev_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["rc"].toDouble(),
                           ctx->saved_data["ra"].toDouble(), s[6], s[7]);
    return {gv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor aev(const Tensor& vectors, const Tensor& offsets, const Tensor& nbr, const Tensor& species,
           const Tensor& params, const Tensor& triu, double rc, double ra) {
  return AEVFunction::apply(vectors, offsets, nbr, species, params, triu, rc, ra);
}

}  // namespace

TORCH_LIBRARY(nnpq_aev, m) {
  m.def("neighbors(Tensor positions, Tensor? cell, float cutoff) -> (Tensor, Tensor, Tensor)", neighbors);
  m.def("aev(Tensor vectors, Tensor offsets, Tensor neighbors, Tensor species, Tensor params, Tensor triu, "
        "float radial_cutoff, float angular_cutoff) -> Tensor", aev);
}
