/*
 * The fused update for one instruction set and one math type (a template: see cpu.c).
 *
 * cpu_isa.h includes this header once per math type, with
 *   RMS_T      the math type (float or double), RMS_TN its suffix (f, d),
 *   RMS_TCODE  its dtype code (DT_F32, DT_F64) and RMS_IS_F32 (1 or 0, for #if),
 *   RMS_SQRT   sqrtf or sqrt, RMS_FMA the matching fused multiply-add,
 *   RMS_HYP    the per-step constants in T (rms_hyp_f, rms_hyp_d),
 * and ISA_NAME/RMS_ISA from cpu_isa.h. It defines seg_<isa>_<tn>: the step over one
 * contiguous run of elements of one tensor, and what seg needs (codecs, loops); for T = float
 * also segq_<isa>_f, the same step over block-quantized state (8-bit and 4-bit).
 *
 * The arithmetic per element follows torch.optim.RMSprop's for-loop step operation by
 * operation (torch/optim/rmsprop.py over ATen's CPU kernels), so that with torch's options
 * (lr, alpha, eps, weight_decay, momentum, centered, maximize) the results are the same bits:
 *
 *   torch                                     here
 *   grad.add(param, alpha=wd)                 g = fma(wd, p, g)          (ATen: fmadd)
 *   square_avg.mul_(alpha)                    a = alpha * v
 *     .addcmul_(grad, grad, value=1-alpha)    v = fma(oma * g, g, a)     (contracted)
 *   grad_avg.lerp_(grad, 1-alpha)             m = fma(w, g - m, m) if |w| < 0.5,
 *                                                 fma(w - 1, g - m, g) otherwise
 *   square_avg.addcmul(grad_avg, grad_avg,    s = fma(-m, m, v)
 *     value=-1)
 *   .sqrt().add_(eps)                         d = sqrt(s) + eps
 *   param.addcdiv_(grad, avg, value=-lr)      p = p - (lr * g) / d
 *   buf.mul_(momentum).addcdiv_(grad, avg)    b = mu * b + g / d
 *   param.add_(buf, alpha=-lr)                p = fma(-lr, b, p)         (ATen: fmadd)
 *
 * Every constant is the double value of its expression rounded once to T (make_hyp in
 * cpu.c), as torch rounds a Python float scalar once to the tensor's type. The options
 * torch lacks keep the rule of rmsprop.spec.step around these operations: the bias
 * correction scales v and m by invc = 1/c (exactly 1 without it), eps_in_sqrt moves eps
 * under the root, decoupled weight decay scales p by 1 - lr*wd first, lr_in_momentum puts
 * lr into the buffer (b = mu*b + lr*n, p = p - b), Nesterov uses mu*b + k*n, and the
 * centered variance is clamped at 0 (torch takes the root of a negative rounding residue,
 * a NaN). Nothing else is contracted: cpu.c is compiled with -ffp-contract=off, so the
 * baseline and x86-64-v3 builds, and the loops with and without statistics, agree bit for
 * bit.
 */

#define TN_NAME_(a, b, c) a##_##b##_##c
#define TN_NAME2(a, b, c) TN_NAME_(a, b, c)
#define TNAME(x) TN_NAME2(x, RMS_ISA, RMS_TN)
#define T RMS_T

/* ------------------------------------ state codecs ---------------------------------- */
/* Every stream that is not stored in T (16-bit params and gradients; state in another
 * format than T) is read through decode and written through encode, one block of at most
 * RMS_CVT_BLK elements at a time: decode(fmt, src, scale, n, dst) turns n stored values into
 * T, encode(fmt, dst, scale, n, src) rounds n values of T once into the format. `scale` is
 * the block's scale for a block-scaled format and NULL for the float formats below, which
 * need none. The block-quantized formats (u8/s8, u4/s4) have their own codecs and segment
 * (segq, below), whose encode also computes each block's new scale; the update loops are
 * the same. */
