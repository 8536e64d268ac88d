/*
 * Fused single-pass RMSProp step for CPU tensors, with a plain C ABI (called through ctypes).
 *
 * The rule is rmsprop.spec.step (src/rmsprop/spec.py); per element, in the math type T
 * (float for float32/float16/bfloat16 params, double for float64):
 *
 *   g = grad * gmul                      gmul = (maximize ? -1 : 1) * (1/grad_scale)
 *   coupled wd:   g += wd * p            decoupled wd: p *= 1 - lr*wd
 *   v = alpha*v + (1-alpha)*g*g          m = alpha*m + (1-alpha)*g            (centered)
 *   s = v/c  or  max(v/c - (m/c)^2, 0)   c = 1 - alpha^t (bias correction) or 1
 *   d = sqrt(s + eps_in) + eps_out       (eps_in, eps_out) = (eps, 0) or (0, eps)
 *   n = g/d
 *   momentum: b = mu*b + k*n; u = (nesterov ? mu*b + k*n : b) * post
 *             (k, post) = (lr, 1) if lr_in_momentum else (1, lr)
 *   else      u = lr*n
 *   p -= u
 *
 * Every input is read once and every output written once; 16-bit values are converted to
 * float (in the update loop with float state and no stats: AVX2/F16C intrinsics on the
 * x86-64-v3 build, auto-vectorised bit operations for bfloat16 on the baseline one; through
 * short L1-resident blocks otherwise) and rounded once (round-to-nearest-even) when stored.
 *
 * Layout of this file: it includes itself twice more. The first pass (RMS_PART undefined)
 * holds the ABI and the threading driver; RMS_PART 1 is compiled once per instruction set
 * (baseline x86-64 / any CPU, and x86-64-v3 = AVX2+FMA+F16C, chosen at run time); RMS_PART 2
 * is the arithmetic, compiled once per math type inside each instruction set.
 * Build: cc -O3 -fno-math-errno -fno-trapping-math -fopenmp-simd -pthread -fPIC -shared cpu.c
 * (-fno-math-errno lets sqrt vectorise: without it gcc keeps a scalar call for errno;
 * -fopenmp-simd only enables the `omp simd` loop pragmas, no OpenMP runtime is linked.)
 */

#ifndef RMS_PART
/* ===================================================================================== */
/*                                 ABI and threading driver                              */
/* ===================================================================================== */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RMS_X86 1
#endif

#if defined(_WIN32)
#define RMS_API __declspec(dllexport)
#else
#define RMS_API __attribute__((visibility("default")))
#endif

#define RMS_ABI_VERSION 1
#ifndef RMS_SOURCE_HASH
#define RMS_SOURCE_HASH "unknown"
#endif

/* dtype codes shared with cpu.py */
enum { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3 };
/* flag bits shared with cpu.py */
enum {
    FL_CENTERED = 1, FL_MOMENTUM = 2, FL_WD_COUPLED = 4, FL_NESTEROV = 8, FL_STATS = 16,
    FL_EPS_IN_SQRT = 32, FL_LR_IN_MOMENTUM = 64, FL_DECOUPLED = 128, FL_MAXIMIZE = 256
};
/* hyper[] indices shared with cpu.py */
enum { H_LR = 0, H_ALPHA, H_EPS, H_WD, H_MU, H_C, H_INV_SCALE, H_COUNT };

/* Per-step constants in the math type, each computed the way spec.py computes it. */
typedef struct {
    float lr, alpha, oma, eps, eps_in, eps_out, wd, pdecay, mu, k, post, invc, gmul;
    int nesterov, eps_in_sqrt;
} rms_hyp_f;
typedef struct {
    double lr, alpha, oma, eps, eps_in, eps_out, wd, pdecay, mu, k, post, invc, gmul;
    int nesterov, eps_in_sqrt;
} rms_hyp_d;

static inline float rms_bits2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t rms_f2bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bfloat16 -> float: the top half of a float. */
static inline float rms_bf2f(uint16_t h) { return rms_bits2f((uint32_t)h << 16); }
/* float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t rms_f2bf(float f) {
    uint32_t u = rms_f2bits(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
}
/* float16 -> float, exact (normals, subnormals, inf, NaN). */
static inline float rms_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    float sub = (float)mant * 5.9604644775390625e-8f;          /* mant * 2^-24 */
    uint32_t nrm = ((e + 112u) << 23) | (mant << 13);
    uint32_t inf = 0x7f800000u | (mant << 13);
    uint32_t mag = e == 0x1fu ? inf : nrm;
    float r = e == 0 ? sub : rms_bits2f(mag);
    return rms_bits2f(rms_f2bits(r) | sign);
}
/* float -> float16, round to nearest even, overflow to inf, NaN to quiet NaN. Subnormal
 * results use the FPU's own rounding: adding 0.5 shifts the value so the float's mantissa
 * holds exactly the 10 bits of the half subnormal. */
static inline uint16_t rms_f2h(float f) {
    uint32_t u = rms_f2bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;        /* NaN : inf */
    float shifted = rms_bits2f(a) + 0.5f;
    uint32_t subn = rms_f2bits(shifted) - 0x3f000000u;
    uint32_t odd = (a >> 13) & 1u;
    uint32_t nrm = (a - (112u << 23) + 0xfffu + odd) >> 13;
    uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? subn : nrm);
    return (uint16_t)(r | sign);
}

typedef void (*rms_seg_fn)(int pdt, int sdt, int spec, int64_t n, char *p, const char *g,
                           char *v, char *m, char *b, const void *hyp, double *acc);
typedef void (*rms_floor_fn)(int psz, int ssz, int64_t n, char *p, const char *g, char *v,
                             char *m, char *b, uint64_t zero);
typedef int (*rms_nonfinite_fn)(int dt, const char *x, int64_t n);

typedef struct {
    rms_seg_fn seg_f, seg_d;
    rms_floor_fn floor;
    rms_nonfinite_fn nonfinite;
    const char *name;
} rms_isa;

static size_t rms_dtsize(int dt) { return dt == DT_F64 ? 8 : dt == DT_F32 ? 4 : 2; }

/* Per-ISA parts. */
#define RMS_PART 1
#define RMS_ISA base
#include "cpu.c"
#undef RMS_ISA

#if defined(RMS_X86) && (defined(__GNUC__) || defined(__clang__))
#define RMS_HAVE_V3 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define RMS_ISA v3
#define RMS_F16C 1
#include "cpu.c"
#undef RMS_F16C
#undef RMS_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#undef RMS_PART

static const rms_isa rms_isa_base = {seg_base_f, seg_base_d, floor_base, nonfinite_base, "x86-64"};
#ifdef RMS_HAVE_V3
static const rms_isa rms_isa_v3 = {seg_v3_f, seg_v3_d, floor_v3, nonfinite_v3, "x86-64-v3"};
#endif
static const rms_isa *rms_active = NULL;

static int rms_cpu_has_v3(void) {
#ifdef RMS_HAVE_V3
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
#else
    return 0;
#endif
}

static const rms_isa *rms_get_isa(void) {
    if (!rms_active) {
#ifdef RMS_HAVE_V3
        rms_active = rms_cpu_has_v3() ? &rms_isa_v3 : &rms_isa_base;
#else
        rms_active = &rms_isa_base;
#endif
    }
    return rms_active;
}

