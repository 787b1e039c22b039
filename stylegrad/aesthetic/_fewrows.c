/* Products of one large float32 weight W (O rows, K columns, row-major) with a few token rows, and an Adam step
of W fused with the next of them, for AVX-512 or AVX2 + FMA.

Why: tuning runs each of the 72 large matrices of a text tower through three products per step on about 17 rows
(forward, input gradient, weight gradient) and one Adam step. BLAS kernels, built for many rows, waste vector
lanes on the short side; these never vectorise over tokens, and ran each kind of work about 1.5x faster than
torch's kernels on two cores of the test machine (bench/products.py):
- forward, y = x W^T + b: dot products along K, 4 rows of W against 6 tokens (3 on AVX2) at a time, so each row
  block, streamed once from memory, is reused from L1 for every token;
- input gradient, gx = g W: rows of W scaled and summed along K, 12 tokens x 32 columns (6 x 16 on AVX2) at a
  time, over panels of rows of W streamed in memory order, each thread summing over its own rows;
- Adam, then forward (adam_linear): each block of rows forms its gradient from the two factors the backward
  pass kept, takes its Adam step and runs the next forward product while in cache. Per step, W and its moments
  (packed in 6 bytes a weight on AVX-512, see round24) cross memory once, and no full gradient is ever stored.
- Adam with rebuilt moments (nothing stored but W; every step's factors kept): the same, except that each element
  forms all t gradients so far again. That is arithmetic, not memory, so the order changes: per panel of 16 rows,
  strip by strip, 8 rows x 32 columns at a time, from a strip-major copy of every step's x, which then stays in
  L1 for the whole panel. Walking each block's rows instead read that x from L2 at every block and ran at half
  the speed (bigG's 5120 x 1280 weight at step 10: 53-67 ms before, 24-31 ms after, on two cores);
  bench/products.py times it against torch's path.
Threads come from OpenMP: linked against libgomp.so.1, this module shares the runtime torch has already loaded, so
torch.set_num_threads applies and its worker threads are reused. stylegrad uses the module only if it was built
and the CPU has AVX2 and FMA (products.py); otherwise it uses torch's products and fused Adam. The AVX-512 kernels
(twice the lanes and registers) run where the CPU has AVX-512F; _fewrows_isa.h holds both sets' code. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4        /* forward and Adam: rows of W per block */
/* forward and Adam: rows of W handed to a thread at a time, as each thread becomes free. Why not half the rows
   each: on a shared machine one core is often slowed for a while, and a static split then left the other idle
   at the end of every product (an SDXL prompt ran 10% faster on the test machine, interleaved). Each row's
   numbers do not depend on which thread computes it. A multiple of ROWS. */
#define CHUNK_ROWS 64
#define PANEL 65536   /* input gradient: floats of W per panel of rows (256 KB: ran 7-19% faster than 512 KB) */
#define KCHUNK 1024   /* forward: columns per pass, so a block of W stays in L1 while every token reads it */
#define RPANEL 16     /* rebuilt moments: rows per panel, whose blocks share each strip of x from L1 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* One Adam step of a weight whose gradient is gp^T xp (gp: Tp x O, xp: Tp x K, the factors the backward pass
   saved), fused with the next forward product on the updated rows. Why: a step otherwise reads W four times from
   memory (gradient product, Adam, next forward) and writes and reads a full gradient; here each block of rows is
   read and written once, and its gradient exists only in registers. */
typedef struct {
    const float *src, *gp, *xp; /* weight before the step (the original at the first step), gradient factors */
    float *dst;                 /* weight after the step (may be src) */
    void *m, *v;                /* moments (NULL at a first, last step): float32, or packed (see round24) */
    int packed;                 /* the moments are packed: the AVX-512 kernels' layout */
    long Tp, K, O;
    int first, keep;            /* moments are zero: not read; moments are written (no step follows: not) */
    float step_size, inv_bc2_sqrt, beta1, beta2, eps;
    float c1, c2;               /* 1 - beta1, 1 - beta2, rounded from double as torch does */
    long nh;                    /* > 0: no stored moments; they are rebuilt from the factors of all nh steps so far */
    const float *const *hgp, *const *hxp; /* those factors, oldest first (the last are this step's) */
} adam_args;