static void TNAME(decode)(int fmt, const char *src, const float *scale, int64_t n,
                          T *restrict dst) {
    (void)scale;
    if (fmt == DT_F32) {
        const float *s = (const float *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (T)s[i];
    } else if (fmt == DT_F64) {
        const double *s = (const double *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (T)s[i];
    } else {
        float tmp[RMS_CVT_BLK];
        float *f = sizeof(T) == sizeof(float) ? (float *)(void *)dst : tmp;
        if (fmt == DT_F16) ISA_NAME(h2f_block)((const uint16_t *)src, f, n);
        else ISA_NAME(bf2f_block)((const uint16_t *)src, f, n);
        if (f != (float *)(void *)dst)
            for (int64_t i = 0; i < n; i++) dst[i] = (T)f[i];
    }
}

static void TNAME(encode)(int fmt, char *dstc, float *scale, int64_t n,
                          const T *restrict src) {
    (void)scale;
    if (fmt == DT_F32) {
        float *d = (float *)dstc;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (float)src[i];
    } else if (fmt == DT_F64) {
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
        if (fmt == DT_F16) ISA_NAME(f2h_block)(f, (uint16_t *)dstc, n);
        else ISA_NAME(f2bf_block)(f, (uint16_t *)dstc, n);
    }
}

/* ------------------------------------- the update ----------------------------------- */
/* The update for n elements whose streams are all in T (or, when BF16, bfloat16 params
 * and gradients with T = float). The const int parameters are literals at every call site,
 * so each specialisation is its own vector loop with no per-element branches on options.
 * Options that cost nothing when off are folded into multipliers that are exactly 1 (gmul,
 * pdecay, invc, k, post) or addends that are exactly 0 (eps_in, eps_out): x * 1 and x + 0
 * are x bit for bit. */
static inline __attribute__((always_inline)) void TNAME(core)(
    int64_t n, void *restrict pv, const void *restrict gv, T *restrict v, T *restrict m,
    T *restrict b, const RMS_HYP *h, double *acc, const int CEN, const int MOM, const int WD,
    const int ST, const int BF16, const int SQ, const int GP, const int NST, T *vmax,
    const uint8_t *restrict qv, const T qs, const T qinv) {
    /* SQ (dispatch_sq): v decoded from codes qv in the loop, roots written to v */
    T *restrict p = (T *)pv;
    const T *restrict g = (const T *)gv;
    uint16_t *restrict p16 = (uint16_t *)pv;
    const uint16_t *restrict g16 = (const uint16_t *)gv;
    const T lr = h->lr, alpha = h->alpha, oma = h->oma, eps = h->eps, eps_in = h->eps_in,
            eps_out = h->eps_out, wd = h->wd, pdecay = h->pdecay, mu = h->mu, k = h->k,
            npost = -h->post, invc = h->invc, gmul = h->gmul,
            lerp_w = h->lerp_w;
    /* NST: Nesterov fixed at compile time (0, 1), or -1: read from h */
    const int nest = NST < 0 ? h->nesterov : NST, eis = h->eps_in_sqrt,
              lsmall = h->lerp_small;
    T sg = 0, su = 0, sp = 0, cnt = 0, mn = (T)INFINITY, mx = -(T)INFINITY, vm = 0;
#pragma omp simd reduction(+ : sg, su, sp, cnt) reduction(min : mn) reduction(max : mx, vm)
    for (int64_t i = 0; i < n; i++) {
        /* SQ without GP: gmul and pdecay are 1, and their multiplies cost where the
         * quantized step is arithmetic-bound */
        T gi = BF16 ? (T)rms_bf2f(g16[i]) : g[i];
        if (!SQ || GP) gi = gi * gmul;
        const T p0 = BF16 ? (T)rms_bf2f(p16[i]) : p[i];
        if (WD) gi = RMS_FMA(wd, p0, gi);
        T pi = SQ && !GP ? p0 : p0 * pdecay;
        T vo;
        if (SQ) { /* dec_u's value: (q + 1)^2 and its product with 1 / L^2 are exact */
            const T qq = (T)qv[i] + (T)1;
            vo = qs * ((qq * qq) * qinv);
        } else {
            vo = v[i];
        }
        T vi = RMS_FMA(oma * gi, gi, alpha * vo);
        if (SQ) vm = vi > vm ? vi : vm;
        else v[i] = vi;
        T s;
        if (CEN) {
            T mo = m[i];
            T mi = RMS_FMA(lerp_w, gi - mo, lsmall ? mo : gi);
            m[i] = mi;
            T mc = mi * invc;
            s = RMS_FMA(-mc, mc, vi * invc);
            s = s < 0 ? (T)0 : s; /* keeps NaN: NaN < 0 is false */
        } else {
            s = SQ ? vi : vi * invc; /* SQ: invc is 1 and eps_in 0 */
        }
        T sq = RMS_SQRT(SQ ? s : s + eps_in);
        if (SQ) v[i] = sq;
        T d = sq + eps_out;
        if (MOM) {
            T nn = gi / d;
            T bi = mu * b[i] + k * nn;
            b[i] = bi;
            T ub = nest ? mu * bi + k * nn : bi;
            pi = RMS_FMA(npost, ub, pi);
        } else {
            pi = pi - (lr * gi) / d;
        }
        if (BF16) {
            const uint16_t q = rms_f2bf((float)pi);
            p16[i] = q;
            if (ST) pi = (T)rms_bf2f(q);
        } else {
            p[i] = pi;
        }
        if (ST) {
            /* The change that happened and the value as stored (rmsprop.torch._stats), not
             * the rule's update: decoupled weight decay is part of the change, and rounding
             * to 16 bits may erase an update or be most of it. A decoded 16-bit buffer is
             * not what is stored: seg sums its change again (stored_stats). */
            const T u = p0 - pi;
            sg += gi * gi;
            su += u * u;
            sp += pi * pi;
            T r = lr / d;
            mn = r < mn ? r : mn;
            mx = r > mx ? r : mx;
            /* Select the compared value, not the comparison: gcc (12) cannot vectorise a
             * choice between two vector masks on a scalar condition, and that one statement
             * would keep every stats loop scalar. */
            T dom = eis ? s : sq;
            cnt += eps > dom ? (T)1 : (T)0;
        }
    }
    if (SQ) *vmax = vm;
    if (ST) {
        acc[0] += (double)sg; acc[1] += (double)su; acc[2] += (double)sp;
        if ((double)mn < acc[3]) acc[3] = (double)mn;
        if ((double)mx > acc[4]) acc[4] = (double)mx;
        acc[5] += (double)cnt;
    }
}

#define RMS_CORE_CASE(S, BF)                                                                 \
    case S:                                                                                  \
        TNAME(core)(n, p, g, v, m, b, h, acc, (S)&1, ((S) >> 1) & 1, ((S) >> 2) & 1,         \
                    ((S) >> 3) & 1, BF, 0, 0, -1, NULL, NULL, 0, 0);                         \
        break;
#define RMS_CORE_CASES(BF)                                                                   \
    RMS_CORE_CASE(0, BF) RMS_CORE_CASE(1, BF) RMS_CORE_CASE(2, BF) RMS_CORE_CASE(3, BF)      \
    RMS_CORE_CASE(4, BF) RMS_CORE_CASE(5, BF) RMS_CORE_CASE(6, BF) RMS_CORE_CASE(7, BF)      \
    RMS_CORE_CASE(8, BF) RMS_CORE_CASE(9, BF) RMS_CORE_CASE(10, BF) RMS_CORE_CASE(11, BF)    \
    RMS_CORE_CASE(12, BF) RMS_CORE_CASE(13, BF) RMS_CORE_CASE(14, BF) RMS_CORE_CASE(15, BF)

/* spec bits: 1 centered, 2 momentum, 4 coupled weight decay, 8 statistics. */
static void TNAME(dispatch)(int spec, int64_t n, void *p, const void *g, T *v, T *m, T *b,
                            const RMS_HYP *h, double *acc) {
    switch (spec) {
        RMS_CORE_CASES(0)
    default: break;
    }
}

#if RMS_IS_F32
/* The update of a quantized block whose square_avg is encoded from sqrt(v) itself (spec
 * 0, 2, 4 or 6: not centered, no stats; no bias correction, eps outside the root; with
 * momentum, not Nesterov, whose select beside the maximum gcc cannot vectorise). The old v
 * is decoded inside the loop from its codes qv (one per byte: 4-bit ones unpacked first)
 * under the block scale qs (qinv = 1 / L^2), which hides the decoding behind the divider;
 * v receives sqrt(v_new), the root the update divides by, and *vmax max(v_new), the
 * block's new scale, so that the encoder (qenc_run_sq) need not take the root again. gp:
 * gmul or pdecay is not 1 (maximize, a gradient scale, decoupled weight decay). */
static void TNAME(dispatch_sq)(int spec, int gp, int64_t n, void *p, const void *g, T *v,
                               T *b, const RMS_HYP *h, T *vmax, const uint8_t *qv, T qs,
                               T qinv) {
#define RMS_SQ_CASE(S, GP)                                                                   \
    case S:                                                                                  \
        TNAME(core)(n, p, g, v, NULL, b, h, NULL, 0, ((S) >> 1) & 1, ((S) >> 2) & 1, 0, 0,   \
                    1, GP, 0, vmax, qv, qs, qinv);                                           \
        break;
    if (gp) {
        switch (spec) {
            RMS_SQ_CASE(0, 1) RMS_SQ_CASE(2, 1) RMS_SQ_CASE(4, 1) RMS_SQ_CASE(6, 1)
        default: break;
        }
    } else {
        switch (spec) {
            RMS_SQ_CASE(0, 0) RMS_SQ_CASE(2, 0) RMS_SQ_CASE(4, 0) RMS_SQ_CASE(6, 0)
        default: break;
        }
    }
#undef RMS_SQ_CASE
}

/* bfloat16 params and gradients, float state, no stats: bfloat16 <-> float is integer work
 * that vectorises inside the update loop itself, so every stream advances together as in
 * the float32 step, instead of through buffers. Used by the baseline build, and for the last
 * n % 16 elements on x86-64-v3 (dispatch16 does the rest). float16 on the baseline build
 * keeps the buffers: gcc does not vectorise its conversions. The stats variants keep the
 * buffers too: each auto-vectorised specialisation adds build time, paid at install or on
 * first use, for a loop that is opt-in. */
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
#include "cpu_step16.h"
#endif

/* ------------------------- statistics of a decoded 16-bit param --------------------- */
/* core ran on a buffer decoded from 16-bit params, so its sums of u^2 and p^2 describe the
 * unrounded values; the encoding that followed may have erased the update (an update below
 * half an ulp leaves the param as it was). Those two sums are taken instead from the
 * params as stored, read back with the block codec: a pass over L1-resident buffers.
 * Rounding inside core's loop instead costs more (gcc has no vector float16 conversion to
 * use there) and would add a stats loop per format. part: core's sums for the block; old:
 * the params before it. */
static void TNAME(stored_stats)(int pdt, const char *pc, int64_t n, const T *restrict old,
                                T *restrict buf, double *part, double *acc) {
    TNAME(decode)(pdt, pc, NULL, n, buf);
    /* two halves summed side by side: one vector sum per statistic would wait on the
     * latency of its adds, as long as the whole pass otherwise */
    const int64_t half = n / 2;
    T su = 0, sp = 0, su2 = 0, sp2 = 0;
#pragma omp simd reduction(+ : su, sp, su2, sp2)
    for (int64_t i = 0; i < half; i++) {
        const T a = buf[i], b = buf[half + i];
        const T ua = old[i] - a, ub = old[half + i] - b;
        su += ua * ua;
        sp += a * a;
        su2 += ub * ub;
        sp2 += b * b;
    }
    if (n & 1) {
        const T a = buf[n - 1], ua = old[n - 1] - a;
        su += ua * ua;
        sp += a * a;
    }
    part[1] = (double)(su + su2);
    part[2] = (double)(sp + sp2);
    stats_merge(acc, part);
}

/* ----------------------------------- one segment ------------------------------------ */
/* A contiguous run of n elements of one tensor. Streams already in T are used in place;
 * 16-bit params with float state and no stats are converted inside the update loop
 * (dispatch16 on x86-64-v3, then dispatch_bf16 for bfloat16 on the baseline build and for
 * the tail); every other stream (float16 on the baseline build or with stats, 16-bit state,
 * float32 state under float64 params) goes through the codecs into L1-resident buffers in
 * short blocks (RMS_CVT_BLK): the passes over a block touch one stream at a time, and a
 * stream left alone for long lets its hardware prefetcher fall behind, so short blocks keep
 * memory latency and compute overlapped. With stats on, blocks also bound the length of the
 * T-precision partial sums. */
static void TNAME(seg)(int pdt, int sdt, int spec, int64_t n, const rms_streams *S,
                       const void *hyp, double *acc) {
    const RMS_HYP *h = (const RMS_HYP *)hyp;
    int cen = spec & 1, mom = (spec >> 1) & 1, st = (spec >> 3) & 1;
    int pdir = pdt == RMS_TCODE, sdir = sdt == RMS_TCODE && !S->vs;
    char *p = S->p, *v = S->v, *m = S->m, *b = S->b;
    const char *g = S->g;
    if (pdir && sdir && !st) {
        TNAME(dispatch)(spec, n, p, g, (T *)v, (T *)m, (T *)b, h, acc);
        return;
    }
#if RMS_IS_F32 && defined(RMS_F16C)
    if ((pdt == DT_F16 || pdt == DT_BF16) && sdir && !st) {
        int64_t n16 = n & ~(int64_t)15;
        TNAME(dispatch16)(spec, pdt == DT_F16, n16, (uint16_t *)(void *)p,
                          (const uint16_t *)(const void *)g, (T *)(void *)v,
                          cen ? (T *)(void *)m : NULL, mom ? (T *)(void *)b : NULL, h);
        if (n16 == n) return;
        n -= n16; p += 2 * n16; g += 2 * n16; v += 4 * n16; /* the tail, as below */
        if (cen) m += 4 * n16;
        if (mom) b += 4 * n16;
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
    const int st16 = st && !pdir; /* stats of a decoded param: see stored_stats */
    T bp[RMS_CVT_BLK], bg[RMS_CVT_BLK], bv[RMS_CVT_BLK], bm[RMS_CVT_BLK], bb[RMS_CVT_BLK];
    T bo[RMS_CVT_BLK];
    double part[6];
    for (int64_t lo = 0; lo < n; lo += blk) {
        int64_t len = n - lo < blk ? n - lo : blk;
        char *pc = p + lo * ps, *vc = v + lo * ss;
        char *mc = cen ? m + lo * ss : NULL, *bc = mom ? b + lo * ss : NULL;
        const char *gc = g + lo * ps;
        /* the block's scales (block-scaled formats only; blk is one scale block then) */
        float *vsc = S->vs ? S->vs + lo / RMS_CVT_BLK : NULL;
        float *msc = S->ms ? S->ms + lo / RMS_CVT_BLK : NULL;
        float *bsc = S->bs ? S->bs + lo / RMS_CVT_BLK : NULL;
        T *pp, *vp, *mp = NULL, *bpp = NULL;
        const T *gp;
        if (pdir) { pp = (T *)pc; gp = (const T *)gc; }
        else {
            TNAME(decode)(pdt, pc, NULL, len, bp); TNAME(decode)(pdt, gc, NULL, len, bg);
            pp = bp; gp = bg;
        }
        if (sdir) {
            vp = (T *)vc;
            if (cen) mp = (T *)mc;
            if (mom) bpp = (T *)bc;
        } else {
            TNAME(decode)(sdt, vc, vsc, len, bv); vp = bv;
            if (cen) { TNAME(decode)(sdt, mc, msc, len, bm); mp = bm; }
            if (mom) { TNAME(decode)(sdt, bc, bsc, len, bb); bpp = bb; }
        }
        if (st16) { /* decoded again, not copied: gcc expands the copy to a slow rep movs */
            TNAME(decode)(pdt, pc, NULL, len, bo);
            stats_init(part);
        }
        TNAME(dispatch)(spec, len, pp, gp, vp, mp, bpp, h, st16 ? part : acc);
        if (!pdir) TNAME(encode)(pdt, pc, NULL, len, bp);
        if (st16) TNAME(stored_stats)(pdt, pc, len, bo, bp, part, acc);
        if (!sdir) {
            TNAME(encode)(sdt, vc, vsc, len, bv);
            if (cen) TNAME(encode)(sdt, mc, msc, len, bm);
            if (mom) TNAME(encode)(sdt, bc, bsc, len, bb);
        }
    }
}

#if RMS_IS_F32
/* --------------------------- block-quantized state (8/4-bit) ------------------------ */
/* The formats of rmsprop.codecs, one block of at most RMS_QBLK elements per call, in
 * float32 with its single roundings (cpu.c is compiled with -ffp-contract=off); L = 256 / 16
 * levels of the unsigned map, K = 127 / 7 of the signed one (8 / 4 bits):
 *   u decode  x' = s * ((q + 1)^2 / L^2)          (the table value is exact: one rounding)
 *   s decode  x' = s * S[c]                       (S: rms_s8tab / rms_s4tab, rounded once)
 *   u encode  s = max(x), k = rint(sqrt(x) * (L / sqrt(s))), q = clamp(k - 1, 0, L - 1)
 *   s encode  s = max|x|, k = rint(K * (|x| / s)), negated for x < 0, stored mod 2^bits
 * The unsigned code needs the root of x, which the update has just taken to divide by it:
 * in the default step (dispatch_sq) the update hands the roots and the block's maximum to
 * the encoder (qenc_run_sq), which is then one product per element. The signed code is
 * defined by the correctly rounded quotient x / s: the portable codecs below divide; the
 * x86-64-v3 ones (further down) compute the same quotient without the divider, which the
 * update's own division and sqrt already keep busy.
 * 4-bit codes: element 2j in the low nibble of byte j. Each encode returns the block's new
 * scale; its maximum keeps the larger operand when one is a NaN, as `a > s ? a : s` does. */
static inline __attribute__((always_inline)) void TNAME(dec_u)(
    const uint8_t *restrict c, float s, int64_t n, float *restrict d, const int B4) {
    const float inv = B4 ? 0x1p-8f : 0x1p-16f;
    if (s >= 0x1p-100f) { /* s * inv is exact: one product, the same rounding */
        const float si = s * inv;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float q = (float)c[i] + 1.0f;
            d[i] = (q * q) * si;
        }
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        int q = (int)c[i] + 1;
        d[i] = s * ((float)(q * q) * inv);
    }
}

static inline __attribute__((always_inline)) void TNAME(dec_s)(
    const uint8_t *restrict c, float s, int64_t n, float *restrict d, const int B4) {
    const float *tab = B4 ? rms_s4tab : rms_s8tab;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = s * tab[c[i]];
}

/* The codes of n values under the block scale s > 0 (the scale itself: enc_max); ROOT: x
 * holds the roots sqrt(v) of the values (dispatch_sq), not the values. */
static inline __attribute__((always_inline)) void TNAME(enc_u_codes)(
    const float *restrict x, float s, int64_t n, uint8_t *restrict c, const int B4,
    const int ROOT) {
    const float cs = (B4 ? 16.0f : 256.0f) / sqrtf(s);
    const int top = B4 ? 15 : 255;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float mg = x[i] > 0.0f ? x[i] : 0.0f;
        int q = (int)rintf((ROOT ? mg : sqrtf(mg)) * cs) - 1;
        q = q < 0 ? 0 : q;
        q = q > top ? top : q;
        c[i] = (uint8_t)q;
    }
}

static inline __attribute__((always_inline)) void TNAME(enc_s_codes)(
    const float *restrict x, float s, int64_t n, uint8_t *restrict c, const int B4) {
    const float kmax = B4 ? 7.0f : 127.0f;
    const int mask = B4 ? 0x0f : 0xff;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        int k = (int)rintf(kmax * (fabsf(x[i]) / s));
        k = x[i] < 0.0f ? -k : k;
        c[i] = (uint8_t)(k & mask);
    }
}