/* ---------------------------------- introspection ---------------------------------- */
RMS_API int rms_abi_version(void) { return RMS_ABI_VERSION; }
RMS_API const char *rms_source_hash(void) { return RMS_SOURCE_HASH; }
RMS_API const char *rms_isa_name(void) { return rms_get_isa()->name; }
static int rms_parallel_impl(void);
/* 1 if steps can run on several threads (the pthread pool), 0 if always single-threaded. */
RMS_API int rms_parallel(void) { return rms_parallel_impl(); }
/* 0: best available, 1: force baseline, 2: force x86-64-v3. Returns 0 if unavailable. */
RMS_API int rms_set_isa(int which) {
    if (which == 1) { rms_active = &rms_isa_base; return 1; }
#ifdef RMS_HAVE_V3
    if (which == 2) { if (!rms_cpu_has_v3()) return 0; rms_active = &rms_isa_v3; return 1; }
#endif
    if (which == 0) { rms_active = NULL; rms_get_isa(); return 1; }
    return 0;
}

/* ------------------------------- thread pool --------------------------------------- */
/* A small pool instead of OpenMP. Work is cut into chunks that threads claim from one atomic
 * counter; the calling thread works too and, when the chunks run out, waits only for chunks
 * other threads have already claimed. A helper that is not running (a busy neighbour on a
 * small shared machine, or a forked child where helpers do not exist) therefore never holds
 * up a step: at worst the caller does everything, at single-thread speed. An OpenMP region
 * instead waits at its closing barrier for every thread to be scheduled, which costs whole
 * scheduler quanta (~8 ms) per step when cores are shared. Also: no OpenMP runtime to link,
 * so no clash with the one torch bundles. */
typedef void (*rms_chunk_fn)(void *ctx, int64_t chunk);

#if !defined(_WIN32)
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#define RMS_POOL 1
#define RMS_MAX_WORKERS 255
/* claim word: generation (24 bits) | chunk count (20 bits) | next chunk (20 bits) */
#define CL_GEN(w) ((w) >> 40)
#define CL_N(w) (((w) >> 20) & 0xfffffu)
#define CL_I(w) ((w) & 0xfffffu)
#define RMS_MAX_CHUNKS 0xfffffu

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one parallel call at a time */
static int pool_nworkers = 0;
static _Atomic uint64_t pool_gen = 0;
static _Atomic uint64_t pool_claim = 0;
static _Atomic int64_t pool_done = 0;
static rms_chunk_fn _Atomic pool_fn = NULL;
static void *_Atomic pool_ctx = NULL;
static _Atomic int pool_max_workers = 0;
static int pool_atfork_set = 0;

/* Claim and run chunks of generation gen until none are left. Returns how many it ran. */
static int64_t pool_drain(uint64_t gen, int count_done) {
    int64_t ran = 0;
    for (;;) {
        uint64_t cur = atomic_load(&pool_claim);
        if (CL_GEN(cur) != (gen & 0xffffffu) || CL_I(cur) >= CL_N(cur)) break;
        if (!atomic_compare_exchange_weak(&pool_claim, &cur, cur + 1)) continue;
        /* A claimed chunk pins the job: its caller waits for it, so fn and ctx are current. */
        atomic_load(&pool_fn)(atomic_load(&pool_ctx), (int64_t)CL_I(cur));
        ran++;
        if (count_done) atomic_fetch_add(&pool_done, 1);
    }
    return ran;
}

static void *pool_worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool_gen);
    for (;;) {
        uint64_t g = atomic_load(&pool_gen);
        if (g == seen) { /* spin briefly (back-to-back steps), then sleep */
            for (int k = 0; k < 2000 && (g = atomic_load(&pool_gen)) == seen; k++) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            }
            if (g == seen) {
                pthread_mutex_lock(&pool_mu);
                while ((g = atomic_load(&pool_gen)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
                pthread_mutex_unlock(&pool_mu);
            }
        }
        seen = g;
        if (id < atomic_load(&pool_max_workers)) pool_drain(seen, 1);
    }
    return NULL;
}

static void pool_atfork_child(void) {
    /* helpers do not exist in a forked child; the caller does all the work until new ones
     * are started on demand */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pool_nworkers = 0;
}

static int pool_ensure(int nworkers) {
    if (!pool_atfork_set) {
        pthread_atfork(NULL, NULL, pool_atfork_child);
        pool_atfork_set = 1;
    }
    if (nworkers > RMS_MAX_WORKERS) nworkers = RMS_MAX_WORKERS;
    while (pool_nworkers < nworkers) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20);
        int rc = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)pool_nworkers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_nworkers++;
    }
    return pool_nworkers;
}
#endif

/* Run fn(ctx, c) for c in [0, nchunks) on up to nthreads threads (the caller included). */
static void pool_run(rms_chunk_fn fn, void *ctx, int64_t nchunks, int nthreads) {
#ifdef RMS_POOL
    if (nthreads > 1 && nchunks > 1 && nchunks <= (int64_t)RMS_MAX_CHUNKS &&
        pthread_mutex_trylock(&call_mu) == 0) {
        int helpers = pool_ensure(nthreads - 1);
        if (helpers > nthreads - 1) helpers = nthreads - 1;
        if (helpers > 0) {
            atomic_store(&pool_fn, fn);
            atomic_store(&pool_ctx, ctx);
            atomic_store(&pool_max_workers, helpers);
            atomic_store(&pool_done, 0);
            pthread_mutex_lock(&pool_mu);
            uint64_t gen = atomic_load(&pool_gen) + 1;
            atomic_store(&pool_claim, ((gen & 0xffffffu) << 40) | ((uint64_t)nchunks << 20));
            atomic_store(&pool_gen, gen);
            pthread_cond_broadcast(&pool_cv);
            pthread_mutex_unlock(&pool_mu);
            int64_t mine = pool_drain(gen, 0);
            while (mine + atomic_load(&pool_done) < nchunks) sched_yield();
            pthread_mutex_unlock(&call_mu);
            return;
        }
        pthread_mutex_unlock(&call_mu);
    }
#else
    (void)nthreads;
#endif
    for (int64_t c = 0; c < nchunks; c++) fn(ctx, c);
}

#ifdef RMS_POOL
static pthread_mutex_t stats_mu = PTHREAD_MUTEX_INITIALIZER;
#define STATS_LOCK() pthread_mutex_lock(&stats_mu)
#define STATS_UNLOCK() pthread_mutex_unlock(&stats_mu)
#else
#define STATS_LOCK()
#define STATS_UNLOCK()
#endif

/* ------------------------------- work partition ------------------------------------- */
/* Below this many elements in total a step runs on one thread (waking a second thread costs
 * more than it saves); above it, the concatenated range of all tensors is cut into chunks of
 * at least RMS_CHUNK elements, claimed dynamically by the pool's threads. */
#define RMS_SERIAL_BELOW 131072
#define RMS_CHUNK 65536

static void stats_init(double *row) {
    row[0] = row[1] = row[2] = 0.0; row[3] = INFINITY; row[4] = -INFINITY; row[5] = 0.0;
}
static void stats_merge(double *row, const double *acc) {
    row[0] += acc[0]; row[1] += acc[1]; row[2] += acc[2];
    if (acc[3] < row[3]) row[3] = acc[3];
    if (acc[4] > row[4]) row[4] = acc[4];
    row[5] += acc[5];
}

/* Index of the tensor containing global element e: last t with prefix[t] <= e. */
static int64_t find_tensor(const int64_t *prefix, int64_t nt, int64_t e) {
    int64_t lo = 0, hi = nt; /* prefix[lo] <= e < prefix[hi] */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (prefix[mid] <= e) lo = mid; else hi = mid;
    }
    return lo;
}

