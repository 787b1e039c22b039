/* Products of one large float32 weight W (O rows, K columns, row-major) with a few token rows, for AVX2 + FMA.

Why: tuning runs each of the 72 large matrices of a text tower twice per step on about 17 rows (forward and input
gradient). There BLAS kernels, built for many rows, waste vector lanes on the short side and reach 40-50 GFLOP/s
on two cores of the test machine; these reach about 70 by never vectorising over tokens:
- forward, y = x W^T + b: dot products along K, 4 rows of W against 3 tokens at a time, so each row block,
  streamed once from memory, is reused from L1 for every token;
- input gradient, gx = g W: rows of W scaled and summed along K, 6 tokens x 16 columns at a time, over blocks
  of 64 rows of W so that block is read once from memory and reused from cache for every token.
Threads come from OpenMP: linked against libgomp.so.1, this module shares the runtime torch has already loaded, so
torch.set_num_threads applies and its worker threads are reused. stylegrad uses the module only if it was built
and the CPU has AVX2 and FMA (eos_forward.py); otherwise it uses torch's products. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <omp.h>

#define INLINE static inline __attribute__((always_inline))
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
   ``next`` is a row of the next block to prefetch while this one computes (or NULL). */
INLINE void dot_block(const float *x, const float *w, float *y, long K, long O, long t, long k0, long k1,
                      const int n, int add, const float *next)
{
    __m256 acc[ROWS][TOKENS];
    long kv = k0 + (k1 - k0) / 8 * 8;
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < n; j++) acc[r][j] = _mm256_setzero_ps();
    for (long k = k0; k < kv; k += 8) {
        __m256 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = _mm256_loadu_ps(w + r * K + k);
        if (next && !(k & 15)) _mm_prefetch((const char *)(next + k), _MM_HINT_T0);
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
static void forward_rows(const float *x, const float *w, float *y, long T, long K, long O, long o0, long o1)
{
    for (long o = o0; o < o1; o += ROWS) {
        const float *wo = w + o * K;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long k1 = k0 + KCHUNK < K ? k0 + KCHUNK : K;
            int add = k0 > 0, g = 0;
            long t = 0;
/* each token block prefetches one row of the next row block: ROWS blocks cover it */
#define NEXT (o + ROWS < o1 && g < ROWS ? wo + (ROWS + g) * K : (const float *)0)
            for (; t + TOKENS <= T; t += TOKENS, g++) dot_block(x, wo, y + o, K, O, t, k0, k1, TOKENS, add, NEXT);
            if (T - t == 1) dot_block(x, wo, y + o, K, O, t, k0, k1, 1, add, NEXT);
            if (T - t == 2) dot_block(x, wo, y + o, K, O, t, k0, k1, 2, add, NEXT);
#undef NEXT
        }
    }
}

/* The columns of y left over when O is not a multiple of ROWS. */
static void forward_tail(const float *x, const float *w, float *y, long T, long K, long O, long o0)
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
   this strip of W from memory: it prefetches AHEAD rows ahead, in the order the strips are read (measured 20%
   faster than prefetching only within the strip). */
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
static void input_grad_columns(const float *g, const float *w, float *gx, long T, long K, long O, long k0, long k1)
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

/* [start, end) of n items split in parts of ``unit`` among the threads of a parallel region. */
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
    }
    return 0;
}

static PyObject *py_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *p[4];
    long d[3];
    if (parse(args, nargs, p, d, 4) < 0) return NULL;
    const float *x = p[0], *w = p[1], *b = p[2];
    float *y = p[3];
    long T = d[0], K = d[1], O = d[2];
    if (T < 1 || K < 1 || O < 1) {
        PyErr_SetString(PyExc_ValueError, "empty product");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        long o0, o1;
        share(O, ROWS, &o0, &o1);
        forward_rows(x, w, y, T, K, O, o0, o1);
    }
    forward_tail(x, w, y, T, K, O, O / ROWS * ROWS);
    if (b)
        for (long t = 0; t < T; t++)
            for (long o = 0; o < O; o++) y[t * O + o] += b[o];
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
    if (T < 1 || K < 1 || O < 1) {
        PyErr_SetString(PyExc_ValueError, "empty product");
        return NULL;
    }
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
    {"supported", py_supported, METH_NOARGS, "Whether this CPU has the AVX2 and FMA instructions these use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fewrows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fewrows(void) { return PyModule_Create(&module); }
