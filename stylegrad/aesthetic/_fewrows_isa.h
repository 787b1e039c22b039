/* The kernels of _fewrows.c for one instruction set, included once per set; before each inclusion the file
   defines KERNEL (the target attribute), SFX (the name suffix), the vector type V of VW floats and its ops, and
   TOKENS / GTOKENS (tokens per block of the forward and input-gradient products: as many as the set's registers
   hold accumulators for). */

#define INLINE static inline __attribute__((always_inline)) KERNEL
#define SW (2 * VW) /* columns per strip of the input gradient and Adam */

/* y[t..t+n, o..o+ROWS] (+)= x[t..t+n, k0:k1] . w[o..o+ROWS, k0:k1]; n is a constant after inlining.
   ``next`` is a row of the next block to prefetch to L1 while this one computes (or NULL), ``later`` rows to
   prefetch to L2: the value at column k of row p is at byte later[p] + size[p] * k (4 bytes a value, 2 for
   packed second moments). */
INLINE void SFX(dot_block)(const float *x, const float *w, float *y, long K, long O, long t, long k0, long k1,
                           const int n, int add, const float *next, const char *const *later, const int *size,
                           int nlater)
{
    V acc[ROWS][TOKENS];
    long kv = k0 + (k1 - k0) / VW * VW;
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < n; j++) acc[r][j] = VZERO();
    for (long k = k0; k < kv; k += VW) {
        V wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = VLOAD(w + r * K + k);
        if (next && !(k & 15)) _mm_prefetch((const char *)(next + k), _MM_HINT_T0);
        if (!(k & 15))
            for (int p = 0; p < nlater; p++) _mm_prefetch(later[p] + size[p] * k, _MM_HINT_T1);
        for (int j = 0; j < n; j++) {
            V xv = VLOAD(x + (t + j) * K + k);
            for (int r = 0; r < ROWS; r++) acc[r][j] = VFMA(wv[r], xv, acc[r][j]);
        }
    }
    for (int j = 0; j < n; j++)
        for (int r = 0; r < ROWS; r++) {
            float *p = y + (t + j) * O + r;
            float s = HSUM(acc[r][j]);
            for (long k = kv; k < k1; k++) s += x[(t + j) * K + k] * w[r * K + k];
            *p = add ? *p + s : s;
        }
}

/* All T tokens against rows o..o+ROWS, columns [k0, k1), in blocks of at most TOKENS of equal size.
   ``later``/``nlater``/``per``: rows to prefetch to L2, ``per`` of them in each token block. */
INLINE void SFX(dot_tokens)(const float *x, const float *w, float *y, long T, long K, long O, long k0, long k1,
                            int add, const float *next, const char *const *later, const int *size, int nlater,
                            int per)
{
    const int blocks = (int)((T + TOKENS - 1) / TOKENS);
    long t = 0;
    for (int b = 0; b < blocks; b++) {
        long n = (T - t) / (blocks - b);
        int lo = b * per < nlater ? b * per : nlater, cnt = lo + per < nlater ? per : nlater - lo;
        const float *nx = b < ROWS ? next : 0;
        const float *nrow = nx ? nx + b * K : 0; /* token block b prefetches row b of the next row block */
        switch (n) {
        case 1: SFX(dot_block)(x, w, y, K, O, t, k0, k1, 1, add, nrow, later + lo, size + lo, cnt); break;
        case 2: SFX(dot_block)(x, w, y, K, O, t, k0, k1, 2, add, nrow, later + lo, size + lo, cnt); break;
#if TOKENS > 3
        case 3: SFX(dot_block)(x, w, y, K, O, t, k0, k1, 3, add, nrow, later + lo, size + lo, cnt); break;
        case 4: SFX(dot_block)(x, w, y, K, O, t, k0, k1, 4, add, nrow, later + lo, size + lo, cnt); break;
        case 5: SFX(dot_block)(x, w, y, K, O, t, k0, k1, 5, add, nrow, later + lo, size + lo, cnt); break;
#endif
        default: SFX(dot_block)(x, w, y, K, O, t, k0, k1, TOKENS, add, nrow, later + lo, size + lo, cnt); break;
        }
        t += n;
    }
}