/* The block scale: max(x) (unsigned map, 0 at least) or max|x| (signed). */
static inline __attribute__((always_inline)) float TNAME(enc_max)(
    const float *restrict x, int64_t n, const int SIGNED) {
    float s = 0.0f;
#pragma omp simd reduction(max : s)
    for (int64_t i = 0; i < n; i++) {
        float a = SIGNED ? fabsf(x[i]) : x[i];
        s = a > s ? a : s;
    }
    return s;
}

/* 4-bit codes of n elements (n even: rmsprop.codecs quantizes only even sizes at 4 bits) */
static void TNAME(unpack4)(const uint8_t *restrict p, int64_t n, uint8_t *restrict c) {
#pragma omp simd
    for (int64_t j = 0; j < n / 2; j++) {
        c[2 * j] = p[j] & 0x0f;
        c[2 * j + 1] = p[j] >> 4;
    }
}
static void TNAME(pack4)(const uint8_t *restrict c, int64_t n, uint8_t *restrict p) {
#pragma omp simd
    for (int64_t j = 0; j < n / 2; j++) p[j] = (uint8_t)(c[2 * j] | (c[2 * j + 1] << 4));
}

/* One stream's block, portable: decode codes (packed at 4 bits) into n floats, or encode n
 * floats into codes and return the new scale. */
static inline __attribute__((always_inline)) void TNAME(qdec_gen)(
    const uint8_t *codes, float s, int64_t n, float *restrict d, const int SIGNED,
    const int B4) {
    uint8_t cq[RMS_QBLK];
    const uint8_t *c = codes;
    if (B4) { TNAME(unpack4)(codes, n, cq); c = cq; }
    if (SIGNED) TNAME(dec_s)(c, s, n, d, B4);
    else TNAME(dec_u)(c, s, n, d, B4);
}
static inline __attribute__((always_inline)) void TNAME(qenc_gen_codes)(
    const float *restrict x, float s, int64_t n, uint8_t *codes, const int SIGNED,
    const int B4) {
    uint8_t cq[RMS_QBLK];
    uint8_t *c = B4 ? cq : codes;
    if (SIGNED) TNAME(enc_s_codes)(x, s, n, c, B4);
    else TNAME(enc_u_codes)(x, s, n, c, B4, 0);
    if (B4) TNAME(pack4)(cq, n, codes);
}

