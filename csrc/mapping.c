/*
 * mapping.c: Mapping(fd, size, own_fd=False, populate=False, readonly=False),
 * a MAP_SHARED mapping of a memfd that exports the buffer protocol and is
 * unmapped when its last reference (an ndarray, a memoryview) goes away.
 *
 *   Mapping.populate(off=0, len=-1)   allocate and map the pages now
 *   Mapping.address/size/fd/key/exports
 *                                     where it is, how big, the memfd it owns
 *                                     (or -1), a key unique in this process,
 *                                     buffer views exported now
 *   Mapping_spec                      the type's spec (module.c makes it)
 *
 * A Mapping keeps no descriptor of its own unless own_fd: the mmap module
 * dup()s one per mapping, and thousands of result mappings must not cost
 * thousands of descriptors.
 */
#include "pmaprt.h"

#include <sys/mman.h>

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

/* Per process, not per module: a key names a mapping in this process. */
static unsigned long long mapping_next_key = 1;

/* ---- Lifetime ------------------------------------------------------------ */

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

/* ---- The buffer protocol --------------------------------------------------- */

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

/* ---- Methods and attributes ------------------------------------------------ */

/* populate(off=0, len=-1): madvise(MADV_POPULATE_WRITE) over the pages of
 * [off, off + len): ENOMEM is an error here instead of a SIGBUS at a later
 * write. GIL released. */
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
    int err = populate_pages(self->addr + off, (size_t)len);
    if (err) {
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

/* ---- The type ------------------------------------------------------------ */

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

PyType_Spec Mapping_spec = {
    .name = "pmaprt._core.Mapping",
    .basicsize = sizeof(MappingObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Mapping_slots,
};
