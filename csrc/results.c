/* results.c: the iterator a map's caller sees, and the budget of its timed pieces.
 *   PieceBudget(budget_s, dear_item_s, clock_stride, start=0): what Python and
 *     Results exchange about one timed piece: its budget in, where it stopped
 *     (`stop`) out, the item in fn (`running`), cut(k) from another thread
 *   Results(source, tail_type): the items of source's pieces, in order
 *   PieceBudget_spec, Results_spec: the types' specs (module.c makes them)
 * source yields the map's results in pieces:
 *   - a list: a chunk's results, taken by index;
 *   - a tail_type tuple (fn, seq, start, end[, budget]): the inline rest of a
 *     map over a list, tuple or range, fn(seq[i]) for i in start..end-1,
 *     computed here with one call per item (no map object, no iterator over
 *     seq, no chain); with a PieceBudget, a timed piece (below);
 *   - any other iterable, taken item by item.
 * It stands in for itertools.chain.from_iterable(source), whose extra layer
 * per item would make an inline map of tiny items slower than builtin map.
 * As map does, an exception from fn is raised for its item, and the next call
 * goes on with the next item.
 *
 * A timed piece reads the clock after its first item, then after every item
 * while items cost more than the budget's dear_item_s, else after every
 * clock_stride-th item; it ends once it has run budget_s seconds and stores
 * in the budget's `stop` the index it reached, so the caller can time it and
 * hand dear items on to the workers. The caller chooses the thresholds
 * (pmaprt's map job names them). */
#include "pmaprt.h"

/* ==== PieceBudget ======================================================== */
typedef struct {
    PyObject_HEAD
    double budget_s;          /* the piece ends once it has run this long */
    double dear_item_s;       /* items dearer than this: a clock read each */
    Py_ssize_t clock_stride;  /* else: a clock read per this many items */
    Py_ssize_t stop;          /* the index the piece reached; -1 until it ends */
    Py_ssize_t pos;           /* the index after the item running (start before one) */
    Py_ssize_t cut_at;        /* cut(): the piece ends here; -1 if not cut */
    int in_call;              /* fn is running (not the consumer, between items) */
} PieceBudgetObject;

static PyObject *
PieceBudget_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    double budget_s, dear_item_s;
    Py_ssize_t clock_stride, start = 0;
    static char *kwlist[] = {"budget_s", "dear_item_s", "clock_stride", "start", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ddn|n:PieceBudget", kwlist, &budget_s,
                                     &dear_item_s, &clock_stride, &start))
        return NULL;
    if (clock_stride < 1)
        return PyErr_Format(PyExc_ValueError, "PieceBudget: clock_stride must be >= 1");
    PieceBudgetObject *self = (PieceBudgetObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->budget_s = budget_s, self->dear_item_s = dear_item_s, self->clock_stride = clock_stride;
    self->stop = self->cut_at = -1;
    self->pos = start < 0 ? 0 : start;
    return (PyObject *)self;
}