typedef struct {
    int kind; /* 0 step, 1 floor */
    int pdt, sdt, spec;
    int psz, ssz;
    rms_seg_fn seg;
    rms_floor_fn floor;
    const void *hyp;
    double *stats;
    uint64_t zero;
} rms_job;

typedef struct {
    const rms_job *J;
    int64_t nt, total, chunk;
    const int64_t *prefix;
    void *const *P, *const *G, *const *V, *const *M, *const *B;
} rms_ctx;

static void run_segment(const rms_job *J, int64_t t, int64_t off, int64_t len, void *const *P,
                        void *const *G, void *const *V, void *const *M, void *const *B,
                        double *acc) {
    size_t ps = (size_t)J->psz, ss = (size_t)J->ssz;
    char *p = (char *)P[t] + off * ps;
    const char *g = (const char *)G[t] + off * ps;
    char *v = (char *)V[t] + off * ss;
    char *m = M ? (char *)M[t] + off * ss : NULL;
    char *b = B ? (char *)B[t] + off * ss : NULL;
    if (J->kind == 0) J->seg(J->pdt, J->sdt, J->spec, len, p, g, v, m, b, J->hyp, acc);
    else J->floor(J->psz, J->ssz, len, p, g, v, m, b, J->zero);
}

static void job_chunk(void *vctx, int64_t c) {
    const rms_ctx *X = (const rms_ctx *)vctx;
    const int64_t *prefix = X->prefix;
    int64_t lo = c * X->chunk, hi = lo + X->chunk;
    if (hi > X->total) hi = X->total;
    int64_t t = find_tensor(prefix, X->nt, lo);
    while (lo < hi) {
        while (prefix[t + 1] <= lo) t++; /* skip empty tensors */
        int64_t end = prefix[t + 1] < hi ? prefix[t + 1] : hi;
        double acc[6] = {0, 0, 0, INFINITY, -INFINITY, 0};
        run_segment(X->J, t, lo - prefix[t], end - lo, X->P, X->G, X->V, X->M, X->B, acc);
        if (X->J->stats) {
            STATS_LOCK();
            stats_merge(X->J->stats + 6 * t, acc);
            STATS_UNLOCK();
        }
        lo = end;
    }
}

static int64_t chunk_size(int64_t total) {
    int64_t ch = RMS_CHUNK;
    while ((total + ch - 1) / ch > 0xfffff) ch *= 2;
    return ch;
}

static int run_job(const rms_job *J, int64_t nt, const int64_t *numel, void *const *P,
                   void *const *G, void *const *V, void *const *M, void *const *B, int nthreads) {
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) {
        if (numel[t] < 0) return -3;
        total += numel[t];
    }
    if (J->stats)
        for (int64_t t = 0; t < nt; t++) stats_init(J->stats + 6 * t);
    if (total == 0) return 0;
    if (nthreads <= 1 || total < RMS_SERIAL_BELOW) {
        for (int64_t t = 0; t < nt; t++) {
            if (numel[t] == 0) continue;
            double acc[6] = {0, 0, 0, INFINITY, -INFINITY, 0};
            run_segment(J, t, 0, numel[t], P, G, V, M, B, acc);
            if (J->stats) stats_merge(J->stats + 6 * t, acc);
        }
        return 0;
    }
    int64_t *prefix = (int64_t *)malloc((size_t)(nt + 1) * sizeof(int64_t));
    if (!prefix) return -4;
    prefix[0] = 0;
    for (int64_t t = 0; t < nt; t++) prefix[t + 1] = prefix[t] + numel[t];
    rms_ctx X = {J, nt, total, chunk_size(total), prefix, P, G, V, M, B};
    int64_t nchunks = (total + X.chunk - 1) / X.chunk;
    pool_run(job_chunk, &X, nchunks, nthreads);
    free(prefix);
    return 0;
}

static void make_hyp_f(const double *h, int flags, rms_hyp_f *o) {
    float lr = (float)h[H_LR], alpha = (float)h[H_ALPHA], eps = (float)h[H_EPS];
    float wd = (float)h[H_WD], mu = (float)h[H_MU], c = (float)h[H_C];
    int lim = (flags & FL_LR_IN_MOMENTUM) != 0, eis = (flags & FL_EPS_IN_SQRT) != 0;
    o->lr = lr; o->alpha = alpha; o->oma = 1.0f - alpha; o->eps = eps;
    o->eps_in = eis ? eps : 0.0f; o->eps_out = eis ? 0.0f : eps;
    o->wd = wd; o->pdecay = (flags & FL_DECOUPLED) && wd != 0.0f ? 1.0f - lr * wd : 1.0f;
    o->mu = mu; o->k = lim ? lr : 1.0f; o->post = lim ? 1.0f : lr;
    o->invc = 1.0f / c;
    o->gmul = (float)h[H_INV_SCALE] * ((flags & FL_MAXIMIZE) ? -1.0f : 1.0f);
    o->nesterov = (flags & FL_NESTEROV) != 0; o->eps_in_sqrt = eis;
}
static void make_hyp_d(const double *h, int flags, rms_hyp_d *o) {
    double lr = h[H_LR], alpha = h[H_ALPHA], eps = h[H_EPS], wd = h[H_WD], mu = h[H_MU];
    int lim = (flags & FL_LR_IN_MOMENTUM) != 0, eis = (flags & FL_EPS_IN_SQRT) != 0;
    o->lr = lr; o->alpha = alpha; o->oma = 1.0 - alpha; o->eps = eps;
    o->eps_in = eis ? eps : 0.0; o->eps_out = eis ? 0.0 : eps;
    o->wd = wd; o->pdecay = (flags & FL_DECOUPLED) && wd != 0.0 ? 1.0 - lr * wd : 1.0;
    o->mu = mu; o->k = lim ? lr : 1.0; o->post = lim ? 1.0 : lr;
    o->invc = 1.0 / h[H_C];
    o->gmul = h[H_INV_SCALE] * ((flags & FL_MAXIMIZE) ? -1.0 : 1.0);
    o->nesterov = (flags & FL_NESTEROV) != 0; o->eps_in_sqrt = eis;
}

/* One fused RMSProp step over nt tensors. P, G, V (and M if centered, B if momentum) are
 * tables of data pointers; numel[t] elements each. pdt: param/grad dtype; sdt: state dtype
 * (== pdt, or DT_F32). hyper: see H_*; flags: see FL_*. stats: NULL or nt x 6 doubles,
 * overwritten with this step's sum(g^2), sum(u^2), sum(p^2), min(lr/d), max(lr/d),
 * count(eps dominates d). Returns 0, or < 0 for an unsupported dtype combination. */
RMS_API int rms_fused_step(int64_t nt, const int64_t *numel, void *const *P, void *const *G,
                           void *const *V, void *const *M, void *const *B, int pdt, int sdt,
                           const double *hyper, int flags, double *stats, int nthreads) {
    if (pdt < 0 || pdt > 3 || !(sdt == pdt || sdt == DT_F32)) return -1;
    if ((flags & FL_CENTERED) && !M) return -2;
    if ((flags & FL_MOMENTUM) && !B) return -2;
    const rms_isa *isa = rms_get_isa();
    rms_hyp_f hf;
    rms_hyp_d hd;
    rms_job J;
    memset(&J, 0, sizeof J);
    J.kind = 0; J.pdt = pdt; J.sdt = sdt;
    J.psz = (int)rms_dtsize(pdt); J.ssz = (int)rms_dtsize(sdt);
    J.spec = ((flags & FL_CENTERED) ? 1 : 0) | ((flags & FL_MOMENTUM) ? 2 : 0) |
             ((flags & FL_WD_COUPLED) ? 4 : 0) | (stats ? 8 : 0);
    J.stats = stats;
    if (pdt == DT_F64) { make_hyp_d(hyper, flags, &hd); J.hyp = &hd; J.seg = isa->seg_d; }
    else { make_hyp_f(hyper, flags, &hf); J.hyp = &hf; J.seg = isa->seg_f; }
    return run_job(&J, nt, numel, P, G, V, (flags & FL_CENTERED) ? M : NULL,
                   (flags & FL_MOMENTUM) ? B : NULL, nthreads);
}

