/*
 * writetrack.c: WriteTracker(), which pages of this process's private
 * anonymous memory were written since they were last armed, kept by the
 * kernel: a userfaultfd in asynchronous write-protect mode
 * (UFFD_FEATURE_WP_ASYNC, Linux 6.7) and the PAGEMAP_SCAN ioctl of
 * /proc/self/pagemap. A write to an armed page takes one minor fault, which
 * the kernel resolves itself (no handler thread) by marking the page
 * written; kernel writes (read(2) into the range, process_vm_writev) fault
 * the same way.
 *
 *   WriteTracker()               opens both descriptors; OSError where the
 *                                kernel lacks the features
 *   track(addr, nbytes) -> bool  register and arm the pages covering the range
 *   written(addr, nbytes) -> bool
 *                                whether any page was written or dropped since
 *                                it was armed; arms them again, atomically per page
 *   untrack(addr, nbytes)        unregister the pages wholly inside the range
 *   WriteTracker_spec            the type's spec (module.c makes it)
 *
 * Soundness: written() answers True on any doubt (a failed scan, a range
 * not registered, a call from a forked child, whose registrations the kernel
 * did not copy and whose inherited descriptors name the parent's memory).
 * A page dropped by MADV_DONTNEED changes its bytes (to zeros) without a
 * write: arming puts a marker on every page (UFFD_FEATURE_WP_UNPOPULATED), so
 * a page found with neither a mapping nor a marker was dropped.
 *
 * The uapi definitions are spelled out: they are newer than many systems'
 * headers (linux/fs.h, linux/userfaultfd.h of Linux 6.7).
 */
#include "pmaprt.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

/* ---- uapi: linux/userfaultfd.h --------------------------------------------- */

#define WT_UFFD_API 0xAAULL
#define WT_UFFD_USER_MODE_ONLY 1
#define WT_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define WT_FEATURE_WP_ASYNC (1ULL << 15)
#define WT_REGISTER_MODE_WP (1ULL << 1)
#define WT_WRITEPROTECT_MODE_WP (1ULL << 0)

struct wt_uffdio_api { uint64_t api, features, ioctls; };
struct wt_uffdio_range { uint64_t start, len; };
struct wt_uffdio_register { struct wt_uffdio_range range; uint64_t mode, ioctls; };
struct wt_uffdio_writeprotect { struct wt_uffdio_range range; uint64_t mode; };

#define WT_UFFDIO_API _IOWR(0xAA, 0x3F, struct wt_uffdio_api)
#define WT_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct wt_uffdio_register)
#define WT_UFFDIO_UNREGISTER _IOR(0xAA, 0x01, struct wt_uffdio_range)
#define WT_UFFDIO_WRITEPROTECT _IOWR(0xAA, 0x06, struct wt_uffdio_writeprotect)
#define WT_USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)

/* ---- uapi: linux/fs.h ------------------------------------------------------ */

#define WT_PAGE_IS_WRITTEN (1ULL << 1)
#define WT_PAGE_IS_PRESENT (1ULL << 3)
#define WT_PAGE_IS_SWAPPED (1ULL << 4)
#define WT_PM_SCAN_WP_MATCHING (1ULL << 0)
#define WT_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

struct wt_page_region { uint64_t start, end, categories; };
struct wt_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define WT_PAGEMAP_SCAN _IOWR('f', 16, struct wt_pm_scan_arg)

typedef struct {
    PyObject_HEAD
    int uffd;
    int pagemap;
    pid_t pid;          /* the process that opened them */
} WriteTrackerObject;

static uintptr_t wt_page;

/* ---- Opening ------------------------------------------------------------- */

