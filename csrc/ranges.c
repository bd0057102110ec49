/*
 * ranges.c: the work-stealing protocol on packed range words, and claims
 * that record what they took. Methods of Region (region.c lists them).
 *
 * A range word (pmaprt.h: range_pack) holds [lo, lo + n) in one 64-bit word:
 * its owner takes from the front, a thief takes the back half, each with one
 * compare-and-swap, so no item is ever in two ranges.
 *
 *   Region.range_take(off, maxc[, mark])     the owner takes from the front
 *   Region.range_steal(off[, dest])          a thief takes the back half
 *   Region.range_untake(off, lo, c, mark, kept)
 *                                            the owner gives its chunk's tail back
 *   Region.range_put(off, lo, n)             store a range into an empty word
 *   Region.range_set(off, lo, n)             the owner publishes a new range
 *   Region.range_get(off)                    read a range word
 *   Region.claim_span(next, expected, span, dest)
 *                                            move a span of a shared counter into
 *                                            the caller's empty range word
 *   Region.cas64_mark(off, expected, new, mark, value)
 *                                            a CAS that records what it took
 *
 * A claim writes its mark (the worker's "current chunk" words, which name
 * what a crash loses) right after its compare-and-swap, a few instructions
 * later; docs/ARCHITECTURE.md, in its section on claims, gives the window
 * that leaves and how the parent closes it.
 */
#include "pmaprt.h"

#define CAS64(p, e, v) \
    __atomic_compare_exchange_n((p), (e), (v), 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)

/* ---- Owner and thief ------------------------------------------------------ */

/* range_take(off, maxc[, mark]) -> (lo, c): the owner takes up to maxc indices
 * from the front of its range; c == 0 when the range is empty. With `mark`,
 * the claim is recorded right after the CAS: lo at mark, c at mark + 8. */
PyObject *
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
        if (CAS64(p, &v, range_pack(lo + c, n - c))) {
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
 * right after the CAS. */
PyObject *
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
        if (CAS64(p, &v, range_pack(lo, n - k))) {
            if (dest)
                __atomic_store_n(dest, range_pack(lo + n - k, k), __ATOMIC_SEQ_CST);
            return Py_BuildValue("(KK)", (unsigned long long)(lo + n - k), (unsigned long long)k);
        }
    }
}

/* The (off, lo, n) arguments that open range_untake, range_put and range_set:
 * the word's address and a range that must fit the packed word, with at least
 * min_n items. 0 on success; -1 with an exception set. */
static int
range_args(RegionObject *self, PyObject *const *args, const char *name, uint64_t min_n,
           uint64_t **p, unsigned long long *lo, unsigned long long *n)
{
    *p = region_at(self, args[0], 8);
    if (!*p) return -1;
    *lo = PyLong_AsUnsignedLongLong(args[1]);
    if (*lo == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *n = PyLong_AsUnsignedLongLong(args[2]);
    if (*n == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (*lo > RANGE_LO_MAX || *n > RANGE_N_MASK || *n < min_n) {
        PyErr_Format(PyExc_OverflowError, "%s: (lo=%llu, n=%llu) does not fit the packed word",
                     name, *lo, *n);
        return -1;
    }
    return 0;
}

/* range_untake(off, lo, c, mark, kept) -> bool: the owner gives back
 * [lo, lo + c), the unstarted tail of its current chunk, to the front of its
 * own range word (which starts at lo + c, thieves having taken only from its
 * back, or is empty); then stores `kept` (the items of the chunk it keeps) at
 * `mark` (its "current chunk" length word). False, and nothing changed, when
 * the word cannot take them (it holds a range elsewhere, or would overflow). */
PyObject *
Region_range_untake(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_untake", 5);
    uint64_t *p;
    unsigned long long lo, c;
    if (range_args(self, args, "range_untake", 1, &p, &lo, &c) < 0) return NULL;
    int64_t *mark = region_at(self, args[3], 8);
    if (!mark) return NULL;
    long long kept = PyLong_AsLongLong(args[4]);
    if (kept == -1 && PyErr_Occurred()) return NULL;
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        uint64_t n = range_n(v), nv;
        if (n == 0)
            nv = range_pack(lo, c);
        else if (range_lo(v) == lo + c && n + c <= RANGE_N_MASK)
            nv = range_pack(lo, n + c);
        else
            Py_RETURN_FALSE;
        if (CAS64(p, &v, nv)) {
            __atomic_store_n(mark, (int64_t)kept, __ATOMIC_SEQ_CST);
            Py_RETURN_TRUE;
        }
    }
}

/* ---- Publishing and reading a range --------------------------------------- */

/* range_put(off, lo, n) -> bool: store a range into a word that holds an empty
 * one (CAS from empty): the parent hands work back (a retried chunk). */
PyObject *
Region_range_put(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_put", 3);
    uint64_t *p;
    unsigned long long lo, n;
    if (range_args(self, args, "range_put", 1, &p, &lo, &n) < 0) return NULL;
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (range_n(v) == 0) {
        if (CAS64(p, &v, range_pack(lo, n)))
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* range_set(off, lo, n): the owner publishes a new range. Only valid when the
 * word holds an empty range (thieves never write an empty range). */
PyObject *
Region_range_set(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_set", 3);
    uint64_t *p;
    unsigned long long lo, n;
    if (range_args(self, args, "range_set", 0, &p, &lo, &n) < 0) return NULL;
    __atomic_store_n(p, range_pack(lo, n), __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* range_get(off) -> (lo, n) */
PyObject *
Region_range_get(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS("range_get", 1);
    uint64_t *p = region_at(self, args[0], 8);
    if (!p) return NULL;
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    return Py_BuildValue("(KK)", (unsigned long long)range_lo(v), (unsigned long long)range_n(v));
}

/* ---- Claims that record what they took ------------------------------------ */

/* claim_span(next, expected, span, dest) -> bool: move [expected, expected+span)
 * from the shared counter `next` into the caller's own, empty, range word. */
PyObject *
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
    if (!CAS64(p, &e, (int64_t)(expected + span)))
        Py_RETURN_FALSE;
    __atomic_store_n(dest, range_pack((uint64_t)expected, (uint64_t)span), __ATOMIC_SEQ_CST);
    Py_RETURN_TRUE;
}

/* cas64_mark(off, expected, new, mark, value) -> bool: cas64, and on success
 * store64(mark, value) right after (a worker records the feed chunk it took). */
PyObject *
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
    if (!CAS64(p, &e, (int64_t)desired))
        Py_RETURN_FALSE;
    __atomic_store_n(mark, (int64_t)value, __ATOMIC_SEQ_CST);
    Py_RETURN_TRUE;
}
