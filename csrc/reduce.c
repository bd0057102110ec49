/*
 * reduce.c: the element-wise reduction of W buffers into one, in one pass,
 * the GIL released (the arithmetic of pmaprt's all-reduce).
 *
 *   reduce_into(dst, dst_off, srcs, offs, n, kind, op, divisor, generic=False)
 *       dst[i] = divide(src_0[i] (op) src_1[i] (op) ... (op) src_{W-1}[i])
 *       for i < n elements; src_q at byte offset offs[q] of buffer srcs[q],
 *       dst at byte offset dst_off of a writable buffer (it may be a source).
 *
 * kind: KIND_F32, KIND_F64, KIND_I32, KIND_I64, KIND_F16 (IEEE half),
 * KIND_BF16 (bfloat16); op: OP_SUM, OP_MIN, OP_MAX. divisor: sum's result is
 * divided by it (a mean) when it is not 1; floating kinds only.
 *
 * The order is fixed: ((src_0 op src_1) op src_2) ..., element by element, so
 * every caller with the same W inputs gets the same bits, however it cuts the
 * buffers. float32/float64 round after each operation, as NumPy's
 * np.add(np.add(a, b), c) does. float16 and bfloat16 convert each element to
 * float32 exactly, accumulate (and divide) in float32, and round once to
 * their type at the end, to nearest, ties to even. Integer sums wrap.
 * min/max follow np.minimum/np.maximum: a NaN propagates, and of two equal
 * values (-0.0 and 0.0) the later source's is kept.
 *
 * Work goes in blocks of BLK elements through an accumulator that stays in
 * the L1 cache, so memory sees each source read once and dst written once.
 * On x86 with F16C, float16 converts with vcvtph2ps/vcvtps2ph; elsewhere (or
 * generic=True, for tests) with the portable bit-level conversions below,
 * which give the same bits.
 */
#include "pmaprt.h"

/* The build's -O2 leaves these loops scalar on older GCC; vectorized they
 * keep up with memory. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* Elements per block: 2,048 float32 accumulators (8 KiB) plus a converted
 * source block fit in L1 beside the streaming loads. */
#define BLK 2048
/* Reductions of fewer bytes than this keep the GIL: releasing it costs
 * about as much as reducing 64 KiB. */
#define REDUCE_RELEASE_GIL_BYTES 65536
/* Sources kept on the stack; more go to the heap. */
#define STACK_SRCS 32

enum { KIND_F32, KIND_F64, KIND_I32, KIND_I64, KIND_F16, KIND_BF16, NKINDS };
enum { OP_SUM, OP_MIN, OP_MAX, NOPS };
_Static_assert(NOPS == REDUCE_NOPS, "pmaprt.h's REDUCE_NOPS");

static const int kind_size[NKINDS] = {4, 8, 4, 8, 2, 2};

/* np.minimum / np.maximum: the first NaN wins, equal values give b. */
#define FMIN(a, b) (((a) < (b) || (a) != (a)) ? (a) : (b))
#define FMAX(a, b) (((a) > (b) || (a) != (a)) ? (a) : (b))
#define IMIN(a, b) ((a) < (b) ? (a) : (b))
#define IMAX(a, b) ((a) > (b) ? (a) : (b))

/* ---- Same-type kinds: float32, float64, int32, int64 ---------------------- */

/* ACC: the accumulator type (unsigned for integers: sums wrap, no UB). */
#define DEFINE_SAME(NAME, T, ACC, MIN, MAX, FLOAT)                                   \
static void                                                                      \
NAME(char *dst, char *const *src, int w, Py_ssize_t n, int op, double divisor)   \
{                                                                                \
    ACC acc[BLK];                                                                \
    for (Py_ssize_t i0 = 0; i0 < n; i0 += BLK) {                                 \
        Py_ssize_t m = n - i0 < BLK ? n - i0 : BLK;                              \
        const T *s0 = (const T *)src[0] + i0;                                    \
        for (Py_ssize_t i = 0; i < m; i++) acc[i] = (ACC)s0[i];                  \
        for (int q = 1; q < w; q++) {                                            \
            const T *s = (const T *)src[q] + i0;                                 \
            if (op == OP_SUM)                                                    \
                for (Py_ssize_t i = 0; i < m; i++) acc[i] = (ACC)(acc[i] + (ACC)s[i]); \
            else if (op == OP_MIN)                                               \
                for (Py_ssize_t i = 0; i < m; i++) {                             \
                    T a = (T)acc[i], b = s[i];                                   \
                    acc[i] = (ACC)MIN(a, b);                                     \
                }                                                                \
            else                                                                 \
                for (Py_ssize_t i = 0; i < m; i++) {                             \
                    T a = (T)acc[i], b = s[i];                                   \
                    acc[i] = (ACC)MAX(a, b);                                     \
                }                                                                \
        }                                                                        \
        T *d = (T *)dst + i0;                                                    \
        if (FLOAT && divisor != 1.0) {                                           \
            T dv = (T)divisor;                                                   \
            for (Py_ssize_t i = 0; i < m; i++) d[i] = (T)((T)acc[i] / dv);       \
        } else {                                                                 \
            for (Py_ssize_t i = 0; i < m; i++) d[i] = (T)acc[i];                 \
        }                                                                        \
    }                                                                            \
}