/* The bandwidth floor: the same partition, tables and access pattern as rms_fused_step (read
 * p, g, v [, m, b]; write p, v [, m, b] in place) with trivial integer arithmetic that leaves
 * every value unchanged (zero is 0 at run time, which the compiler cannot know). */
RMS_API int rms_floor(int64_t nt, const int64_t *numel, void *const *P, void *const *G,
                      void *const *V, void *const *M, void *const *B, int pdt, int sdt,
                      int nthreads, uint64_t zero) {
    rms_job J;
    memset(&J, 0, sizeof J);
    J.kind = 1; J.psz = (int)rms_dtsize(pdt); J.ssz = (int)rms_dtsize(sdt);
    J.floor = rms_get_isa()->floor; J.zero = zero;
    return run_job(&J, nt, numel, P, G, V, M, B, nthreads);
}

typedef struct {
    const rms_isa *isa;
    const int *dts;
    void *const *X;
    const int64_t *prefix;
    int64_t nt, total, chunk;
    _Atomic int64_t found;
} rms_nf_ctx;

static void nf_chunk(void *vctx, int64_t c) {
    rms_nf_ctx *C = (rms_nf_ctx *)vctx;
    const int64_t *prefix = C->prefix;
    /* Last chunk first: the step that follows starts at the front, which the scan then
     * leaves in the last-level cache, so part of the gradients is not read from DRAM twice
     * (measured ~10% off the scan at 10M). Which tensor is reported does not depend on the
     * order: `found` keeps the lowest index. */
    c = (C->total + C->chunk - 1) / C->chunk - 1 - c;
    int64_t lo = c * C->chunk, hi = lo + C->chunk;
    if (hi > C->total) hi = C->total;
    int64_t t = find_tensor(prefix, C->nt, lo);
    while (lo < hi) {
        while (prefix[t + 1] <= lo) t++;
        if (t >= atomic_load(&C->found)) return; /* an earlier tensor already has one */
        int64_t end = prefix[t + 1] < hi ? prefix[t + 1] : hi;
        size_t es = rms_dtsize(C->dts[t]);
        if (C->isa->nonfinite(C->dts[t], (const char *)C->X[t] + (lo - prefix[t]) * es,
                              end - lo)) {
            int64_t cur = atomic_load(&C->found);
            while (t < cur && !atomic_compare_exchange_weak(&C->found, &cur, t)) {
            }
            return;
        }
        lo = end;
    }
}

/* Index of the first tensor holding an inf or NaN, or -1. dts: per-tensor dtype codes. */
RMS_API int64_t rms_first_nonfinite(int64_t nt, const int64_t *numel, void *const *X,
                                    const int *dts, int nthreads) {
    const rms_isa *isa = rms_get_isa();
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) total += numel[t];
    if (total < RMS_SERIAL_BELOW || nthreads <= 1) {
        for (int64_t t = 0; t < nt; t++)
            if (numel[t] && isa->nonfinite(dts[t], (const char *)X[t], numel[t])) return t;
        return -1;
    }
    int64_t *prefix = (int64_t *)malloc((size_t)(nt + 1) * sizeof(int64_t));
    if (!prefix) return -4;
    prefix[0] = 0;
    for (int64_t t = 0; t < nt; t++) prefix[t + 1] = prefix[t] + numel[t];
    rms_nf_ctx C;
    C.isa = isa; C.dts = dts; C.X = X; C.prefix = prefix; C.nt = nt; C.total = total;
    C.chunk = chunk_size(total);
    atomic_init(&C.found, nt);
    pool_run(nf_chunk, &C, (total + C.chunk - 1) / C.chunk, nthreads);
    free(prefix);
    int64_t f = atomic_load(&C.found);
    return f == nt ? -1 : f;
}

/* STREAM-style reference kernels over float arrays (bytes counted as STREAM does), on the
 * same pool and chunking as the step. */
typedef struct {
    int64_t n, chunk;
    float *a;
    const float *b, *c;
    float s;
    int triad;
} rms_stream_ctx;

static void stream_chunk(void *vctx, int64_t k) {
    const rms_stream_ctx *S = (const rms_stream_ctx *)vctx;
    int64_t lo = k * S->chunk, hi = lo + S->chunk;
    if (hi > S->n) hi = S->n;
    float *restrict a = S->a;
    const float *restrict b = S->b, *restrict c = S->c;
    const float s = S->s;
    if (S->triad) {
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) a[i] = b[i] + s * c[i];
    } else {
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) a[i] = b[i];
    }
}

static void stream_run(int64_t n, float *a, const float *b, const float *c, float s, int triad,
                       int nthreads) {
    rms_stream_ctx S = {n, chunk_size(n), a, b, c, s, triad};
    int64_t nchunks = (n + S.chunk - 1) / S.chunk;
    pool_run(stream_chunk, &S, nchunks, n < RMS_SERIAL_BELOW ? 1 : nthreads);
}

RMS_API void rms_stream_copy(int64_t n, float *c, const float *a, int nthreads) {
    stream_run(n, c, a, a, 0.0f, 0, nthreads);
}
RMS_API void rms_stream_triad(int64_t n, float *a, const float *b, const float *c, float s,
                              int nthreads) {
    stream_run(n, a, b, c, s, 1, nthreads);
}

static int rms_parallel_impl(void) {
#ifdef RMS_POOL
    return 1;
#else
    return 0;
#endif
}

/* Lets a setuptools-built copy link on platforms whose build_ext exports a module init. */
RMS_API void *PyInit__cpu(void) { return NULL; }

#elif RMS_PART == 1
/* ===================================================================================== */
/*                         Per instruction set: dtype conversion, floor                  */
/* ===================================================================================== */
#define RMS_CAT_(a, b) a##_##b
#define RMS_CAT(a, b) RMS_CAT_(a, b)
#define ISA_NAME(x) RMS_CAT(x, RMS_ISA)

/* Block length of the stats partial sums when every stream is in the math type. */
#define RMS_BLK 1024
/* Block length for 16-bit / mixed-precision streams (see TNAME(seg)): short enough that every
 * stream is touched often, long enough to amortise the per-block work. */
#define RMS_CVT_BLK 256

static void ISA_NAME(h2f_block)(const uint16_t *restrict s, float *restrict d, int64_t n) {
    int64_t i = 0;
#ifdef RMS_F16C
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
    for (; i < n; i++) d[i] = rms_h2f(s[i]);
}
static void ISA_NAME(f2h_block)(const float *restrict s, uint16_t *restrict d, int64_t n) {
    int64_t i = 0;
#ifdef RMS_F16C
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = rms_f2h(s[i]);
}
static void ISA_NAME(bf2f_block)(const uint16_t *restrict s, float *restrict d, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = rms_bf2f(s[i]);
}
static void ISA_NAME(f2bf_block)(const float *restrict s, uint16_t *restrict d, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = rms_f2bf(s[i]);
}

