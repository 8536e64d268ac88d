/*
 * Per-instruction-set part of the CPU kernel (a template: see cpu.c).
 *
 * cpu.c includes this header once per instruction set, with
 *   RMS_ISA   the suffix of every function generated here (base, v3), and
 *   RMS_F16C  defined when the part is compiled for x86-64-v3 (AVX2, FMA, F16C),
 * and reads back the functions floor_<isa>, nonfinite_<isa>, seg_<isa>_f, seg_<isa>_d and
 * segq_<isa>_f (quantized state).
 * This header includes cpu_step.h twice: once per math type (float, double).
 */

#define RMS_CAT_(a, b) a##_##b
#define RMS_CAT(a, b) RMS_CAT_(a, b)
#define ISA_NAME(x) RMS_CAT(x, RMS_ISA)

/* Block length of the stats partial sums when every stream is in the math type. */
#define RMS_BLK 1024
/* Block length for 16-bit / mixed-precision streams (see seg in cpu_step.h): short enough
 * that every stream is touched often, long enough to amortise the per-block work. It is
 * also the block a block-scaled state format would use, so one block of such a state is
 * decoded and encoded by one codec call. */
#define RMS_CVT_BLK 256
/* Elements per scale of the 8-bit state formats (rmsprop.codecs). */
#define RMS_QBLK 256

/* A fused multiply-add, rounded once, so that every build gives the same bits (and torch's,
 * whose vectorised kernels use the instruction). On x86-64-v3 it is the vfmadd instruction
 * and vectorises; on the baseline build it is libm's fma: exact (glibc uses the instruction
 * where the CPU has it, an exact software fma where not) but a scalar call, which keeps the
 * loops that use it scalar, so the baseline build trades speed for the same results. */
#define RMS_FMAF(a, b, c) __builtin_fmaf((a), (b), (c))
#define RMS_FMAD(a, b, c) __builtin_fma((a), (b), (c))

/* ----------------------------- 16-bit <-> float blocks ------------------------------ */
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

/* ------------------------------- the step, per math type ---------------------------- */
#define RMS_T float
#define RMS_TN f
#define RMS_TCODE DT_F32
#define RMS_IS_F32 1 /* for #if: RMS_TCODE is an enum, 0 to the preprocessor */
#define RMS_SQRT sqrtf
#define RMS_FMA RMS_FMAF
#define RMS_HYP rms_hyp_f
#include "cpu_step.h"
#undef RMS_T
#undef RMS_TN
#undef RMS_TCODE
#undef RMS_IS_F32
#undef RMS_SQRT
#undef RMS_FMA
#undef RMS_HYP

#define RMS_T double
#define RMS_TN d
#define RMS_TCODE DT_F64
#define RMS_IS_F32 0
#define RMS_SQRT sqrt
#define RMS_FMA RMS_FMAD
#define RMS_HYP rms_hyp_d
#include "cpu_step.h"
#undef RMS_T
#undef RMS_TN
#undef RMS_TCODE
#undef RMS_IS_F32
#undef RMS_SQRT
#undef RMS_FMA
#undef RMS_HYP

/* ------------------------------------ the floor ------------------------------------- */
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
    else if (psz == 4 && ssz == 1) RMS_FLOOR_MB(uint32_t, uint8_t); /* 8-bit state codes */
    else if (psz == 2 && ssz == 1) RMS_FLOOR_MB(uint16_t, uint8_t);
}
#undef RMS_FLOOR_MB
#undef RMS_FLOOR_LOOP

/* ---------------------------------- inf/NaN scan ------------------------------------ */
/* A value is non-finite iff its exponent bits are all ones, i.e. iff adding one unit of the
 * exponent's lowest bit to its magnitude carries into the sign bit: one and, one add and one
 * or per element, OR-accumulated in the element's own width (full vector lanes) and tested
 * once per round. One sequential read stream is limited by how many cache lines a core's
 * prefetcher keeps in flight, so a segment is cut into RMS_NF_STREAMS equal parts scanned
 * side by side, which lets the prefetcher track that many streams at once. A round reads
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
#undef RMS_NF_SCAN
#undef RMS_NF_STREAMS
#undef RMS_NF_ROUND

#undef RMS_FMAF
#undef RMS_FMAD
#undef RMS_BLK
#undef RMS_CVT_BLK
#undef RMS_QBLK
#undef ISA_NAME
#undef RMS_CAT
#undef RMS_CAT_
