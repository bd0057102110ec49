/*
 * buffers.c: copying and preparing plain buffers, the GIL released.
 *
 *   populate_pages(start, len)        MADV_POPULATE_WRITE over whole pages
 *                                     (also Mapping.populate's)
 *   memcpy(dst, dst_off, src) -> n    copy a contiguous buffer into a writable
 *                                     one at a byte offset (threads copy in
 *                                     parallel)
 *   populate(buffer, off=0, len=-1)   allocate and map a writable mapped
 *                                     buffer's pages now (an mmap): ENOMEM is
 *                                     an error here, not a SIGBUS later
 *   vm_read(pid, address, dst, dst_off, nbytes) -> n
 *                                     process_vm_readv: a worker copies bytes
 *                                     straight out of the parent's memory
 *   buffer_address(obj) -> (address, nbytes)  of a contiguous buffer
 *
 * module.c lists the module functions.
 */
#include "pmaprt.h"

#include <sys/mman.h>
#include <sys/uio.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* memcpy releases the GIL only for copies of at least this many bytes:
 * releasing and taking it back costs more than a small copy, and a small
 * copy holds the GIL too briefly for other threads to notice. */
#define MEMCPY_RELEASE_GIL_BYTES 65536

int
populate_pages(char *start, size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)start, b = a + (uintptr_t)len;
    a = a / (uintptr_t)page * (uintptr_t)page;
    int rc = 0, err = 0;
    if (b > a) {
        Py_BEGIN_ALLOW_THREADS
        rc = madvise((void *)a, (size_t)(b - a), MADV_POPULATE_WRITE);
        if (rc != 0) err = errno;
        Py_END_ALLOW_THREADS
    }
    return rc != 0 ? err : 0;
}

PyObject *
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
    if (n >= MEMCPY_RELEASE_GIL_BYTES) {
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

PyObject *
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
    int err = populate_pages((char *)v.buf + off, (size_t)len);
    PyBuffer_Release(&v);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* vm_read: the GIL released; a read that a signal interrupts is retried, and
 * a partial read goes on where it stopped. */
PyObject *
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

PyObject *
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