/* Math-type parts. */
#undef RMS_PART
#define RMS_PART 2
#define RMS_T float
#define RMS_TN f
#define RMS_TCODE DT_F32
#define RMS_IS_F32 1 /* for #if: RMS_TCODE is an enum, 0 to the preprocessor */
#define RMS_SQRT sqrtf
#define RMS_HYP rms_hyp_f
#include "cpu.c"
#undef RMS_T
#undef RMS_TN
#undef RMS_TCODE
#undef RMS_IS_F32
#undef RMS_SQRT
#undef RMS_HYP
#define RMS_T double
#define RMS_TN d
#define RMS_TCODE DT_F64
#define RMS_IS_F32 0
#define RMS_SQRT sqrt
#define RMS_HYP rms_hyp_d
#include "cpu.c"
#undef RMS_T
#undef RMS_TN
#undef RMS_TCODE
#undef RMS_IS_F32
#undef RMS_SQRT
#undef RMS_HYP
#undef RMS_PART
#define RMS_PART 1

#define RMS_FLOOR_LOOP(PT, ST, HAS_M, HAS_B)                                                 \
    do {                                                                                     \
        PT *restrict p_ = (PT *)p; const PT *restrict g_ = (const PT *)g;                    \
        ST *restrict v_ = (ST *)v; ST *restrict m_ = (ST *)m; ST *restrict b_ = (ST *)b;     \
        PT zp = (PT)zero; ST zs = (ST)zero;                                                  \
        _Pragma("omp simd")                                                                  \
        for (int64_t i = 0; i < n; i++) {                                                    \
            p_[i] = p_[i] + (g_[i] & zp);                                                    \
            v_[i] = v_[i] + zs;                                                              \
            if (HAS_M) m_[i] = m_[i] + zs;                                                   \
            if (HAS_B) b_[i] = b_[i] + zs;                                                   \
        }                                                                                    \
    } while (0)

#define RMS_FLOOR_MB(PT, ST)                                                                 \
    do {                                                                                     \
        if (m && b) RMS_FLOOR_LOOP(PT, ST, 1, 1);                                            \
        else if (m) RMS_FLOOR_LOOP(PT, ST, 1, 0);                                            \
        else if (b) { m = b; RMS_FLOOR_LOOP(PT, ST, 1, 0); }                                 \
        else RMS_FLOOR_LOOP(PT, ST, 0, 0);                                                   \
    } while (0)

static void ISA_NAME(floor)(int psz, int ssz, int64_t n, char *p, const char *g, char *v,
                            char *m, char *b, uint64_t zero) {
    if (psz == 4 && ssz == 4) RMS_FLOOR_MB(uint32_t, uint32_t);
    else if (psz == 8 && ssz == 8) RMS_FLOOR_MB(uint64_t, uint64_t);
    else if (psz == 8 && ssz == 4) RMS_FLOOR_MB(uint64_t, uint32_t);
    else if (psz == 2 && ssz == 4) RMS_FLOOR_MB(uint16_t, uint32_t);
    else if (psz == 2 && ssz == 2) RMS_FLOOR_MB(uint16_t, uint16_t);
}

/* Inf/NaN scan. A value is non-finite iff its exponent bits are all ones, i.e. iff adding
 * one unit of the exponent's lowest bit to its magnitude carries into the sign bit: one and,
 * one add and one or per element, OR-accumulated in the element's own width (full vector
 * lanes) and tested once per round. A single sequential read stream is limited by how many
 * cache lines one core's prefetcher keeps in flight (about 10-15 GB/s per core on the
 * 2-core AMD EPYC dev machine, against ~23 GB/s for the step's five streams), so a segment
 * is cut into RMS_NF_STREAMS equal parts scanned side by side: the prefetcher then tracks
 * that many streams at once, which measured ~1.8x the bandwidth of one stream. A round reads
 * RMS_NF_ROUND bytes of each part, so the early exit costs one branch per 32 KiB. */
#define RMS_NF_STREAMS 8
#define RMS_NF_ROUND 4096

#define RMS_NF_SCAN(U, ABS, LSB, SIGN)                                                       \
    do {                                                                                     \
        const U *u = (const U *)x;                                                           \
        const int64_t bl = RMS_NF_ROUND / (int64_t)sizeof(U);                                \
        const int64_t per = n >= RMS_NF_STREAMS * bl ? n / RMS_NF_STREAMS : 0;               \
        for (int64_t lo = 0; lo < per; lo += bl) {                                           \
            int64_t hi = per - lo < bl ? per : lo + bl;                                      \
            U any = 0;                                                                       \
            _Pragma("omp simd reduction(| : any)")                                           \
            for (int64_t i = lo; i < hi; i++)                                                \
                for (int s = 0; s < RMS_NF_STREAMS; s++)                                     \
                    any |= (U)((U)(u[s * per + i] & (ABS)) + (LSB));                         \
            if (any & (SIGN)) return 1;                                                      \
        }                                                                                    \
        for (int64_t lo = per * RMS_NF_STREAMS; lo < n; lo += bl) { /* short ones, tail */   \
            int64_t hi = n - lo < bl ? n : lo + bl;                                          \
            U any = 0;                                                                       \
            _Pragma("omp simd reduction(| : any)")                                           \
            for (int64_t i = lo; i < hi; i++) any |= (U)((U)(u[i] & (ABS)) + (LSB));         \
            if (any & (SIGN)) return 1;                                                      \
        }                                                                                    \
        return 0;                                                                            \
    } while (0)

static int ISA_NAME(nonfinite)(int dt, const char *x, int64_t n) {
    if (dt == DT_F32) RMS_NF_SCAN(uint32_t, 0x7fffffffu, 0x00800000u, 0x80000000u);
    if (dt == DT_F64)
        RMS_NF_SCAN(uint64_t, 0x7fffffffffffffffull, 0x0010000000000000ull,
                    0x8000000000000000ull);
    if (dt == DT_F16) RMS_NF_SCAN(uint16_t, 0x7fffu, 0x0400u, 0x8000u);
    RMS_NF_SCAN(uint16_t, 0x7fffu, 0x0080u, 0x8000u); /* bfloat16 */
}

#undef ISA_NAME
#undef RMS_CAT
#undef RMS_CAT_

#elif RMS_PART == 2
/* ===================================================================================== */
/*                   Per instruction set and math type: the fused update                 */
/* ===================================================================================== */
#define TN_NAME_(a, b, c) a##_##b##_##c
#define TN_NAME2(a, b, c) TN_NAME_(a, b, c)
#define TNAME(x) TN_NAME2(x, RMS_ISA, RMS_TN)
#define T RMS_T

/* The update for n elements whose streams are all in the math type T. The const int
 * parameters are literals at every call site, so each specialisation is its own vector loop
 * with no per-element branches on options. Options that cost nothing when off are folded
 * into multipliers that are exactly 1 (gmul, pdecay, invc, k/post) or addends that are
 * exactly 0 (eps_in/eps_out). */
