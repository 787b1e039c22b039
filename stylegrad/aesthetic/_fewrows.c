/* Products of one large float32 weight W (O rows, K columns, row-major) with a few token rows, and an Adam step
of W fused with the next of them, for AVX2 + FMA.

Why: tuning runs each of the 72 large matrices of a text tower through three products per step on about 17 rows
(forward, input gradient, weight gradient) and one Adam step. BLAS kernels, built for many rows, waste vector
lanes on the short side; these never vectorise over tokens, and ran each kind of work about 1.5x faster than
torch's kernels on two cores of the test machine (bench/products.py):
- forward, y = x W^T + b: dot products along K, 4 rows of W against 3 tokens at a time, so each row block,
  streamed once from memory, is reused from L1 for every token;
- input gradient, gx = g W: rows of W scaled and summed along K, 6 tokens x 16 columns at a time, over blocks
  of 128 rows of W so that block is read once from memory and reused from cache for every token;
- Adam, then forward (adam_linear): each block of rows forms its gradient from the two factors the backward
  pass kept, takes its Adam step and runs the next forward product while in cache. Per step, W and its moments
  cross memory once, and no full gradient is ever stored.
Threads come from OpenMP: linked against libgomp.so.1, this module shares the runtime torch has already loaded, so
torch.set_num_threads applies and its worker threads are reused. stylegrad uses the module only if it was built
and the CPU has AVX2 and FMA (products.py); otherwise it uses torch's products and fused Adam. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <omp.h>

/* Only the kernels are compiled for AVX2 + FMA, so that importing the module is safe on any x86-64 CPU. */
#define KERNEL __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline)) KERNEL
#define ROWS 4      /* forward: rows of W per block */
#define TOKENS 3    /* forward: tokens per block */
#define GTOKENS 6   /* input gradient: tokens per block */
#define GROWS 128   /* input gradient: rows of W per cache block */
#define AHEAD 48    /* input gradient: prefetch distance in rows of W */
#define KCHUNK 1024 /* forward: columns per pass, so a block of W stays in L1 while every token reads it */

INLINE float hsum(__m256 v)
{
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* y[t..t+n, o..o+ROWS] (+)= x[t..t+n, k0:k1] . w[o..o+ROWS, k0:k1]; n is a constant after inlining.
   ``next`` is a row of the next block to prefetch to L1 while this one computes (or NULL), ``later`` rows to
   prefetch to L2. */
INLINE void dot_block(const float *x, const float *w, float *y, long K, long O, long t, long k0, long k1,
                      const int n, int add, const float *next, const float *const *later, int nlater)
{
    __m256 acc[ROWS][TOKENS];
    long kv = k0 + (k1 - k0) / 8 * 8;
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < n; j++) acc[r][j] = _mm256_setzero_ps();
    for (long k = k0; k < kv; k += 8) {
        __m256 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = _mm256_loadu_ps(w + r * K + k);
        if (next && !(k & 15)) _mm_prefetch((const char *)(next + k), _MM_HINT_T0);
        if (!(k & 15))
            for (int p = 0; p < nlater; p++) _mm_prefetch((const char *)(later[p] + k), _MM_HINT_T1);
        for (int j = 0; j < n; j++) {
            __m256 xv = _mm256_loadu_ps(x + (t + j) * K + k);
            for (int r = 0; r < ROWS; r++) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
        }
    }
    for (int j = 0; j < n; j++)
        for (int r = 0; r < ROWS; r++) {
            float *p = y + (t + j) * O + r;
            float s = hsum(acc[r][j]);
            for (long k = kv; k < k1; k++) s += x[(t + j) * K + k] * w[r * K + k];
            *p = add ? *p + s : s;
        }
}