#if defined(RMS_F16C)
/* x86-64-v3 codecs: 32 elements per round (one ymm of codes at 8 bits, 16 bytes at 4), the
 * rest of a block through the portable ones, which give the same codes.
 *
 * The quotient without a division. With f = 2^(127 - e) for the biased exponent e of s
 * (0 < e < 253), s' = s * f lies in [1, 2) and x' = x * f; both products are exact (a power
 * of two; x' may lose bits only below 2^-126, where x / s < 2^-125 and every code is 0 as
 * for the exact quotient), so x' / s' = x / s. With y = RN(1 / s') (one scalar division
 * per block):
 *   q0 = RN(x' * y)                  within about one ulp of x' / s'
 *   q1 = q0 + RN(x' - s' q0) * y     (two fused multiply-adds): within 1/2 ulp + O(2^-46)
 *   u  = q1 + RN(x' - s' q1) * y     = RN(x' / s')  exactly
 * The last line is Markstein's theorem (P. Markstein, IBM J. Res. Dev. 34(1), 1990; J.-M.
 * Muller et al., Handbook of Floating-Point Arithmetic, ch. "The fused multiply-add"): for
 * q1 within one ulp of a / b and y within half an ulp of 1 / b, the residual a - b q1 is
 * exact and q1 + r y rounds to RN(a / b), barring underflow, which the scaling rules out
 * down to quotients of 2^-100, far below the first code boundary (2^-18). Scales outside
 * 0 < e < 253 (subnormal, >= 2^126, inf, NaN) take the portable codecs. The unsigned map
 * needs no quotient (its codes are the roots times L / sqrt(s)); an infinite or NaN scale
 * takes the portable codecs there too. */
#define RMS_QV 32

static inline __attribute__((always_inline)) __m256 TNAME(v_quot)(
    __m256 x, __m256 f, __m256 sp, __m256 y) {
    const __m256 xs = _mm256_mul_ps(x, f);
    const __m256 q0 = _mm256_mul_ps(xs, y);
    const __m256 q1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(sp, q0, xs), y, q0);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(sp, q1, xs), y, q1);
}

/* The unsigned code q = k - 1 (before the clamp at 0, which the packing does) of 8 values:
 * k = rint(sqrt(x) * c), c = L / sqrt(s) (y holds c). */
static inline __attribute__((always_inline)) __m256i TNAME(v_ucode)(__m256 x, __m256 y) {
    const __m256 r = _mm256_max_ps(x, _mm256_setzero_ps()); /* NaN: 0, as enc_u_codes */
    const __m256 t = _mm256_mul_ps(_mm256_sqrt_ps(r), y);
    return _mm256_add_epi32(_mm256_cvtps_epi32(t), _mm256_set1_epi32(-1));
}

/* The signed code k (two's complement, masked to the format's width) of 8 values. */
static inline __attribute__((always_inline)) __m256i TNAME(v_scode)(
    __m256 x, __m256 f, __m256 sp, __m256 y, __m256 kmax, __m256i mask) {
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256i k = _mm256_cvtps_epi32(_mm256_mul_ps(kmax, TNAME(v_quot)(a, f, sp, y)));
    /* negated where the sign bit is set: x < 0, or -0 and a negative NaN, whose k (0 and
     * INT_MIN, masked to 0) negation leaves */
    return _mm256_and_si256(_mm256_sign_epi32(k, _mm256_castps_si256(x)), mask);
}

/* The signed codes of 32 values without the exact quotient, where that gives the same:
 * t = RN(|x| * ck) with ck = RN(K / s) and the spec's T = RN(K * RN(|x| / s)) are each within
 * K * 2^-23 (1 + 2^-24) < 2^-16 of K |x| / s (two roundings of relative 2^-24 each; |x| <= s),
 * so within 2^-15 of each other, and rint(t) = rint(T) wherever t is farther than that from
 * a half-integer (T rounds a tie to even only at a half-integer). Returns 0, leaving the
 * 32 to the exact quotient (v_scode), if any t is that near one, or NaN. */
static inline __attribute__((always_inline)) int TNAME(v_scode32_near)(
    const float *restrict x, __m256 ck, __m256i c[4], __m256i mask) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(0.5f - 0x1p-14f);
    __m256 far = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int j = 0; j < 4; j++) {
        const __m256 v = _mm256_loadu_ps(x + 8 * j);
        const __m256 t = _mm256_mul_ps(_mm256_andnot_ps(sign, v), ck);
        const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 d = _mm256_andnot_ps(sign, _mm256_sub_ps(t, r));
        far = _mm256_and_ps(far, _mm256_cmp_ps(d, lim, _CMP_LT_OQ));
        const __m256i k = _mm256_cvtps_epi32(r);
        c[j] = _mm256_and_si256(_mm256_sign_epi32(k, _mm256_castps_si256(v)), mask);
    }
    return _mm256_movemask_ps(far) == 0xff;
}

/* 32 codes (0..255 after the clamp of packus) as 32 bytes in order, from 4 x 8 int32. */
static inline __attribute__((always_inline)) __m256i TNAME(v_pack32)(__m256i a, __m256i b,
                                                                    __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* 32 4-bit codes (bytes in order, each 0-15) packed into 16 bytes, element 2j in the low
 * nibble: each pair of bytes times (1, 16) summed into 16 bits, then narrowed. */
static inline __attribute__((always_inline)) __m128i TNAME(v_nib)(__m256i c) {
    const __m256i w = _mm256_maddubs_epi16(c, _mm256_set1_epi16(0x1001));
    return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

/* 32 codes (32 bytes; at 4 bits 16 packed bytes) as 4 x 8 int32, in element order. */
static inline __attribute__((always_inline)) void TNAME(v_unpack32)(const uint8_t *c,
                                                                   __m256i o[4], const int B4,
                                                                   const int SIGNED) {
    __m128i lo, hi;
    if (B4) {
        const __m128i p = _mm_loadu_si128((const __m128i *)c), m = _mm_set1_epi8(0x0f);
        const __m128i l = _mm_and_si128(p, m), h = _mm_and_si128(_mm_srli_epi16(p, 4), m);
        lo = _mm_unpacklo_epi8(l, h);
        hi = _mm_unpackhi_epi8(l, h);
    } else {
        lo = _mm_loadu_si128((const __m128i *)c);
        hi = _mm_loadu_si128((const __m128i *)(c + 16));
    }
    if (SIGNED && !B4) {
        o[0] = _mm256_cvtepi8_epi32(lo); o[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
        o[2] = _mm256_cvtepi8_epi32(hi); o[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
    } else {
        o[0] = _mm256_cvtepu8_epi32(lo); o[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
        o[2] = _mm256_cvtepu8_epi32(hi); o[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    }
    if (SIGNED && B4) /* sign-extend the nibble: (c ^ 8) - 8 */
        for (int j = 0; j < 4; j++)
            o[j] = _mm256_sub_epi32(_mm256_xor_si256(o[j], _mm256_set1_epi32(8)),
                                    _mm256_set1_epi32(8));
}

static inline __attribute__((always_inline)) void TNAME(qdec)(
    const uint8_t *codes, float s, int64_t n, float *restrict d, const int SIGNED,
    const int B4) {
    /* unsigned: s * ((q + 1)^2 / L^2) = (q + 1)^2 * (s / L^2), both one rounding of the same
     * product, where s / L^2 is exact (normal) */
    const int fold = !SIGNED && s >= 0x1p-100f;
    const __m256 sv = _mm256_set1_ps(fold ? s * (B4 ? 0x1p-8f : 0x1p-16f) : s);
    const float kf = B4 ? 7.0f : 127.0f;
    const __m256 kv = _mm256_set1_ps(kf), r = _mm256_set1_ps(1.0f / kf);
    const __m256i kneg = _mm256_set1_epi32(B4 ? -7 : -127);
    const __m256 one = _mm256_set1_ps(1.0f), inv = _mm256_set1_ps(B4 ? 0x1p-8f : 0x1p-16f);
    int64_t i = 0;
    for (; i + RMS_QV <= n; i += RMS_QV) {
        __m256i c[4];
        TNAME(v_unpack32)(codes + (B4 ? i / 2 : i), c, B4, SIGNED);
        for (int j = 0; j < 4; j++) {
            __m256 t;
            if (SIGNED) {
                /* S[k] = RN(k / K): k * RN(1/K) corrected once (Markstein, as above;
                 * equal to the table for every code, which the tests check) */
                const __m256 k = _mm256_cvtepi32_ps(_mm256_max_epi32(c[j], kneg));
                const __m256 a = _mm256_mul_ps(k, r);
                t = _mm256_fmadd_ps(_mm256_fnmadd_ps(a, kv, k), r, a);
            } else {
                const __m256 q = _mm256_add_ps(_mm256_cvtepi32_ps(c[j]), one);
                t = _mm256_mul_ps(q, q);
                if (!fold) t = _mm256_mul_ps(t, inv); /* exact */
            }
            _mm256_storeu_ps(d + i + 8 * j, _mm256_mul_ps(sv, t));
        }
    }
    if (i < n) TNAME(qdec_gen)(codes + (B4 ? i / 2 : i), s, n - i, d + i, SIGNED, B4);
}

/* The block's scale and what encoding under it needs (qenc_run). */
static inline __attribute__((always_inline)) void TNAME(qenc_prep)(
    const float *restrict x, int64_t n, rms_qenc *E, const int SIGNED, const int B4) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 mv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                    _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + RMS_QV <= n; i += RMS_QV)
        for (int j = 0; j < 4; j++) {
            __m256 a = _mm256_loadu_ps(x + i + 8 * j);
            if (SIGNED) a = _mm256_andnot_ps(signbit, a);
            mv[j] = _mm256_max_ps(a, mv[j]); /* a NaN in a keeps mv */
        }
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i);
        if (SIGNED) a = _mm256_andnot_ps(signbit, a);
        mv[0] = _mm256_max_ps(a, mv[0]);
    }
    float lanes[8], s = 0.0f;
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(mv[0], mv[1]),
                                          _mm256_max_ps(mv[2], mv[3])));
    for (int j = 0; j < 8; j++) s = lanes[j] > s ? lanes[j] : s;
    for (; i < n; i++) {
        float a = SIGNED ? fabsf(x[i]) : x[i];
        s = a > s ? a : s;
    }
    E->s = s;
    if (!(s > 0.0f)) { E->mode = 0; return; }
    if (!SIGNED) { /* y = L / sqrt(s), finite for every finite s > 0 */
        if (!(s < INFINITY)) { E->mode = 1; return; }
        E->mode = 2;
        E->y = (B4 ? 16.0f : 256.0f) / sqrtf(s);
        return;
    }
    /* s > 0, not NaN: e is its biased exponent, f = 2^(127 - e) */
    const uint32_t e = rms_f2bits(s) >> 23;
    if (e == 0 || e >= 253) { E->mode = 1; return; }
    E->mode = 2;
    E->sp = s * rms_bits2f((254u - e) << 23);
    E->f = rms_bits2f((254u - e) << 23);
    E->y = 1.0f / E->sp;
    E->ck = s >= 0x1p-100f && s <= 0x1p100f ? (B4 ? 7.0f : 127.0f) / s : 0.0f;
}