static inline __attribute__((always_inline)) void TNAME(core)(
    int64_t n, void *restrict pv, const void *restrict gv, T *restrict v, T *restrict m,
    T *restrict b, const RMS_HYP *h, double *acc, const int CEN, const int MOM, const int WD,
    const int ST, const int BF16) {
    /* p and g are T, or bfloat16 when BF16 (only with T = float) */
    T *restrict p = (T *)pv;
    const T *restrict g = (const T *)gv;
    uint16_t *restrict p16 = (uint16_t *)pv;
    const uint16_t *restrict g16 = (const uint16_t *)gv;
    const T lr = h->lr, alpha = h->alpha, oma = h->oma, eps = h->eps, eps_in = h->eps_in,
            eps_out = h->eps_out, wd = h->wd, pdecay = h->pdecay, mu = h->mu, k = h->k,
            post = h->post, invc = h->invc, gmul = h->gmul;
    const int nest = h->nesterov, eis = h->eps_in_sqrt;
    T sg = 0, su = 0, sp = 0, cnt = 0, mn = (T)INFINITY, mx = -(T)INFINITY;
#pragma omp simd reduction(+ : sg, su, sp, cnt) reduction(min : mn) reduction(max : mx)
    for (int64_t i = 0; i < n; i++) {
        T gi = (BF16 ? (T)rms_bf2f(g16[i]) : g[i]) * gmul;
        T pi = BF16 ? (T)rms_bf2f(p16[i]) : p[i];
        if (WD) gi = gi + wd * pi;
        pi = pi * pdecay;
        T vi = alpha * v[i] + oma * gi * gi;
        v[i] = vi;
        T s;
        if (CEN) {
            T mi = alpha * m[i] + oma * gi;
            m[i] = mi;
            T mc = mi * invc;
            s = vi * invc - mc * mc;
            s = s < 0 ? (T)0 : s; /* keeps NaN: NaN < 0 is false */
        } else {
            s = vi * invc;
        }
        T sq = RMS_SQRT(s + eps_in);
        T d = sq + eps_out;
        T nn = gi / d;
        T u;
        if (MOM) {
            T bi = mu * b[i] + k * nn;
            b[i] = bi;
            T un = mu * bi + k * nn;
            u = (nest ? un : bi) * post;
        } else {
            u = lr * nn;
        }
        pi = pi - u;
        if (BF16) p16[i] = rms_f2bf((float)pi);
        else p[i] = pi;
        if (ST) {
            sg += gi * gi;
            su += u * u;
            sp += pi * pi;
            T r = lr / d;
            mn = r < mn ? r : mn;
            mx = r > mx ? r : mx;
            /* Select the compared value, not the comparison: gcc (12) cannot vectorise a
             * choice between two vector masks on a scalar condition, and that one statement
             * kept every stats loop scalar (4-5x slower). */
            T dom = eis ? s : sq;
            cnt += eps > dom ? (T)1 : (T)0;
        }
    }
    if (ST) {
        acc[0] += (double)sg; acc[1] += (double)su; acc[2] += (double)sp;
        if ((double)mn < acc[3]) acc[3] = (double)mn;
        if ((double)mx > acc[4]) acc[4] = (double)mx;
        acc[5] += (double)cnt;
    }
}

static void TNAME(load)(int dt, const char *src, int64_t n, T *restrict dst) {
    if (dt == DT_F32) {
        const float *s = (const float *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (T)s[i];
    } else if (dt == DT_F64) {
        const double *s = (const double *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (T)s[i];
    } else {
        float tmp[RMS_CVT_BLK];
        float *f = sizeof(T) == sizeof(float) ? (float *)(void *)dst : tmp;
        if (dt == DT_F16) ISA_NAME(h2f_block)((const uint16_t *)src, f, n);
        else ISA_NAME(bf2f_block)((const uint16_t *)src, f, n);
        if (f != (float *)(void *)dst)
            for (int64_t i = 0; i < n; i++) dst[i] = (T)f[i];
    }
}

static void TNAME(store)(int dt, char *dstc, int64_t n, const T *restrict src) {
    if (dt == DT_F32) {
        float *d = (float *)dstc;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (float)src[i];
    } else if (dt == DT_F64) {
        double *d = (double *)dstc;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (double)src[i];
    } else {
        float tmp[RMS_CVT_BLK];
        const float *f = (const float *)(const void *)src;
        if (sizeof(T) != sizeof(float)) {
            for (int64_t i = 0; i < n; i++) tmp[i] = (float)src[i];
            f = tmp;
        }
        if (dt == DT_F16) ISA_NAME(f2h_block)(f, (uint16_t *)dstc, n);
        else ISA_NAME(f2bf_block)(f, (uint16_t *)dstc, n);
    }
}

#define RMS_CORE_CASE(S, BF)                                                                 \
    case S:                                                                                  \
        TNAME(core)(n, p, g, v, m, b, h, acc, (S)&1, ((S) >> 1) & 1, ((S) >> 2) & 1,         \
                    ((S) >> 3) & 1, BF);                                                     \
        break;
#define RMS_CORE_CASES(BF)                                                                   \
    RMS_CORE_CASE(0, BF) RMS_CORE_CASE(1, BF) RMS_CORE_CASE(2, BF) RMS_CORE_CASE(3, BF)      \
    RMS_CORE_CASE(4, BF) RMS_CORE_CASE(5, BF) RMS_CORE_CASE(6, BF) RMS_CORE_CASE(7, BF)      \
    RMS_CORE_CASE(8, BF) RMS_CORE_CASE(9, BF) RMS_CORE_CASE(10, BF) RMS_CORE_CASE(11, BF)    \
    RMS_CORE_CASE(12, BF) RMS_CORE_CASE(13, BF) RMS_CORE_CASE(14, BF) RMS_CORE_CASE(15, BF)

static void TNAME(dispatch)(int spec, int64_t n, void *p, const void *g, T *v, T *m, T *b,
                            const RMS_HYP *h, double *acc) {
    switch (spec) {
        RMS_CORE_CASES(0)
    default: break;
    }
}

#if RMS_IS_F32
/* bfloat16 params and gradients, float state, no stats: bfloat16 <-> float is integer work
 * that vectorises inside the update loop itself, so every stream advances together as in the
 * float32 step (measured 15-20% faster at 10M than converting through buffers). Used by the
 * baseline build, and for the last n % 16 elements on x86-64-v3 (dispatch16 does the rest).
 * float16 on the baseline build keeps the buffers: gcc 12 does not vectorise its
 * conversions. The stats variants (opt-in) keep the buffers too: each auto-vectorised
 * specialisation adds ~0.4 s to the build, which is paid at install or on first use. */
static void TNAME(dispatch_bf16)(int spec, int64_t n, void *p, const void *g, T *v, T *m,
                                 T *b, const RMS_HYP *h, double *acc) {
    switch (spec) {
        RMS_CORE_CASE(0, 1) RMS_CORE_CASE(1, 1) RMS_CORE_CASE(2, 1) RMS_CORE_CASE(3, 1)
        RMS_CORE_CASE(4, 1) RMS_CORE_CASE(5, 1) RMS_CORE_CASE(6, 1) RMS_CORE_CASE(7, 1)
    default: break;
    }
}
#endif
#undef RMS_CORE_CASES
#undef RMS_CORE_CASE

#if RMS_IS_F32 && defined(RMS_F16C)
/* float16 / bfloat16 params and gradients with float state, no stats, on the x86-64-v3
 * build: the update written with AVX2/F16C intrinsics, 16 elements per iteration, the 16-bit
 * values converted in registers (vcvtph2ps / vcvtps2ph for float16; a byte shuffle and an
 * integer rounding for bfloat16). gcc 12 does not vectorise `_Float16` conversions, so float16
 * went through L1 buffers, and its auto-vectorised bfloat16 loop (dispatch_bf16, still used
 * by the baseline build) spends twice the instructions on packing and rounding: with the
 * divider already busy with sqrt and div, either ran at ~2x the time per element of the
 * float32 step in cache, and ~59% of the bandwidth floor at 10M. The operations are those of
 * TNAME(core), in the same order, each separately rounded (no FMA), so the results are
 * bit-identical to the baseline build and to the stats path (which keeps the buffers). */
/* 8 floats from 8 float16 / bfloat16 values. bfloat16: broadcast-load 16 bytes and
 * byte-shuffle each value into the top half of its lane (one shuffle; a zero-extend plus a
 * shift is two, and shuffle/shift ports are what this loop runs short of on Zen 3). */
static inline __attribute__((always_inline)) __m256 TNAME(ld16)(const uint16_t *s,
                                                               const int F16) {
    __m128i x = _mm_loadu_si128((const __m128i *)(const void *)s);
    if (F16) return _mm256_cvtph_ps(x);
    const __m256i sh = _mm256_setr_epi8(-128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5,
                                        -128, -128, 6, 7, -128, -128, 8, 9, -128, -128, 10, 11,
                                        -128, -128, 12, 13, -128, -128, 14, 15);
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(x), sh));
}