/* On AVX-512 the kept moments are packed: each moment rounded to its 24 high bits (float32 with 15 stored mantissa
   bits instead of 23; to nearest, ties away from zero), m's in a 32-bit word with v's bits 8-15 in its low byte,
   v's 16 high bits in a 16-bit word: 6 bytes a weight for both, where float32 takes 8. Why: kept, the moments were
   two thirds of tuning's memory (5.0 of the 7.5 GB SDXL's bigG takes in float32; packed, 3.8 of 6.3 GB). A step
   uses its moments at full precision; only the values carried to the next step are rounded, within 2^-16 of
   themselves, which moves that step by at most about 2^-16 of itself (bfloat16, at 2^-9, moved SD1.x's tuned
   output by 2.3e-4; truncating instead of rounding, biased, moved the tests' tiny towers past their 1e-5: the
   contract's tiers are in docs/exactness.md). Rebuilt
   moments are rounded the same way, so both give the same bits. Packing costs a few integer instructions a vector:
   the kept step ran 4% slower for its 17% fewer bytes, the rebuilt one 11% slower (bigG's shapes, 2026-12-03).
   On AVX2 the moments stay float32: without AVX-512's three-input logic and with half the registers, the
   packing would cost more there. */
static inline uint32_t bits_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float float_of(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static inline float round24(float x) { return float_of((bits_of(x) + 0x80) & ~(uint32_t)0xff); }

static inline void load_moments(const adam_args *a, long i, float *m, float *v)
{
    if (a->packed) {
        uint32_t w = ((const uint32_t *)a->m)[i], h = ((const uint16_t *)a->v)[i];
        *m = float_of(w & ~(uint32_t)0xff), *v = float_of(h << 16 | (w & 0xff) << 8);
    } else
        *m = ((const float *)a->m)[i], *v = ((const float *)a->v)[i];
}

static inline void store_moments(const adam_args *a, long i, float m, float v)
{
    if (a->packed) {
        uint32_t mr = bits_of(m) + 0x80, vr = bits_of(v) + 0x80; /* rounded: the low byte is then dropped */
        ((uint32_t *)a->m)[i] = (mr & ~(uint32_t)0xff) | ((vr >> 8) & 0xff);
        ((uint16_t *)a->v)[i] = (uint16_t)(vr >> 16);
    } else
        ((float *)a->m)[i] = m, ((float *)a->v)[i] = v;
}

/* The scalar paths (columns and rows past the vector blocks), one copy each, never inlined: so a weight's step
   is computed by the same instructions whether its moments are stored or rebuilt. */
static __attribute__((noinline)) float tail_grad(const float *gp, const float *xp, long Tp, long O, long K, long o,
                                                 long k)
{
    float g = 0.f;
    for (long t = 0; t < Tp; t++) g += gp[t * O + o] * xp[t * K + k];
    return g;
}

/* Adam's recursions for one element: (m, v) from the previous ones (read unless ``first``) and g. */
static __attribute__((noinline)) void moments(const adam_args *a, float g, float *m, float *v, int first)
{
    float mo = a->packed ? round24(*m) : *m, vo = a->packed ? round24(*v) : *v; /* as carried from the last step */
    *m = a->c1 * g, *v = a->c2 * g * g;
    if (!first) {
        *m += a->beta1 * mo;
        *v += a->beta2 * vo;
    }
}

static __attribute__((noinline)) float update(const adam_args *a, long i, float m, float v)
{
    return a->src[i] - a->step_size * (m / (sqrtf(v) * a->inv_bc2_sqrt + a->eps));
}

/* One element's step with its moments rebuilt: every step's gradient formed again from its factors and run
   through Adam's recursions in the order Adam ran them, so the numbers are those of stored moments. Why: the
   moments are most of the tuning state (3.8 GB of 6.3 packed, for SDXL's bigG); rebuilt, only the weight is kept. */
static float adam_scalar_rebuilt(const adam_args *a, long o, long k)
{
    float m = 0.f, v = 0.f;
    for (long s = 0; s < a->nh; s++) moments(a, tail_grad(a->hgp[s], a->hxp[s], a->Tp, a->O, a->K, o, k), &m, &v, !s);
    return update(a, o * a->K + k, m, v);
}

static float adam_scalar(const adam_args *a, long o, long k)
{
    long i = o * a->K + k;
    float m = 0.f, v = 0.f;
    if (!a->first) load_moments(a, i, &m, &v);
    moments(a, tail_grad(a->gp, a->xp, a->Tp, a->O, a->K, o, k), &m, &v, a->first);
    if (a->keep) store_moments(a, i, m, v);
    return update(a, i, m, v);
}

/* AVX2 + FMA. Only the kernels are compiled for it, so that importing the module is safe on any x86-64 CPU. */
#define KERNEL __attribute__((target("avx2,fma")))
#define SFX(name) CAT(name, _avx2)
#define V __m256
#define VW 8
#define TOKENS 3
#define GTOKENS 6
#define RROWS 4 /* rebuilt moments: rows per block (8 would take 19 of the 16 registers) */
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VZERO _mm256_setzero_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VFNMA _mm256_fnmadd_ps
#define VMUL _mm256_mul_ps
#define VMAX _mm256_max_ps
#define VRSQRT _mm256_rsqrt_ps
#define VRCP _mm256_rcp_ps
static inline __attribute__((always_inline, target("avx2,fma"))) float hsum_avx2(__m256 v)
{
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#define HSUM hsum_avx2
/* float32 moments (see round24) */
#define VROUND(x) (x)
#define VLOADMV(args, i, pm, pv) \
    (*(pm) = _mm256_loadu_ps((const float *)(args)->m + (i)), *(pv) = _mm256_loadu_ps((const float *)(args)->v + (i)))
#define VSTOREMV(args, i, vm, vv) \
    (_mm256_storeu_ps((float *)(args)->m + (i), vm), _mm256_storeu_ps((float *)(args)->v + (i), vv))
#define VBYTES 4 /* of v per value */
#include "_fewrows_isa.h"
#undef KERNEL
#undef SFX
#undef V
#undef VW
#undef TOKENS
#undef GTOKENS
#undef RROWS
#undef VLOAD
#undef VSTORE
#undef VZERO
#undef VSET1
#undef VFMA
#undef VFNMA
#undef VMUL
#undef VMAX
#undef VRSQRT
#undef VRCP
#undef HSUM
#undef VROUND
#undef VLOADMV
#undef VSTOREMV
#undef VBYTES

/* AVX-512F: 16 lanes and 32 registers, so twice the tokens per block. */
#define KERNEL __attribute__((target("avx512f,fma")))
#define SFX(name) CAT(name, _avx512)
#define V __m512
#define VW 16
#define TOKENS 6
#define GTOKENS 12
#define RROWS 8 /* rebuilt moments: rows per block (16 sums in registers hide the multiply-adds' latency) */
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VZERO _mm512_setzero_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VFNMA _mm512_fnmadd_ps
#define VMUL _mm512_mul_ps
#define VMAX _mm512_max_ps
#define VRSQRT _mm512_rsqrt14_ps
#define VRCP _mm512_rcp14_ps
#define HSUM _mm512_reduce_add_ps
/* packed moments (see round24) */
#define A5 static inline __attribute__((always_inline, target("avx512f,fma")))
A5 __m512 round24_avx512(__m512 x)
{
    __m512i r = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x80));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(~0xff)));
}
A5 void load_moments_avx512(const adam_args *a, long i, __m512 *m, __m512 *v)
{
    __m512i w = _mm512_loadu_si512((const uint32_t *)a->m + i);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->v + i)));
    *m = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(~0xff)));
    /* h << 16 | (w << 8 & 0xff00): the three-input logic op 0xf8 is a | (b & c) */
    *v = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_slli_epi32(h, 16), _mm512_slli_epi32(w, 8),
                                                       _mm512_set1_epi32(0xff00), 0xf8));
}
A5 void store_moments_avx512(const adam_args *a, long i, __m512 m, __m512 v)
{
    const __m512i half = _mm512_set1_epi32(0x80); /* rounded: the low byte is then dropped */
    __m512i mi = _mm512_add_epi32(_mm512_castps_si512(m), half), vi = _mm512_add_epi32(_mm512_castps_si512(v), half);
    /* m's high 24 bits, v's bits 8-15 below them: 0xe4 is (a & c) | (b & ~c) */
    __m512i w = _mm512_ternarylogic_epi32(mi, _mm512_srli_epi32(vi, 8), _mm512_set1_epi32(~0xff), 0xe4);
    _mm512_storeu_si512((uint32_t *)a->m + i, w);
    _mm256_storeu_si256((__m256i *)((uint16_t *)a->v + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(vi, 16)));
}
#undef A5
#define VROUND round24_avx512
#define VLOADMV load_moments_avx512
#define VSTOREMV store_moments_avx512
#define VBYTES 2
#include "_fewrows_isa.h"

