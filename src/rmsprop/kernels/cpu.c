/*
 * Fused single-pass RMSProp step for CPU tensors, with a plain C ABI (called through ctypes).
 *
 * The rule is rmsprop.spec.step (src/rmsprop/spec.py); per element, in the math type T
 * (float for float32/float16/bfloat16 params, double for float64):
 *
 *   g = grad * gmul                      gmul = (maximize ? -1 : 1) * (1/grad_scale)
 *   coupled wd:   g += wd * p            decoupled wd: p *= 1 - lr*wd
 *   v = alpha*v + (1-alpha)*g*g          m = lerp(m, g, 1-alpha)              (centered)
 *   s = v/c  or  max(v/c - (m/c)^2, 0)   c = 1 - alpha^t (bias correction) or 1
 *   d = sqrt(s + eps_in) + eps_out       (eps_in, eps_out) = (eps, 0) or (0, eps)
 *   momentum: b = mu*b + k*g/d; u = (nesterov ? mu*b + k*g/d : b) * post
 *             (k, post) = (lr, 1) if lr_in_momentum else (1, lr)
 *   else      u = lr*g/d
 *   p -= u
 *
 * with torch.optim.RMSprop's operations and roundings (cpu_step.h lists them), so that with
 * torch's options the step is torch's, bit for bit, except where torch's own sqrt is not
 * correctly rounded (this kernel's is). Every per-step constant is computed in double and
 * rounded once to T (make_hyp below).
 *
 * Every input is read once and every output written once; 16-bit values are converted to
 * float (in the update loop with float state and no stats: AVX2/F16C intrinsics on the
 * x86-64-v3 build, auto-vectorised bit operations for bfloat16 on the baseline one; through
 * short L1-resident blocks otherwise) and rounded once (round-to-nearest-even) when stored.
 *
 * Layout: this file holds the ABI, the scalar helpers and the threading driver. The
 * arithmetic is generated from two template headers, each included with macros that name
 * what it generates:
 *   cpu_isa.h    once per instruction set (RMS_ISA = base: any x86-64 CPU; v3: AVX2, FMA,
 *                F16C, chosen at run time): block conversions, the floor, the inf/NaN scan,
 *                and cpu_step.h once per math type;
 *   cpu_step.h   once per (instruction set, math type): the state codecs, the update loops
 *                and seg_<isa>_<f|d>, the step over one run of elements (cpu_step16.h: its
 *                AVX2 loop for 16-bit params).
 * Build: cc -O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -fopenmp-simd -pthread
 *        -fPIC -shared cpu.c
 * (-fno-math-errno lets sqrt vectorise: without it gcc keeps a scalar call for errno;
 * -ffp-contract=off keeps every multiply and add rounded on its own except the explicit
 * fused multiply-adds; -fopenmp-simd only enables the `omp simd` loop pragmas, no OpenMP
 * runtime is linked.)
 */

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
/* block-quantized state format codes shared with cpu.py (rmsprop.codecs' names) */
enum { QF_U8 = 4, QF_S8 = 5, QF_U4 = 6, QF_S4 = 7 };
/* elements per scale of the 8-bit formats (the 4-bit ones: half of it): quantized segments
 * start on multiples of it */
#define RMS_QALIGN 256
/* flag bits shared with cpu.py */
enum {
    FL_CENTERED = 1, FL_MOMENTUM = 2, FL_WD_COUPLED = 4, FL_NESTEROV = 8, FL_STATS = 16,
    FL_EPS_IN_SQRT = 32, FL_LR_IN_MOMENTUM = 64, FL_DECOUPLED = 128, FL_MAXIMIZE = 256
};
/* hyper[] indices shared with cpu.py */
enum { H_LR = 0, H_ALPHA, H_EPS, H_WD, H_MU, H_C, H_INV_SCALE, H_COUNT };

/* Per-step constants in the math type T, each the double value of its expression rounded
 * once to T (make_hyp). lerp_w is the weight of the centered average's lerp in torch's
 * form: 1-alpha when |1-alpha| < 0.5 (lerp_small: m + w*(g-m)), else (1-alpha) - 1
 * (g + w*(g-m)). */