/* bfloat16 round to nearest even as rms_f2bf for non-NaN x, left in the top half of each
 * 32-bit lane: add 0x7fff plus the kept value's lowest bit (subtracting the all-ones
 * compare mask saves a shift). */
static inline __attribute__((always_inline)) __m256i TNAME(bfround)(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    const __m256i bit16 = _mm256_set1_epi32(0x10000);
    __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(u, bit16), bit16);
    return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
}
/* NaN lanes of x: its top half with the quiet bit set (as rms_f2bf); others from r. */
static inline __attribute__((always_inline)) __m256i TNAME(bfnan)(__m256i r, __m256 x) {
    __m256i q = _mm256_or_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x400000));
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q), nan));
}

/* Round and store 16 values (a: the first 8, b: the next 8). The bfloat16 rounding matches
 * rms_f2bf for all 2^32 inputs (checked exhaustively); NaN lanes take a branch that is
 * predicted not taken. */
static inline __attribute__((always_inline)) void TNAME(st16)(uint16_t *d, __m256 a, __m256 b,
                                                             const int F16) {
    if (F16) {
        _mm_storeu_si128((__m128i *)(void *)d, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(void *)(d + 8),
                         _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    __m256i ra = TNAME(bfround)(a), rb = TNAME(bfround)(b);
    __m256 anynan = _mm256_cmp_ps(a, b, _CMP_UNORD_Q); /* lane: a or b is NaN */
    if (__builtin_expect(!_mm256_testz_ps(anynan, anynan), 0)) {
        ra = TNAME(bfnan)(ra, a);
        rb = TNAME(bfnan)(rb, b);
    }
    /* top halves of a to bytes 0-7 of each 128-bit lane, of b to bytes 8-15; then the
     * middle two 64-bit quarters swap places */
    const __m256i sa = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -128, -128, -128, -128, -128,
                                        -128, -128, -128, 2, 3, 6, 7, 10, 11, 14, 15, -128,
                                        -128, -128, -128, -128, -128, -128, -128);
    const __m256i sb = _mm256_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, 2, 3, 6,
                                        7, 10, 11, 14, 15, -128, -128, -128, -128, -128, -128,
                                        -128, -128, 2, 3, 6, 7, 10, 11, 14, 15);
    __m256i x = _mm256_or_si256(_mm256_shuffle_epi8(ra, sa), _mm256_shuffle_epi8(rb, sb));
    _mm256_storeu_si256((__m256i *)(void *)d, _mm256_permute4x64_epi64(x, 0xd8));
}

typedef struct {
    __m256 lr, alpha, oma, eps_in, eps_out, wd, pdecay, mu, k, post, invc, gmul, zero;
} TNAME(vhyp);

/* The new parameter value for elements i..i+7 (state written back). */
static inline __attribute__((always_inline)) __m256 TNAME(upd8)(
    int64_t i, const uint16_t *restrict p, const uint16_t *restrict g, float *restrict v,
    float *restrict m, float *restrict b, const TNAME(vhyp) *c, int nest, const int CEN,
    const int MOM, const int WD, const int F16, const int ONE) {
    __m256 gi = TNAME(ld16)(g + i, F16);
    if (!ONE) gi = _mm256_mul_ps(gi, c->gmul);
    __m256 pi = TNAME(ld16)(p + i, F16);
    if (WD) gi = _mm256_add_ps(gi, _mm256_mul_ps(c->wd, pi));
    if (!ONE) pi = _mm256_mul_ps(pi, c->pdecay);
    __m256 vi = _mm256_add_ps(_mm256_mul_ps(c->alpha, _mm256_loadu_ps(v + i)),
                              _mm256_mul_ps(_mm256_mul_ps(c->oma, gi), gi));
    _mm256_storeu_ps(v + i, vi);
    __m256 s;
    if (CEN) {
        __m256 mi = _mm256_add_ps(_mm256_mul_ps(c->alpha, _mm256_loadu_ps(m + i)),
                                  _mm256_mul_ps(c->oma, gi));
        _mm256_storeu_ps(m + i, mi);
        __m256 mc = _mm256_mul_ps(mi, c->invc);
        s = _mm256_sub_ps(_mm256_mul_ps(vi, c->invc), _mm256_mul_ps(mc, mc));
        s = _mm256_max_ps(c->zero, s); /* (0 > s) ? 0 : s: NaN stays NaN, as in core */
    } else {
        s = _mm256_mul_ps(vi, c->invc);
    }
    __m256 d = _mm256_add_ps(_mm256_sqrt_ps(_mm256_add_ps(s, c->eps_in)), c->eps_out);
    __m256 nn = _mm256_div_ps(gi, d);
    __m256 u;
    if (MOM) {
        __m256 kn = _mm256_mul_ps(c->k, nn);
        __m256 bi = _mm256_add_ps(_mm256_mul_ps(c->mu, _mm256_loadu_ps(b + i)), kn);
        _mm256_storeu_ps(b + i, bi);
        __m256 un = _mm256_add_ps(_mm256_mul_ps(c->mu, bi), kn);
        u = _mm256_mul_ps(nest ? un : bi, c->post);
    } else {
        u = _mm256_mul_ps(c->lr, nn);
    }
    return _mm256_sub_ps(pi, u);
}

/* Software prefetch RMS_PF16 elements ahead, one cache line of each 16-bit stream and two
 * of each float stream per 32 elements: the hardware prefetchers alone left the loop waiting
 * on memory (measured 3-10% faster at 10M with it, on the 2-core EPYC dev machine).
 * Addresses are formed as integers since they may point past the end (a prefetch never
 * faults). */
#define RMS_PF16 1024
static inline __attribute__((always_inline)) void TNAME(pf)(const void *base, int64_t byte) {
    _mm_prefetch((const char *)(uintptr_t)((uintptr_t)base + (uintptr_t)byte), _MM_HINT_T0);
}

static inline __attribute__((always_inline)) void TNAME(pf16)(
    int64_t i, const uint16_t *p, const uint16_t *g, const float *v, const float *m,
    const float *b, const int CEN, const int MOM) {
    const int64_t j = i + RMS_PF16;
    TNAME(pf)(g, 2 * j);
    TNAME(pf)(p, 2 * j);
    TNAME(pf)(v, 4 * j);
    TNAME(pf)(v, 4 * j + 64);
    if (CEN) { TNAME(pf)(m, 4 * j); TNAME(pf)(m, 4 * j + 64); }
    if (MOM) { TNAME(pf)(b, 4 * j); TNAME(pf)(b, 4 * j + 64); }
}

