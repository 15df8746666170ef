/* The one-pass C roofline for bench_step.py: the same fused SGD update as fastsgd (Keras 3's
 * rule, fp32, contraction off), written as plain loops over restrict pointers, plus a STREAM
 * triad probe. Multi-threaded through a tiny persistent pthread pool (not OpenMP: torch ships
 * its own libgomp.so.1 and two OpenMP runtimes in one process would fight over the cores).
 *
 * Built by the benchmark itself:  cc -O3 -march=native -ffp-contract=off -fPIC -shared -pthread
 * Called through ctypes; nothing here allocates per call.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* ---- the update --------------------------------------------------------------------------- */

enum { RL_PLAIN = 0, RL_MOMENTUM = 1, RL_NESTEROV = 2 };

typedef struct {
  int kind;       /* RL_PLAIN / RL_MOMENTUM / RL_NESTEROV */
  int decay;      /* decoupled weight decay: w *= decay_factor first */
  int ema;        /* avg = keep * avg + take * w after the step */
  int gclip;      /* global_clipnorm: a sum-of-squares pass, then g *= scale */
  float lr, momentum, decay_factor, keep, take;
  double clipnorm;
} rl_config;

typedef struct {
  int n;                /* tensors */
  float **w;            /* variables */
  const float **g;      /* gradients */
  float **m;            /* momentum slots (or NULL) */
  float **avg;          /* EMA slots (or NULL) */
  const int64_t *offs;  /* n + 1 prefix sums of the element counts */
} rl_set;

#define RL_INLINE static inline __attribute__((always_inline))

/* One tensor slice. Same operation order as cpp/include/fastsgd/math.h. */
RL_INLINE void body(const int kind, const int decay, const int ema, const int clip, float *restrict w,
                    const float *restrict g, float *restrict m, float *restrict a, int64_t b, int64_t e,
                    const rl_config *c, float scale) {
  const float lr = c->lr, mom = c->momentum, df = c->decay_factor, keep = c->keep, take = c->take;
  for (int64_t i = b; i < e; ++i) {
    float gv = g[i];
    if (clip) gv = gv * scale;
    float wv = w[i];
    if (decay) wv = wv * df;
    if (kind == RL_PLAIN) {
      wv = wv - lr * gv;
    } else {
      const float mv = mom * m[i] - lr * gv;
      m[i] = mv;
      wv = (kind == RL_NESTEROV) ? (wv - lr * gv) + mom * mv : wv + mv;
    }
    if (ema) a[i] = keep * a[i] + take * wv;
    w[i] = wv;
  }
}

typedef void (*slice_fn)(float *, const float *, float *, float *, int64_t, int64_t, const rl_config *, float);

#define RL_SPECIALISE(NAME, K, D, E, C)                                                              \
  static void NAME(float *w, const float *g, float *m, float *a, int64_t b, int64_t e,            \
                   const rl_config *c, float s) {                                                   \
    body(K, D, E, C, w, g, m, a, b, e, c, s);                                                       \
  }
/* plain, momentum, nesterov; each with/without decay, EMA, clip (the benchmark uses six). */
RL_SPECIALISE(s_p, RL_PLAIN, 0, 0, 0)
RL_SPECIALISE(s_pd, RL_PLAIN, 1, 0, 0)
RL_SPECIALISE(s_pe, RL_PLAIN, 0, 1, 0)
RL_SPECIALISE(s_pc, RL_PLAIN, 0, 0, 1)
RL_SPECIALISE(s_m, RL_MOMENTUM, 0, 0, 0)
RL_SPECIALISE(s_md, RL_MOMENTUM, 1, 0, 0)
RL_SPECIALISE(s_me, RL_MOMENTUM, 0, 1, 0)
RL_SPECIALISE(s_mc, RL_MOMENTUM, 0, 0, 1)
RL_SPECIALISE(s_n, RL_NESTEROV, 0, 0, 0)
RL_SPECIALISE(s_nd, RL_NESTEROV, 1, 0, 0)
RL_SPECIALISE(s_ne, RL_NESTEROV, 0, 1, 0)
RL_SPECIALISE(s_nc, RL_NESTEROV, 0, 0, 1)