#define RMS_HYP_STRUCT(T)                                                                    \
    struct {                                                                                 \
        T lr, alpha, oma, eps, eps_in, eps_out, wd, pdecay, mu, k, post, invc, gmul, lerp_w;  \
        int nesterov, eps_in_sqrt, lerp_small;                                               \
    }
typedef RMS_HYP_STRUCT(float) rms_hyp_f;
typedef RMS_HYP_STRUCT(double) rms_hyp_d;

/* Streams of one segment: element 0 of each, and the block scales of a block-scaled state
 * format (NULL for the float formats, which have none). */
typedef struct {
    char *p;
    const char *g;
    char *v, *m, *b;
    float *vs, *ms, *bs;
} rms_streams;

/* What encoding one block of a block-quantized state needs, once its new values are known
 * (qenc_prep in cpu_step.h): the scale s, the mode (0: s is not > 0, every code 0; 1: the
 * portable codecs; 2: the x86-64-v3 codecs) and their constants: for the signed map the
 * quotient's f = 2^k, s' = s * f in [1, 2) and y = 1 / s' (see cpu_step.h) and ck = RN(K / s)
 * (0 outside 2^-100 <= s <= 2^100), for the unsigned one y = L / sqrt(s). */
typedef struct {
    float s, f, sp, y, ck;
    int mode;
} rms_qenc;

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

typedef void (*rms_seg_fn)(int pdt, int sdt, int spec, int64_t n, const rms_streams *s,
                           const void *hyp, double *acc);
typedef void (*rms_floor_fn)(int psz, int ssz, int64_t n, char *p, const char *g, char *v,
                             char *m, char *b, uint64_t zero);
typedef int (*rms_nonfinite_fn)(int dt, const char *x, int64_t n);
typedef void (*rms_segq_fn)(int pdt, int bits, int spec, int64_t n, const rms_streams *s,
                            const void *hyp, double *acc);

typedef struct {
    rms_seg_fn seg_f, seg_d;
    rms_floor_fn floor;
    rms_nonfinite_fn nonfinite;
    const char *name;
    rms_segq_fn segq_f;
    void (*qcodec)(int fmt, int enc, int64_t n, float *x, uint8_t *codes, float *scales);
} rms_isa;

/* A row of the six statistics (see rms_fused_step): empty, and another one added to it. */
static void stats_init(double *row) {
    row[0] = row[1] = row[2] = 0.0; row[3] = INFINITY; row[4] = -INFINITY; row[5] = 0.0;
}
static void stats_merge(double *row, const double *acc) {
    row[0] += acc[0]; row[1] += acc[1]; row[2] += acc[2];
    if (acc[3] < row[3]) row[3] = acc[3];
    if (acc[4] > row[4]) row[4] = acc[4];
    row[5] += acc[5];
}

static size_t rms_dtsize(int dt) {
    return dt == DT_F64 ? 8 : dt == DT_F32 ? 4 : dt >= QF_U8 ? 1 : 2; /* QF_*: a code byte */
}

/* The s8 decode table S[c] = sign(k) * min(|k|, 127) / 127 (k: c as two's complement),
 * each entry the double ratio rounded once to float, as rmsprop.codecs.signed_table. Filled
 * by the first quantized step, before any thread reads it (same values on every fill). */
static float rms_s8tab[256], rms_s4tab[16];
static void rms_signed_table(float *tab, int bits) {
    const int codes = 1 << bits, kmax = (1 << (bits - 1)) - 1;
    for (int c = 0; c < codes; c++) {
        int k = c > kmax ? c - codes : c;
        int a = k < 0 ? -k : k;
        a = a > kmax ? kmax : a;
        tab[c] = (float)((k < 0 ? -(double)a : (double)a) / (double)kmax);
    }
}
static void rms_init_tables(void) {
    rms_signed_table(rms_s8tab, 8);
    rms_signed_table(rms_s4tab, 4);
}

