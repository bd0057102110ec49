/*
 * pmaprt.h: what the C files of pmaprt._core share.
 *
 *   includes              Python, atomics' and system calls' headers
 *   CoreState             the module state: the extension's types
 *   core_state_of_type    the module state reached from one of its types
 *   range_pack/_lo/_n     the packed range word (low index: 44 bits,
 *                         count: 20 bits), RANGE_LO_MAX, RANGE_N_MASK
 *   cpu_relax, now_s      a spin-loop pause, a monotonic clock in seconds
 *   CHECK_NARGS           the argument count check of a METH_FASTCALL method
 *   RegionObject, region_at              (region.c)
 *   Region_range_* / claim_span / cas64_mark, the Region methods of ranges.c
 *   populate_pages                       (buffers.c)
 *   core_memcpy, core_populate, core_vm_read, core_buffer_address (buffers.c)
 *   reduce_kind_size, reduce_run, reduce_twice (reduce.c)
 *   core_one_round                     (collective.c)
 *   Region_spec, Mapping_spec, Results_spec, PieceBudget_spec, WriteTracker_spec
 *
 * Each type is made from its spec per module (PyType_FromModuleAndSpec) and
 * held in the module state, never in a static: the module uses multi-phase
 * init.
 */
#ifndef PMAPRT_H
#define PMAPRT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

/* ---- Module state ------------------------------------------------------ */

typedef struct {
    PyTypeObject *region_type;
    PyTypeObject *mapping_type;
    PyTypeObject *results_type;
    PyTypeObject *piece_budget_type;
    PyTypeObject *write_tracker_type;
} CoreState;

/* The state of the module that made `type` (one of this module's types). */
static inline CoreState *
core_state_of_type(PyTypeObject *type)
{
    return (CoreState *)PyType_GetModuleState(type);
}

/* ---- The packed range word --------------------------------------------- */

/* One 64-bit word holds a range of indices, so that one compare-and-swap
 * moves it: 44 bits of low index (inputs of up to 2^44 items) and 20 bits of
 * count (a range of fewer than 2^20 items). */
#define RANGE_LO_BITS 44
#define RANGE_N_BITS 20
#define RANGE_N_MASK ((UINT64_C(1) << RANGE_N_BITS) - 1)
#define RANGE_LO_MAX ((UINT64_C(1) << RANGE_LO_BITS) - 1)

static inline uint64_t range_pack(uint64_t lo, uint64_t n) { return (lo << RANGE_N_BITS) | n; }
static inline uint64_t range_lo(uint64_t v) { return v >> RANGE_N_BITS; }
static inline uint64_t range_n(uint64_t v) { return v & RANGE_N_MASK; }

/* ---- Small helpers ----------------------------------------------------- */

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define CHECK_NARGS(name, want)                                                   \
    if (nargs != (want)) {                                                        \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)",   \
                     (int)(want), nargs);                                         \
        return NULL;                                                              \
    }

/* ---- Region (region.c) and its range methods (ranges.c) ----------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
} RegionObject;

/* A pointer to `width` bytes at offset `offobj`, aligned to `width`, or NULL
 * with an exception set. */
void *region_at(RegionObject *self, PyObject *offobj, Py_ssize_t width);

PyObject *Region_range_take(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_range_steal(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_range_put(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_range_untake(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_range_set(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_range_get(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_claim_span(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Region_cas64_mark(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);

/* ---- Buffers (buffers.c) ------------------------------------------------ */

/* madvise(MADV_POPULATE_WRITE) over [start, start + len), start rounded down
 * to a page, the GIL released: 0, or the errno of the failure. */
int populate_pages(char *start, size_t len);

PyObject *core_memcpy(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_populate(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_vm_read(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_buffer_address(PyObject *mod, PyObject *obj);

/* ---- Reductions (reduce.c) ---------------------------------------------- */

PyObject *core_reduce_into(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
/* Adds the REDUCE_* kind and op constants to the module: 0, or -1. */
int reduce_add_constants(PyObject *m);
/* The byte size of a kind's element, 0 for an unknown kind. */
int reduce_kind_size(int kind);
#define REDUCE_NOPS 3
/* reduce_into's kernel on checked pointers (n elements of a known kind and op);
 * the GIL released for large reductions, as reduce_into does. */
void reduce_run(char *dst, char *const *src, int w, Py_ssize_t n, int kind, int op,
                double divisor);
/* reduce_run into dst, and the result copied into `copy` too, piece by piece
 * while each piece is in L1 (the GIL released). */
void reduce_twice(char *dst, char *copy, char *const *src, int w, Py_ssize_t n, int kind,
                  int op, double divisor);

/* ---- The collective's small round (collective.c) ------------------------- */

PyObject *core_one_round(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
/* Adds the ROUND_* status codes and ROUND_LAYOUT to the module: 0, or -1. */
int collective_add_constants(PyObject *m);

/* ---- Type specs (one per type's file) ----------------------------------- */

extern PyType_Spec Region_spec;
extern PyType_Spec Mapping_spec;
extern PyType_Spec Results_spec;
extern PyType_Spec PieceBudget_spec;
extern PyType_Spec WriteTracker_spec;

#endif /* PMAPRT_H */
