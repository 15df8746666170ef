/* The byte-moving floor for benchmarks/lowp_bench.py: for each low-precision mode of a plain
 * SGD step (no momentum), a C loop that reads and writes exactly the buffers the engine does,
 * with the same element sizes, doing one integer add per element (no rounding, no hashing).
 * Runs on `threads` OpenMP threads (static split, as the engine's pool splits a tensor). Built by
 * the benchmark: cc -O3 -march=native -fopenmp -fPIC -shared.
 *
 *   mode 0 float32   w(4) g(4) -> w(4)                       12 bytes / element
 *   mode 1 16-bit    w(2) g(2) -> w(2)                        6 bytes (to nearest, stochastic)
 *   mode 2 master    m(4) g(2) -> m(4) w(2)                  12 bytes
 *   mode 3 remainder w(2) r(2) g(2) -> w(2) r(2)             10 bytes
 */
#include <stdint.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Runs `reps` passes of `mode` over n elements on `threads` threads; returns the best seconds per
 * pass. */
double lb_run(int mode, int64_t n, int reps, int threads, void* w, void* g, void* x) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    if (mode == 0) {
      uint32_t* restrict a = w; const uint32_t* restrict b = g;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
    } else if (mode == 1) {
      uint16_t* restrict a = w; const uint16_t* restrict b = g;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
    } else if (mode == 2) {
      uint16_t* restrict a = w; const uint16_t* restrict b = g; uint32_t* restrict m = x;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) { const uint32_t v = m[i] + b[i]; m[i] = v; a[i] = (uint16_t)(v >> 16); }
    } else {
      uint16_t* restrict a = w; const uint16_t* restrict b = g; uint16_t* restrict m = x;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) { const uint16_t v = a[i] + m[i] + b[i]; a[i] = v; m[i] = (uint16_t)(v ^ b[i]); }
    }
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  return best;
}