static void
PieceBudget_dealloc(PieceBudgetObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
PieceBudget_get_stop(PieceBudgetObject *self, void *closure)
{
    if (self->stop < 0) Py_RETURN_NONE;
    return PyLong_FromSsize_t(self->stop);
}

/* cut(k): ends the piece after the item running if that is still the one
 * `running` read as k: where it ends, or where it ended; else None (the
 * consumer's time between items, or items that move on, are not one dear item). */
static PyObject *
PieceBudget_cut(PieceBudgetObject *self, PyObject *k)
{
    if (self->stop >= 0) return PyLong_FromSsize_t(self->stop);
    if (self->cut_at < 0) {
        Py_ssize_t expect = PyLong_AsSsize_t(k);
        if (expect == -1 && PyErr_Occurred()) return NULL;
        if (!self->in_call || self->pos != expect) Py_RETURN_NONE;
        self->cut_at = self->pos;
    }
    return PyLong_FromSsize_t(self->cut_at);
}

static PyObject *
PieceBudget_get_running(PieceBudgetObject *self, void *closure)
{
    if (!self->in_call || self->stop >= 0) Py_RETURN_NONE;
    return PyLong_FromSsize_t(self->pos);
}

static PyMethodDef PieceBudget_methods[] = {
    {"cut", (PyCFunction)PieceBudget_cut, METH_O, "end the piece after item k - 1 if it still runs"},
    {NULL}};

static PyMemberDef PieceBudget_members[] = {
    {"budget_s", T_DOUBLE, offsetof(PieceBudgetObject, budget_s), READONLY, "its seconds"},
    {"dear_item_s", T_DOUBLE, offsetof(PieceBudgetObject, dear_item_s), READONLY,
     "items dearer than this get a clock read each"},
    {"clock_stride", T_PYSSIZET, offsetof(PieceBudgetObject, clock_stride), READONLY,
     "items per clock read while items are cheaper than dear_item_s"},
    {NULL},
};

static PyGetSetDef PieceBudget_getset[] = {
    {"stop", (getter)PieceBudget_get_stop, NULL, "where the piece ended, or None", NULL},
    {"running", (getter)PieceBudget_get_running, NULL, "index after the item in fn, or None", NULL},
    {NULL}};

static PyType_Slot PieceBudget_slots[] = {
    {Py_tp_new, PieceBudget_new},
    {Py_tp_dealloc, PieceBudget_dealloc},
    {Py_tp_members, PieceBudget_members},
    {Py_tp_methods, PieceBudget_methods},
    {Py_tp_getset, PieceBudget_getset},
    {Py_tp_doc, "PieceBudget(budget_s, dear_item_s, clock_stride, start=0): the budget of one "
                "timed piece of Results; .stop is where it stopped (None until it has)."},
    {0, NULL},
};

PyType_Spec PieceBudget_spec = {
    .name = "pmaprt._core.PieceBudget",
    .basicsize = sizeof(PieceBudgetObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = PieceBudget_slots,
};

/* ==== Results ============================================================ */

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
    PieceBudgetObject *budget; /* a timed tail's budget, or NULL */
    double t0;           /* when the timed tail started */
    double t_check;      /* when the clock was last read */
    Py_ssize_t ran;      /* items the current tail has run */
    Py_ssize_t check_at; /* ran count at which to read the clock next */
    Py_ssize_t last_stride; /* items between the last two reads */
    int crange;          /* seq is a range whose items fit a long long: */
    long long rstart, rstep; /* item i is rstart + i * rstep (no PyLong math) */
} ResultsObject;

/* ---- Lifetime ------------------------------------------------------------ */

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
    Py_VISIT(self->budget);
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
    Py_CLEAR(self->budget);
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

/* ---- A list piece ---------------------------------------------------------- */

/* The next item of the current list piece, or NULL (no error) at its end. */
static inline PyObject *
list_piece_next(ResultsObject *self)
{
    if (self->pos < PyList_GET_SIZE(self->list)) {
        PyObject *x = PyList_GET_ITEM(self->list, self->pos++);
        Py_INCREF(x);
        return x;
    }
    Py_CLEAR(self->list);
    return NULL;
}

/* ---- An inline tail -------------------------------------------------------- */

/* A timed tail's clock read: end the tail here once it has run its budget,
 * else choose when to read the clock next. */
static void
tail_read_clock(ResultsObject *self)
{
    double t = now_s();
    double per_item = (t - self->t_check) / (double)self->last_stride;
    self->t_check = t;
    if (t - self->t0 >= self->budget->budget_s) {
        self->end = self->pos;
    }
    else {
        self->last_stride = per_item > self->budget->dear_item_s ? 1 : self->budget->clock_stride;
        self->check_at = self->ran + self->last_stride;
    }
}

/* seq[pos] of the current tail (a new reference), or NULL: with an error set,
 * or without one when a list shrank below pos (the tail stops there, as the
 * list's own iterator does). */
static inline PyObject *
tail_item(ResultsObject *self)
{
    PyObject *x;
    if (PyList_CheckExact(self->seq)) {
        if (self->pos >= PyList_GET_SIZE(self->seq))
            return NULL;
        x = PyList_GET_ITEM(self->seq, self->pos);
        Py_INCREF(x);
        return x;
    }
    if (PyTuple_CheckExact(self->seq)) {
        x = PyTuple_GET_ITEM(self->seq, self->pos);
        Py_INCREF(x);
        return x;
    }
    if (self->crange)
        /* a range of C-sized ints: as its own iterator computes them
         * (range[i] would do the arithmetic in PyLongs) */
        return PyLong_FromLongLong(self->rstart + (long long)self->pos * self->rstep);
    /* any other sequence (a range of huge ints): seq[i] */
    return PySequence_GetItem(self->seq, self->pos);
}

/* The tail has ended: tell a timed tail's budget where, and drop it. */
static void
tail_finish(ResultsObject *self)
{
    if (self->budget) {
        self->budget->stop = self->pos;
        Py_CLEAR(self->budget);
    }
    Py_CLEAR(self->seq);
    Py_CLEAR(self->fn);
}

/* fn(seq[pos]) for the current tail, or NULL: with an error set (fn's, or
 * taking the item's), or without one once the tail has ended. */
static PyObject *
tail_next(ResultsObject *self)
{
    PieceBudgetObject *b = self->budget;
    if (b && b->cut_at >= 0 && b->cut_at < self->end)
        self->end = b->cut_at > self->pos ? b->cut_at : self->pos;
    else if (b && self->ran >= self->check_at && self->pos < self->end)
        tail_read_clock(self);
    if (self->pos < self->end) {
        PyObject *x = tail_item(self);
        if (x) {
            self->pos++;
            self->ran++;
            if (b) b->pos = self->pos;
            /* Strong references for the call: fn may re-enter next() on
             * this iterator, which may finish the tail and clear them. */
            PyObject *fn = self->fn;
            Py_INCREF(fn);
            if (b) b->in_call = 1;
            PyObject *r = PyObject_CallOneArg(fn, x);
            if (b) b->in_call = 0;
            Py_DECREF(fn);
            Py_DECREF(x);
            return r;
        }
        if (PyErr_Occurred())
            return NULL;
    }
    tail_finish(self);
    return NULL;
}

/* Whether range `seq`'s items 0..end-1 fit a long long (1: *start and *step
 * are set), or not (0), or -1 with an error set. */
static int
range_fits_c(PyObject *seq, Py_ssize_t end, long long *start, long long *step)
{
    PyObject *a = PyObject_GetAttrString(seq, "start");
    PyObject *b = a ? PyObject_GetAttrString(seq, "step") : NULL;
    if (!a || !b) { Py_XDECREF(a); Py_XDECREF(b); return -1; }
    int o1 = 0, o2 = 0;
    *start = PyLong_AsLongLongAndOverflow(a, &o1);
    *step = PyLong_AsLongLongAndOverflow(b, &o2);
    Py_DECREF(a);
    Py_DECREF(b);
    if (PyErr_Occurred())
        return -1;
    long long prod, last;
    return !o1 && !o2
        && !__builtin_mul_overflow((long long)(end - 1), *step, &prod)
        && !__builtin_add_overflow(*start, prod, &last);
}

/* Makes the tail piece (fn, seq, start, end[, budget]) the current one:
 * 0, or -1 with an error set. */
static int
tail_start(ResultsObject *self, PyObject *piece)
{
    CoreState *state = core_state_of_type(Py_TYPE(self));
    PyObject *fn, *seq, *budget = NULL;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(piece, "OOnn|O!:inline tail", &fn, &seq, &start, &end,
                          state->piece_budget_type, &budget))
        return -1;
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq) && !PyRange_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "Results: an inline tail needs a list, tuple or range");
        return -1;
    }
    if (start < 0) start = 0;
    if (!PyList_CheckExact(seq)) {      /* fixed length: clamp once */
        Py_ssize_t len = PySequence_Size(seq);
        if (len < 0)
            return -1;
        if (end > len)
            end = len;
    }
    int crange = 0;
    long long rstart = 0, rstep = 0;
    if (PyRange_Check(seq) && end > start) {
        crange = range_fits_c(seq, end, &rstart, &rstep);
        if (crange < 0)
            return -1;
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
    Py_XINCREF(budget);
    Py_XSETREF(self->budget, (PieceBudgetObject *)budget);
    if (budget) {       /* cut before it began: it ends where it starts */
        ((PieceBudgetObject *)budget)->pos = start;
        if (((PieceBudgetObject *)budget)->cut_at >= 0) self->end = start;
    }
    self->ran = 0;
    self->check_at = 1;
    self->last_stride = 1;
    self->t0 = self->t_check = budget ? now_s() : 0;
    return 0;
}