/* The arithmetic, once per instruction set (see cpu_isa.h). */
#define RMS_ISA base
#include "cpu_isa.h"
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
#include "cpu_isa.h"
#undef RMS_F16C
#undef RMS_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

static const rms_isa rms_isa_base = {seg_base_f, seg_base_d, floor_base, nonfinite_base,
                                      "x86-64", segq_base_f, qcodec_base_f};
#ifdef RMS_HAVE_V3
static const rms_isa rms_isa_v3 = {seg_v3_f, seg_v3_d, floor_v3, nonfinite_v3, "x86-64-v3",
                                    segq_v3_f, qcodec_v3_f};
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
 * other threads have already claimed. A helper that is not running (descheduled because
 * another process holds its core, or absent in a forked child) therefore never holds up a
 * step: at worst the caller does everything, at single-thread speed. An OpenMP region
 * instead waits at its closing barrier for every thread to be scheduled, which costs whole
 * scheduler quanta per step when cores are shared. Also: no OpenMP runtime to link, so no
 * clash with the one torch bundles. */
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
    /* quantized state (kind 0 only): per tensor, the scale tables of v, m, b (VS[t] NULL:
     * tensor t keeps float32 state); segq runs the quantized tensors, qbits 8 or 4. */
    float *const *VS, *const *MS, *const *BS;
    rms_segq_fn segq;
    int qbits;
} rms_job;

typedef struct {
    const rms_job *J;
    int64_t nt, total, chunk;
    const int64_t *prefix;
    void *const *P, *const *G, *const *V, *const *M, *const *B;
    const int64_t *numel; /* when the prefix is padded (quantized state): the real sizes */
} rms_ctx;

static void run_segment(const rms_job *J, int64_t t, int64_t off, int64_t len, void *const *P,
                        void *const *G, void *const *V, void *const *M, void *const *B,
                        double *acc) {
    size_t ps = (size_t)J->psz, ss = (size_t)J->ssz;
    rms_streams S;
    S.p = (char *)P[t] + off * ps;
    S.g = (const char *)G[t] + off * ps;
    S.v = (char *)V[t] + off * ss;
    S.m = M ? (char *)M[t] + off * ss : NULL;
    S.b = B ? (char *)B[t] + off * ss : NULL;
    S.vs = S.ms = S.bs = NULL;
    if (J->VS && J->VS[t]) {
        /* a code byte per element (8 bits) or per two (4 bits), a scale per block of
         * RMS_QALIGN (8 bits) or RMS_QALIGN / 2 elements; off is a multiple of RMS_QALIGN
         * (run_job pads the partition) */
        const int64_t cb = J->qbits == 4 ? off / 2 : off;
        const int64_t sb = J->qbits == 4 ? off / (RMS_QALIGN / 2) : off / RMS_QALIGN;
        S.v = (char *)V[t] + cb;
        S.m = M ? (char *)M[t] + cb : NULL;
        S.b = B ? (char *)B[t] + cb : NULL;
        S.vs = J->VS[t] + sb;
        S.ms = M ? J->MS[t] + sb : NULL;
        S.bs = B ? J->BS[t] + sb : NULL;
        J->segq(J->pdt, J->qbits, J->spec, len, &S, J->hyp, acc);
        return;
    }
    if (J->kind == 0) J->seg(J->pdt, J->sdt, J->spec, len, &S, J->hyp, acc);
    else J->floor(J->psz, J->ssz, len, S.p, S.g, S.v, S.m, S.b, J->zero);
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
        /* a padded tensor's real end (its padding is no element: nothing to run) */
        int64_t stop = X->numel && prefix[t] + X->numel[t] < end ? prefix[t] + X->numel[t] : end;
        if (stop <= lo) { lo = end; continue; }
        double acc[6] = {0, 0, 0, INFINITY, -INFINITY, 0};
        run_segment(X->J, t, lo - prefix[t], stop - lo, X->P, X->G, X->V, X->M, X->B, acc);
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
    /* With quantized state each tensor's range is padded to a multiple of the block in the
     * partition, and chunks are multiples of it too, so every segment of a quantized tensor
     * starts on one of its blocks (and a block never spans two threads). */
    const int pad = J->VS != NULL;
    prefix[0] = 0;
    for (int64_t t = 0; t < nt; t++)
        prefix[t + 1] = prefix[t] +
                        (pad ? (numel[t] + RMS_QALIGN - 1) / RMS_QALIGN * RMS_QALIGN : numel[t]);
    total = prefix[nt];
    rms_ctx X = {J, nt, total, chunk_size(total), prefix, P, G, V, M, B, pad ? numel : NULL};
    int64_t nchunks = (total + X.chunk - 1) / X.chunk;
    pool_run(job_chunk, &X, nchunks, nthreads);
    free(prefix);
    return 0;
}