/* Rows [o0, o1) of y = x W^T (o1 - o0 a multiple of ROWS). */
KERNEL static void SFX(forward_rows)(const float *x, const float *w, float *y, long T, long K, long O, long o0,
                                     long o1)
{
    for (long o = o0; o < o1; o += ROWS) {
        const float *wo = w + o * K;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
            const float *next = o + ROWS < o1 ? wo + ROWS * K : 0;
            SFX(dot_tokens)(x, wo, y + o, T, K, O, k0, k1, k0 > 0, next, 0, 0, 0, 0);
        }
    }
}

/* The columns of y left over when O is not a multiple of ROWS. */
KERNEL static void SFX(forward_tail)(const float *x, const float *w, float *y, long T, long K, long O, long o0)
{
    for (long o = o0; o < O; o++)
        for (long t = 0; t < T; t++) {
            V acc = VZERO();
            long k = 0;
            for (; k + VW <= K; k += VW) acc = VFMA(VLOAD(w + o * K + k), VLOAD(x + t * K + k), acc);
            float s = HSUM(acc);
            for (; k < K; k++) s += x[t * K + k] * w[o * K + k];
            y[t * O + o] = s;
        }
}

/* out[t..t+n, k:k+SW] (+)= sum over o in [o0, o1) of g[t.., o] * w[o, k:k+SW], the sums in registers. With
   ``next``, SW floats from it per row walked are prefetched to L2. */
INLINE void SFX(axpy_block)(const float *g, const float *w, float *out, long K, long O, long k, long t, long o0,
                            long o1, const int n, int add, const float *next)
{
    V a[GTOKENS][2];
    if (add)
        for (int j = 0; j < n; j++) {
            a[j][0] = VLOAD(out + (t + j) * K + k);
            a[j][1] = VLOAD(out + (t + j) * K + k + VW);
        }
    else
        for (int j = 0; j < n; j++) a[j][0] = a[j][1] = VZERO();
    for (long o = o0; o < o1; o++) {
        V w0 = VLOAD(w + o * K + k), w1 = VLOAD(w + o * K + k + VW);
        if (next)
            for (int l = 0; l < SW; l += 16) _mm_prefetch((const char *)(next + (o - o0) * SW + l), _MM_HINT_T1);
        for (int j = 0; j < n; j++) {
            V b = VSET1(g[(t + j) * O + o]);
            a[j][0] = VFMA(b, w0, a[j][0]);
            a[j][1] = VFMA(b, w1, a[j][1]);
        }
    }
    for (int j = 0; j < n; j++) {
        VSTORE(out + (t + j) * K + k, a[j][0]);
        VSTORE(out + (t + j) * K + k + VW, a[j][1]);
    }
}

/* out = g[:, o0:o1] W[o0:o1, :] on the first K / SW * SW columns, panel by panel. Why panels of rows: a panel of W
   is one contiguous stretch of memory, so it streams in at full speed (prefetched while the panel before it
   computes) and is then read strip by strip from cache; walking the columns of all O rows instead touches a new
   page every row and ran at a third of the memory's speed. */
KERNEL static void SFX(input_grad_rows)(const float *g, const float *w, float *out, long T, long K, long O,
                                        long o0, long o1)
{
    const long strips = K / SW;
    const int blocks = (int)((T + GTOKENS - 1) / GTOKENS);
    const long rows = PANEL / K > 16 ? PANEL / K : 16;
    for (long p0 = o0; p0 < o1; p0 += rows) {
        long p1 = p0 + rows < o1 ? p0 + rows : o1;
        long n1 = p1 + rows < o1 ? p1 + rows : o1; /* the next panel, [p1, n1) */
        for (long s = 0; s < strips; s++) {
            long k = s * SW;
            /* this strip prefetches as much of the next panel as it reads of this one, in memory order: over
               the strips, the next panel's first (p1 - p0) * kv floats, which cover it */
            const float *next = p1 < n1 ? w + p1 * K + s * (p1 - p0) * SW : 0;
            long t = 0;
            for (int b = 0; b < blocks; b++) {
                long n = (T - t) / (blocks - b);
                const float *pf = b == 0 ? next : 0;
                int add = p0 > o0;
                switch (n) {
                case 1: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 1, add, pf); break;
                case 2: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 2, add, pf); break;
                case 3: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 3, add, pf); break;
                case 4: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 4, add, pf); break;
                case 5: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 5, add, pf); break;