/* Rows [o0, o1) of y = x W^T (o1 - o0 a multiple of ROWS). */
KERNEL static void forward_rows(const float *x, const float *w, float *y, long T, long K, long O, long o0, long o1)
{
    for (long o = o0; o < o1; o += ROWS) {
        const float *wo = w + o * K;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
            int add = k0 > 0, g = 0;
            long t = 0;
/* each token block prefetches one row of the next row block: ROWS blocks cover it */
#define NEXT (o + ROWS < o1 && g < ROWS ? wo + (ROWS + g) * K : (const float *)0)
            for (; t + TOKENS <= T; t += TOKENS, g++)
                dot_block(x, wo, y + o, K, O, t, k0, k1, TOKENS, add, NEXT, NULL, 0);
            if (T - t == 1) dot_block(x, wo, y + o, K, O, t, k0, k1, 1, add, NEXT, NULL, 0);
            if (T - t == 2) dot_block(x, wo, y + o, K, O, t, k0, k1, 2, add, NEXT, NULL, 0);
#undef NEXT
        }
    }
}

/* The columns of y left over when O is not a multiple of ROWS. */
KERNEL static void forward_tail(const float *x, const float *w, float *y, long T, long K, long O, long o0)
{
    for (long o = o0; o < O; o++)
        for (long t = 0; t < T; t++) {
            __m256 acc = _mm256_setzero_ps();
            long k = 0;
            for (; k + 8 <= K; k += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + o * K + k), _mm256_loadu_ps(x + t * K + k), acc);
            float s = hsum(acc);
            for (; k < K; k++) s += x[t * K + k] * w[o * K + k];
            y[t * O + o] = s;
        }
}

/* gx[t..t+n, k:k+16] (+)= sum over o in [o0, o1) of g[t.., o] * w[o, k:k+16]. The first token block reads
   this strip of W from memory: it prefetches AHEAD rows ahead, in the order the strips are read, so the next strip is in
   cache when its turn comes (prefetching only within the strip leaves that wait exposed). */
INLINE void axpy_block(const float *g, const float *w, float *gx, long K, long O, long k, long k1, long t,
                       long o0, long o1, const int n, int add)
{
    __m256 a[GTOKENS][2];
    for (int j = 0; j < n; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
    for (long o = o0; o < o1; o++) {
        __m256 w0 = _mm256_loadu_ps(w + o * K + k), w1 = _mm256_loadu_ps(w + o * K + k + 8);
        if (t == 0) {
            long ahead = o + AHEAD;
            if (ahead < o1)
                _mm_prefetch((const char *)(w + ahead * K + k), _MM_HINT_T0);
            else if (k + 16 < k1 && ahead - (o1 - o0) < o1)
                _mm_prefetch((const char *)(w + (ahead - (o1 - o0)) * K + k + 16), _MM_HINT_T0);
        }
        for (int j = 0; j < n; j++) {
            __m256 b = _mm256_broadcast_ss(g + (t + j) * O + o);
            a[j][0] = _mm256_fmadd_ps(b, w0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(b, w1, a[j][1]);
        }
    }
    for (int j = 0; j < n; j++) {
        float *p = gx + (t + j) * K + k;
        if (add) {
            a[j][0] = _mm256_add_ps(a[j][0], _mm256_loadu_ps(p));
            a[j][1] = _mm256_add_ps(a[j][1], _mm256_loadu_ps(p + 8));
        }
        _mm256_storeu_ps(p, a[j][0]);
        _mm256_storeu_ps(p + 8, a[j][1]);
    }
}

/* Columns [k0, k1) of gx = g W (multiples of 16). */
KERNEL static void input_grad_columns(const float *g, const float *w, float *gx, long T, long K, long O, long k0, long k1)
{
    for (long o0 = 0; o0 < O; o0 += GROWS) {
        long o1 = o0 + GROWS < O ? o0 + GROWS : O;
        int add = o0 > 0;
        for (long k = k0; k < k1; k += 16) {
            long t = 0;
            for (; t + GTOKENS <= T; t += GTOKENS) axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, GTOKENS, add);
            switch (T - t) {
            case 1: axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, 1, add); break;
            case 2: axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, 2, add); break;
            case 3: axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, 3, add); break;
            case 4: axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, 4, add); break;
            case 5: axpy_block(g, w, gx, K, O, k, k1, t, o0, o1, 5, add); break;
            }
        }
    }
}

/* One Adam step of a weight whose gradient is gp^T xp (gp: Tp x O, xp: Tp x K, the factors the backward pass
   saved), fused with the next forward product on the updated rows. Why: a step otherwise reads W four times from
   memory (gradient product, Adam, next forward) and writes and reads a full gradient; here each block of rows is
   read and written once, and its gradient exists only in registers. */