/* Codes of the elements [lo, lo + n) of a block prepared by qenc_prep (lo: a multiple of
 * RMS_QV, so that 4-bit codes start on a byte). */
static inline __attribute__((always_inline)) void TNAME(qenc_run)(
    const rms_qenc *E, const float *restrict x, int64_t n, uint8_t *codes, const int SIGNED,
    const int B4) {
    if (E->mode == 0) { memset(codes, 0, (size_t)(B4 ? n / 2 : n)); return; }
    if (E->mode == 1) { TNAME(qenc_gen_codes)(x, E->s, n, codes, SIGNED, B4); return; }
    const __m256 fv = _mm256_set1_ps(E->f), spv = _mm256_set1_ps(E->sp),
                 y = _mm256_set1_ps(E->y);
    const __m256 kmax = _mm256_set1_ps(B4 ? 7.0f : 127.0f);
    const __m256i mask = _mm256_set1_epi32(B4 ? 0x0f : 0xff);
    const __m256 ck = _mm256_set1_ps(E->ck);
    int64_t i = 0;
    for (; i + RMS_QV <= n; i += RMS_QV) {
        __m256i c[4];
        if (!(SIGNED && E->ck > 0.0f && TNAME(v_scode32_near)(x + i, ck, c, mask)))
            for (int j = 0; j < 4; j++) {
                const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
                c[j] = SIGNED ? TNAME(v_scode)(v, fv, spv, y, kmax, mask)
                              : TNAME(v_ucode)(v, y);
            }
        const __m256i b = TNAME(v_pack32)(c[0], c[1], c[2], c[3]);
        if (B4) _mm_storeu_si128((__m128i *)(codes + i / 2), TNAME(v_nib)(b));
        else _mm256_storeu_si256((__m256i *)(codes + i), b);
    }
    if (i < n) TNAME(qenc_gen_codes)(x + i, E->s, n - i, codes + (B4 ? i / 2 : i), SIGNED, B4);
}

/* 32 unsigned codes (16 bytes at 4 bits) from 32 roots r times y = L / sqrt(s) (0 < s <
 * inf): k = rint(r * y) (a NaN root: INT_MIN), then q = k - 1 on the 16-bit packed k with
 * saturation, which leaves a NaN's -32768 to become code 0 as in enc_u_codes (r >= 0 or NaN
 * needs no other clamp at 0: packus does it). */
static inline __attribute__((always_inline)) void TNAME(v_enc_sq32)(
    const float *restrict r, __m256 y, uint8_t *codes, const int B4) {
    __m256i c[4];
    for (int j = 0; j < 4; j++)
        c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + 8 * j), y));
    const __m256i one16 = _mm256_set1_epi16(1);
    const __m256i ab = _mm256_subs_epi16(_mm256_packs_epi32(c[0], c[1]), one16);
    const __m256i cd = _mm256_subs_epi16(_mm256_packs_epi32(c[2], c[3]), one16);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                                  _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (B4) _mm_storeu_si128((__m128i *)(void *)codes, TNAME(v_nib)(b));
    else _mm256_storeu_si256((__m256i *)(void *)codes, b);
}

/* The unsigned codes of a block from the roots r = sqrt(v) of its values, its scale
 * s = max(v) (dispatch_sq's outputs) and cs = L / sqrt(s): the codes qenc_run gives for v
 * itself. */
static inline __attribute__((always_inline)) void TNAME(qenc_run_sq)(
    const float *restrict r, float s, float cs, int64_t n, uint8_t *codes, const int B4) {
    if (!(s > 0.0f)) { memset(codes, 0, (size_t)(B4 ? n / 2 : n)); return; }
    const __m256 y = _mm256_set1_ps(cs);
    int64_t i = 0;
    if (s < INFINITY)
        for (; i + RMS_QV <= n; i += RMS_QV) {
            TNAME(v_enc_sq32)(r + i, y, codes + (B4 ? i / 2 : i), B4);
        }
    if (i < n) {
        uint8_t cq[RMS_QBLK];
        uint8_t *c = B4 ? cq : codes + i;
        TNAME(enc_u_codes)(r + i, s, n - i, c, B4, 1);
        if (B4) TNAME(pack4)(cq, n - i, codes + i / 2);
    }
}

/* The default step (spec 0 with gp 0: plain RMSProp, no momentum, weight decay, gradient
 * scale or maximize; float32 params) and the same with momentum but not Nesterov (spec 2:
 * MOM) over a run of n elements, written out for x86-64-v3 (segq_plain). What gcc's loop of
 * core() and the separate encoder leave on the table:
 *  - the old value is decoded from the codes, 8 per vector (4-bit codes unpacked to bytes
 *    a block at a time first, sq_unpack4), with the block scale folded into one product
 *    (qs' = s / L^2, exact for s >= 2^-100, gives the same rounding of s * (q + 1)^2 / L^2);
 *  - the work is skewed by block, three blocks in one loop: the new v of block j (decode,
 *    the gradient's square: sq_stage_v) into a buffer, the update of block j - 1 from its
 *    buffered v (the root and the division: sq_stage_u), and the codes of block j - 2 from
 *    its roots (v_enc_sq32). The divider's chain then starts at a load from L1 instead of
 *    at the end of the decode, so the reorder window holds more independent work;
 *  - the streams are prefetched ahead (sq_prefetch).
 * The same IEEE operations in the same order as core() and qenc_run_sq, so the same bits;
 * blocks with a scale below 2^-100 (or NaN) and the last n % 8 elements take dispatch_sq, and
 * blocks with a new scale of 0, inf or NaN qenc_run_sq. */
typedef struct {
    __m256 lr, alpha, oma, eps, one;
} TNAME(sqk);

/* momentum's: mu, k, -post; the signed map's K, RN(1/K) and -K */
typedef struct {
    __m256 mu, k, npost, kf, rkf;
    __m256i kneg;
} TNAME(sqm);

/* The codes of the 8 elements at i, one per byte (4-bit ones unpacked: sq_unpack4), one
 * per lane. */
static inline __attribute__((always_inline)) __m256i TNAME(sq_codes8)(
    const uint8_t *restrict qv, int64_t i) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(qv + i)));
}