static slice_fn pick(const rl_config *c) {
  static const slice_fn table[3][4] = {{s_p, s_pd, s_pe, s_pc}, {s_m, s_md, s_me, s_mc}, {s_n, s_nd, s_ne, s_nc}};
  const int extra = c->decay ? 1 : c->ema ? 2 : c->gclip ? 3 : 0; /* one extra at a time */
  return table[c->kind][extra];
}

/* Sum of squares of g[b:e] in 16 double lanes (vectorisable without reassociation). */
static double sum_squares(const float *restrict g, int64_t b, int64_t e) {
  double lanes[16] = {0};
  int64_t i = b;
  for (; i + 16 <= e; i += 16)
    for (int j = 0; j < 16; ++j) {
      const double x = g[i + j];
      lanes[j] += x * x;
    }
  for (int j = 0; i < e; ++i, ++j) {
    const double x = g[i];
    lanes[j] += x * x;
  }
  double s = 0;
  for (int j = 0; j < 16; ++j) s += lanes[j];
  return s;
}

/* ---- a persistent pthread pool ------------------------------------------------------------ */

typedef void (*task_fn)(void *ctx, int worker, int workers);

#define RL_MAX_THREADS 64
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_size = 1; /* including the caller */
static unsigned long pool_gen = 0;
static task_fn pool_task;
static void *pool_ctx;
static int pool_count, pool_pending;

static void *worker_main(void *arg) {
  const int index = (int)(intptr_t)arg;
  unsigned long seen = 0;
  for (;;) {
    pthread_mutex_lock(&pool_mu);
    while (pool_gen == seen) pthread_cond_wait(&pool_wake, &pool_mu);
    seen = pool_gen;
    task_fn task = pool_task;
    void *ctx = pool_ctx;
    const int count = pool_count;
    pthread_mutex_unlock(&pool_mu);
    if (index < count) {
      task(ctx, index, count);
      pthread_mutex_lock(&pool_mu);
      if (--pool_pending == 0) pthread_cond_signal(&pool_done);
      pthread_mutex_unlock(&pool_mu);
    }
  }
  return NULL;
}

static void parallel(int count, task_fn task, void *ctx) {
  if (count <= 1) {
    task(ctx, 0, 1);
    return;
  }
  if (count > RL_MAX_THREADS) count = RL_MAX_THREADS;
  while (pool_size < count) { /* grow lazily; threads live as long as the process */
    pthread_t t;
    pthread_create(&t, NULL, worker_main, (void *)(intptr_t)pool_size);
    pthread_detach(t);
    ++pool_size;
  }
  pthread_mutex_lock(&pool_mu);
  pool_task = task;
  pool_ctx = ctx;
  pool_count = count;
  pool_pending = count - 1;
  ++pool_gen;
  pthread_cond_broadcast(&pool_wake);
  pthread_mutex_unlock(&pool_mu);
  task(ctx, 0, count);
  pthread_mutex_lock(&pool_mu);
  while (pool_pending != 0) pthread_cond_wait(&pool_done, &pool_mu);
  pthread_mutex_unlock(&pool_mu);
}

/* ---- a step over a tensor set ------------------------------------------------------------- */

typedef struct {
  const rl_set *set;
  const rl_config *cfg;
  slice_fn fn;
  float scale;
  double partial[RL_MAX_THREADS];
} step_ctx;

/* Worker k of K owns the global element range [T*k/K, T*(k+1)/K), boundaries rounded down to
 * 16 elements (one 64-byte line of fp32). */
static void range_of(const rl_set *s, int k, int K, int64_t *lo, int64_t *hi) {
  const int64_t total = s->offs[s->n];
  *lo = (k == 0) ? 0 : (total * k / K) / 16 * 16;
  *hi = (k + 1 == K) ? total : (total * (k + 1) / K) / 16 * 16;
}