typedef struct {
    const float *src, *gp, *xp; /* weight before the step (the original at the first step), gradient factors */
    float *dst, *m, *v;         /* weight after the step (may be src); moments (NULL at a first, last step) */
    long Tp, K, O;
    int first, keep;            /* moments are zero: not read; moments are written (no step follows: not) */
    float step_size, inv_bc2_sqrt, beta1, beta2, eps;
    float c1, c2;               /* 1 - beta1, 1 - beta2, rounded from double as torch does */
} adam_args;

INLINE __m256 adam_vec(const adam_args *a, long i, __m256 g)
{
    const __m256 c1 = _mm256_set1_ps(a->c1), c2 = _mm256_set1_ps(a->c2);
    __m256 m = _mm256_mul_ps(c1, g), v = _mm256_mul_ps(_mm256_mul_ps(c2, g), g);
    if (!a->first) {
        m = _mm256_fmadd_ps(_mm256_set1_ps(a->beta1), _mm256_loadu_ps(a->m + i), m);
        v = _mm256_fmadd_ps(_mm256_set1_ps(a->beta2), _mm256_loadu_ps(a->v + i), v);
    }
    if (a->keep) {
        _mm256_storeu_ps(a->m + i, m);
        _mm256_storeu_ps(a->v + i, v);
    }
    /* sqrt and division from the CPU's estimates refined by one Newton step each (a few ulp from exact, tested
       against torch's Adam): with vsqrtps and vdivps this step was bound by them, not by memory */
    const __m256 half = _mm256_set1_ps(0.5f), three = _mm256_set1_ps(3.f), two = _mm256_set1_ps(2.f);
    __m256 vc = _mm256_max_ps(v, _mm256_set1_ps(1.17549435e-38f));           /* v = 0: sqrt 0, not 0 * inf */
    __m256 r = _mm256_rsqrt_ps(vc);
    r = _mm256_mul_ps(_mm256_mul_ps(half, r), _mm256_fnmadd_ps(_mm256_mul_ps(vc, r), r, three)); /* 1 / sqrt v */
    __m256 den = _mm256_fmadd_ps(_mm256_mul_ps(vc, r), _mm256_set1_ps(a->inv_bc2_sqrt), _mm256_set1_ps(a->eps));
    __m256 q = _mm256_rcp_ps(den);
    q = _mm256_mul_ps(q, _mm256_fnmadd_ps(den, q, two));                       /* 1 / den */
    return _mm256_fnmadd_ps(_mm256_set1_ps(a->step_size), _mm256_mul_ps(m, q), _mm256_loadu_ps(a->src + i));
}

static float adam_scalar(const adam_args *a, long i, float g)
{
    float m = a->c1 * g, v = a->c2 * g * g;
    if (!a->first) {
        m += a->beta1 * a->m[i];
        v += a->beta2 * a->v[i];
    }
    if (a->keep) {
        a->m[i] = m;
        a->v[i] = v;
    }
    return a->src[i] - a->step_size * (m / (sqrtf(v) * a->inv_bc2_sqrt + a->eps));
}