static int wide; /* use the AVX-512 kernels */

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

/* The end of the chunk of rows that starts at o0, of ``rows`` in all (see CHUNK_ROWS). */
static inline long chunk_end(long o0, long rows) { return o0 + CHUNK_ROWS < rows ? o0 + CHUNK_ROWS : rows; }

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
    const long rows = O / ROWS * ROWS, chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
#pragma omp parallel for schedule(dynamic, 1)
    for (long c = 0; c < chunks; c++) {
        long o0 = c * CHUNK_ROWS, o1 = chunk_end(o0, rows);
        if (wide)
            forward_rows_avx512(x, w, y, T, K, O, o0, o1);
        else
            forward_rows_avx2(x, w, y, T, K, O, o0, o1);
    }
    (wide ? forward_tail_avx512 : forward_tail_avx2)(x, w, y, T, K, O, O / ROWS * ROWS);
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
    long T = d[0], K = d[1], O = d[2], kv = K / (wide ? 32 : 16) * (wide ? 32 : 16);
    Py_BEGIN_ALLOW_THREADS
    /* each thread sums over its own rows of W; thread 0 into gx, the others into their own buffers, added after */
    int threads = omp_get_max_threads();
    float *parts = threads > 1 && kv ? malloc(sizeof(float) * (size_t)(threads - 1) * T * K) : NULL;
    if (!parts) threads = 1; /* no memory for the other threads' sums: one thread does it all */
