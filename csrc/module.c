/*
 * module.c: the module pmaprt._core, the few things Python cannot do fast
 * between processes. Plain CPython C API, multi-phase init, the buffer
 * protocol.
 *
 *   core_exec, core_module, PyInit__core   multi-phase init: makes each type
 *                         from its spec into the module state, adds the types
 *                         and the constants RANGE_N_MAX, RANGE_LO_MAX
 *   set_pdeathsig(sig)    prctl(PR_SET_PDEATHSIG): a worker dies with its parent
 *   the module functions of buffers.c: memcpy, populate, vm_read,
 *   buffer_address; of reduce.c: reduce_into and its REDUCE_* constants; of
 *   collective.c: one_round and its ROUND_* constants
 *
 * The types: Region (region.c, with its range methods in ranges.c), Mapping
 * (mapping.c), Results and PieceBudget (results.c), WriteTracker (writetrack.c). pmaprt/_core.pyi gives
 * every signature.
 */
#include "pmaprt.h"

#include <sys/prctl.h>

/* ---- Module functions -------------------------------------------------------- */

static PyObject *
core_set_pdeathsig(PyObject *mod, PyObject *arg)
{
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (prctl(PR_SET_PDEATHSIG, sig) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

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
    {"reduce_into", (PyCFunction)(void (*)(void))core_reduce_into, METH_FASTCALL,
     "reduce_into(dst, dst_off, srcs, offs, n, kind, op, divisor, generic=False): "
     "dst = the element-wise reduction of the sources, in order, GIL released"},
    {"one_round", (PyCFunction)(void (*)(void))core_one_round, METH_FASTCALL,
     "one_round(seg, src, dst, heads, reds, lines, rank, m, slots, stamp, kind, op, divisor, "
     "spin_ns, phase) -> status: a call of one round of the all-reduce (direct, or split "
     "with reds) over a collective segment"},
    {NULL, NULL, 0, NULL},
};

/* ---- Multi-phase init ---------------------------------------------------------- */

/* Makes a type from its spec, keeps it in the module state (*slot) and adds
 * it to the module under its short name: 0, or -1 with an error set. */
static int
add_type(PyObject *m, PyType_Spec *spec, PyTypeObject **slot)
{
    PyObject *tp = PyType_FromModuleAndSpec(m, spec, NULL);
    if (!tp) return -1;
    *slot = (PyTypeObject *)tp;
    return PyModule_AddType(m, *slot);
}

static int
core_exec(PyObject *m)
{
    CoreState *state = PyModule_GetState(m);
    if (add_type(m, &Region_spec, &state->region_type) < 0
            || add_type(m, &Mapping_spec, &state->mapping_type) < 0
            || add_type(m, &Results_spec, &state->results_type) < 0
            || add_type(m, &PieceBudget_spec, &state->piece_budget_type) < 0
            || add_type(m, &WriteTracker_spec, &state->write_tracker_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "RANGE_N_MAX", (long)RANGE_N_MASK) < 0) return -1;
    if (reduce_add_constants(m) < 0 || collective_add_constants(m) < 0) return -1;
    PyObject *lo_max = PyLong_FromUnsignedLongLong(RANGE_LO_MAX);
    if (!lo_max) return -1;
    if (PyModule_AddObject(m, "RANGE_LO_MAX", lo_max) < 0) {
        Py_DECREF(lo_max);
        return -1;
    }
    return 0;
}

static int
core_traverse(PyObject *m, visitproc visit, void *arg)
{
    CoreState *state = PyModule_GetState(m);
    if (state) {
        Py_VISIT(state->region_type);
        Py_VISIT(state->mapping_type);
        Py_VISIT(state->results_type);
        Py_VISIT(state->piece_budget_type);
        Py_VISIT(state->write_tracker_type);
    }
    return 0;
}

static int
core_clear(PyObject *m)
{
    CoreState *state = PyModule_GetState(m);
    if (state) {
        Py_CLEAR(state->region_type);
        Py_CLEAR(state->mapping_type);
        Py_CLEAR(state->results_type);
        Py_CLEAR(state->piece_budget_type);
        Py_CLEAR(state->write_tracker_type);
    }
    return 0;
}

static void
core_free(void *m)
{
    core_clear((PyObject *)m);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pmaprt._core",
    .m_doc = "Atomics, futex waits, the range-stealing protocol, memfd mappings and the "
             "results iterator over shared memory.",
    .m_size = sizeof(CoreState),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