DEFINE_SAME(reduce_f32, float, float, FMIN, FMAX, 1)
DEFINE_SAME(reduce_f64, double, double, FMIN, FMAX, 1)
DEFINE_SAME(reduce_i32, int32_t, uint32_t, IMIN, IMAX, 0)
DEFINE_SAME(reduce_i64, int64_t, uint64_t, IMIN, IMAX, 0)

/* ---- Half kinds: float16, bfloat16, accumulated in float32 ---------------- */

typedef union { uint32_t u; float f; } bits32;

/* IEEE half -> float32, exact (F. Giesen's half_to_float_fast3). */
static inline float
f16_to_f32(uint16_t h)
{
    const bits32 magic = {(uint32_t)(254 - 15) << 23};
    const bits32 was_infnan = {(uint32_t)(127 + 16) << 23};
    bits32 o;
    o.u = (uint32_t)(h & 0x7fff) << 13;
    o.f *= magic.f;
    if (o.f >= was_infnan.f) o.u |= (uint32_t)255 << 23;
    o.u |= (uint32_t)(h & 0x8000) << 16;
    return o.f;
}

/* float32 -> IEEE half, to nearest, ties to even; NaN -> quiet NaN
 * (F. Giesen's float_to_half_fast3_rtne). */
static inline uint16_t
f32_to_f16(float x)
{
    const bits32 f32infty = {(uint32_t)255 << 23};
    const bits32 f16max = {(uint32_t)(127 + 16) << 23};
    const bits32 denorm_magic = {(uint32_t)((127 - 15) + (23 - 10) + 1) << 23};
    bits32 f = {.f = x};
    uint32_t sign = f.u & 0x80000000u;
    uint16_t o;
    f.u ^= sign;
    if (f.u >= f16max.u) {
        o = (f.u > f32infty.u) ? 0x7e00 : 0x7c00;
    } else if (f.u < ((uint32_t)113 << 23)) {
        f.f += denorm_magic.f;
        o = (uint16_t)(f.u - denorm_magic.u);
    } else {
        uint32_t mant_odd = (f.u >> 13) & 1;
        f.u += ((uint32_t)(15 - 127) << 23) + 0xfff;
        f.u += mant_odd;
        o = (uint16_t)(f.u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

static inline float
bf16_to_f32(uint16_t h)
{
    bits32 o = {.u = (uint32_t)h << 16};
    return o.f;
}

/* float32 -> bfloat16, to nearest, ties to even; NaN stays a (quiet) NaN.
 * Both results are computed and one selected, so the loop vectorizes. */
static inline uint16_t
f32_to_bf16(float x)
{
    bits32 f = {.f = x};
    uint32_t rounded = (f.u + 0x7fff + ((f.u >> 16) & 1)) >> 16;
    uint32_t quiet = (f.u >> 16) | 0x0040;
    return (uint16_t)(x != x ? quiet : rounded);
}

typedef void (*load_fn)(float *out, const uint16_t *s, Py_ssize_t m);
typedef void (*store_fn)(uint16_t *d, const float *in, Py_ssize_t m);

static void
load_f16(float *out, const uint16_t *s, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < m; i++) out[i] = f16_to_f32(s[i]);
}

static void
store_f16(uint16_t *d, const float *in, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < m; i++) d[i] = f32_to_f16(in[i]);
}

#ifdef HAVE_X86
/* Widening and narrowing 16-bit words take several SSE2 instructions each;
 * AVX2 does them in one, where the CPU has it. */
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES static void
load_bf16(float *out, const uint16_t *s, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < m; i++) out[i] = bf16_to_f32(s[i]);
}

CLONES static void
store_bf16(uint16_t *d, const float *in, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < m; i++) d[i] = f32_to_bf16(in[i]);
}