#pragma omp parallel num_threads(threads)
    {
        long o0, o1;
        int id = omp_get_thread_num(), used = omp_get_num_threads();
        share(O, 1, &o0, &o1);
        float *out = id == 0 ? gx : parts + (size_t)(id - 1) * T * K;
        if (kv) {
            if (o1 > o0)
                (wide ? input_grad_rows_avx512 : input_grad_rows_avx2)(g, w, out, T, K, O, o0, o1);
            else
                for (long t = 0; t < T; t++) memset(out + t * K, 0, sizeof(float) * kv);
        }
#pragma omp barrier
        long k0, k1;
        share(kv, 16, &k0, &k1); /* kv is a multiple of 16 */
        for (int q = 1; q < used; q++)
            for (long t = 0; t < T; t++)
                for (long k = k0; k < k1; k++) gx[t * K + k] += parts[(size_t)(q - 1) * T * K + t * K + k];
    }
    free(parts);
    input_grad_tail(g, w, gx, T, K, O, kv);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_adam_linear(PyObject *self, PyObject *args)
{
    Py_ssize_t src, dst, m, v, gp, xp, x, b, y;
    long T;
    adam_args a;
    double beta1, beta2;
    Py_ssize_t hgp = 0, hxp = 0;
    a.nh = 0;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnlllliifffdd|lnn", &src, &dst, &m, &v, &gp, &xp, &x, &b, &y, &a.Tp, &T,
                          &a.K, &a.O, &a.first, &a.keep, &a.step_size, &a.inv_bc2_sqrt, &a.eps, &beta1, &beta2,
                          &a.nh, &hgp, &hxp))
        return NULL;
    a.hgp = (const float *const *)hgp, a.hxp = (const float *const *)hxp;
    if (a.nh < 0 || (a.nh > 0 && (!hgp || !hxp || !a.first || a.keep))) {
        PyErr_SetString(PyExc_ValueError, "rebuilt moments: factor lists, and no stored moments");
        return NULL;
    }
    a.beta1 = (float)beta1, a.beta2 = (float)beta2, a.c1 = (float)(1.0 - beta1), a.c2 = (float)(1.0 - beta2);
    if (T < 0 || (T > 0 && (!x || !y)) || a.Tp < 1 || a.K < 1 || a.O < 1 || ((!a.first || a.keep) && (!m || !v))) {
        PyErr_SetString(PyExc_ValueError, "bad shapes or moments");
        return NULL;
    }
    a.src = (const float *)src, a.dst = (float *)dst, a.m = (void *)m, a.v = (void *)v, a.packed = wide;
    a.gp = (const float *)gp, a.xp = (const float *)xp;
    const float *xs = (const float *)x, *bias = (const float *)b;
    float *ys = (float *)y;
    long O = a.O, K = a.K;
    Py_BEGIN_ALLOW_THREADS
    /* rebuilt moments from two steps on: every step's x, strip by strip (see rebuilt_forward_rows); at the first
       the row-block order of adam_forward_rows, without the packing, was as fast */
    const long sw = wide ? 32 : 16, kv = K / sw * sw, nh = a.nh, Tp = a.Tp;
    float *xstrips = nh > 1 && kv ? aligned_alloc(64, sizeof(float) * (size_t)(nh * Tp * kv)) : NULL; /* lines */
    if (xstrips)
        for (long k = 0; k < kv; k += sw)
            for (long s = 0; s < nh; s++)
                for (long t = 0; t < Tp; t++)
                    memcpy(xstrips + k * nh * Tp + (s * Tp + t) * sw, a.hxp[s] + t * K + k, sizeof(float) * sw);
    const long rows = O / ROWS * ROWS, chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