/* The per-step constants in T from the double hyperparameters (hyper: see H_*): every
 * expression is evaluated in double and rounded once to T, as torch rounds the Python float
 * it is given (1 - alpha for addcmul and lerp; the scalar of every other operation). */
#define RMS_MAKE_HYP(T, h, flags, o)                                                         \
    do {                                                                                     \
        const double lr_ = (h)[H_LR], alpha_ = (h)[H_ALPHA], eps_ = (h)[H_EPS];              \
        const double wd_ = (h)[H_WD], w_ = 1.0 - alpha_;                                     \
        const int lim_ = ((flags) & FL_LR_IN_MOMENTUM) != 0;                                 \
        const int eis_ = ((flags) & FL_EPS_IN_SQRT) != 0;                                    \
        (o)->lr = (T)lr_; (o)->alpha = (T)alpha_; (o)->oma = (T)w_; (o)->eps = (T)eps_;      \
        (o)->eps_in = eis_ ? (T)eps_ : (T)0; (o)->eps_out = eis_ ? (T)0 : (T)eps_;           \
        (o)->wd = (T)wd_;                                                                    \
        (o)->pdecay = ((flags) & FL_DECOUPLED) && wd_ != 0.0 ? (T)(1.0 - lr_ * wd_) : (T)1;  \
        (o)->mu = (T)(h)[H_MU];                                                              \
        (o)->k = lim_ ? (T)lr_ : (T)1; (o)->post = lim_ ? (T)1 : (T)lr_;                     \
        (o)->invc = (T)(1.0 / (h)[H_C]);                                                     \
        (o)->gmul = (T)((h)[H_INV_SCALE] * (((flags) & FL_MAXIMIZE) ? -1.0 : 1.0));          \
        (o)->lerp_small = (o)->oma < (T)0.5 && (o)->oma > (T)-0.5;                           \
        (o)->lerp_w = (o)->lerp_small ? (o)->oma : (o)->oma - (T)1;                          \
        (o)->nesterov = ((flags) & FL_NESTEROV) != 0; (o)->eps_in_sqrt = eis_;               \
    } while (0)
static void make_hyp_f(const double *h, int flags, rms_hyp_f *o) {
    RMS_MAKE_HYP(float, h, flags, o);
}
static void make_hyp_d(const double *h, int flags, rms_hyp_d *o) {
    RMS_MAKE_HYP(double, h, flags, o);
}

/* One fused RMSProp step over nt tensors. P, G, V (and M if centered, B if momentum) are
 * tables of data pointers; numel[t] elements each. pdt: param/grad dtype; sdt: state dtype
 * (== pdt, or DT_F32). hyper: see H_*; flags: see FL_*. stats: NULL or nt x 6 doubles,
 * overwritten with this step's sum(g^2), sum(u^2), sum(p^2), min(lr/d), max(lr/d),
 * count(eps dominates d), with u = p_old - p and p the new param as stored (16-bit params
 * rounded), in T. Returns 0, or < 0 for an unsupported dtype combination. */
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

/* The signed decode tables, filled by the first quantized call (same values on every
 * fill, so a race only writes them twice). */
static void rms_tables_once(void) {
    static _Atomic int ready = 0;
    if (!atomic_load(&ready)) { rms_init_tables(); atomic_store(&ready, 1); }
}