#if GTOKENS > 6
                case 6: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 6, add, pf); break;
                case 7: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 7, add, pf); break;
                case 8: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 8, add, pf); break;
                case 9: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 9, add, pf); break;
                case 10: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 10, add, pf); break;
                case 11: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, 11, add, pf); break;
#endif
                default: SFX(axpy_block)(g, w, out, K, O, k, t, p0, p1, GTOKENS, add, pf); break;
                }
                t += n;
            }
        }
    }
}

/* The step of VW elements from i on, given their moments m and v after this step's gradient. */
INLINE V SFX(adam_update)(const adam_args *a, long i, V m, V v)
{
    /* sqrt and division from the CPU's estimates refined by one Newton step each (a few ulp from exact, tested
       against torch's Adam): with the exact instructions this step was bound by them, not by memory */
    const V half = VSET1(0.5f), three = VSET1(3.f), two = VSET1(2.f);
    V vc = VMAX(v, VSET1(1.17549435e-38f)); /* v = 0: sqrt 0, not 0 * inf */
    V r = VRSQRT(vc);
    r = VMUL(VMUL(half, r), VFNMA(VMUL(vc, r), r, three)); /* 1 / sqrt v */
    V den = VFMA(VMUL(vc, r), VSET1(a->inv_bc2_sqrt), VSET1(a->eps));
    V q = VRCP(den);
    q = VMUL(q, VFNMA(den, q, two)); /* 1 / den */
    return VFNMA(VSET1(a->step_size), VMUL(m, q), VLOAD(a->src + i));
}

INLINE V SFX(adam_vec)(const adam_args *a, long i, V g)
{
    const V c1 = VSET1(a->c1), c2 = VSET1(a->c2);
    V m = VMUL(c1, g), v = VMUL(VMUL(c2, g), g);
    if (!a->first) {
        V mo, vo;
        VLOADMV(a, i, &mo, &vo);
        m = VFMA(VSET1(a->beta1), mo, m);
        v = VFMA(VSET1(a->beta2), vo, v);
    }
    if (a->keep) VSTOREMV(a, i, m, v);
    return SFX(adam_update)(a, i, m, v);
}

/* acc = the gradient gp^T xp on rows o..o+n (gp already offset to o, n <= RROWS), columns k..k+SW: the sums in
   registers. */
INLINE void SFX(grad_strip)(const float *gp, const float *xp, long K, long O, long Tp, long k, const int n,
                            V acc[RROWS][2])
{
    for (int r = 0; r < n; r++) acc[r][0] = acc[r][1] = VZERO();
    for (long t = 0; t < Tp; t++) {
        V x0 = VLOAD(xp + t * K + k), x1 = VLOAD(xp + t * K + k + VW);
        for (int r = 0; r < n; r++) {
            V b = VSET1(gp[t * O + r]);
            acc[r][0] = VFMA(b, x0, acc[r][0]);
            acc[r][1] = VFMA(b, x1, acc[r][1]);
        }
    }
}

/* Adam's recursions for rows 0..n of a block after step s's gradient acc (at s = 0 the moments' first values):
   one routine for both rebuilding kernels, so every element gets the same instructions, in the same order, as
   adam_vec gives it with stored moments. */
INLINE void SFX(recur)(const adam_args *a, V acc[RROWS][2], V m[RROWS][2], V v[RROWS][2], long s, const int n)
{
    const V c1 = VSET1(a->c1), c2 = VSET1(a->c2), b1 = VSET1(a->beta1), b2 = VSET1(a->beta2);
    for (int r = 0; r < n; r++)
        for (int h = 0; h < 2; h++) {
            V g = acc[r][h], gm = VMUL(c1, g), gv = VMUL(VMUL(c2, g), g);
            m[r][h] = s ? VFMA(b1, VROUND(m[r][h]), gm) : gm; /* the previous moments as kept ones carry them */
            v[r][h] = s ? VFMA(b2, VROUND(v[r][h]), gv) : gv;
        }
}