/* The first n (a multiple of 8) of a block's 4-bit codes one per byte (signed: the nibble
 * sign-extended, (c ^ 8) - 8), for the 8-bit loads of sq_codes8 and sq_bold8: a pass of byte
 * shuffles per block costs less than a variable shift per vector. */
static inline __attribute__((always_inline)) void TNAME(sq_unpack4)(
    const uint8_t *restrict q, int64_t n, uint8_t *restrict out, const int SIGNED) {
    const __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    int64_t k = 0;
    for (; k + 16 <= n / 2; k += 16) {
        const __m128i w = _mm_loadu_si128((const __m128i *)(const void *)(q + k));
        __m128i lo = _mm_and_si128(w, m), hi = _mm_and_si128(_mm_srli_epi16(w, 4), m);
        if (SIGNED) {
            lo = _mm_sub_epi8(_mm_xor_si128(lo, eight), eight);
            hi = _mm_sub_epi8(_mm_xor_si128(hi, eight), eight);
        }
        _mm_storeu_si128((__m128i *)(void *)(out + 2 * k), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128((__m128i *)(void *)(out + 2 * k + 16), _mm_unpackhi_epi8(lo, hi));
    }
    for (; k < n / 2; k++) {
        const int lo = q[k] & 15, hi = q[k] >> 4;
        out[2 * k] = (uint8_t)(SIGNED ? (lo ^ 8) - 8 : lo);
        out[2 * k + 1] = (uint8_t)(SIGNED ? (hi ^ 8) - 8 : hi);
    }
}

/* The new v of the 8 elements at i, v = alpha * v_old + (1 - alpha) * g^2 with v_old
 * decoded from their codes c under qs = s / L^2 (v_old = s * (q + 1)^2 / L^2), into vb;
 * *vm: the running maximum of v's bits, lane by lane (see vmax_bits). The q + 1 and the
 * maximum are integer operations, and the add and subtract of sq_stage_u fmas with a factor
 * of 1 (the same rounding), which leaves less of the loop on the floating-point adders. */
static inline __attribute__((always_inline)) void TNAME(sq_stage_v)(
    const TNAME(sqk) *K, __m256 qs, __m256i c, int64_t i, const float *restrict g,
    float *restrict vb, __m256i *vm) {
    const __m256 qq = _mm256_cvtepi32_ps(_mm256_add_epi32(c, _mm256_set1_epi32(1)));
    const __m256 av = _mm256_mul_ps(K->alpha, _mm256_mul_ps(qs, _mm256_mul_ps(qq, qq)));
    const __m256 gi = _mm256_loadu_ps(g + i);
    const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(K->oma, gi), gi, av);
    *vm = _mm256_max_epi32(_mm256_castps_si256(vi), *vm);
    _mm256_storeu_ps(vb + i, vi);
}

/* The update of the 8 elements at i from their new v in vb: p -= lr * g / (sqrt(v) + eps);
 * the roots into r. */
static inline __attribute__((always_inline)) void TNAME(sq_stage_u)(
    const TNAME(sqk) *K, int64_t i, float *restrict p, const float *restrict g,
    const float *restrict vb, float *restrict r) {
    const __m256 sq = _mm256_sqrt_ps(_mm256_loadu_ps(vb + i));
    _mm256_storeu_ps(r + i, sq);
    const __m256 q = _mm256_div_ps(_mm256_mul_ps(K->lr, _mm256_loadu_ps(g + i)),
                                   _mm256_fmadd_ps(sq, K->one, K->eps));
    _mm256_storeu_ps(p + i, _mm256_fnmadd_ps(K->one, q, _mm256_loadu_ps(p + i)));
}

/* The old momentum buffer of the 8 elements at i, decoded from their signed codes bq (one
 * per byte, 4-bit ones unpacked: sq_unpack4) under the block scale sb: sb * RN(k / K) as
 * qdec computes it. */
static inline __attribute__((always_inline)) __m256 TNAME(sq_bold8)(
    const TNAME(sqm) *M, const uint8_t *restrict bq, int64_t i, __m256 sb) {
    const __m256i c =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(bq + i)));
    const __m256 k = _mm256_cvtepi32_ps(_mm256_max_epi32(c, M->kneg));
    const __m256 a = _mm256_mul_ps(k, M->rkf);
    return _mm256_mul_ps(sb, _mm256_fmadd_ps(_mm256_fnmadd_ps(a, M->kf, k), M->rkf, a));
}

/* The momentum update of the 8 elements at i from their new v in vb and their old buffer
 * bo: b = mu * bo + k * g / (sqrt(v) + eps) into bn, p += -post * b; the roots into r. */
static inline __attribute__((always_inline)) void TNAME(sq_stage_um)(
    const TNAME(sqk) *K, const TNAME(sqm) *M, int64_t i, float *restrict p,
    const float *restrict g, const float *restrict vb, float *restrict r, __m256 bo,
    float *restrict bn) {
    const __m256 sq = _mm256_sqrt_ps(_mm256_loadu_ps(vb + i));
    _mm256_storeu_ps(r + i, sq);
    const __m256 nn =
        _mm256_div_ps(_mm256_loadu_ps(g + i), _mm256_fmadd_ps(sq, K->one, K->eps));
    const __m256 bi = _mm256_add_ps(_mm256_mul_ps(M->mu, bo), _mm256_mul_ps(M->k, nn));
    _mm256_storeu_ps(bn + i, bi);
    _mm256_storeu_ps(p + i, _mm256_fmadd_ps(M->npost, bi, _mm256_loadu_ps(p + i)));
}

/* Prefetch of 32 elements of each stream RMS_PF_AHEAD elements ahead of element at
 * (clamped to the run's end). The loop's long chains of divider work fill the reorder
 * window, which then holds too few of the loads to keep memory busy, and the hardware
 * prefetchers alone do not make up for it. */
#define RMS_PF_AHEAD 2048
#define RMS_PF_HINT _MM_HINT_T0
static inline __attribute__((always_inline)) void TNAME(sq_prefetch)(
    const float *p, const float *g, const uint8_t *codes, int64_t n, int64_t at,
    const int B4) {
    const int64_t k = at + RMS_PF_AHEAD < n - 32 ? at + RMS_PF_AHEAD : (n > 32 ? n - 32 : 0);
    _mm_prefetch((const char *)(p + k), RMS_PF_HINT);
    _mm_prefetch((const char *)(p + k + 16), RMS_PF_HINT);
    _mm_prefetch((const char *)(g + k), RMS_PF_HINT);
    _mm_prefetch((const char *)(g + k + 16), RMS_PF_HINT);
    _mm_prefetch((const char *)(codes + (B4 ? k / 2 : k)), RMS_PF_HINT);
}

