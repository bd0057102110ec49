/*
 * pmaprt._core: the few things Python cannot do fast between processes.
 *
 *   Region(buffer)        a writable buffer (an mmap of a shared segment) with
 *                         bounds-checked atomic operations at byte offsets:
 *     load32/store32/add32            32-bit words (futex words)
 *     load64/store64/add64/cas64      64-bit counters
 *     wait32(off, expected, timeout, spin_ns)
 *                         spin briefly, then sleep on a futex until the word
 *                         differs from `expected` (or the timeout passes);
 *                         the GIL is released while waiting and signals
 *                         (Ctrl-C) are checked when the sleep is interrupted.
 *     wake32(off, n)      wake up to n sleepers on that word.
 *     range_take/range_steal/range_set
 *                         the work-stealing protocol on one packed 64-bit
 *                         word (low index: 44 bits, count: 20 bits): the
 *                         owner takes from the front, a thief takes the back
 *                         half, each with one compare-and-swap.
 *   set_pdeathsig(sig)    prctl(PR_SET_PDEATHSIG): a worker dies with its parent.
 *   Mapping(fd, size, own_fd=False, populate=False)
 *                         a MAP_SHARED mapping of a memfd that exports the
 *                         buffer protocol and is unmapped when the last
 *                         reference (an ndarray, a memoryview) goes away. It
 *                         keeps no descriptor of its own unless own_fd (the
 *                         mmap module dup()s one per mapping; thousands of
 *                         result mappings must not cost thousands of fds).
 *     populate(off, len)  madvise(MADV_POPULATE_WRITE): allocate and map the
 *                         pages now; ENOMEM is an error here instead of a
 *                         SIGBUS at a later write. GIL released.
 *   memcpy(dst, off, src) copy a contiguous buffer into a writable one at a
 *                         byte offset, the GIL released (threads copy in
 *                         parallel).
 *   populate(buf, off, len)  the same for any writable mapped buffer (an mmap).
 *   buffer_address(obj)   (address, nbytes) of a contiguous buffer.
 *   vm_read(pid, addr, dst, off, n)
 *                         process_vm_readv: a worker copies bytes straight out
 *                         of the parent's memory (a plain ndarray), GIL released.
 *
 * Plain CPython C API, multi-phase init, the buffer protocol.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define RANGE_LO_BITS 44
#define RANGE_N_BITS 20
#define RANGE_N_MASK ((UINT64_C(1) << RANGE_N_BITS) - 1)
#define RANGE_LO_MAX ((UINT64_C(1) << RANGE_LO_BITS) - 1)

static inline uint64_t range_pack(uint64_t lo, uint64_t n) { return (lo << RANGE_N_BITS) | n; }
static inline uint64_t range_lo(uint64_t v) { return v >> RANGE_N_BITS; }
static inline uint64_t range_n(uint64_t v) { return v & RANGE_N_MASK; }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
} RegionObject;

static int
Region_init(RegionObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &obj))
        return -1;
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (((uintptr_t)self->view.buf) % 8 != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "Region: buffer must be 8-byte aligned");
        return -1;
    }
    self->has_view = 1;
    return 0;
}

static void
Region_dealloc(RegionObject *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Returns a pointer to `width` bytes at `off`, aligned to `width`, or NULL with
 * an exception set. */
static void *
region_at(RegionObject *self, PyObject *offobj, Py_ssize_t width)
{
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "Region is released");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(offobj);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (off < 0 || off + width > self->view.len) {
        PyErr_Format(PyExc_IndexError, "offset %zd out of range for a region of %zd bytes",
                     off, self->view.len);
        return NULL;
    }
    if (off % width != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, width);
        return NULL;
    }
    return (char *)self->view.buf + off;
}

#define CHECK_NARGS(name, want)                                                   \
    if (nargs != (want)) {                                                        \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)",   \
                     (int)(want), nargs);                                         \
        return NULL;                                                              \
    }

static PyObject *
Region_load32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("load32", 1);
    uint32_t *p = region_at(self, args[0], 4);
    if (!p) return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *
Region_store32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("store32", 2);
    uint32_t *p = region_at(self, args[0], 4);
    if (!p) return NULL;
    unsigned long v = PyLong_AsUnsignedLongMask(args[1]);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    __atomic_store_n(p, (uint32_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Region_add32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("add32", 2);
    uint32_t *p = region_at(self, args[0], 4);
    if (!p) return NULL;
    long d = PyLong_AsLong(args[1]);
    if (d == -1 && PyErr_Occurred()) return NULL;
    uint32_t old = __atomic_fetch_add(p, (uint32_t)d, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLong(old);
}

static PyObject *
Region_load64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("load64", 1);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    return PyLong_FromLongLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *
Region_store64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("store64", 2);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long v = PyLong_AsLongLong(args[1]);
    if (v == -1 && PyErr_Occurred()) return NULL;
    __atomic_store_n(p, (int64_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Region_add64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("add64", 2);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long d = PyLong_AsLongLong(args[1]);
    if (d == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(__atomic_fetch_add(p, (int64_t)d, __ATOMIC_SEQ_CST));
}

static PyObject *
Region_cas64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("cas64", 3);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long expected = PyLong_AsLongLong(args[1]);
    if (expected == -1 && PyErr_Occurred()) return NULL;
    long long desired = PyLong_AsLongLong(args[2]);
    if (desired == -1 && PyErr_Occurred()) return NULL;
    int64_t e = expected;
    int ok = __atomic_compare_exchange_n(p, &e, (int64_t)desired, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyBool_FromLong(ok);
}

/* wait32(off, expected, timeout_s, spin_ns[, sleepers]) -> True if the word
 * differs from `expected` on return, False on timeout. timeout_s None waits
 * without bound. With `sleepers` (the offset of a 32-bit counter), the
 * counter is raised for as long as this waiter sleeps in the kernel, not
 * while it spins: a waker that reads it as 0 after changing the word needs
 * no system call (the waiter's futex compares the word after raising it). */
static PyObject *
Region_wait32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_Format(PyExc_TypeError, "wait32() takes 4 or 5 arguments (%zd given)", nargs);
        return NULL;
    }
    uint32_t *p = region_at(self, args[0], 4);
    if (!p) return NULL;
    uint32_t *sleepers = NULL;
    if (nargs == 5) {
        sleepers = region_at(self, args[4], 4);
        if (!sleepers) return NULL;
    }
    unsigned long expected = PyLong_AsUnsignedLongMask(args[1]);
    if (expected == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    double timeout = -1.0;
    if (args[2] != Py_None) {
        timeout = PyFloat_AsDouble(args[2]);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    long long spin_ns = PyLong_AsLongLong(args[3]);
    if (spin_ns == -1 && PyErr_Occurred()) return NULL;

    uint32_t exp32 = (uint32_t)expected;
    if (__atomic_load_n(p, __ATOMIC_SEQ_CST) != exp32)
        Py_RETURN_TRUE;

    double start = now_s();
    double deadline = timeout >= 0 ? start + timeout : 0;
    int changed = 0;
    for (;;) {
        int err = 0, slept = 0;
        Py_BEGIN_ALLOW_THREADS
        /* Spin: a waker that answers within spin_ns costs no system call. */
        if (spin_ns > 0) {
            double spin_end = start + (double)spin_ns * 1e-9;
            unsigned i = 0;
            for (;;) {
                if (__atomic_load_n(p, __ATOMIC_SEQ_CST) != exp32) { changed = 1; break; }
                cpu_relax();
                if ((++i & 63) == 0 && now_s() >= spin_end) break;
            }
            spin_ns = 0;
        }
        if (!changed && sleepers) {
            __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
            slept = 1;
        }
        while (!changed) {
            struct timespec ts, *tsp = NULL;
            if (timeout >= 0) {
                double left = deadline - now_s();
                if (left <= 0) break;
                ts.tv_sec = (time_t)left;
                ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
                tsp = &ts;
            }
            long r = syscall(SYS_futex, p, FUTEX_WAIT, exp32, tsp, NULL, 0);
            if (__atomic_load_n(p, __ATOMIC_SEQ_CST) != exp32) { changed = 1; break; }
            if (r == -1 && errno == EINTR) { err = EINTR; break; }
            if (r == -1 && errno == ETIMEDOUT) break;
        }
        if (slept) {
            __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
            slept = 0;
        }
        Py_END_ALLOW_THREADS
        if (changed) Py_RETURN_TRUE;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) return NULL;
            if (timeout >= 0 && now_s() >= deadline) Py_RETURN_FALSE;
            continue;
        }
        Py_RETURN_FALSE;
    }
}

static PyObject *
Region_wake32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("wake32", 2);
    uint32_t *p = region_at(self, args[0], 4);
    if (!p) return NULL;
    int n = PyLong_AsLong(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    long r = syscall(SYS_futex, p, FUTEX_WAKE, n, NULL, NULL, 0);
    if (r < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

/* range_take(off, maxc[, mark]) -> (lo, c): the owner takes up to maxc indices
 * from the front of its range; c == 0 when the range is empty. With `mark`,
 * the claim is recorded right after the CAS: lo at mark, c at mark + 8 (the
 * worker's "current chunk" words, which name what a crash loses). */
static PyObject *
Region_range_take(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_Format(PyExc_TypeError, "range_take() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long maxc = PyLong_AsLongLong(args[1]);
    if (maxc == -1 && PyErr_Occurred()) return NULL;
    if (maxc < 1) {
        PyErr_SetString(PyExc_ValueError, "range_take: maxc must be >= 1");
        return NULL;
    }
    int64_t *mark = NULL;
    if (nargs == 3) {
        mark = region_at(self, args[2], 16);
        if (!mark) return NULL;
    }
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        uint64_t lo = range_lo(v), n = range_n(v);
        if (n == 0)
            return Py_BuildValue("(KK)", (unsigned long long)lo, 0ULL);
        uint64_t c = (uint64_t)maxc < n ? (uint64_t)maxc : n;
        if (__atomic_compare_exchange_n(p, &v, range_pack(lo + c, n - c), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            if (mark) {
                __atomic_store_n(mark, (int64_t)lo, __ATOMIC_SEQ_CST);
                __atomic_store_n(mark + 1, (int64_t)c, __ATOMIC_SEQ_CST);
            }
            return Py_BuildValue("(KK)", (unsigned long long)lo, (unsigned long long)c);
        }
    }
}

/* range_steal(off[, dest]) -> (lo, c): a thief takes the back half (rounded
 * up) of the victim's range; c == 0 when there was nothing to take. With
 * `dest` (the thief's own, empty, range word) the stolen range is stored there
 * right after the CAS (a few instructions later: see ARCHITECTURE.md, "No item
 * is ever held only in a local variable", for the window that leaves). */
static PyObject *
Region_range_steal(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 && nargs != 2) {
        PyErr_Format(PyExc_TypeError, "range_steal() takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    uint64_t *dest = NULL;
    if (nargs == 2) {
        dest = region_at(self, args[1], 8);
        if (!dest) return NULL;
    }
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        uint64_t lo = range_lo(v), n = range_n(v);
        if (n == 0)
            return Py_BuildValue("(KK)", 0ULL, 0ULL);
        uint64_t k = n - n / 2;
        if (__atomic_compare_exchange_n(p, &v, range_pack(lo, n - k), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            if (dest)
                __atomic_store_n(dest, range_pack(lo + n - k, k), __ATOMIC_SEQ_CST);
            return Py_BuildValue("(KK)", (unsigned long long)(lo + n - k), (unsigned long long)k);
        }
    }
}

/* range_put(off, lo, n) -> bool: store a range into a word that holds an empty
 * one (CAS from empty): the parent hands work back (a retried chunk). */
static PyObject *
Region_range_put(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_put", 3);
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    unsigned long long lo = PyLong_AsUnsignedLongLong(args[1]);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long n = PyLong_AsUnsignedLongLong(args[2]);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (lo > RANGE_LO_MAX || n > RANGE_N_MASK || n == 0) {
        PyErr_Format(PyExc_OverflowError, "range_put: (lo=%llu, n=%llu) does not fit the packed word",
                     lo, n);
        return NULL;
    }
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (range_n(v) == 0) {
        if (__atomic_compare_exchange_n(p, &v, range_pack(lo, n), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* range_untake(off, lo, c, mark, kept) -> bool: the owner gives back
 * [lo, lo + c), the unstarted tail of its current chunk, to the front of its
 * own range word (which starts at lo + c, thieves having taken only from its
 * back, or is empty); then stores `kept` (the items of the chunk it keeps) at
 * `mark` (its "current chunk" length word). False, and nothing changed, when
 * the word cannot take them (it holds a range elsewhere, or would overflow). */
static PyObject *
Region_range_untake(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_untake", 5);
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    unsigned long long lo = PyLong_AsUnsignedLongLong(args[1]);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long c = PyLong_AsUnsignedLongLong(args[2]);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    int64_t *mark = region_at(self, args[3], 8);
    if (!mark) return NULL;
    long long kept = PyLong_AsLongLong(args[4]);
    if (kept == -1 && PyErr_Occurred()) return NULL;
    if (c == 0 || lo > RANGE_LO_MAX || c > RANGE_N_MASK) {
        PyErr_Format(PyExc_OverflowError, "range_untake: (lo=%llu, c=%llu) does not fit the packed word",
                     lo, c);
        return NULL;
    }
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        uint64_t n = range_n(v), nv;
        if (n == 0)
            nv = range_pack(lo, c);
        else if (range_lo(v) == lo + c && n + c <= RANGE_N_MASK)
            nv = range_pack(lo, n + c);
        else
            Py_RETURN_FALSE;
        if (__atomic_compare_exchange_n(p, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(mark, (int64_t)kept, __ATOMIC_SEQ_CST);
            Py_RETURN_TRUE;
        }
    }
}

/* claim_span(next, expected, span, dest) -> bool: move [expected, expected+span)
 * from the shared counter `next` into the caller's own, empty, range word. */
static PyObject *
Region_claim_span(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("claim_span", 4);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long expected = PyLong_AsLongLong(args[1]);
    if (expected == -1 && PyErr_Occurred()) return NULL;
    long long span = PyLong_AsLongLong(args[2]);
    if (span == -1 && PyErr_Occurred()) return NULL;
    uint64_t *dest = region_at(self, args[3], 8);
    if (!dest) return NULL;
    if (expected < 0 || span < 1 || (uint64_t)expected > RANGE_LO_MAX || (uint64_t)span > RANGE_N_MASK) {
        PyErr_Format(PyExc_OverflowError, "claim_span: (%lld, %lld) does not fit the packed word",
                     expected, span);
        return NULL;
    }
    int64_t e = expected;
    if (!__atomic_compare_exchange_n(p, &e, (int64_t)(expected + span), 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    __atomic_store_n(dest, range_pack((uint64_t)expected, (uint64_t)span), __ATOMIC_SEQ_CST);
    Py_RETURN_TRUE;
}

/* cas64_mark(off, expected, new, mark, value) -> bool: cas64, and on success
 * store64(mark, value) right after (a worker records the feed chunk it took). */
static PyObject *
Region_cas64_mark(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("cas64_mark", 5);
    int64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    long long expected = PyLong_AsLongLong(args[1]);
    if (expected == -1 && PyErr_Occurred()) return NULL;
    long long desired = PyLong_AsLongLong(args[2]);
    if (desired == -1 && PyErr_Occurred()) return NULL;
    int64_t *mark = region_at(self, args[3], 8);
    if (!mark) return NULL;
    long long value = PyLong_AsLongLong(args[4]);
    if (value == -1 && PyErr_Occurred()) return NULL;
    int64_t e = expected;
    if (!__atomic_compare_exchange_n(p, &e, (int64_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    __atomic_store_n(mark, (int64_t)value, __ATOMIC_SEQ_CST);
    Py_RETURN_TRUE;
}

/* range_set(off, lo, n): the owner publishes a new range. Only valid when the
 * word holds an empty range (thieves never write an empty range). */
static PyObject *
Region_range_set(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_set", 3);
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    unsigned long long lo = PyLong_AsUnsignedLongLong(args[1]);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long n = PyLong_AsUnsignedLongLong(args[2]);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (lo > RANGE_LO_MAX || n > RANGE_N_MASK) {
        PyErr_Format(PyExc_OverflowError, "range_set: (lo=%llu, n=%llu) does not fit the packed word",
                     lo, n);
        return NULL;
    }
    __atomic_store_n(p, range_pack(lo, n), __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Region_range_get(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_get", 1);
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    return Py_BuildValue("(KK)", (unsigned long long)range_lo(v), (unsigned long long)range_n(v));
}

static PyObject *
Region_release(RegionObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *
Region_get_size(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->has_view ? self->view.len : 0);
}

static PyMethodDef Region_methods[] = {
    {"load32", (PyCFunction)(void (*)(void))Region_load32, METH_FASTCALL, "load32(off) -> int"},
    {"store32", (PyCFunction)(void (*)(void))Region_store32, METH_FASTCALL, "store32(off, v)"},
    {"add32", (PyCFunction)(void (*)(void))Region_add32, METH_FASTCALL, "add32(off, d) -> old"},
    {"load64", (PyCFunction)(void (*)(void))Region_load64, METH_FASTCALL, "load64(off) -> int"},
    {"store64", (PyCFunction)(void (*)(void))Region_store64, METH_FASTCALL, "store64(off, v)"},
    {"add64", (PyCFunction)(void (*)(void))Region_add64, METH_FASTCALL, "add64(off, d) -> old"},
    {"cas64", (PyCFunction)(void (*)(void))Region_cas64, METH_FASTCALL,
     "cas64(off, expected, new) -> bool"},
    {"wait32", (PyCFunction)(void (*)(void))Region_wait32, METH_FASTCALL,
     "wait32(off, expected, timeout_s, spin_ns) -> changed"},
    {"wake32", (PyCFunction)(void (*)(void))Region_wake32, METH_FASTCALL, "wake32(off, n) -> woken"},
    {"range_take", (PyCFunction)(void (*)(void))Region_range_take, METH_FASTCALL,
     "range_take(off, maxc[, mark]) -> (lo, n)"},
    {"range_steal", (PyCFunction)(void (*)(void))Region_range_steal, METH_FASTCALL,
     "range_steal(off[, dest]) -> (lo, n)"},
    {"range_put", (PyCFunction)(void (*)(void))Region_range_put, METH_FASTCALL,
     "range_put(off, lo, n) -> bool (only into an empty range)"},
    {"range_untake", (PyCFunction)(void (*)(void))Region_range_untake, METH_FASTCALL,
     "range_untake(off, lo, c, mark, kept) -> bool (give back the tail of the current chunk)"},
    {"claim_span", (PyCFunction)(void (*)(void))Region_claim_span, METH_FASTCALL,
     "claim_span(next, expected, span, dest) -> bool"},
    {"cas64_mark", (PyCFunction)(void (*)(void))Region_cas64_mark, METH_FASTCALL,
     "cas64_mark(off, expected, new, mark, value) -> bool"},
    {"range_set", (PyCFunction)(void (*)(void))Region_range_set, METH_FASTCALL,
     "range_set(off, lo, n)"},
    {"range_get", (PyCFunction)(void (*)(void))Region_range_get, METH_FASTCALL,
     "range_get(off) -> (lo, n)"},
    {"release", (PyCFunction)Region_release, METH_NOARGS, "release the buffer"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Region_getset[] = {
    {"size", (getter)Region_get_size, NULL, "size in bytes", NULL},
    {NULL},
};

static PyType_Slot Region_slots[] = {
    {Py_tp_init, Region_init},
    {Py_tp_dealloc, Region_dealloc},
    {Py_tp_methods, Region_methods},
    {Py_tp_getset, Region_getset},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "Region(buffer): atomics and futex waits on a writable shared buffer."},
    {0, NULL},
};

static PyType_Spec Region_spec = {
    .name = "pmaprt._core.Region",
    .basicsize = sizeof(RegionObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Region_slots,
};


/* ---- Mapping: a shared mapping of a memfd, freed with its last reference ---- */

typedef struct {
    PyObject_HEAD
    char *addr;
    Py_ssize_t size;
    int fd;                 /* owned (closed with the mapping) or -1 */
    int readonly;
    unsigned long long key; /* unique in this process */
    Py_ssize_t exports;
    PyObject *weakreflist;
} MappingObject;

static unsigned long long mapping_next_key = 1;

static PyObject *
Mapping_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int fd, own_fd = 0, populate = 0, readonly = 0;
    Py_ssize_t size;
    static char *kwlist[] = {"fd", "size", "own_fd", "populate", "readonly", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in|ppp", kwlist, &fd, &size, &own_fd,
                                     &populate, &readonly))
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "Mapping: size must be > 0");
        return NULL;
    }
    int prot = PROT_READ | (readonly ? 0 : PROT_WRITE);
    int flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
    void *addr;
    Py_BEGIN_ALLOW_THREADS
    addr = mmap(NULL, (size_t)size, prot, flags, fd, 0);
    Py_END_ALLOW_THREADS
    if (addr == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    MappingObject *self = (MappingObject *)type->tp_alloc(type, 0);
    if (!self) {
        munmap(addr, (size_t)size);
        return NULL;
    }
    self->addr = addr;
    self->size = size;
    self->fd = own_fd ? fd : -1;
    self->readonly = readonly;
    self->key = mapping_next_key++;
    self->exports = 0;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static void
Mapping_dealloc(MappingObject *self)
{
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->addr)
        munmap(self->addr, (size_t)self->size);
    if (self->fd >= 0)
        close(self->fd);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
Mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, self->readonly,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
Mapping_releasebuffer(MappingObject *self, Py_buffer *view)
{
    self->exports--;
}

static PyObject *
Mapping_populate(MappingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off = 0, len = -1;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "populate(off=0, len=-1)");
        return NULL;
    }
    if (nargs >= 1 && (off = PyLong_AsSsize_t(args[0])) == -1 && PyErr_Occurred()) return NULL;
    if (nargs >= 2 && (len = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) return NULL;
    if (len < 0) len = self->size - off;
    if (off < 0 || len < 0 || off + len > self->size) {
        PyErr_SetString(PyExc_IndexError, "populate: range out of the mapping");
        return NULL;
    }
    long page = sysconf(_SC_PAGESIZE);
    Py_ssize_t a = off / page * page, b = off + len;
    if (b <= a) Py_RETURN_NONE;
    int rc, err = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(self->addr + a, (size_t)(b - a), MADV_POPULATE_WRITE);
    if (rc != 0) err = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Mapping_get_address(MappingObject *self, void *c) { return PyLong_FromVoidPtr(self->addr); }
static PyObject *Mapping_get_size(MappingObject *self, void *c) { return PyLong_FromSsize_t(self->size); }
static PyObject *Mapping_get_fd(MappingObject *self, void *c) { return PyLong_FromLong(self->fd); }
static PyObject *Mapping_get_key(MappingObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->key); }
static PyObject *Mapping_get_exports(MappingObject *self, void *c) { return PyLong_FromSsize_t(self->exports); }

static PyMethodDef Mapping_methods[] = {
    {"populate", (PyCFunction)(void (*)(void))Mapping_populate, METH_FASTCALL,
     "populate(off=0, len=-1): allocate and map the pages now (MADV_POPULATE_WRITE)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Mapping_getset[] = {
    {"address", (getter)Mapping_get_address, NULL, "start address in this process", NULL},
    {"size", (getter)Mapping_get_size, NULL, "size in bytes", NULL},
    {"fd", (getter)Mapping_get_fd, NULL, "the memfd it owns, or -1", NULL},
    {"key", (getter)Mapping_get_key, NULL, "a number unique to this mapping in this process", NULL},
    {"exports", (getter)Mapping_get_exports, NULL, "buffer views exported now", NULL},
    {NULL},
};

static PyMemberDef Mapping_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(MappingObject, weakreflist), READONLY, NULL},
    {NULL},
};

static PyType_Slot Mapping_slots[] = {
    {Py_tp_new, Mapping_new},
    {Py_tp_members, Mapping_members},
    {Py_tp_dealloc, Mapping_dealloc},
    {Py_tp_methods, Mapping_methods},
    {Py_tp_getset, Mapping_getset},
    {Py_bf_getbuffer, Mapping_getbuffer},
    {Py_bf_releasebuffer, Mapping_releasebuffer},
    {Py_tp_doc, "Mapping(fd, size, own_fd=False, populate=False, readonly=False): a shared "
                "mapping of a memfd, unmapped when its last reference goes."},
    {0, NULL},
};

static PyType_Spec Mapping_spec = {
    .name = "pmaprt._core.Mapping",
    .basicsize = sizeof(MappingObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Mapping_slots,
};

static PyObject *
core_memcpy(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "memcpy(dst, dst_off, src)");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred()) return NULL;
    Py_buffer d, s;
    if (PyObject_GetBuffer(args[0], &d, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &s, PyBUF_FULL_RO) < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    if (!PyBuffer_IsContiguous(&s, 'A')) {
        PyBuffer_Release(&d);
        PyBuffer_Release(&s);
        PyErr_SetString(PyExc_ValueError, "memcpy: the source must be contiguous");
        return NULL;
    }
    if (off < 0 || off + s.len > d.len) {
        PyErr_Format(PyExc_IndexError, "memcpy: %zd bytes at offset %zd do not fit in %zd",
                     s.len, off, d.len);
        PyBuffer_Release(&d);
        PyBuffer_Release(&s);
        return NULL;
    }
    Py_ssize_t n = s.len;
    if (n >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        memcpy((char *)d.buf + off, s.buf, (size_t)n);
        Py_END_ALLOW_THREADS
    } else if (n > 0) {
        memcpy((char *)d.buf + off, s.buf, (size_t)n);
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    return PyLong_FromSsize_t(n);
}

static PyObject *
core_populate(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "populate(buffer, off=0, len=-1)");
        return NULL;
    }
    Py_ssize_t off = 0, len = -1;
    if (nargs >= 2 && (off = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) return NULL;
    if (nargs >= 3 && (len = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[0], &v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (len < 0) len = v.len - off;
    if (off < 0 || len < 0 || off + len > v.len) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_IndexError, "populate: range out of the buffer");
        return NULL;
    }
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)v.buf + (uintptr_t)off, b = a + (uintptr_t)len;
    a = a / (uintptr_t)page * (uintptr_t)page;
    int rc = 0, err = 0;
    if (b > a) {
        Py_BEGIN_ALLOW_THREADS
        rc = madvise((void *)a, (size_t)(b - a), MADV_POPULATE_WRITE);
        if (rc != 0) err = errno;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    if (rc != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
core_vm_read(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "vm_read(pid, address, dst, dst_off, nbytes)");
        return NULL;
    }
    long pid = PyLong_AsLong(args[0]);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    unsigned long long addr = PyLong_AsUnsignedLongLong(args[1]);
    if (addr == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_ssize_t off = PyLong_AsSsize_t(args[3]);
    if (off == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[4]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    Py_buffer d;
    if (PyObject_GetBuffer(args[2], &d, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (off < 0 || n < 0 || off + n > d.len) {
        PyBuffer_Release(&d);
        PyErr_SetString(PyExc_IndexError, "vm_read: range out of the destination");
        return NULL;
    }
    int err = 0;
    Py_ssize_t done = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        struct iovec l = {(char *)d.buf + off + done, (size_t)(n - done)};
        struct iovec r = {(void *)(uintptr_t)(addr + (unsigned long long)done), (size_t)(n - done)};
        ssize_t k = process_vm_readv((pid_t)pid, &l, 1, &r, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        if (k == 0) {
            err = EFAULT;
            break;
        }
        done += k;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(done);
}

static PyObject *
core_buffer_address(PyObject *mod, PyObject *obj)
{
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_FULL_RO) < 0) return NULL;
    if (!PyBuffer_IsContiguous(&v, 'A')) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "buffer_address: the buffer is not contiguous");
        return NULL;
    }
    PyObject *r = Py_BuildValue("(Nn)", PyLong_FromVoidPtr(v.buf), v.len);
    PyBuffer_Release(&v);
    return r;
}

static PyObject *
core_set_pdeathsig(PyObject *mod, PyObject *arg)
{
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (prctl(PR_SET_PDEATHSIG, sig) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------
 * Results(source, tail_type): the iterator a map's caller sees.
 *
 * source yields the map's results in pieces: lists (a chunk's results, taken
 * by index), tail_type tuples (fn, seq, start, end): the inline rest of a
 * map over a list or tuple, fn(seq[i]) for i in start..end-1, computed here
 * with one call per item (no map object, no iterator over seq, no chain), or
 * any other iterable (taken item by item). It replaces
 * itertools.chain.from_iterable(source), whose extra layer per item made an
 * inline map of tiny items 5-10 % slower than builtin map.
 * As map does, an exception from fn is raised for its item, and the next
 * call goes on with the next item.
 * ------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    PyObject *source;    /* iterator of pieces; NULL once exhausted */
    PyObject *tail_type; /* the type that marks an inline tail */
    PyObject *list;      /* current list piece, or NULL */
    Py_ssize_t pos;
    PyObject *fn;        /* current inline tail: fn over seq[pos:end] */
    PyObject *seq;
    Py_ssize_t end;
    PyObject *it;        /* current piece of another kind */
    PyObject *box;       /* a timed tail's [budget_s, stop index], or NULL */
    double budget, t0;   /* a timed tail ends once it has run budget seconds */
    double t_check;      /* when the clock was last read */
    Py_ssize_t ran;      /* items the current tail has run */
    Py_ssize_t check_at; /* ran count at which to read the clock next */
    Py_ssize_t last_stride; /* items between the last two reads */
    int crange;          /* seq is a range whose items fit a long long: */
    long long rstart, rstep; /* item i is rstart + i * rstep (no PyLong math) */
} ResultsObject;

static PyObject *
Results_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *source, *tail_type;
    if (!PyArg_ParseTuple(args, "OO:Results", &source, &tail_type))
        return NULL;
    if (!PyType_Check(tail_type) ||
            !PyType_IsSubtype((PyTypeObject *)tail_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Results: tail_type must be a subclass of tuple");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(source);
    if (!it) return NULL;
    ResultsObject *self = (ResultsObject *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(it);
        return NULL;
    }
    self->source = it;
    Py_INCREF(tail_type);
    self->tail_type = tail_type;
    return (PyObject *)self;
}

static int
Results_traverse(ResultsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->source);
    Py_VISIT(self->tail_type);
    Py_VISIT(self->list);
    Py_VISIT(self->fn);
    Py_VISIT(self->seq);
    Py_VISIT(self->it);
    Py_VISIT(self->box);
    return 0;
}

static int
Results_clear(ResultsObject *self)
{
    Py_CLEAR(self->source);
    Py_CLEAR(self->tail_type);
    Py_CLEAR(self->list);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->seq);
    Py_CLEAR(self->it);
    Py_CLEAR(self->box);
    return 0;
}

static void
Results_dealloc(ResultsObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Results_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Results_next(ResultsObject *self)
{
    for (;;) {
        if (self->list) {
            if (self->pos < PyList_GET_SIZE(self->list)) {
                PyObject *x = PyList_GET_ITEM(self->list, self->pos++);
                Py_INCREF(x);
                return x;
            }
            Py_CLEAR(self->list);
        }
        else if (self->seq) {
            /* A timed tail reads the clock after its 1st item, then after
             * every item while items take over 2 us, else every 16th item
             * (a read costs about 20 ns): it stops once it has run its
             * budget, so the caller can time it and hand dear items on. */
            if (self->box && self->ran >= self->check_at && self->pos < self->end) {
                double t = now_s();
                double per_item = (t - self->t_check) / (double)self->last_stride;
                self->t_check = t;
                if (t - self->t0 >= self->budget) {
                    self->end = self->pos;
                }
                else {
                    self->last_stride = per_item > 2e-6 ? 1 : 16;
                    self->check_at = self->ran + self->last_stride;
                }
            }
            if (self->pos < self->end) {
                PyObject *x;
                if (PyList_CheckExact(self->seq)) {
                    if (self->pos >= PyList_GET_SIZE(self->seq))
                        goto tail_done;     /* the list shrank: stop, as its iterator does */
                    x = PyList_GET_ITEM(self->seq, self->pos);
                    Py_INCREF(x);
                }
                else if (PyTuple_CheckExact(self->seq)) {
                    x = PyTuple_GET_ITEM(self->seq, self->pos);
                    Py_INCREF(x);
                }
                else if (self->crange) {
                    /* a range of C-sized ints: as its own iterator computes
                     * them (range[i] would do the arithmetic in PyLongs:
                     * 1.7x map's time for x*2) */
                    x = PyLong_FromLongLong(self->rstart + (long long)self->pos * self->rstep);
                    if (!x)
                        return NULL;
                }
                else {
                    /* any other sequence (a range of huge ints): seq[i] */
                    x = PySequence_GetItem(self->seq, self->pos);
                    if (!x)
                        return NULL;
                }
                self->pos++;
                self->ran++;
                /* Strong references for the call: fn may re-enter next() on
                 * this iterator, which may finish the tail and clear them. */
                PyObject *fn = self->fn;
                Py_INCREF(fn);
                PyObject *r = PyObject_CallOneArg(fn, x);
                Py_DECREF(fn);
                Py_DECREF(x);
                return r;
            }
        tail_done:
            if (self->box) {
                PyObject *stop = PyLong_FromSsize_t(self->pos);
                if (!stop || PyList_SetItem(self->box, 1, stop) < 0) {
                    Py_CLEAR(self->box);
                    return NULL;
                }
                Py_CLEAR(self->box);
            }
            Py_CLEAR(self->seq);
            Py_CLEAR(self->fn);
        }
        else if (self->it) {
            PyObject *it = self->it;
            Py_INCREF(it);
            PyObject *x = PyIter_Next(it);
            if (x || PyErr_Occurred()) {
                Py_DECREF(it);
                return x;
            }
            if (self->it == it)
                Py_CLEAR(self->it);
            Py_DECREF(it);
        }
        if (!self->source)
            return NULL;
        PyObject *src = self->source;
        Py_INCREF(src);
        PyObject *piece = PyIter_Next(src);
        if (!piece) {
            int err = PyErr_Occurred() != NULL;
            if (!err && self->source == src)
                Py_CLEAR(self->source);
            Py_DECREF(src);
            return NULL;
        }
        Py_DECREF(src);
        if (PyList_CheckExact(piece)) {
            Py_XSETREF(self->list, piece);
            self->pos = 0;
        }
        else if ((PyObject *)Py_TYPE(piece) == self->tail_type) {
            PyObject *fn, *seq, *box = NULL;
            Py_ssize_t start, end;
            if (!PyArg_ParseTuple(piece, "OOnn|O!:inline tail", &fn, &seq, &start, &end,
                                  &PyList_Type, &box)) {
                Py_DECREF(piece);
                return NULL;
            }
            double budget = 0;
            if (box) {
                if (PyList_GET_SIZE(box) != 2) {
                    Py_DECREF(piece);
                    PyErr_SetString(PyExc_ValueError,
                                    "Results: a timed tail's box is [budget_s, stop]");
                    return NULL;
                }
                budget = PyFloat_AsDouble(PyList_GET_ITEM(box, 0));
                if (budget == -1.0 && PyErr_Occurred()) {
                    Py_DECREF(piece);
                    return NULL;
                }
            }
            if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)
                    && !PyRange_Check(seq)) {
                Py_DECREF(piece);
                PyErr_SetString(PyExc_TypeError,
                                "Results: an inline tail needs a list, tuple or range");
                return NULL;
            }
            if (start < 0) start = 0;
            if (!PyList_CheckExact(seq)) {      /* fixed length: clamp once */
                Py_ssize_t len = PySequence_Size(seq);
                if (len < 0) {
                    Py_DECREF(piece);
                    return NULL;
                }
                if (end > len)
                    end = len;
            }
            int crange = 0;
            long long rstart = 0, rstep = 0;
            if (PyRange_Check(seq) && end > start) {
                /* items start + i*step for i < end: C arithmetic when the
                 * range's start, step and last item fit a long long */
                PyObject *a = PyObject_GetAttrString(seq, "start");
                PyObject *b = a ? PyObject_GetAttrString(seq, "step") : NULL;
                if (!a || !b) {
                    Py_XDECREF(a);
                    Py_XDECREF(b);
                    Py_DECREF(piece);
                    return NULL;
                }
                int o1 = 0, o2 = 0;
                rstart = PyLong_AsLongLongAndOverflow(a, &o1);
                rstep = PyLong_AsLongLongAndOverflow(b, &o2);
                Py_DECREF(a);
                Py_DECREF(b);
                if (PyErr_Occurred()) {
                    Py_DECREF(piece);
                    return NULL;
                }
                long long prod, last;
                crange = !o1 && !o2
                    && !__builtin_mul_overflow((long long)(end - 1), rstep, &prod)
                    && !__builtin_add_overflow(rstart, prod, &last);
            }
            self->crange = crange;
            self->rstart = rstart;
            self->rstep = rstep;
            Py_INCREF(fn);
            Py_INCREF(seq);
            Py_XSETREF(self->fn, fn);
            Py_XSETREF(self->seq, seq);
            self->pos = start;
            self->end = end;
            Py_XINCREF(box);
            Py_XSETREF(self->box, box);
            self->budget = budget;
            self->ran = 0;
            self->check_at = 1;
            self->last_stride = 1;
            self->t0 = self->t_check = box ? now_s() : 0;
            Py_DECREF(piece);
        }
        else {
            PyObject *it = PyObject_GetIter(piece);
            Py_DECREF(piece);
            if (!it)
                return NULL;
            Py_XSETREF(self->it, it);
        }
    }
}

static PyType_Slot Results_slots[] = {
    {Py_tp_new, Results_new},
    {Py_tp_dealloc, Results_dealloc},
    {Py_tp_traverse, Results_traverse},
    {Py_tp_clear, Results_clear},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, Results_next},
    {Py_tp_doc, "Results(source, tail_type): the items of source's pieces in order; "
                "a tail_type piece (fn, seq, start, end[, box]) (seq a list, tuple or "
                "range) gives fn(seq[i]) for i in "
                "start..end-1; with box = [budget_s, stop] it stops once it has run "
                "budget_s seconds and sets box[1] to where it stopped."},
    {0, NULL},
};

static PyType_Spec Results_spec = {
    .name = "pmaprt._core.Results",
    .basicsize = sizeof(ResultsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Results_slots,
};

static PyMethodDef core_methods[] = {
    {"set_pdeathsig", core_set_pdeathsig, METH_O,
     "set_pdeathsig(sig): deliver sig to this process when its parent dies"},
    {"memcpy", (PyCFunction)(void (*)(void))core_memcpy, METH_FASTCALL,
     "memcpy(dst, dst_off, src) -> n: copy src into dst at dst_off, GIL released"},
    {"populate", (PyCFunction)(void (*)(void))core_populate, METH_FASTCALL,
     "populate(buffer, off=0, len=-1): MADV_POPULATE_WRITE over a shared mapping's pages, "
     "GIL released"},
    {"vm_read", (PyCFunction)(void (*)(void))core_vm_read, METH_FASTCALL,
     "vm_read(pid, address, dst, dst_off, nbytes) -> n: process_vm_readv from another "
     "process into dst, GIL released"},
    {"buffer_address", core_buffer_address, METH_O,
     "buffer_address(obj) -> (address, nbytes) of a contiguous buffer"},
    {NULL, NULL, 0, NULL},
};

static int
core_exec(PyObject *m)
{
    PyObject *tp = PyType_FromModuleAndSpec(m, &Region_spec, NULL);
    if (!tp) return -1;
    if (PyModule_AddObject(m, "Region", tp) < 0) {
        Py_DECREF(tp);
        return -1;
    }
    PyObject *mt = PyType_FromModuleAndSpec(m, &Mapping_spec, NULL);
    if (!mt) return -1;
    if (PyModule_AddObject(m, "Mapping", mt) < 0) {
        Py_DECREF(mt);
        return -1;
    }
    PyObject *rt = PyType_FromModuleAndSpec(m, &Results_spec, NULL);
    if (!rt) return -1;
    if (PyModule_AddObject(m, "Results", rt) < 0) {
        Py_DECREF(rt);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "RANGE_N_MAX", (long)RANGE_N_MASK) < 0) return -1;
    if (PyModule_AddObject(m, "RANGE_LO_MAX", PyLong_FromUnsignedLongLong(RANGE_LO_MAX)) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pmaprt._core",
    .m_doc = "Atomics, futex waits, the range-stealing protocol and memfd mappings over shared memory.",
    .m_size = 0,
    .m_methods = core_methods,
    .m_slots = core_slots,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