/* Rows o..o+n, columns k..k+SW take their step from their moments m, v. */
INLINE void SFX(step_rows)(const adam_args *a, long o, long k, V m[RROWS][2], V v[RROWS][2], const int n)
{
#pragma GCC unroll 16
    for (int r = 0; r < n; r++) {
        long i = (o + r) * a->K + k;
        V w0 = SFX(adam_update)(a, i, m[r][0], v[r][0]), w1 = SFX(adam_update)(a, i + VW, m[r][1], v[r][1]);
        VSTORE(a->dst + i, w0);
        VSTORE(a->dst + i + VW, w1);
    }
}

/* Rows o..o+n, columns [k0, k1) take their step with rebuilt moments: per strip, every step's gradient is
   formed again (the same sums as adam_block's) and run through Adam's recursions in registers. */
INLINE void SFX(adam_rebuilt_block)(const adam_args *a, long o, long k0, long k1, const int n)
{
    const long K = a->K, O = a->O, Tp = a->Tp, nh = a->nh;
    long k = k0;
    for (; k + SW <= k1; k += SW) {
        V m[RROWS][2], v[RROWS][2];
        for (long s = 0; s < nh; s++) {
            V acc[RROWS][2];
            SFX(grad_strip)(a->hgp[s] + o, a->hxp[s], K, O, Tp, k, n, acc);
            SFX(recur)(a, acc, m, v, s, n);
        }
        SFX(step_rows)(a, o, k, m, v, n);
    }
    for (; k < k1; k++)
        for (int r = 0; r < n; r++) a->dst[(o + r) * K + k] = adam_scalar_rebuilt(a, o + r, k);
}

/* One block of RROWS rows, one strip of SW columns, with rebuilt moments, from packed factors: gk[s] holds step
   s's grad_out for this panel's rows (Tp rows of RPANEL, offset to the block), xk[s] its x on this strip (Tp rows
   of SW). Why twice adam_block's rows (on AVX-512): 16 independent sums hide the multiply-adds' latency, where 8
   left the units idle; the moments, touched once a step, then live in L1 instead of registers. */
INLINE void SFX(rebuilt_strip)(const adam_args *a, const float *gk, const float *xk, long o, long k)
{
    const long Tp = a->Tp, nh = a->nh, sg = Tp * RPANEL, sx = Tp * SW;
    V m[RROWS][2], v[RROWS][2];
    for (long s = 0; s < nh; s++) {
        V acc[RROWS][2];
        SFX(grad_strip)(gk + s * sg, xk + s * sx, SW, RPANEL, Tp, 0, RROWS, acc);
        SFX(recur)(a, acc, m, v, s, RROWS);
    }
    SFX(step_rows)(a, o, k, m, v, RROWS);
}

/* Rows [o0, o1) (a multiple of ROWS) take their step with rebuilt moments, then y = x W^T on them. Why this order
   (strips outside, row blocks inside, per panel of RPANEL rows): a strip's x over every step (xs: strip-major,
   nh * Tp * SW floats, 22 KB at 10 steps of 17 rows) is then read from L1 by every block of the panel, where
   walking a block's whole row first read it from L2 for each block, which bound the kernel at a third of the
   cores' arithmetic. ``gk``: this thread's buffer of nh * Tp * RPANEL floats for the panel's grad_out. */
KERNEL static void SFX(rebuilt_forward_rows)(const adam_args *args, const float *xs, float *gk, const float *x,
                                             float *y, long T, long o0, long o1)
{
    const adam_args local = *args, *a = &local; /* see adam_forward_rows */
    const long K = a->K, O = a->O, Tp = a->Tp, nh = a->nh, kv = K / SW * SW;
    for (long p0 = o0; p0 < o1; p0 += RPANEL) {
        long p1 = p0 + RPANEL < o1 ? p0 + RPANEL : o1;
        for (long s = 0; s < nh; s++) /* pack the panel's grad_out: [s][t][row] */
            for (long t = 0; t < Tp; t++)
                memcpy(gk + (s * Tp + t) * RPANEL, a->hgp[s] + t * O + p0, sizeof(float) * (size_t)(p1 - p0));
        const long pr = p0 + (p1 - p0) / RROWS * RROWS; /* rows past it: a block of ROWS, the older way */
        for (long k = 0; k < kv; k += SW)
            for (long o = p0; o < pr; o += RROWS)
                SFX(rebuilt_strip)(a, gk + (o - p0), xs + k * nh * Tp, o, k);
        for (long o = pr; o < p1; o += ROWS) SFX(adam_rebuilt_block)(a, o, 0, kv, ROWS);
        for (long k = kv; k < K; k++)
            for (long o = p0; o < p1; o++) a->dst[o * K + k] = adam_scalar_rebuilt(a, o, k);
        if (T > 0)
            for (long o = p0; o < p1; o += ROWS)
                for (long k0 = 0; k0 < K; k0 += KCHUNK) {
                    long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
                    SFX(dot_tokens)(x, a->dst + o * K, y + o, T, K, O, k0, k1, k0 > 0, 0, 0, 0, 0, 0);
                }
    }
}

