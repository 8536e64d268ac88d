/*
 * float16 / bfloat16 params and gradients with float state, no stats, on the x86-64-v3 build
 * (a template part of cpu_step.h, included there for T = float when RMS_F16C is defined).
 *
 * The update is written with AVX2/FMA/F16C intrinsics, 16 elements per iteration, the 16-bit
 * values converted in registers (vcvtph2ps / vcvtps2ph for float16; a byte shuffle and an
 * integer rounding for bfloat16). gcc does not vectorise `_Float16` conversions, and its
 * auto-vectorised bfloat16 loop (dispatch_bf16, still used by the baseline build) spends
 * about twice the instructions on packing and rounding, which matters because the divider is
 * already busy with sqrt and div. The operations are those of core in cpu_step.h, in the
 * same order with the same roundings, so the results are bit-identical to the baseline build
 * and to the stats path (which keeps the buffers).
 */
/* 8 floats from 8 float16 / bfloat16 values. bfloat16: broadcast-load 16 bytes and
 * byte-shuffle each value into the top half of its lane (one shuffle; a zero-extend plus a
 * shift is two, and shuffle and shift ports are what this loop runs short of). */
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
    __m256 lr, alpha, oma, eps_in, eps_out, wd, pdecay, mu, k, post, npost, invc, gmul, lerp_w,
        zero;
} TNAME(vhyp);

/* The new parameter value for elements i..i+7 (state written back): core's arithmetic. */
static inline __attribute__((always_inline)) __m256 TNAME(upd8)(
    int64_t i, const uint16_t *restrict p, const uint16_t *restrict g, float *restrict v,
    float *restrict m, float *restrict b, const TNAME(vhyp) *c, int nest, int lsmall,
    const int CEN, const int MOM, const int WD, const int F16, const int ONE) {
    __m256 gi = TNAME(ld16)(g + i, F16);
    if (!ONE) gi = _mm256_mul_ps(gi, c->gmul);
    __m256 pi = TNAME(ld16)(p + i, F16);
    if (WD) gi = _mm256_fmadd_ps(c->wd, pi, gi);
    if (!ONE) pi = _mm256_mul_ps(pi, c->pdecay);
    __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(c->oma, gi), gi,
                                _mm256_mul_ps(c->alpha, _mm256_loadu_ps(v + i)));
    _mm256_storeu_ps(v + i, vi);
    __m256 s;
    if (CEN) {
        __m256 mo = _mm256_loadu_ps(m + i);
        __m256 mi = _mm256_fmadd_ps(c->lerp_w, _mm256_sub_ps(gi, mo), lsmall ? mo : gi);
        _mm256_storeu_ps(m + i, mi);
        __m256 mc = _mm256_mul_ps(mi, c->invc);
        s = _mm256_fnmadd_ps(mc, mc, _mm256_mul_ps(vi, c->invc));
        s = _mm256_max_ps(c->zero, s); /* (0 > s) ? 0 : s: NaN stays NaN, as in core */
    } else {
        s = _mm256_mul_ps(vi, c->invc);
    }
    __m256 d = _mm256_add_ps(_mm256_sqrt_ps(_mm256_add_ps(s, c->eps_in)), c->eps_out);
    if (MOM) {
        __m256 kn = _mm256_mul_ps(c->k, _mm256_div_ps(gi, d));
        __m256 bi = _mm256_add_ps(_mm256_mul_ps(c->mu, _mm256_loadu_ps(b + i)), kn);
        _mm256_storeu_ps(b + i, bi);
        __m256 un = _mm256_add_ps(_mm256_mul_ps(c->mu, bi), kn);
        return _mm256_fmadd_ps(c->npost, nest ? un : bi, pi);
    }
    return _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(c->lr, gi), d));
}

/* Software prefetch RMS_PF16 elements ahead, one cache line of each 16-bit stream and two
 * of each float stream per 32 elements: with half-width param streams beside full-width
 * state streams the hardware prefetchers alone leave the loop waiting on memory.
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
        _mm256_set1_ps(h->post),   _mm256_set1_ps(-h->post),  _mm256_set1_ps(h->invc),
        _mm256_set1_ps(h->gmul),   _mm256_set1_ps(h->lerp_w), _mm256_setzero_ps()};
    const int nest = h->nesterov, lsmall = h->lerp_small;
    if (one) {
        for (int64_t i = 0; i + 16 <= n; i += 16) {
            if ((i & 31) == 0) TNAME(pf16)(i, p, g, v, m, b, CEN, MOM);
            __m256 a = TNAME(upd8)(i, p, g, v, m, b, &c, nest, lsmall, CEN, MOM, WD, F16, 1);
            __m256 z =
                TNAME(upd8)(i + 8, p, g, v, m, b, &c, nest, lsmall, CEN, MOM, WD, F16, 1);
            TNAME(st16)(p + i, a, z, F16);
        }
    } else {
        for (int64_t i = 0; i + 16 <= n; i += 16) {
            if ((i & 31) == 0) TNAME(pf16)(i, p, g, v, m, b, CEN, MOM);
            __m256 a = TNAME(upd8)(i, p, g, v, m, b, &c, nest, lsmall, CEN, MOM, WD, F16, 0);
            __m256 z =
                TNAME(upd8)(i + 8, p, g, v, m, b, &c, nest, lsmall, CEN, MOM, WD, F16, 0);
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
#undef RMS_PF16