/* One fused RMSProp step (as rms_fused_step) with block-quantized state: tensor t with
 * VS[t] != NULL stores square_avg as u8 codes (V[t], numel[t] bytes) with float32 scales
 * VS[t] (one per 256 elements, its last block shorter), and grad_avg / momentum_buffer (when
 * used) as s8 codes M[t] / B[t] with scales MS[t] / BS[t]; or, with u4 / s4, two codes per
 * byte (element 2j in the low nibble) and a scale per 128 elements, numel[t] even. With
 * centered, V[t] holds the centered moment w (rmsprop.codecs). A tensor with VS[t] == NULL
 * keeps float32 state (then MS[t], BS[t] are not read). vfmt, mfmt, bfmt: QF_U8, QF_S8,
 * QF_S8 or QF_U4, QF_S4, QF_S4. pdt: float32, float16 or bfloat16 (math in float). Returns
 * 0, -1 for an unsupported dtype or format, -2 for a missing table, -3 for a negative size
 * or an odd 4-bit one. */
RMS_API int rms_fused_step_q(int64_t nt, const int64_t *numel, void *const *P, void *const *G,
                             void *const *V, void *const *M, void *const *B,
                             float *const *VS, float *const *MS, float *const *BS, int pdt,
                             int vfmt, int mfmt, int bfmt, const double *hyper, int flags,
                             double *stats, int nthreads) {
    const int cen = (flags & FL_CENTERED) != 0, mom = (flags & FL_MOMENTUM) != 0;
    if (!(pdt == DT_F32 || pdt == DT_F16 || pdt == DT_BF16)) return -1;
    const int b4 = vfmt == QF_U4, sf = b4 ? QF_S4 : QF_S8;
    if (!(vfmt == QF_U8 || b4) || (cen && mfmt != sf) || (mom && bfmt != sf)) return -1;
    if (!VS || (cen && (!M || !MS)) || (mom && (!B || !BS))) return -2;
    for (int64_t t = 0; t < nt; t++) {
        if (VS[t] && ((cen && !MS[t]) || (mom && !BS[t]))) return -2;
        if (VS[t] && b4 && numel[t] % 2) return -3;
    }
    rms_tables_once();
    const rms_isa *isa = rms_get_isa();
    rms_hyp_f hf;
    rms_job J;
    memset(&J, 0, sizeof J);
    J.kind = 0; J.pdt = pdt; J.sdt = DT_F32;
    J.psz = (int)rms_dtsize(pdt); J.ssz = 4;
    J.spec = (cen ? 1 : 0) | (mom ? 2 : 0) | ((flags & FL_WD_COUPLED) ? 4 : 0) | (stats ? 8 : 0);
    J.stats = stats;
    make_hyp_f(hyper, flags, &hf);
    J.hyp = &hf; J.seg = isa->seg_f; J.segq = isa->segq_f;
    J.VS = VS; J.MS = cen ? MS : NULL; J.BS = mom ? BS : NULL; J.qbits = b4 ? 4 : 8;
    return run_job(&J, nt, numel, P, G, V, cen ? M : NULL, mom ? B : NULL, nthreads);
}

/* The quantized-state codecs of the step on their own, with the active instruction set:
 * enc = 1 encodes the n float32 values x (blocks of 256, 4-bit: 128; 4-bit n even) into
 * codes and one scale per block, enc = 0 decodes codes and scales into x. fmt: QF_U8,
 * QF_S8, QF_U4 or QF_S4. For tests against rmsprop.codecs. Returns 0, -1 for an unknown
 * format, -3 for a negative or (4-bit) odd n. */
RMS_API int rms_quant_codec(int fmt, int enc, int64_t n, float *x, uint8_t *codes,
                            float *scales) {
    if (fmt < QF_U8 || fmt > QF_S4) return -1;
    if (n < 0 || ((fmt == QF_U4 || fmt == QF_S4) && n % 2)) return -3;
    rms_tables_once();
    rms_get_isa()->qcodec(fmt, enc != 0, n, x, codes, scales);
    return 0;
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
     * leaves in the last-level cache, so part of the gradients is not read from DRAM twice.
     * Which tensor is reported does not depend on the
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