/* Rows o..o+n (n a constant after inlining), columns [k0, k1) of the weight take their Adam step. */
INLINE void adam_block(const adam_args *a, long o, long k0, long k1, const int n)
{
    const long K = a->K, O = a->O, Tp = a->Tp; /* locals: the compiler then keeps the sums in registers */
    const float *gp = a->gp + o, *xp = a->xp;
    long k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m256 acc[ROWS][2];
        for (int r = 0; r < n; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (long t = 0; t < Tp; t++) {
            __m256 x0 = _mm256_loadu_ps(xp + t * K + k), x1 = _mm256_loadu_ps(xp + t * K + k + 8);
            for (int r = 0; r < n; r++) {
                __m256 b = _mm256_broadcast_ss(gp + t * O + r);
                acc[r][0] = _mm256_fmadd_ps(b, x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(b, x1, acc[r][1]);
            }
        }
#pragma GCC unroll 8 /* constant indices: the sums stay in registers through the t loop */
        for (int r = 0; r < n; r++) {
            long i = (o + r) * K + k;
            __m256 w0 = adam_vec(a, i, acc[r][0]), w1 = adam_vec(a, i + 8, acc[r][1]);
            _mm256_storeu_ps(a->dst + i, w0);
            _mm256_storeu_ps(a->dst + i + 8, w1);
        }
    }
    for (; k < k1; k++)
        for (int r = 0; r < n; r++) {
            float g = 0.f;
            for (long t = 0; t < a->Tp; t++) g += a->gp[t * O + o + r] * a->xp[t * K + k];
            a->dst[(o + r) * K + k] = adam_scalar(a, (o + r) * K + k, g);
        }
}

/* The rows from o0 on, when O is not a multiple of ROWS, take their step. */
KERNEL static void adam_tail(const adam_args *a, long o0)
{
    for (long o = o0; o < a->O; o++) adam_block(a, o, 0, a->K, 1);
}

/* Rows [o0, o1) (a multiple of ROWS) take their step, then y = x W^T on them, chunk by chunk from cache. While
   the product of one chunk computes, the weight and moments of the next are prefetched to L2, so memory and
   arithmetic overlap: without it the fused step would wait on memory as long as the three passes it replaces. */
KERNEL static void adam_forward_rows(const adam_args *a, const float *x, float *y, long T, long o0, long o1)
{
    const long K = a->K, O = a->O;
    const int blocks = (int)((T + TOKENS - 1) / TOKENS), arrays = a->first ? 1 : 3, rows = ROWS * arrays;
    const int per = (rows + blocks - 1) / blocks; /* rows to prefetch in each token block */
    for (long o = o0; o < o1; o += ROWS) {
        const float *wo = a->dst + o * K;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
            /* the next chunk: further along these rows, or the start of the next rows */
            long no = k1 < K ? o : o + ROWS, nk = k1 < K ? k1 : 0;
            const float *later[3 * ROWS];
            int nlater = 0;
            if (no < o1)
                for (int r = 0; r < ROWS; r++) {
                    long i = (no + r) * K + nk - k0; /* offset so that later[p] + k walks the next chunk */
                    later[nlater++] = a->src + i;
                    if (!a->first) {
                        later[nlater++] = a->m + i;
                        later[nlater++] = a->v + i;
                    }
                }
            int add = k0 > 0, g = 0;
            long t = 0;
            adam_block(a, o, k0, k1, ROWS);
#define LATER(g) (later + ((g) * per < nlater ? (g) * per : nlater)), \
                 ((g) * per < nlater ? ((g) * per + per < nlater ? per : nlater - (g) * per) : 0)
            for (; t + TOKENS <= T; t += TOKENS, g++)
                dot_block(x, wo, y + o, K, O, t, k0, k1, TOKENS, add, NULL, LATER(g));
            if (T - t == 1) dot_block(x, wo, y + o, K, O, t, k0, k1, 1, add, NULL, LATER(g));
            if (T - t == 2) dot_block(x, wo, y + o, K, O, t, k0, k1, 2, add, NULL, LATER(g));
#undef LATER
        }
    }
}

/* The columns of gx left over when K is not a multiple of 16. */
static void input_grad_tail(const float *g, const float *w, float *gx, long T, long K, long O, long k0)
{
    for (long t = 0; t < T; t++)
        for (long k = k0; k < K; k++) {
            float s = 0.f;
            for (long o = 0; o < O; o++) s += g[t * O + o] * w[o * K + k];
            gx[t * K + k] = s;
        }
}

/* [start, end) of n items split in parts of ``unit`` among the threads of a parallel region. */
static void share(long n, long unit, long *start, long *end)
{
    long threads = omp_get_num_threads(), id = omp_get_thread_num();
    long units = n / unit, each = units / threads, extra = units % threads;
    *start = unit * (id * each + (id < extra ? id : extra));
    *end = *start + unit * (each + (id < extra));
}