#pragma omp parallel
    {
        float *gk = xstrips ? malloc(sizeof(float) * (size_t)(nh * Tp * RPANEL)) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (long c = 0; c < chunks; c++) {
            long o0 = c * CHUNK_ROWS, o1 = chunk_end(o0, rows);
            if (gk)
                (wide ? rebuilt_forward_rows_avx512 : rebuilt_forward_rows_avx2)(&a, xstrips, gk, xs, ys, T, o0, o1);
            else
                (wide ? adam_forward_rows_avx512 : adam_forward_rows_avx2)(&a, xs, ys, T, o0, o1);
        }
        free(gk);
    }
    free(xstrips);
    (wide ? adam_tail_avx512 : adam_tail_avx2)(&a, O / ROWS * ROWS);
    (wide ? forward_tail_avx512 : forward_tail_avx2)(xs, a.dst, ys, T, K, O, O / ROWS * ROWS);
    add_bias(ys, bias, T, O);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *unused)
{
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

static int has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* use(name): 'avx512' (where the CPU has it) or 'avx2'; returns the set now in use. Tests run both. */
static PyObject *py_use(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (strcmp(name, "avx512") == 0 && has_avx512())
        wide = 1;
    else if (strcmp(name, "avx2") == 0)
        wide = 0;
    else {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
        return NULL;
    }
    return PyUnicode_FromString(wide ? "avx512" : "avx2");
}

static PyObject *py_isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(wide ? "avx512" : "avx2"); }

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL,
     "linear(x, w, b_or_0, y, T, K, O): y = x w^T + b on data pointers; x (T, K), w (O, K), y (T, O)."},
    {"input_grad", (PyCFunction)(void (*)(void))py_input_grad, METH_FASTCALL,
     "input_grad(g, w, gx, T, K, O): gx = g w on data pointers; g (T, O), w (O, K), gx (T, K)."},
    {"adam_linear", py_adam_linear, METH_VARARGS,
     "adam_linear(src, dst, m, v, gp, xp, x, b, y, Tp, T, K, O, first, keep, step_size, inv_bc2_sqrt, eps, beta1,"
     " beta2):"
     " one Adam step of w from the gradient gp^T xp, then y = x w^T + b on the stepped weight (T = 0: the step"
     " alone). Optional nh, hgp, hxp: addresses of nh pointers each, every step's factors so far; the moments"
     " are then rebuilt from them (m, v are 0, first is 1 and keep 0)."},
    {"supported", py_supported, METH_NOARGS, "Whether this CPU has the AVX2 and FMA instructions these use."},
    {"use", py_use, METH_O, "use('avx512' or 'avx2'): pick the kernels' instruction set; returns the one in use."},
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels use: 'avx512' or 'avx2'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fewrows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fewrows(void)
{
    const char *isa = getenv("STYLEGRAD_KERNELS_ISA"); /* 'avx2' keeps the narrower kernels */
    wide = has_avx512() && !(isa && strcmp(isa, "avx2") == 0);
    return PyModule_Create(&module);
}