/* Rows o..o+n (n a constant after inlining), columns [k0, k1) of the weight take their Adam step. */
INLINE void SFX(adam_block)(const adam_args *a, long o, long k0, long k1, const int n)
{
    if (a->nh) {
        SFX(adam_rebuilt_block)(a, o, k0, k1, n);
        return;
    }
    const long K = a->K, O = a->O, Tp = a->Tp; /* locals: the compiler then keeps the sums in registers */
    const float *gp = a->gp + o, *xp = a->xp;
    long k = k0;
    for (; k + SW <= k1; k += SW) {
        V acc[RROWS][2];
        SFX(grad_strip)(gp, xp, K, O, Tp, k, n, acc);
#pragma GCC unroll 8 /* constant indices: the sums stay in registers through the t loop */
        for (int r = 0; r < n; r++) {
            long i = (o + r) * K + k;
            V w0 = SFX(adam_vec)(a, i, acc[r][0]), w1 = SFX(adam_vec)(a, i + VW, acc[r][1]);
            VSTORE(a->dst + i, w0);
            VSTORE(a->dst + i + VW, w1);
        }
    }
    for (; k < k1; k++)
        for (int r = 0; r < n; r++) a->dst[(o + r) * K + k] = adam_scalar(a, o + r, k);
}

/* The rows from o0 on, when O is not a multiple of ROWS, take their step. */
KERNEL static void SFX(adam_tail)(const adam_args *a, long o0)
{
    for (long o = o0; o < a->O; o++) SFX(adam_block)(a, o, 0, a->K, 1);
}

/* Rows [o0, o1) (a multiple of ROWS) take their step, then y = x W^T on them, chunk by chunk from cache. While
   the product of one chunk computes, the weight and moments of the next are prefetched to L2, so memory and
   arithmetic overlap: without it the fused step would wait on memory as long as the three passes it replaces. */
KERNEL static void SFX(adam_forward_rows)(const adam_args *args, const float *x, float *y, long T, long o0, long o1)
{
    /* a copy that no store through the weight or moment pointers can alias: the compiler keeps its fields in
       registers instead of loading them again after every store (the kept step ran 3-7% faster) */
    const adam_args local = *args, *a = &local;
    const long K = a->K, O = a->O;
    const int blocks = T > 0 ? (int)((T + TOKENS - 1) / TOKENS) : 1, arrays = a->first ? 1 : 3, rows = ROWS * arrays;
    const int per = (rows + blocks - 1) / blocks; /* rows to prefetch in each token block */
    for (long o = o0; o < o1; o += ROWS) {
        const float *wo = a->dst + o * K;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
            /* the next chunk: further along these rows, or the start of the next rows */
            long no = k1 < K ? o : o + ROWS, nk = k1 < K ? k1 : 0;
            const char *later[3 * ROWS];
            int size[3 * ROWS], nlater = 0;
            if (no < o1)
                for (int r = 0; r < ROWS; r++) {
                    long i = (no + r) * K + nk - k0; /* offset so that column k walks the next chunk */
                    size[nlater] = 4, later[nlater++] = (const char *)(a->src + i);
                    if (!a->first) {
                        size[nlater] = 4, later[nlater++] = (const char *)a->m + 4 * i;
                        size[nlater] = VBYTES, later[nlater++] = (const char *)a->v + VBYTES * i;
                    }
                }
            SFX(adam_block)(a, o, k0, k1, ROWS);
            if (T > 0) SFX(dot_tokens)(x, wo, y + o, T, K, O, k0, k1, k0 > 0, 0, later, size, nlater, per);
        }
    }
}

#undef INLINE
#undef SW