#ifdef HAVE_X86
__attribute__((target("avx,f16c"))) static void
load_f16_f16c(float *out, const uint16_t *s, Py_ssize_t m)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= m; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < m; i++) out[i] = f16_to_f32(s[i]);
}

__attribute__((target("avx,f16c"))) static void
store_f16_f16c(uint16_t *d, const float *in, Py_ssize_t m)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= m; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < m; i++) d[i] = f32_to_f16(in[i]);
}
#endif

static void
reduce_half(char *dst, char *const *src, int w, Py_ssize_t n, int op, double divisor,
            load_fn load, store_fn store)
{
    float acc[BLK], x[BLK];
    float dv = (float)divisor;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += BLK) {
        Py_ssize_t m = n - i0 < BLK ? n - i0 : BLK;
        load(acc, (const uint16_t *)src[0] + i0, m);
        for (int q = 1; q < w; q++) {
            load(x, (const uint16_t *)src[q] + i0, m);
            if (op == OP_SUM)
                for (Py_ssize_t i = 0; i < m; i++) acc[i] += x[i];
            else if (op == OP_MIN)
                for (Py_ssize_t i = 0; i < m; i++) acc[i] = FMIN(acc[i], x[i]);
            else
                for (Py_ssize_t i = 0; i < m; i++) acc[i] = FMAX(acc[i], x[i]);
        }
        if (divisor != 1.0)
            for (Py_ssize_t i = 0; i < m; i++) acc[i] /= dv;
        store((uint16_t *)dst + i0, acc, m);
    }
}

static void
reduce_any(char *dst, char *const *src, int w, Py_ssize_t n, int kind, int op, double divisor,
           int generic)
{
    switch (kind) {
    case KIND_F32: reduce_f32(dst, src, w, n, op, divisor); break;
    case KIND_F64: reduce_f64(dst, src, w, n, op, divisor); break;
    case KIND_I32: reduce_i32(dst, src, w, n, op, 1.0); break;
    case KIND_I64: reduce_i64(dst, src, w, n, op, 1.0); break;
    case KIND_BF16: reduce_half(dst, src, w, n, op, divisor, load_bf16, store_bf16); break;
    case KIND_F16:
#ifdef HAVE_X86
        if (!generic && __builtin_cpu_supports("f16c")) {
            reduce_half(dst, src, w, n, op, divisor, load_f16_f16c, store_f16_f16c);
            break;
        }
#endif
        reduce_half(dst, src, w, n, op, divisor, load_f16, store_f16);
        break;
    }
}

/* ---- Shared with collective.c --------------------------------------------- */

int
reduce_kind_size(int kind)
{
    return kind >= 0 && kind < NKINDS ? kind_size[kind] : 0;
}

void
reduce_run(char *dst, char *const *src, int w, Py_ssize_t n, int kind, int op, double divisor)
{
    if (n * kind_size[kind] * w >= REDUCE_RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        reduce_any(dst, src, w, n, kind, op, divisor, 0);
        Py_END_ALLOW_THREADS
    } else if (n > 0) {
        reduce_any(dst, src, w, n, kind, op, divisor, 0);
    }
}

/* Bytes per piece of reduce_twice: the piece is still in L1 when it is copied. */
#define TWICE_PIECE_BYTES 16384

void
reduce_twice(char *dst, char *copy, char *const *src, int w, Py_ssize_t n, int kind, int op,
             double divisor)
{
    int isz = kind_size[kind];
    Py_ssize_t per = TWICE_PIECE_BYTES / isz;
    char *at[STACK_SRCS];
    if (w > STACK_SRCS) {   /* no room for offset pointers: two passes */
        reduce_run(dst, src, w, n, kind, op, divisor);
        if (n > 0) memcpy(copy, dst, (size_t)(n * isz));
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t lo = 0; lo < n; lo += per) {
        Py_ssize_t m = n - lo < per ? n - lo : per, off = lo * isz;
        for (int q = 0; q < w; q++) at[q] = src[q] + off;
        reduce_any(dst + off, at, w, m, kind, op, divisor, 0);
        memcpy(copy + off, dst + off, (size_t)(m * isz));
    }
    Py_END_ALLOW_THREADS
}

/* ---- The module function ---------------------------------------------------- */

/* A pointer to `nbytes` bytes at byte offset `offobj` of `v`, aligned to
 * `align`, or NULL with an exception set. */