static int first_tensor(const rl_set *s, int64_t global) { /* last t with offs[t] <= global */
  int lo = 0, hi = s->n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (s->offs[mid] <= global) lo = mid; else hi = mid;
  }
  return lo;
}

static void norm_task(void *p, int k, int K) {
  step_ctx *c = (step_ctx *)p;
  const rl_set *s = c->set;
  int64_t lo, hi;
  range_of(s, k, K, &lo, &hi);
  double sum = 0;
  for (int t = first_tensor(s, lo); t < s->n && s->offs[t] < hi; ++t) {
    const int64_t b = lo > s->offs[t] ? lo - s->offs[t] : 0;
    const int64_t e = (hi < s->offs[t + 1] ? hi : s->offs[t + 1]) - s->offs[t];
    if (b < e) sum += sum_squares(s->g[t], b, e);
  }
  c->partial[k] = sum;
}

static void update_task(void *p, int k, int K) {
  step_ctx *c = (step_ctx *)p;
  const rl_set *s = c->set;
  int64_t lo, hi;
  range_of(s, k, K, &lo, &hi);
  for (int t = first_tensor(s, lo); t < s->n && s->offs[t] < hi; ++t) {
    const int64_t b = lo > s->offs[t] ? lo - s->offs[t] : 0;
    const int64_t e = (hi < s->offs[t + 1] ? hi : s->offs[t + 1]) - s->offs[t];
    if (b < e)
      c->fn(s->w[t], s->g[t], s->m ? s->m[t] : NULL, s->avg ? s->avg[t] : NULL, b, e, c->cfg, c->scale);
  }
}

/* One optimizer step over every tensor of the set with `threads` threads. */
void rl_step(const rl_set *s, const rl_config *cfg, int threads) {
  step_ctx c;
  c.set = s;
  c.cfg = cfg;
  c.fn = pick(cfg);
  c.scale = 1.0f;
  if (threads < 1) threads = 1;
  if (cfg->gclip) {
    parallel(threads, norm_task, &c);
    double sum = 0;
    for (int k = 0; k < threads; ++k) sum += c.partial[k];
    const double norm = sqrt(sum);
    c.scale = (float)(cfg->clipnorm * fmin(1.0 / norm, 1.0 / cfg->clipnorm));
  }
  parallel(threads, update_task, &c);
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return 1e9 * (double)ts.tv_sec + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median nanoseconds of `reps` steps timed inside C (no Python, no ctypes). reps <= 4096. */
double rl_time_step(const rl_set *s, const rl_config *cfg, int threads, int reps) {
  static double t[4096];
  if (reps < 1) reps = 1;
  if (reps > 4096) reps = 4096;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_ns();
    rl_step(s, cfg, threads);
    t[r] = now_ns() - t0;
  }
  qsort(t, (size_t)reps, sizeof(double), cmp_double);
  return t[reps / 2];
}

/* ---- STREAM triad: a[i] = b[i] + s * c[i] ------------------------------------------------- */

typedef struct {
  float *a;
  const float *b, *c;
  float s;
  int64_t n;
} triad_ctx;

static void triad_task(void *p, int k, int K) {
  triad_ctx *t = (triad_ctx *)p;
  const int64_t lo = (k == 0) ? 0 : (t->n * k / K) / 16 * 16;
  const int64_t hi = (k + 1 == K) ? t->n : (t->n * (k + 1) / K) / 16 * 16;
  float *restrict a = t->a;
  const float *restrict b = t->b, *restrict c = t->c;
  const float s = t->s;
  for (int64_t i = lo; i < hi; ++i) a[i] = b[i] + s * c[i];
}

void rl_triad(float *a, const float *b, const float *c, float s, int64_t n, int threads) {
  triad_ctx t = {a, b, c, s, n};
  parallel(threads < 1 ? 1 : threads, triad_task, &t);
}