static inline __attribute__((always_inline)) void TNAME(core16)(
    int64_t n, uint16_t *restrict p, const uint16_t *restrict g, float *restrict v,
    float *restrict m, float *restrict b, const rms_hyp_f *h, const int CEN, const int MOM,
    const int WD, const int F16) {
    /* gmul and pdecay are exactly 1 unless maximize, a gradient scale or decoupled weight
     * decay is set; x * 1 == x bit for bit (a signalling NaN comes out quiet either way,
     * from the next operation), so the common case skips two multiplies per element. */
    const int one = h->gmul == 1.0f && h->pdecay == 1.0f;
    const TNAME(vhyp) c = {
        _mm256_set1_ps(h->lr),     _mm256_set1_ps(h->alpha),  _mm256_set1_ps(h->oma),
        _mm256_set1_ps(h->eps_in), _mm256_set1_ps(h->eps_out), _mm256_set1_ps(h->wd),
        _mm256_set1_ps(h->pdecay), _mm256_set1_ps(h->mu),     _mm256_set1_ps(h->k),
        _mm256_set1_ps(h->post),   _mm256_set1_ps(h->invc),   _mm256_set1_ps(h->gmul),
        _mm256_setzero_ps()};
    const int nest = h->nesterov;
    if (one) {
        for (int64_t i = 0; i + 16 <= n; i += 16) {
            if ((i & 31) == 0) TNAME(pf16)(i, p, g, v, m, b, CEN, MOM);
            __m256 a = TNAME(upd8)(i, p, g, v, m, b, &c, nest, CEN, MOM, WD, F16, 1);
            __m256 z = TNAME(upd8)(i + 8, p, g, v, m, b, &c, nest, CEN, MOM, WD, F16, 1);
            TNAME(st16)(p + i, a, z, F16);
        }
    } else {
        for (int64_t i = 0; i + 16 <= n; i += 16) {
            if ((i & 31) == 0) TNAME(pf16)(i, p, g, v, m, b, CEN, MOM);
            __m256 a = TNAME(upd8)(i, p, g, v, m, b, &c, nest, CEN, MOM, WD, F16, 0);
            __m256 z = TNAME(upd8)(i + 8, p, g, v, m, b, &c, nest, CEN, MOM, WD, F16, 0);
            TNAME(st16)(p + i, a, z, F16);
        }
    }
}

#define RMS_C16_CASE(S, F)                                                                   \
    case S:                                                                                  \
        TNAME(core16)(n, p, g, v, m, b, h, (S)&1, ((S) >> 1) & 1, ((S) >> 2) & 1, F);        \
        break;
#define RMS_C16_CASES(F)                                                                     \
    RMS_C16_CASE(0, F) RMS_C16_CASE(1, F) RMS_C16_CASE(2, F) RMS_C16_CASE(3, F)              \
    RMS_C16_CASE(4, F) RMS_C16_CASE(5, F) RMS_C16_CASE(6, F) RMS_C16_CASE(7, F)
/* The first n & ~15 elements; the caller does the rest. */
static void TNAME(dispatch16)(int spec, int f16, int64_t n, uint16_t *p, const uint16_t *g,
                              float *v, float *m, float *b, const rms_hyp_f *h) {
    if (f16) {
        switch (spec) { RMS_C16_CASES(1) default: break; }
    } else {
        switch (spec) { RMS_C16_CASES(0) default: break; }
    }
}
#undef RMS_C16_CASES
#undef RMS_C16_CASE
#endif

/* A contiguous run of n elements of one tensor. Streams already in T are used in place;
 * 16-bit params with float state and no stats are converted inside the update loop
 * (dispatch16 on x86-64-v3, then dispatch_bf16 for bfloat16 on the baseline build and for
 * the tail); other streams (float16 on the baseline build or with stats, 16-bit state,
 * float32 state under float64 params) go through L1-resident buffers in short blocks
 * (RMS_CVT_BLK): the passes over a block touch one stream at a time, and a stream left alone
 * for long lets its hardware prefetcher fall behind, so with 1024-element blocks the 16-bit
 * step paid memory latency and compute one after the other (~50% of the bandwidth floor;
 * ~70% at 256). With stats on, blocks also bound the length of the T-precision partial
 * sums. */
static void TNAME(seg)(int pdt, int sdt, int spec, int64_t n, char *p, const char *g, char *v,
                       char *m, char *b, const void *hyp, double *acc) {
    const RMS_HYP *h = (const RMS_HYP *)hyp;
    int cen = spec & 1, mom = (spec >> 1) & 1, st = (spec >> 3) & 1;
    int pdir = pdt == RMS_TCODE, sdir = sdt == RMS_TCODE;
    if (pdir && sdir && !st) {
        TNAME(dispatch)(spec, n, p, g, (T *)v, (T *)m, (T *)b, h, acc);
        return;
    }
#if RMS_IS_F32 && defined(RMS_F16C)
    if ((pdt == DT_F16 || pdt == DT_BF16) && sdir && !st) {
        int64_t n8 = n & ~(int64_t)15;
        TNAME(dispatch16)(spec, pdt == DT_F16, n8, (uint16_t *)(void *)p,
                          (const uint16_t *)(const void *)g, (T *)(void *)v,
                          cen ? (T *)(void *)m : NULL, mom ? (T *)(void *)b : NULL, h);
        if (n8 == n) return;
        n -= n8; p += 2 * n8; g += 2 * n8; v += 4 * n8; /* the tail, as below */
        if (cen) m += 4 * n8;
        if (mom) b += 4 * n8;
    }
#endif
#if RMS_IS_F32
    if (pdt == DT_BF16 && sdir && !st) {
        TNAME(dispatch_bf16)(spec, n, p, g, (T *)v, (T *)m, (T *)b, h, acc);
        return;
    }
#endif

    size_t ps = rms_dtsize(pdt), ss = rms_dtsize(sdt);
    const int64_t blk = pdir && sdir ? RMS_BLK : RMS_CVT_BLK;
    T bp[RMS_CVT_BLK], bg[RMS_CVT_BLK], bv[RMS_CVT_BLK], bm[RMS_CVT_BLK], bb[RMS_CVT_BLK];
    for (int64_t lo = 0; lo < n; lo += blk) {
        int64_t len = n - lo < blk ? n - lo : blk;
        char *pc = p + lo * ps, *vc = v + lo * ss;
        char *mc = cen ? m + lo * ss : NULL, *bc = mom ? b + lo * ss : NULL;
        const char *gc = g + lo * ps;
        T *pp, *vp, *mp = NULL, *bpp = NULL;
        const T *gp;
        if (pdir) { pp = (T *)pc; gp = (const T *)gc; }
        else { TNAME(load)(pdt, pc, len, bp); TNAME(load)(pdt, gc, len, bg); pp = bp; gp = bg; }
        if (sdir) {
            vp = (T *)vc;
            if (cen) mp = (T *)mc;
            if (mom) bpp = (T *)bc;
        } else {
            TNAME(load)(sdt, vc, len, bv); vp = bv;
            if (cen) { TNAME(load)(sdt, mc, len, bm); mp = bm; }
            if (mom) { TNAME(load)(sdt, bc, len, bb); bpp = bb; }
        }
        TNAME(dispatch)(spec, len, pp, gp, vp, mp, bpp, h, acc);
        if (!pdir) TNAME(store)(pdt, pc, len, bp);
        if (!sdir) {
            TNAME(store)(sdt, vc, len, bv);
            if (cen) TNAME(store)(sdt, mc, len, bm);
            if (mom) TNAME(store)(sdt, bc, len, bb);
        }
    }
}

#undef T
#undef TNAME
#undef TN_NAME2
#undef TN_NAME_
#endif
