/*
 * collective.c: a call of one round of the all-reduce over an SPMD map's
 * collective segment, in one C call (pmaprt/_collective/segment.py has the
 * layout and the protocol; reduce.py's `_round` drives this, for every call
 * that fits in one stage slot and is staged).
 *
 *   one_round(seg, src, dst, heads, reds, lines, rank, m, slots, stamp,
 *             kind, op, divisor, spin_ns, phase, place, inputs) -> status
 *
 * reds None: `direct`; a tuple of every rank's red slot: `split`, where rank
 * q reduces elements [n q / W, n (q + 1) / W) (slice q). place (split only):
 * None, or (segment id, offset) of src in a shared array every rank maps,
 * named in the head instead of copied. inputs: None, or (buffers, offsets)
 * of every rank's input, for a round some rank's input is read in place.
 * phase 0: wait until every other rank's FREE has reached m - slots, copy
 *          src into this rank's stage slot (heads[rank] + HEAD; split: all
 *          but its own slice, which it reads from src), store its stamp,
 *          PUB = m, ring.
 * phase 1: wait until every other rank's PUB has reached m, compare their
 *          stamps with `stamp`; direct: reduce every rank's slot into dst in
 *          rank order (reduce.c's kernel), FREE = m, ring, done. split:
 *          reduce slice `rank` into its slice of dst and copy it into this
 *          rank's red slot, RED = m, ring.
 * phase 2: (split) wait until every other rank's RED has reached m, copy
 *          every other red slot into its slice of dst, FREE = m, ring.
 * Status: ROUND_DONE (0), or (q << 8) | code: ROUND_WAIT_FREE (nothing
 * published yet: wait for rank q's FREE, call again with phase 0),
 * ROUND_WAIT_PUB / ROUND_WAIT_RED (wait for rank q's PUB / RED, call again
 * with phase 1 / 2), ROUND_MISMATCH (rank q's stamp differs),
 * ROUND_IN_PLACE (the stamps match, but rank q's input is a shared array
 * read in place: call again with phase 1 and inputs).
 *
 * A call's steps cost about 1 us here against about 5-20 us as Python calls.
 * A wait only spins, for at most spin_ns, on the counters themselves, the
 * GIL released; a longer wait returns to Python, whose wait sleeps on the
 * segment's bell and sees aborts and ranks that left. The words are written
 * in the same order as reduce.py's rounds write them.
 */
#include "pmaprt.h"

#include <linux/futex.h>
#include <sys/syscall.h>

/* The segment's words (segment.py; tests/test_collective_paths.py checks that
 * these match). */
#define SEG_H_ABORT 12
#define SEG_H_BELL 20
#define SEG_H_SLEEPERS 40
#define SEG_L_PUB 0
#define SEG_L_RED 4
#define SEG_L_FREE 8
#define SEG_HEAD 64
#define SEG_HD_STAMP 0
#define SEG_HD_SRC_SEG 8
#define SEG_HD_SRC_OFF 16

/* Copies of fewer bytes than this keep the GIL (as _core.memcpy's). */
#define ROUND_RELEASE_GIL_BYTES 65536

enum { ROUND_DONE, ROUND_WAIT_FREE, ROUND_WAIT_PUB, ROUND_WAIT_RED, ROUND_MISMATCH,
       ROUND_IN_PLACE };

/* Ranks read on the stack; a world larger than this takes the Python
 * path. */
#define ROUND_MAX_RANKS 64
/* The spin reads the clock once per this many pauses (a clock read costs far
 * more than a pause). */
#define ROUND_PAUSES_PER_CLOCK_READ 64

static inline uint32_t *
word32(char *base, Py_ssize_t off)
{
    return (uint32_t *)(base + off);
}

/* Counters compare modulo 2**32: v has reached target. */
static inline int
reached(uint32_t v, uint32_t target)
{
    return (uint32_t)(v - target) < UINT32_C(0x80000000);
}

/* The first other rank whose counter (line + field) has not reached target,
 * or -1. */
static int
first_behind(char *base, const Py_ssize_t *lines, int w, int rank, int field, uint32_t target)
{
    for (int q = 0; q < w; q++)
        if (q != rank
                && !reached(__atomic_load_n(word32(base, lines[q] + field), __ATOMIC_SEQ_CST),
                            target))
            return q;
    return -1;
}

/* Waits, spinning for at most spin_ns (GIL released), until every other
 * rank's counter has reached target: -1, or the first rank still behind. An
 * abort ends the spin early (the Python wait raises it). */