/* ---- Another iterable ------------------------------------------------------ */

/* The next item of the current iterable piece, or NULL: with an error set, or
 * without one at its end. */
static PyObject *
iter_piece_next(ResultsObject *self)
{
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
    return NULL;
}

/* ---- Taking pieces ----------------------------------------------------------- */

/* Takes the next piece from source and makes it the current one: 1, or 0
 * when source is exhausted, or -1 with an error set. */
static int
take_piece(ResultsObject *self)
{
    if (!self->source)
        return 0;
    PyObject *src = self->source;
    Py_INCREF(src);
    PyObject *piece = PyIter_Next(src);
    if (!piece) {
        int err = PyErr_Occurred() != NULL;
        if (!err && self->source == src)
            Py_CLEAR(self->source);
        Py_DECREF(src);
        return err ? -1 : 0;
    }
    Py_DECREF(src);
    if (PyList_CheckExact(piece)) {
        Py_XSETREF(self->list, piece);
        self->pos = 0;
        return 1;
    }
    if ((PyObject *)Py_TYPE(piece) == self->tail_type) {
        int rc = tail_start(self, piece);
        Py_DECREF(piece);
        return rc < 0 ? -1 : 1;
    }
    PyObject *it = PyObject_GetIter(piece);
    Py_DECREF(piece);
    if (!it)
        return -1;
    Py_XSETREF(self->it, it);
    return 1;
}