static int
wt_open_uffd(void)
{
    int flags = O_CLOEXEC | O_NONBLOCK | WT_UFFD_USER_MODE_ONLY;
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd < 0) {
        /* the device hands out the same descriptors where the system call is
         * refused (a seccomp filter, vm.unprivileged_userfaultfd) */
        int saved = errno, dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0) {
            errno = saved;
            return -1;
        }
        fd = ioctl(dev, WT_USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (fd < 0) return -1;
    }
    struct wt_uffdio_api api = {WT_UFFD_API, WT_FEATURE_WP_ASYNC | WT_FEATURE_WP_UNPOPULATED, 0};
    if (ioctl(fd, WT_UFFDIO_API, &api) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Opens both descriptors into self: 0, or -1 with errno set. */
static int
wt_open(WriteTrackerObject *self)
{
    self->uffd = wt_open_uffd();
    if (self->uffd < 0) return -1;
    self->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (self->pagemap < 0) {
        int saved = errno;
        close(self->uffd);
        self->uffd = -1;
        errno = saved;
        return -1;
    }
    self->pid = getpid();
    return 0;
}

static void
wt_close(WriteTrackerObject *self)
{
    if (self->uffd >= 0) close(self->uffd);
    if (self->pagemap >= 0) close(self->pagemap);
    self->uffd = self->pagemap = -1;
}

/* In a forked child the descriptors name the parent's memory: close them and
 * open the child's own (nothing of the child is registered yet). 0, or -1. */
static int
wt_own(WriteTrackerObject *self)
{
    if (self->uffd >= 0 && self->pid == getpid()) return 0;
    wt_close(self);
    return wt_open(self);
}

static PyObject *
WriteTracker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, ":WriteTracker") || (kwds && PyDict_Size(kwds))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "WriteTracker() takes no arguments");
        return NULL;
    }
    if (!wt_page) wt_page = (uintptr_t)sysconf(_SC_PAGESIZE);
    WriteTrackerObject *self = (WriteTrackerObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->uffd = self->pagemap = -1;
    if (wt_open(self) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
WriteTracker_dealloc(WriteTrackerObject *self)
{
    /* closing the last descriptor unregisters every range it registered */
    wt_close(self);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* ---- Ranges ---------------------------------------------------------------- */

/* Parses (addr, nbytes) into the pages covering the range, [*lo, *hi): 0, or
 * -1 with an error set. */
static int
wt_pages(PyObject *const *args, Py_ssize_t nargs, const char *name, uintptr_t *lo, uintptr_t *hi)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    uintptr_t addr = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) return -1;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return -1;
    if (n <= 0 || addr + (uintptr_t)n < addr) {
        PyErr_Format(PyExc_ValueError, "%s(): the range must be non-empty and inside memory", name);
        return -1;
    }
    *lo = addr & ~(wt_page - 1);
    *hi = (addr + (uintptr_t)n + wt_page - 1) & ~(wt_page - 1);
    return 0;
}

/* Whether [lo, hi) lies wholly in private, anonymous, writable mappings:
 * only there are all writes this process's own (a shared or file mapping can
 * change through another process or the file). */
static int
wt_private_anonymous(uintptr_t lo, uintptr_t hi)
{
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return 0;
    char line[8192];
    uintptr_t covered = lo;
    while (covered < hi && fgets(line, sizeof line, f)) {
        unsigned long start, end, inode;
        char perms[8];
        int name_at = 0;
        if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %n", &start, &end, perms, &inode, &name_at) < 4)
            break;
        if (end <= covered) continue;
        if (start > covered) break;             /* a hole */
        const char *name = line + name_at;
        int anonymous = inode == 0 && (name[0] == '\n' || name[0] == '\0'
                                       || strncmp(name, "[heap]", 6) == 0
                                       || strncmp(name, "[anon:", 6) == 0);
        if (!anonymous || perms[0] != 'r' || perms[1] != 'w' || perms[3] != 'p') break;
        covered = end;
    }
    fclose(f);
    return covered >= hi;
}

static int
wt_protect(int uffd, uintptr_t lo, uintptr_t hi)
{
    struct wt_uffdio_writeprotect wp = {{lo, hi - lo}, WT_WRITEPROTECT_MODE_WP};
    return ioctl(uffd, WT_UFFDIO_WRITEPROTECT, &wp);
}

static PyObject *
WriteTracker_track(WriteTrackerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uintptr_t lo, hi;
    if (wt_pages(args, nargs, "track", &lo, &hi) < 0) return NULL;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    if (wt_own(self) == 0 && wt_private_anonymous(lo, hi)) {
        struct wt_uffdio_register reg = {{lo, hi - lo}, WT_REGISTER_MODE_WP, 0};
        if (ioctl(self->uffd, WT_UFFDIO_REGISTER, &reg) == 0) {
            ok = wt_protect(self->uffd, lo, hi) == 0;
            if (!ok) {
                struct wt_uffdio_range r = {lo, hi - lo};
                ioctl(self->uffd, WT_UFFDIO_UNREGISTER, &r);
            }
        }
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

/* One PAGEMAP_SCAN over [lo, hi) from *at: the regions found (>= 0), or -1;
 * *at is where the walk stopped. */
static long
wt_scan(WriteTrackerObject *self, uintptr_t *at, uintptr_t hi, uint64_t flags, uint64_t inverted,
        uint64_t mask, uint64_t max_pages, struct wt_page_region *vec, uint64_t vec_len)
{
    struct wt_pm_scan_arg arg = {
        .size = sizeof arg, .flags = flags, .start = *at, .end = hi,
        .vec = (uint64_t)(uintptr_t)vec, .vec_len = vec_len, .max_pages = max_pages,
        .category_inverted = inverted, .category_mask = mask, .return_mask = mask,
    };
    long found = ioctl(self->pagemap, WT_PAGEMAP_SCAN, &arg);
    *at = (uintptr_t)arg.walk_end;
    return found;
}

/* 1 when a page of [lo, hi) was written or dropped since armed (all armed
 * again on return), 0 when none was, -1 when the scan failed. */
static int
wt_written(WriteTrackerObject *self, uintptr_t lo, uintptr_t hi)
{
    struct wt_page_region vec[32];
    uintptr_t at = lo;
    /* a page with neither a mapping nor the marker arming left: dropped */
    long dropped = wt_scan(self, &at, hi, WT_PM_SCAN_CHECK_WPASYNC,
                           WT_PAGE_IS_PRESENT | WT_PAGE_IS_SWAPPED,
                           WT_PAGE_IS_PRESENT | WT_PAGE_IS_SWAPPED, 1, vec, 1);
    if (dropped < 0) return -1;
    if (dropped > 0) return wt_protect(self->uffd, lo, hi) == 0 ? 1 : -1;
    int written = 0;
    at = lo;
    while (at < hi) {
        /* the vector may fill before the end: go on from where the walk stopped */
        uintptr_t from = at;
        long found = wt_scan(self, &at, hi, WT_PM_SCAN_WP_MATCHING | WT_PM_SCAN_CHECK_WPASYNC,
                             0, WT_PAGE_IS_WRITTEN, 0, vec, 32);
        if (found < 0 || (at <= from && found == 0)) return -1;
        written |= found > 0;
    }
    return written;
}

static PyObject *
WriteTracker_written(WriteTrackerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uintptr_t lo, hi;
    if (wt_pages(args, nargs, "written", &lo, &hi) < 0) return NULL;
    int w = 1;
    Py_BEGIN_ALLOW_THREADS
    if (self->uffd >= 0 && self->pid == getpid())
        w = wt_written(self, lo, hi) != 0;
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(w);
}

static PyObject *
WriteTracker_untrack(WriteTrackerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uintptr_t lo, hi;
    if (wt_pages(args, nargs, "untrack", &lo, &hi) < 0) return NULL;
    /* pages the range shares with its neighbours stay registered: another
     * tracked range may cover them (left armed, they cost at most one fault) */
    uintptr_t addr = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    uintptr_t end = addr + (uintptr_t)PyLong_AsSsize_t(args[1]);
    uintptr_t in_lo = (addr + wt_page - 1) & ~(wt_page - 1), in_hi = end & ~(wt_page - 1);
    if (in_lo < in_hi && self->uffd >= 0 && self->pid == getpid()) {
        struct wt_uffdio_range r = {in_lo, in_hi - in_lo};
        Py_BEGIN_ALLOW_THREADS
        ioctl(self->uffd, WT_UFFDIO_UNREGISTER, &r);   /* fails harmlessly once unmapped */
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyMethodDef WriteTracker_methods[] = {
    {"track", (PyCFunction)(void (*)(void))WriteTracker_track, METH_FASTCALL,
     "track(addr, nbytes) -> bool: arm write tracking over the pages covering the range; "
     "False where it cannot be tracked (not private anonymous memory)"},
    {"written", (PyCFunction)(void (*)(void))WriteTracker_written, METH_FASTCALL,
     "written(addr, nbytes) -> bool: whether a page covering the range was written or dropped "
     "since it was armed (True on any doubt); arms them again"},
    {"untrack", (PyCFunction)(void (*)(void))WriteTracker_untrack, METH_FASTCALL,
     "untrack(addr, nbytes): stop tracking the pages wholly inside the range"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot WriteTracker_slots[] = {
    {Py_tp_new, WriteTracker_new},
    {Py_tp_dealloc, WriteTracker_dealloc},
    {Py_tp_methods, WriteTracker_methods},
    {Py_tp_doc, "WriteTracker(): which pages of this process's private anonymous memory were "
                "written since armed (userfaultfd WP_ASYNC and PAGEMAP_SCAN, Linux 6.7)."},
    {0, NULL},
};

PyType_Spec WriteTracker_spec = {
    .name = "pmaprt._core.WriteTracker",
    .basicsize = sizeof(WriteTrackerObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = WriteTracker_slots,
};