static int
spin_until(char *base, const Py_ssize_t *lines, int w, int rank, int field, uint32_t target,
           long long spin_ns)
{
    int q = first_behind(base, lines, w, rank, field, target);
    if (q < 0 || spin_ns <= 0) return q;
    Py_BEGIN_ALLOW_THREADS
    double end = now_s() + (double)spin_ns * 1e-9;
    unsigned i = 0;
    for (;;) {
        cpu_relax();
        if (!reached(__atomic_load_n(word32(base, lines[q] + field), __ATOMIC_SEQ_CST), target))
        {
            if ((++i & (ROUND_PAUSES_PER_CLOCK_READ - 1)) == 0
                    && (now_s() >= end
                        || __atomic_load_n(word32(base, SEG_H_ABORT), __ATOMIC_SEQ_CST)))
                break;
            continue;
        }
        q = first_behind(base, lines, w, rank, field, target);
        if (q < 0) break;
    }
    Py_END_ALLOW_THREADS
    return q;
}

/* Store this rank's counter and ring the bell (segment.py's publish). */
static void
publish(char *base, Py_ssize_t line, int field, uint32_t value)
{
    __atomic_store_n(word32(base, line + field), value, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(word32(base, SEG_H_BELL), 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(word32(base, SEG_H_SLEEPERS), __ATOMIC_SEQ_CST))
        syscall(SYS_futex, word32(base, SEG_H_BELL), FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* A tuple of w non-negative offsets, each with room for `width` bytes in a
 * buffer of len bytes and aligned to 8: 0, or -1 with an error set. */
static int
offsets(PyObject *tup, int w, Py_ssize_t width, Py_ssize_t len, Py_ssize_t *out,
        const char *what)
{
    if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) != w) {
        PyErr_Format(PyExc_TypeError, "one_round: %s must be a tuple of %d offsets", what, w);
        return -1;
    }
    for (int q = 0; q < w; q++) {
        Py_ssize_t o = PyLong_AsSsize_t(PyTuple_GET_ITEM(tup, q));
        if (o == -1 && PyErr_Occurred()) return -1;
        if (o < 0 || o % 8 || width > len - o) {
            PyErr_Format(PyExc_IndexError, "one_round: %s[%d] = %zd is out of the segment "
                         "or not 8-byte aligned", what, q, o);
            return -1;
        }
        out[q] = o;
    }
    return 0;
}

/* Copies n bytes, the GIL released for large copies. */
static void
copy_bytes(char *d, const char *s, Py_ssize_t n)
{
    if (n >= ROUND_RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(d, s, (size_t)n);
        Py_END_ALLOW_THREADS
    } else if (n > 0) {
        memcpy(d, s, (size_t)n);
    }
}

PyObject *
core_one_round(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("one_round", 17);
    long long v[8];   /* rank, m, slots, stamp, kind, op, spin_ns, phase */
    static const int at[8] = {6, 7, 8, 9, 10, 11, 13, 14};
    for (int i = 0; i < 8; i++) {
        v[i] = PyLong_AsLongLong(args[at[i]]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    double divisor = PyFloat_AsDouble(args[12]);
    if (divisor == -1.0 && PyErr_Occurred()) return NULL;
    int w = PyTuple_Check(args[5]) ? (int)PyTuple_GET_SIZE(args[5]) : 0;
    int rank = (int)v[0], kind = (int)v[4], op = (int)v[5], phase = (int)v[7];
    int split = args[4] != Py_None;
    uint32_t m = (uint32_t)v[1], slots = (uint32_t)v[2];
    if (w < 1 || w > ROUND_MAX_RANKS || rank < 0 || rank >= w || v[2] < 1
            || reduce_kind_size(kind) == 0 || op < 0 || op >= REDUCE_NOPS || !(divisor > 0)
            || phase < 0 || phase > 2) {
        PyErr_Format(PyExc_ValueError, "one_round: bad world %d, rank %d, slots %lld, kind %d, "
                     "op %d or phase %d, or a divisor that is not > 0", w, rank, v[2], kind, op,
                     phase);
        return NULL;
    }
    /* place: (segment id, byte offset) of src in a shared array every rank maps */
    unsigned long long place_seg = 0, place_off = 0;
    if (args[15] != Py_None) {
        if (!PyTuple_Check(args[15]) || PyTuple_GET_SIZE(args[15]) != 2) {
            PyErr_SetString(PyExc_TypeError, "one_round: place must be None or (segment, offset)");
            return NULL;
        }
        place_seg = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[15], 0));
        place_off = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[15], 1));
        if (PyErr_Occurred()) return NULL;
        if (!place_seg || !split) {
            PyErr_SetString(PyExc_ValueError, "one_round: a place needs split and a segment id "
                            "other than 0");
            return NULL;
        }
    }
    PyObject *inputs = args[16];
    if (inputs != Py_None && (!PyTuple_Check(inputs) || PyTuple_GET_SIZE(inputs) != 2
                              || !PyTuple_Check(PyTuple_GET_ITEM(inputs, 0))
                              || PyTuple_GET_SIZE(PyTuple_GET_ITEM(inputs, 0)) != w)) {
        PyErr_Format(PyExc_TypeError, "one_round: inputs must be None or (buffers, offsets) "
                     "of %d ranks", w);
        return NULL;
    }
    Py_buffer seg, src, dst, views[ROUND_MAX_RANKS];
    int nviews = 0;
    if (PyObject_GetBuffer(args[0], &seg, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&seg);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&seg);
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *ret = NULL;
    Py_ssize_t heads[ROUND_MAX_RANKS], reds[ROUND_MAX_RANKS], lines[ROUND_MAX_RANKS];
    Py_ssize_t cut[ROUND_MAX_RANKS + 1];   /* split: rank q reduces bytes [cut[q], cut[q+1]) */
    int isz = reduce_kind_size(kind);
    Py_ssize_t nbytes = src.len, n = nbytes / isz;
    char *base = seg.buf;
    if (nbytes % isz || dst.len != nbytes || (uintptr_t)dst.buf % isz
            || (uintptr_t)src.buf % isz) {
        PyErr_Format(PyExc_ValueError, "one_round: src (%zd bytes) and dst (%zd bytes) must "
                     "be the same whole number of aligned %d-byte elements", nbytes, dst.len, isz);
        goto done;
    }
    for (int q = 0; q <= w; q++) cut[q] = (n * q) / w * isz;
    if (offsets(args[3], w, SEG_HEAD + nbytes, seg.len, heads, "heads") < 0
            || offsets(args[5], w, 64, seg.len, lines, "lines") < 0
            || (split && offsets(args[4], w, (n + w - 1) / w * isz, seg.len, reds, "reds") < 0))
        goto done;
    Py_ssize_t line = lines[rank], head = heads[rank];
    Py_ssize_t a = split ? cut[rank] : 0, b = split ? cut[rank + 1] : nbytes;
    int q;
    if (phase == 0) {
        q = spin_until(base, lines, w, rank, SEG_L_FREE, m - slots, v[6]);
        if (q >= 0) {
            ret = PyLong_FromLong(((long)q << 8) | ROUND_WAIT_FREE);
            goto done;
        }
        /* split: the slice this rank reduces itself is read from src, not staged */
        char *slot = base + head + SEG_HEAD;
        if (place_seg) {
            __atomic_store_n((uint64_t *)(base + head + SEG_HD_SRC_OFF), (uint64_t)place_off,
                             __ATOMIC_SEQ_CST);
        } else if (split) {
            copy_bytes(slot, src.buf, a);
            copy_bytes(slot + b, (char *)src.buf + b, nbytes - b);
        } else {
            copy_bytes(slot, src.buf, nbytes);
        }
        __atomic_store_n((uint64_t *)(base + head + SEG_HD_SRC_SEG), (uint64_t)place_seg,
                         __ATOMIC_SEQ_CST);
        __atomic_store_n((uint64_t *)(base + head + SEG_HD_STAMP), (uint64_t)v[3],
                         __ATOMIC_SEQ_CST);
        publish(base, line, SEG_L_PUB, m);
        phase = 1;
    }
    if (phase == 1) {
        q = spin_until(base, lines, w, rank, SEG_L_PUB, m, v[6]);
        if (q >= 0) {
            ret = PyLong_FromLong(((long)q << 8) | ROUND_WAIT_PUB);
            goto done;
        }
        char *srcs[ROUND_MAX_RANKS];
        for (q = 0; q < w; q++) {
            uint64_t got = __atomic_load_n((uint64_t *)(base + heads[q] + SEG_HD_STAMP),
                                           __ATOMIC_SEQ_CST);
            if (got != (uint64_t)v[3]) {
                ret = PyLong_FromLong(((long)q << 8) | ROUND_MISMATCH);
                goto done;
            }
            srcs[q] = base + heads[q] + SEG_HEAD + a;
        }
        if (inputs == Py_None) {
            for (q = 0; q < w; q++)
                if (q != rank && __atomic_load_n((uint64_t *)(base + heads[q] + SEG_HD_SRC_SEG),
                                                 __ATOMIC_SEQ_CST)) {
                    ret = PyLong_FromLong(((long)q << 8) | ROUND_IN_PLACE);
                    goto done;
                }
        } else {   /* every rank's input where it is: (buffers, offsets) */
            PyObject *offs = PyTuple_GET_ITEM(inputs, 1);
            if (!PyTuple_Check(offs) || PyTuple_GET_SIZE(offs) != w) {
                PyErr_Format(PyExc_TypeError, "one_round: inputs' offsets must be a tuple of %d",
                             w);
                goto done;
            }
            for (; nviews < w; nviews++)
                if (PyObject_GetBuffer(PyTuple_GET_ITEM(PyTuple_GET_ITEM(inputs, 0), nviews),
                                       &views[nviews], PyBUF_C_CONTIGUOUS) < 0)
                    goto done;
            for (q = 0; q < w; q++) {
                Py_ssize_t o = PyLong_AsSsize_t(PyTuple_GET_ITEM(offs, q));
                if (o == -1 && PyErr_Occurred()) goto done;
                if (o < 0 || o % isz || nbytes > views[q].len - o) {
                    PyErr_Format(PyExc_IndexError, "one_round: input %d does not hold the "
                                 "round's %zd bytes at offset %zd", q, nbytes, o);
                    goto done;
                }
                srcs[q] = (char *)views[q].buf + o + a;
            }
        }
        if (!split) {
            reduce_run(dst.buf, srcs, w, n, kind, op, divisor);
            publish(base, line, SEG_L_FREE, m);
            ret = PyLong_FromLong(ROUND_DONE);
            goto done;
        }
        /* its slice straight into dst, and from there (still in L1) into its red slot */
        srcs[rank] = (char *)src.buf + a;
        reduce_twice((char *)dst.buf + a, base + reds[rank], srcs, w, (b - a) / isz, kind, op,
                     divisor);
        publish(base, line, SEG_L_RED, m);
    }
    /* split: every rank's reduced slice into dst */
    q = spin_until(base, lines, w, rank, SEG_L_RED, m, v[6]);
    if (q >= 0) {
        ret = PyLong_FromLong(((long)q << 8) | ROUND_WAIT_RED);
        goto done;
    }
    for (q = 0; q < w; q++)
        if (q != rank)
            copy_bytes((char *)dst.buf + cut[q], base + reds[q], cut[q + 1] - cut[q]);
    publish(base, line, SEG_L_FREE, m);
    ret = PyLong_FromLong(ROUND_DONE);