static char *
span_at(Py_buffer *v, PyObject *offobj, Py_ssize_t nbytes, int align, const char *what,
        Py_ssize_t q)
{
    Py_ssize_t off = PyLong_AsSsize_t(offobj);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (off < 0 || nbytes > v->len - off) {
        PyErr_Format(PyExc_IndexError, "reduce_into: %s %zd: %zd bytes at offset %zd do not "
                     "fit in its %zd", what, q, nbytes, off, v->len);
        return NULL;
    }
    char *p = (char *)v->buf + off;
    if ((uintptr_t)p % (uintptr_t)align) {
        PyErr_Format(PyExc_ValueError, "reduce_into: %s %zd is not aligned to %d bytes",
                     what, q, align);
        return NULL;
    }
    return p;
}

PyObject *
core_reduce_into(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 8 || nargs > 9) {
        PyErr_SetString(PyExc_TypeError, "reduce_into(dst, dst_off, srcs, offs, n, kind, op, "
                        "divisor, generic=False)");
        return NULL;
    }
    PyObject *srcs = args[2], *offs = args[3];
    if (!PyTuple_Check(srcs) || !PyTuple_Check(offs)
        || PyTuple_GET_SIZE(srcs) != PyTuple_GET_SIZE(offs) || PyTuple_GET_SIZE(srcs) < 1
        || PyTuple_GET_SIZE(srcs) > INT_MAX) {
        PyErr_SetString(PyExc_TypeError, "reduce_into: srcs and offs must be tuples of the "
                        "same length, at least 1");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[4]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    long kind = PyLong_AsLong(args[5]), op = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    double divisor = PyFloat_AsDouble(args[7]);
    if (divisor == -1.0 && PyErr_Occurred()) return NULL;
    int generic = nargs > 8 ? PyObject_IsTrue(args[8]) : 0;
    if (generic < 0) return NULL;
    if (n < 0 || kind < 0 || kind >= NKINDS || op < 0 || op >= NOPS || !(divisor > 0)) {
        PyErr_Format(PyExc_ValueError, "reduce_into: bad n %zd, kind %ld or op %ld, or a divisor "
                     "that is not > 0", n, kind, op);
        return NULL;
    }
    int w = (int)PyTuple_GET_SIZE(srcs), isz = kind_size[kind];
    if (n > PY_SSIZE_T_MAX / isz) return PyErr_NoMemory();
    Py_ssize_t nbytes = n * isz;

    Py_buffer stack_views[STACK_SRCS], dv;
    char *stack_ptrs[STACK_SRCS];
    Py_buffer *views = stack_views;
    char **ptrs = stack_ptrs;
    if (w > STACK_SRCS) {
        views = PyMem_Malloc(sizeof(Py_buffer) * (size_t)w);
        ptrs = PyMem_Malloc(sizeof(char *) * (size_t)w);
        if (!views || !ptrs) {
            PyMem_Free(views);
            PyMem_Free(ptrs);
            return PyErr_NoMemory();
        }
    }
    int got = 0, have_dst = 0;
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(args[0], &dv, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
    have_dst = 1;
    char *d = span_at(&dv, args[1], nbytes, isz, "dst", 0);
    if (!d) goto done;
    for (; got < w; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(srcs, got), &views[got],
                               PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        ptrs[got] = span_at(&views[got], PyTuple_GET_ITEM(offs, got), nbytes, isz, "source",
                            got);
        if (!ptrs[got]) {
            got++;
            goto done;
        }
    }
    if (nbytes * w >= REDUCE_RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        reduce_any(d, ptrs, w, n, (int)kind, (int)op, divisor, generic);
        Py_END_ALLOW_THREADS
    } else if (n > 0) {
        reduce_any(d, ptrs, w, n, (int)kind, (int)op, divisor, generic);
    }
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    for (int q = 0; q < got; q++) PyBuffer_Release(&views[q]);
    if (have_dst) PyBuffer_Release(&dv);
    if (views != stack_views) {
        PyMem_Free(views);
        PyMem_Free(ptrs);
    }
    return ret;
}

/* The kind and op codes as module constants (REDUCE_F32, ..., REDUCE_SUM, ...). */
int
reduce_add_constants(PyObject *m)
{
    static const struct { const char *name; int v; } names[] = {
        {"REDUCE_F32", KIND_F32}, {"REDUCE_F64", KIND_F64}, {"REDUCE_I32", KIND_I32},
        {"REDUCE_I64", KIND_I64}, {"REDUCE_F16", KIND_F16}, {"REDUCE_BF16", KIND_BF16},
        {"REDUCE_SUM", OP_SUM}, {"REDUCE_MIN", OP_MIN}, {"REDUCE_MAX", OP_MAX},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (PyModule_AddIntConstant(m, names[i].name, names[i].v) < 0) return -1;
    return 0;
}