/* The largest of 8 lanes, none NaN. */
static inline __attribute__((always_inline)) float TNAME(hmax8)(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* The largest of n v >= 0 in vb from the lane maxima of their bits vm: for v >= 0 (+inf
 * included) the order of the bits is that of the values, a NaN with its sign set stays below
 * the start at 0 as core()'s maximum leaves it out, and one without it, whose bits lie above
 * +inf's, takes the floating-point maximum over vb instead. */
static inline __attribute__((always_inline)) float TNAME(vmax_bits)(__m256i vm,
                                                                   const float *restrict vb,
                                                                   int64_t n) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(vm), _mm256_extracti128_si256(vm, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    const int32_t bits = _mm_cvtsi128_si32(m);
    if (bits <= 0x7f800000) {
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    __m256 x = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) x = _mm256_max_ps(_mm256_loadu_ps(vb + i), x);
    return TNAME(hmax8)(x);
}

/* One block of the pipeline: where it starts, its length, and what its stage so far left. */
typedef struct {
    int64_t lo, len, nv; /* nv: elements whose new v sq_stage_v buffered (0: none) */
    float m;             /* the maximum of those (hmax8 of the running maximum) */
    rms_qenc eb;         /* momentum: the new buffer's scale and encoder constants */
    const float *bb;     /* momentum: the new buffer */
    float s, cs;         /* the block's new scale and the encoder's constant from it */
    const float *r;      /* its roots */
} TNAME(sqb);

static inline __attribute__((always_inline)) void TNAME(segq_plain)(
    int64_t n, const rms_streams *S, const RMS_HYP *h, const int B4, const int MOM) {
    const int64_t blk = B4 ? RMS_QBLK / 2 : RMS_QBLK;
    const float qinv = B4 ? 0x1p-8f : 0x1p-16f, levels = B4 ? 16.0f : 256.0f;
    float *p = (float *)(void *)S->p;
    const float *g = (const float *)(const void *)S->g;
    uint8_t *codes = (uint8_t *)S->v;
    float *scales = S->vs;
    const TNAME(sqk) K = {_mm256_set1_ps(h->lr), _mm256_set1_ps(h->alpha),
                          _mm256_set1_ps(h->oma), _mm256_set1_ps(h->eps_out),
                          _mm256_set1_ps(1.0f)};
    const TNAME(sqm) M = {_mm256_set1_ps(h->mu), _mm256_set1_ps(h->k),
                          _mm256_set1_ps(-h->post), _mm256_set1_ps(B4 ? 7.0f : 127.0f),
                          _mm256_set1_ps(1.0f / (B4 ? 7.0f : 127.0f)),
                          _mm256_set1_epi32(B4 ? -7 : -127)};
    uint8_t *bcodes = (uint8_t *)S->b;
    float vbuf[2][RMS_QBLK], roots[2][RMS_QBLK], bbuf[2][MOM ? RMS_QBLK : 1];
    uint8_t ubuf[B4 ? RMS_QBLK : 1], ubufb[MOM && B4 ? RMS_QBLK : 1];
    const int64_t nb = (n + blk - 1) / blk;
    /* a: block j (its v), b: block j - 1 (its update), e: block j - 2 (its codes) */
    TNAME(sqb) a = {0}, b = {0}, e = {0};
    int hb = 0, he = 0; /* b, e hold a block */
    for (int64_t j = 0; j <= nb + 1; j++) {
        const int ha = j < nb;
        if (ha) {
            a.lo = j * blk;
            a.len = n - a.lo < blk ? n - a.lo : blk;
            const float s = scales[j];
            a.nv = s >= 0x1p-100f ? a.len & ~(int64_t)7 : 0;
        }
        const int64_t na = ha ? a.nv : 0, nbu = hb ? b.nv : 0;
        const int ee = he && e.s > 0.0f && e.s < INFINITY; /* e's codes in the loop */
        float *va = vbuf[j & 1];
        const float *vb = vbuf[(j - 1) & 1];
        float *rb = roots[(j - 1) & 1];
        const uint8_t *qa = codes + (B4 ? a.lo / 2 : a.lo);
        if (B4 && ha) TNAME(sq_unpack4)(qa, a.nv, ubuf, 0);
        const uint8_t *qa8 = B4 ? ubuf : qa;
        uint8_t *ce = codes + (B4 ? e.lo / 2 : e.lo);
        float *pb = p + b.lo;
        const float *ga = g + a.lo, *gb = g + b.lo;
        /* momentum: block b's old buffer (codes bqb, scale sb) and its new one */
        const uint8_t *bqb = MOM ? bcodes + (B4 ? b.lo / 2 : b.lo) : NULL;
        if (MOM && B4 && hb) TNAME(sq_unpack4)(bqb, b.nv, ubufb, 1);
        const uint8_t *bqb8 = MOM && B4 ? ubufb : bqb;
        const __m256 sb = _mm256_set1_ps(MOM && hb ? S->bs[j - 1] : 0.0f);
        float *bnb = bbuf[MOM ? (j - 1) & 1 : 0];
        const __m256 qs = _mm256_set1_ps(ha ? scales[j] * qinv : 0.0f);
        __m256i vm = _mm256_setzero_si256();
        const __m256 y = _mm256_set1_ps(e.cs);
        int64_t i = 0, ie = 0;
        const int64_t both = (na < nbu ? na : nbu) & ~(int64_t)31;
        for (; i < both; i += 32) {
            TNAME(sq_prefetch)(p, g, codes, n, a.lo + i, B4);
            for (int k = 0; k < 32; k += 8) {
                TNAME(sq_stage_v)(&K, qs, TNAME(sq_codes8)(qa8, i + k), i + k, ga, va,
                                  &vm);
                if (MOM)
                    TNAME(sq_stage_um)(&K, &M, i + k, pb, gb, vb, rb,
                                       TNAME(sq_bold8)(&M, bqb8, i + k, sb), bnb);
                else TNAME(sq_stage_u)(&K, i + k, pb, gb, vb, rb);
            }
            if (ee) TNAME(v_enc_sq32)(e.r + i, y, ce + (B4 ? i / 2 : i), B4);
        }
        if (ee) ie = i;
        for (int64_t k = i; k < na; k += 8) {
            if (!(k & 31)) TNAME(sq_prefetch)(p, g, codes, n, a.lo + k, B4);
            TNAME(sq_stage_v)(&K, qs, TNAME(sq_codes8)(qa8, k), k, ga, va, &vm);
        }
        for (int64_t k = i; k < nbu; k += 8) {
            if (!(k & 31)) TNAME(sq_prefetch)(p, g, codes, n, b.lo + k, B4);
            if (MOM)
                TNAME(sq_stage_um)(&K, &M, k, pb, gb, vb, rb,
                                   TNAME(sq_bold8)(&M, bqb8, k, sb), bnb);
            else TNAME(sq_stage_u)(&K, k, pb, gb, vb, rb);
        }
        if (he) { /* the rest of e's codes, and its scale */
            TNAME(qenc_run_sq)(e.r + ie, e.s, e.cs, e.len - ie, ce + (B4 ? ie / 2 : ie), B4);
            scales[(j - 2)] = e.s;
            if (MOM) {
                TNAME(qenc_run)(&e.eb, e.bb, e.len, bcodes + (B4 ? e.lo / 2 : e.lo), 1, B4);
                S->bs[j - 2] = e.eb.s;
            }
        }
        if (hb) { /* the rest of b's update (dispatch_sq), its scale and the root of it */
            float m = b.m;
            if (b.nv < b.len) {
                uint8_t cq[RMS_QBLK];
                const int64_t i0 = b.nv;
                const uint8_t *qv = cq;
                if (B4) TNAME(unpack4)(codes + (b.lo + i0) / 2, b.len - i0, cq);
                else qv = codes + b.lo + i0;
                float mt = 0.0f;
                if (MOM)
                    TNAME(qdec)(bqb + (B4 ? i0 / 2 : i0), S->bs[j - 1], b.len - i0, bnb + i0,
                                1, B4);
                TNAME(dispatch_sq)(MOM ? 2 : 0, 0, b.len - i0, pb + i0, gb + i0, rb + i0,
                                   MOM ? bnb + i0 : NULL, h, &mt, qv, scales[j - 1], qinv);
                m = mt > m ? mt : m;
            }
            /* the root of the maximum is the maximum of the roots (the root is monotonic
             * and correctly rounded): one scalar root instead of a running maximum that
             * waits for the divider */
            b.s = m;
            b.cs = m > 0.0f ? levels / sqrtf(m) : 0.0f;
            if (MOM) {
                TNAME(qenc_prep)(bnb, b.len, &b.eb, 1, B4);
                b.bb = bnb;
            }
            b.r = rb;
        }
        e = b; he = hb;
        if (ha) a.m = TNAME(vmax_bits)(vm, va, a.nv);
        b = a; hb = ha;
    }
}
/* Each variant its own function: inlined side by side, the default step's loop ran slower. */
static void TNAME(segq_plain8)(int64_t n, const rms_streams *S, const RMS_HYP *h) {
    TNAME(segq_plain)(n, S, h, 0, 0);
}
static void TNAME(segq_plain4)(int64_t n, const rms_streams *S, const RMS_HYP *h) {
    TNAME(segq_plain)(n, S, h, 1, 0);
}
static void TNAME(segq_plain8m)(int64_t n, const rms_streams *S, const RMS_HYP *h) {
    TNAME(segq_plain)(n, S, h, 0, 1);
}
static void TNAME(segq_plain4m)(int64_t n, const rms_streams *S, const RMS_HYP *h) {
    TNAME(segq_plain)(n, S, h, 1, 1);
}
#undef RMS_PF_AHEAD
#undef RMS_PF_HINT
#undef RMS_QV
#else
static inline __attribute__((always_inline)) void TNAME(qenc_run_sq)(
    const float *restrict r, float s, float cs, int64_t n, uint8_t *codes, const int B4) {
    (void)cs;
    if (!(s > 0.0f)) { memset(codes, 0, (size_t)(B4 ? n / 2 : n)); return; }
    uint8_t cq[RMS_QBLK];
    TNAME(enc_u_codes)(r, s, n, B4 ? cq : codes, B4, 1);
    if (B4) TNAME(pack4)(cq, n, codes);
}
static inline __attribute__((always_inline)) void TNAME(qdec)(
    const uint8_t *codes, float s, int64_t n, float *restrict d, const int SIGNED,
    const int B4) {
    TNAME(qdec_gen)(codes, s, n, d, SIGNED, B4);
}
static inline __attribute__((always_inline)) void TNAME(qenc_prep)(
    const float *restrict x, int64_t n, rms_qenc *E, const int SIGNED, const int B4) {
    (void)B4;
    E->s = TNAME(enc_max)(x, n, SIGNED);
    E->mode = E->s > 0.0f;
}
static inline __attribute__((always_inline)) void TNAME(qenc_run)(
    const rms_qenc *E, const float *restrict x, int64_t n, uint8_t *codes, const int SIGNED,
    const int B4) {
    if (E->mode == 0) memset(codes, 0, (size_t)(B4 ? n / 2 : n));
    else TNAME(qenc_gen_codes)(x, E->s, n, codes, SIGNED, B4);
}
#endif

/* A run of n elements of one tensor whose state is quantized (u square_avg, s grad_avg and
 * momentum_buffer, all 8-bit or all 4-bit), starting on a block boundary: each block is
 * decoded into float buffers, updated by the same loops as float32 state, and encoded back
 * with its new scale. With centered, square_avg holds w = max(v - m'^2, 0) (m' the decoded
 * grad_avg): decoded as v = w + m^2 from the stored m, and re-encoded from the new m' as the
 * next step decodes it. */
static inline __attribute__((always_inline)) void TNAME(segq_bits)(
    int pdt, int spec, int64_t n, const rms_streams *S, const RMS_HYP *h, double *acc,
    const int B4) {
    const int cen = spec & 1, mom = (spec >> 1) & 1, pdir = pdt == DT_F32;
    const int st16 = (spec >> 3) & 1 && !pdir; /* stats of a decoded param: stored_stats */
    /* square_avg encoded from the update's own roots (dispatch_sq): the root taken is of
     * v itself (no centering, no bias correction, eps outside it), and no Nesterov */
    const int root = (spec & 9) == 0 && !((spec & 2) && h->nesterov) && h->eps_in == 0.0f &&
                     h->invc == 1.0f;
    const int scaled = h->gmul != 1.0f || h->pdecay != 1.0f;
#ifdef RMS_F16C
    if (root && !scaled && pdir && (spec == 0 || spec == 2)) { /* written out */
        if (B4) (spec ? TNAME(segq_plain4m) : TNAME(segq_plain4))(n, S, h);
        else (spec ? TNAME(segq_plain8m) : TNAME(segq_plain8))(n, S, h);
        return;
    }
#endif
    const size_t ps = rms_dtsize(pdt);
    const int64_t blk = B4 ? RMS_QBLK / 2 : RMS_QBLK;
    float bp[RMS_QBLK], bg[RMS_QBLK], bm[RMS_QBLK], bb[RMS_QBLK], bo[RMS_QBLK];
    float bvs[2][RMS_QBLK];
    double part[6];
    rms_qenc E;
    /* In root mode a block's square_avg codes are written after the next block's update:
     * its scale comes out of a reduction at the end of the update, and the encoder's
     * constant from it (a root and a division), so encoding at once would wait for them. */
    struct { uint8_t *vc; const float *r; int64_t len, j; float s, cs; } pend = {0};
#define RMS_QFLUSH()                                                                         \
    do {                                                                                     \
        if (pend.vc) {                                                                       \
            TNAME(qenc_run_sq)(pend.r, pend.s, pend.cs, pend.len, pend.vc, B4);              \
            S->vs[pend.j] = pend.s;                                                          \
        }                                                                                    \
    } while (0)
    for (int64_t lo = 0, j = 0; lo < n; lo += blk, j++) {
        float *bv = bvs[j & 1];
        const int64_t len = n - lo < blk ? n - lo : blk;
        const int64_t co = B4 ? lo / 2 : lo; /* code bytes before this block */
        char *pc = S->p + lo * ps;
        const char *gc = S->g + lo * ps;
        uint8_t *vc = (uint8_t *)S->v + co;
        uint8_t *mc = cen ? (uint8_t *)S->m + co : NULL, *bc = mom ? (uint8_t *)S->b + co : NULL;
        float *pp;
        const float *gp;
        if (pdir) { pp = (float *)(void *)pc; gp = (const float *)(const void *)gc; }
        else {
            TNAME(decode)(pdt, pc, NULL, len, bp); TNAME(decode)(pdt, gc, NULL, len, bg);
            pp = bp; gp = bg;
        }
        uint8_t cq[RMS_QBLK];
        const uint8_t *qv = vc;
        if (root && B4) { TNAME(unpack4)(vc, len, cq); qv = cq; }
        else if (!root) TNAME(qdec)(vc, S->vs[j], len, bv, 0, B4);
        if (cen) {
            TNAME(qdec)(mc, S->ms[j], len, bm, 1, B4);
#pragma omp simd
            for (int64_t i = 0; i < len; i++) bv[i] = bv[i] + bm[i] * bm[i];
        }
        if (mom) TNAME(qdec)(bc, S->bs[j], len, bb, 1, B4);
        if (st16) { /* decoded again, not copied (see seg) */
            TNAME(decode)(pdt, pc, NULL, len, bo);
            stats_init(part);
        }
        float vmax = 0.0f;
        if (root)
            TNAME(dispatch_sq)(spec, scaled, len, pp, gp, bv, mom ? bb : NULL, h, &vmax, qv,
                               S->vs[j], B4 ? 0x1p-8f : 0x1p-16f);
        else TNAME(dispatch)(spec, len, pp, gp, bv, cen ? bm : NULL, mom ? bb : NULL, h,
                             st16 ? part : acc);
        if (!pdir) TNAME(encode)(pdt, pc, NULL, len, bp);
        if (st16) TNAME(stored_stats)(pdt, pc, len, bo, bp, part, acc);
        if (cen) {
            TNAME(qenc_prep)(bm, len, &E, 1, B4);
            TNAME(qenc_run)(&E, bm, len, mc, 1, B4);
            S->ms[j] = E.s;
            TNAME(qdec)(mc, E.s, len, bm, 1, B4);
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {
                float w = bv[i] - bm[i] * bm[i];
                bv[i] = w < 0.0f ? 0.0f : w; /* keeps NaN, as the rule's maximum */
            }
        }
        if (root) {
            RMS_QFLUSH();
            pend.vc = vc; pend.r = bv; pend.len = len; pend.j = j; pend.s = vmax;
            pend.cs = vmax > 0.0f ? (B4 ? 16.0f : 256.0f) / sqrtf(vmax) : 0.0f;
        } else {
            TNAME(qenc_prep)(bv, len, &E, 0, B4);
            TNAME(qenc_run)(&E, bv, len, vc, 0, B4);
            S->vs[j] = E.s;
        }
        if (mom) {
            TNAME(qenc_prep)(bb, len, &E, 1, B4);
            TNAME(qenc_run)(&E, bb, len, bc, 1, B4);
            S->bs[j] = E.s;
        }
    }
    RMS_QFLUSH();
#undef RMS_QFLUSH
}

/* bits: 8 or 4 (the formats' width, checked by rms_fused_step_q). */
static void TNAME(segq)(int pdt, int bits, int spec, int64_t n, const rms_streams *S,
                        const void *hyp, double *acc) {
    const RMS_HYP *h = (const RMS_HYP *)hyp;
    if (bits == 4) TNAME(segq_bits)(pdt, spec, n, S, h, acc, 1);
    else TNAME(segq_bits)(pdt, spec, n, S, h, acc, 0);
}

/* The codecs alone over a flat array of n values cut into blocks (the step's own encode
 * and decode, for tests against rmsprop.codecs): enc 1 encodes x into codes and scales,
 * enc 0 decodes them into x. fmt: QF_U8, QF_S8, QF_U4, QF_S4 (checked by the caller). */
static void TNAME(qcodec)(int fmt, int enc, int64_t n, float *x, uint8_t *codes,
                          float *scales) {
    const int sg = fmt == QF_S8 || fmt == QF_S4, b4 = fmt == QF_U4 || fmt == QF_S4;
    const int64_t blk = b4 ? RMS_QBLK / 2 : RMS_QBLK;
    for (int64_t lo = 0, j = 0; lo < n; lo += blk, j++) {
        const int64_t len = n - lo < blk ? n - lo : blk;
        uint8_t *c = codes + (b4 ? lo / 2 : lo);
        rms_qenc E;
#define RMS_QCODEC(SG, B4)                                                                   \
    do {                                                                                     \
        if (!enc) { TNAME(qdec)(c, scales[j], len, x + lo, SG, B4); break; }                 \
        TNAME(qenc_prep)(x + lo, len, &E, SG, B4);                                           \
        TNAME(qenc_run)(&E, x + lo, len, c, SG, B4);                                         \
        scales[j] = E.s;                                                                     \
    } while (0)
        if (sg && b4) RMS_QCODEC(1, 1);
        else if (sg) RMS_QCODEC(1, 0);
        else if (b4) RMS_QCODEC(0, 1);
        else RMS_QCODEC(0, 0);
#undef RMS_QCODEC
    }
}
#endif

#undef T
#undef TNAME
#undef TN_NAME2
#undef TN_NAME_