done:
    for (int i = 0; i < nviews; i++) PyBuffer_Release(&views[i]);
    PyBuffer_Release(&seg);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

/* The status codes and the layout this file assumes, as module constants. */
int
collective_add_constants(PyObject *m)
{
    if (PyModule_AddIntConstant(m, "ROUND_DONE", ROUND_DONE) < 0
            || PyModule_AddIntConstant(m, "ROUND_WAIT_FREE", ROUND_WAIT_FREE) < 0
            || PyModule_AddIntConstant(m, "ROUND_WAIT_PUB", ROUND_WAIT_PUB) < 0
            || PyModule_AddIntConstant(m, "ROUND_WAIT_RED", ROUND_WAIT_RED) < 0
            || PyModule_AddIntConstant(m, "ROUND_MISMATCH", ROUND_MISMATCH) < 0
            || PyModule_AddIntConstant(m, "ROUND_IN_PLACE", ROUND_IN_PLACE) < 0
            || PyModule_AddIntConstant(m, "ROUND_MAX_RANKS", ROUND_MAX_RANKS) < 0)
        return -1;
    PyObject *layout = Py_BuildValue("(iiiiiiiiii)", SEG_H_ABORT, SEG_H_BELL, SEG_H_SLEEPERS,
                                     SEG_L_PUB, SEG_L_RED, SEG_L_FREE, SEG_HEAD, SEG_HD_STAMP,
                                     SEG_HD_SRC_SEG, SEG_HD_SRC_OFF);
    if (!layout) return -1;
    if (PyModule_AddObject(m, "ROUND_LAYOUT", layout) < 0) {
        Py_DECREF(layout);
        return -1;
    }
    return 0;
}
