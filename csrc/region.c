/*
 * region.c: Region(buffer), atomics and futex waits on a writable shared
 * buffer (an mmap of a shared segment), at bounds-checked byte offsets.
 *
 *   region_at                         offset -> aligned pointer, or an error
 *   Region.load32/store32/add32       32-bit words (futex words)
 *   Region.load64/store64/add64/cas64 64-bit counters
 *   Region.wait32(off, expected, timeout_s, spin_ns[, sleepers])
 *                                     spin briefly, then sleep on a futex
 *                                     until the word differs from expected
 *   Region.wake32(off, n)             wake up to n sleepers on a word
 *   Region.release(), Region.size     drop the buffer; its size in bytes
 *   Region_spec                       the type's spec (module.c makes it)
 *
 * The range-word methods of Region (range_take, range_steal, ...) are in
 * ranges.c; this file lists them in Region's method table.
 *
 * Every operation is sequentially consistent (__ATOMIC_SEQ_CST): the
 * protocols above it reason about one total order of their words' writes.
 */
#include "pmaprt.h"

#include <linux/futex.h>
#include <sys/syscall.h>

/* The spin of wait32 reads the clock once per this many pauses: a clock read
 * costs far more than a pause, and the spin overruns spin_ns by at most this
 * many pauses. A power of two (the test is a mask). */
#define SPIN_PAUSES_PER_CLOCK_READ 64

/* ---- Lifetime ------------------------------------------------------------ */

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

void *
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

/* ---- Atomics ------------------------------------------------------------- */

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

/* ---- Futex wait and wake -------------------------------------------------- */

enum { WAIT_INTERRUPTED = -1, WAIT_TIMED_OUT = 0, WAIT_CHANGED = 1 };

/* Spins until *p differs from `expected` (1) or the clock passes spin_end
 * (0). The caller has released the GIL. */
static int
spin_on_word(uint32_t *p, uint32_t expected, double spin_end)
{
    unsigned i = 0;
    for (;;) {
        if (__atomic_load_n(p, __ATOMIC_SEQ_CST) != expected)
            return 1;
        cpu_relax();
        if ((++i & (SPIN_PAUSES_PER_CLOCK_READ - 1)) == 0 && now_s() >= spin_end)
            return 0;
    }
}

/* Sleeps on the futex at p until *p differs from `expected` (WAIT_CHANGED),
 * the deadline passes (WAIT_TIMED_OUT; no deadline when has_deadline is 0)
 * or a signal interrupts the sleep (WAIT_INTERRUPTED). The caller has
 * released the GIL. */
static int
sleep_on_word(uint32_t *p, uint32_t expected, int has_deadline, double deadline)
{
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (has_deadline) {
            double left = deadline - now_s();
            if (left <= 0) return WAIT_TIMED_OUT;
            ts.tv_sec = (time_t)left;
            ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        long r = syscall(SYS_futex, p, FUTEX_WAIT, expected, tsp, NULL, 0);
        if (__atomic_load_n(p, __ATOMIC_SEQ_CST) != expected) return WAIT_CHANGED;
        if (r == -1 && errno == EINTR) return WAIT_INTERRUPTED;
        if (r == -1 && errno == ETIMEDOUT) return WAIT_TIMED_OUT;
        /* woken with the word unchanged, or EAGAIN: wait again */
    }
}

/* wait32(off, expected, timeout_s, spin_ns[, sleepers]) -> True if the word
 * differs from `expected` on return, False on timeout. timeout_s None waits
 * without bound. With `sleepers` (the offset of a 32-bit counter), the
 * counter is raised for as long as this waiter sleeps in the kernel, not
 * while it spins: a waker that reads it as 0 after changing the word needs
 * no system call (the waiter's futex compares the word after raising it).
 * The GIL is released while waiting; a sleep that a signal interrupts runs
 * the signal handlers (Ctrl-C raises here) and then waits on. */
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
    int has_deadline = timeout >= 0;
    double deadline = has_deadline ? start + timeout : 0;
    for (;;) {
        int outcome = WAIT_TIMED_OUT;
        Py_BEGIN_ALLOW_THREADS
        /* Spin: a waker that answers within spin_ns costs no system call. */
        if (spin_ns > 0 && spin_on_word(p, exp32, start + (double)spin_ns * 1e-9))
            outcome = WAIT_CHANGED;
        spin_ns = 0;
        if (outcome != WAIT_CHANGED) {
            if (sleepers)
                __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
            outcome = sleep_on_word(p, exp32, has_deadline, deadline);
            if (sleepers)
                __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
        }
        Py_END_ALLOW_THREADS
        if (outcome == WAIT_CHANGED) Py_RETURN_TRUE;
        if (outcome == WAIT_INTERRUPTED) {
            if (PyErr_CheckSignals() < 0) return NULL;
            if (has_deadline && now_s() >= deadline) Py_RETURN_FALSE;
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

/* ---- The type ------------------------------------------------------------ */

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL

static PyMethodDef Region_methods[] = {
    {"load32", FASTCALL(Region_load32), "load32(off) -> int"},
    {"store32", FASTCALL(Region_store32), "store32(off, v)"},
    {"add32", FASTCALL(Region_add32), "add32(off, d) -> old"},
    {"load64", FASTCALL(Region_load64), "load64(off) -> int"},
    {"store64", FASTCALL(Region_store64), "store64(off, v)"},
    {"add64", FASTCALL(Region_add64), "add64(off, d) -> old"},
    {"cas64", FASTCALL(Region_cas64), "cas64(off, expected, new) -> bool"},
    {"wait32", FASTCALL(Region_wait32),
     "wait32(off, expected, timeout_s, spin_ns[, sleepers]) -> changed"},
    {"wake32", FASTCALL(Region_wake32), "wake32(off, n) -> woken"},
    /* ranges.c */
    {"range_take", FASTCALL(Region_range_take), "range_take(off, maxc[, mark]) -> (lo, n)"},
    {"range_steal", FASTCALL(Region_range_steal), "range_steal(off[, dest]) -> (lo, n)"},
    {"range_put", FASTCALL(Region_range_put),
     "range_put(off, lo, n) -> bool (only into an empty range)"},
    {"range_untake", FASTCALL(Region_range_untake),
     "range_untake(off, lo, c, mark, kept) -> bool (give back the tail of the current chunk)"},
    {"claim_span", FASTCALL(Region_claim_span), "claim_span(next, expected, span, dest) -> bool"},
    {"cas64_mark", FASTCALL(Region_cas64_mark),
     "cas64_mark(off, expected, new, mark, value) -> bool"},
    {"range_set", FASTCALL(Region_range_set), "range_set(off, lo, n)"},
    {"range_get", FASTCALL(Region_range_get), "range_get(off) -> (lo, n)"},
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

PyType_Spec Region_spec = {
    .name = "pmaprt._core.Region",
    .basicsize = sizeof(RegionObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Region_slots,
};