static PyObject *
Results_next(ResultsObject *self)
{
    for (;;) {
        PyObject *x;
        if (self->list) {
            if ((x = list_piece_next(self)))
                return x;
        }
        else if (self->seq) {
            if ((x = tail_next(self)) || PyErr_Occurred())
                return x;
        }
        else if (self->it) {
            if ((x = iter_piece_next(self)) || PyErr_Occurred())
                return x;
        }
        if (take_piece(self) <= 0)
            return NULL;        /* exhausted, or an error */
    }
}

/* ---- The type ------------------------------------------------------------ */

static PyType_Slot Results_slots[] = {
    {Py_tp_new, Results_new},
    {Py_tp_dealloc, Results_dealloc},
    {Py_tp_traverse, Results_traverse},
    {Py_tp_clear, Results_clear},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, Results_next},
    {Py_tp_doc, "Results(source, tail_type): the items of source's pieces in order; "
                "a tail_type piece (fn, seq, start, end[, budget]) (seq a list, tuple or "
                "range) gives fn(seq[i]) for i in start..end-1; with budget, a PieceBudget, "
                "it stops once it has run budget.budget_s seconds and sets budget.stop to "
                "where it stopped."},
    {0, NULL},
};

PyType_Spec Results_spec = {
    .name = "pmaprt._core.Results",
    .basicsize = sizeof(ResultsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Results_slots,
};