static int parse(PyObject *const *args, Py_ssize_t nargs, void **ptrs, long *dims, int nptr)
{
    if (nargs != nptr + 3) {
        PyErr_SetString(PyExc_TypeError, "wrong number of arguments");
        return -1;
    }
    for (int i = 0; i < nptr; i++) {
        ptrs[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return -1;
    }
    for (int i = 0; i < 3; i++) {
        dims[i] = PyLong_AsLong(args[nptr + i]);
        if (PyErr_Occurred()) return -1;
        if (dims[i] < 1) {
            PyErr_SetString(PyExc_ValueError, "empty product");
            return -1;
        }
    }
    return 0;
}

/* y (T, O) += b, when there is a bias. */
static void add_bias(float *y, const float *b, long T, long O)
{
    if (b)
        for (long t = 0; t < T; t++)
            for (long o = 0; o < O; o++) y[t * O + o] += b[o];
}

static PyObject *py_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *p[4];
    long d[3];
    if (parse(args, nargs, p, d, 4) < 0) return NULL;
    const float *x = p[0], *w = p[1], *b = p[2];
    float *y = p[3];
    long T = d[0], K = d[1], O = d[2];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        long o0, o1;
        share(O, ROWS, &o0, &o1);
        forward_rows(x, w, y, T, K, O, o0, o1);
    }
    forward_tail(x, w, y, T, K, O, O / ROWS * ROWS);
    add_bias(y, b, T, O);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_input_grad(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *p[3];
    long d[3];
    if (parse(args, nargs, p, d, 3) < 0) return NULL;
    const float *g = p[0], *w = p[1];
    float *gx = p[2];
    long T = d[0], K = d[1], O = d[2];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        long k0, k1;
        share(K, 16, &k0, &k1);
        if (k1 > k0) input_grad_columns(g, w, gx, T, K, O, k0, k1);
    }
    input_grad_tail(g, w, gx, T, K, O, K / 16 * 16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_adam_linear(PyObject *self, PyObject *args)
{
    Py_ssize_t src, dst, m, v, gp, xp, x, b, y;
    long T;
    adam_args a;
    double beta1, beta2;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnlllliifffdd", &src, &dst, &m, &v, &gp, &xp, &x, &b, &y, &a.Tp, &T,
                          &a.K, &a.O, &a.first, &a.keep, &a.step_size, &a.inv_bc2_sqrt, &a.eps, &beta1, &beta2))
        return NULL;
    a.beta1 = (float)beta1, a.beta2 = (float)beta2, a.c1 = (float)(1.0 - beta1), a.c2 = (float)(1.0 - beta2);
    if (T < 1 || a.Tp < 1 || a.K < 1 || a.O < 1 || ((!a.first || a.keep) && (!m || !v))) {
        PyErr_SetString(PyExc_ValueError, "bad shapes or moments");
        return NULL;
    }
    a.src = (const float *)src, a.dst = (float *)dst, a.m = (float *)m, a.v = (float *)v;
    a.gp = (const float *)gp, a.xp = (const float *)xp;
    const float *xs = (const float *)x, *bias = (const float *)b;
    float *ys = (float *)y;
    long O = a.O, K = a.K;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        long o0, o1;
        share(O, ROWS, &o0, &o1);
        adam_forward_rows(&a, xs, ys, T, o0, o1);
    }
    adam_tail(&a, O / ROWS * ROWS);
    forward_tail(xs, a.dst, ys, T, K, O, O / ROWS * ROWS);
    add_bias(ys, bias, T, O);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *unused)
{
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL,
     "linear(x, w, b_or_0, y, T, K, O): y = x w^T + b on data pointers; x (T, K), w (O, K), y (T, O)."},
    {"input_grad", (PyCFunction)(void (*)(void))py_input_grad, METH_FASTCALL,
     "input_grad(g, w, gx, T, K, O): gx = g w on data pointers; g (T, O), w (O, K), gx (T, K)."},
    {"adam_linear", py_adam_linear, METH_VARARGS,
     "adam_linear(src, dst, m, v, gp, xp, x, b, y, Tp, T, K, O, first, keep, step_size, inv_bc2_sqrt, eps, beta1,"
     " beta2):"
     " one Adam step of w from the gradient gp^T xp, then y = x w^T + b on the stepped weight."},
    {"supported", py_supported, METH_NOARGS, "Whether this CPU has the AVX2 and FMA instructions these use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fewrows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fewrows(void) { return PyModule_Create(&module); }
