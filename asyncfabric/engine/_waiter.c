/* The fast path's waiter: what `await engine.write(...)` awaits on asyncio's
 * base event loop, in place of an asyncio.Future.
 *
 * Why: an asyncio.Future that ends schedules each of its callbacks (the
 * awaiting task's wake-up) with loop.call_soon, a Python method that makes a
 * Python Handle: five Python calls per transfer, a tenth of the sender's time
 * in a stream of 64 KiB writes. A Waiter queues its callbacks on its Waiters
 * object instead, which asks the loop for one call_soon per burst of ends and
 * runs the whole queue from it, each callback in its own context, in order.
 *
 * A Waiter is future-like in asyncio's sense (asyncio.isfuture is true): a
 * task awaiting it registers its wake-up with add_done_callback and cancels
 * it with cancel(); asyncio.wait_for, gather, shield and wait take it as they
 * take a Future. It has the Future's methods that those and the engine use:
 * done, cancelled, result, exception, set_result, set_exception, cancel,
 * add_done_callback, remove_done_callback, get_loop. It does not log
 * exceptions that were never retrieved.
 */
#include "_waiter.h"

#include <structmember.h>

enum { PENDING = 0, FINISHED = 1, CANCELLED = 2 };

typedef struct {
    PyObject_HEAD
    PyObject *loop;
    PyObject *queue;  /* (callback, waiter, context) triples, flat, or NULL */
    int scheduled;    /* a flush is scheduled on the loop */
    unsigned long long flushes, calls; /* counted for tests and profiles */
} Waiters;

typedef struct {
    PyObject_HEAD
    Waiters *owner;
    PyObject *result;     /* FINISHED without an exception */
    PyObject *exc;        /* FINISHED with an exception */
    PyObject *cancel_msg; /* CANCELLED */
    PyObject *cb0, *ctx0; /* the first callback (a task's wake-up) */
    PyObject *more;       /* the others: a list of (callback, context), or NULL */
    int state;
    int blocking;
} Waiter;

static PyObject *CancelledError, *InvalidStateError, *str_call_soon, *str_flush,
    *str_call_exception_handler;

/* ---------------------------------------------------------------- Waiters */

static int ws_init(Waiters *self, PyObject *args, PyObject *kw) {
    PyObject *loop;
    static char *names[] = {"loop", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:Waiters", names, &loop)) return -1;
    Py_INCREF(loop);
    Py_XSETREF(self->loop, loop);
    return 0;
}

static int ws_traverse(Waiters *self, visitproc visit, void *arg) {
    Py_VISIT(self->loop);
    Py_VISIT(self->queue);
    return 0;
}

static int ws_clear(Waiters *self) {
    Py_CLEAR(self->loop);
    Py_CLEAR(self->queue);
    return 0;
}

static void ws_dealloc(Waiters *self) {
    PyObject_GC_UnTrack(self);
    ws_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Ask the loop for a flush if none is scheduled. */
static int ws_schedule(Waiters *self) {
    if (self->scheduled) return 0;
    PyObject *flush = PyObject_GetAttr((PyObject *)self, str_flush);
    if (!flush) return -1;
    PyObject *h = PyObject_CallMethodOneArg(self->loop, str_call_soon, flush);
    Py_DECREF(flush);
    if (!h) return -1;
    Py_DECREF(h);
    self->scheduled = 1;
    return 0;
}

/* Queue cb(w) in ctx; ask the loop for a flush if none is scheduled. */
static int ws_push(Waiters *self, PyObject *cb, PyObject *w, PyObject *ctx) {
    if (!self->queue && !(self->queue = PyList_New(0))) return -1;
    if (PyList_Append(self->queue, cb) < 0 || PyList_Append(self->queue, w) < 0 ||
        PyList_Append(self->queue, ctx ? ctx : Py_None) < 0)
        return -1;
    return ws_schedule(self);
}

/* Put q[from:] back at the head of the queue (a flush that stopped early). */
static int ws_requeue(Waiters *self, PyObject *q, Py_ssize_t from) {
    Py_ssize_t n = PyList_GET_SIZE(q);
    if (from >= n) return 0;
    PyObject *rest = PyList_GetSlice(q, from, n);
    if (!rest) return -1;
    if (self->queue) {
        PyObject *more = PySequence_InPlaceConcat(rest, self->queue);
        if (!more) {
            Py_DECREF(rest);
            return -1;
        }
        Py_DECREF(more); /* the same list as rest */
    }
    Py_XSETREF(self->queue, rest);
    return ws_schedule(self);
}

/* The exception being raised, normalized and with its traceback, taken off
 * the error indicator (PyErr_Fetch is deprecated from 3.12). */
static PyObject *take_raised(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise `value` again (a reference taken from take_raised, stolen). */
static void raise_again(PyObject *value) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(value);
#else
    PyObject *type = (PyObject *)Py_TYPE(value);
    Py_INCREF(type);
    PyErr_Restore(type, value, PyException_GetTraceback(value));
#endif
}

/* _flush(): run what is queued, in order. Callbacks queued meanwhile wait for
 * the next flush (a fresh call_soon), as the loop would order them. */
static PyObject *ws_flush(Waiters *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *q = self->queue;
    self->queue = NULL;
    self->scheduled = 0;
    self->flushes++;
    if (!q) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(q);
    for (Py_ssize_t i = 0; i + 2 < n; i += 3) {
        PyObject *cb = PyList_GET_ITEM(q, i), *w = PyList_GET_ITEM(q, i + 1),
                 *ctx = PyList_GET_ITEM(q, i + 2);
        int entered = 0;
        if (ctx != Py_None) {
            if (PyContext_Enter(ctx) < 0) goto failed;
            entered = 1;
        }
        PyObject *r = PyObject_CallOneArg(cb, w);
        if (entered && PyContext_Exit(ctx) < 0) {
            Py_XDECREF(r);
            goto failed;
        }
        self->calls++;
        if (r) {
            Py_DECREF(r);
            continue;
        }
    failed:
        /* as asyncio's Handle does: the loop's exception handler hears of an
         * Exception, and a KeyboardInterrupt or SystemExit stops the loop */
        {
            PyObject *value = take_raised();
            /* as asyncio's Handle does, these stop the loop: raise them, and
             * leave the callbacks after this one queued for the next flush */
            if (value && (PyErr_GivenExceptionMatches(value, PyExc_KeyboardInterrupt) ||
                          PyErr_GivenExceptionMatches(value, PyExc_SystemExit))) {
                if (ws_requeue(self, q, i + 3) < 0) PyErr_WriteUnraisable((PyObject *)self);
                Py_DECREF(q);
                raise_again(value);
                return NULL;
            }
            PyObject *ctxd = Py_BuildValue("{s:s,s:O,s:O}", "message",
                                           "Exception in a callback of an asyncfabric waiter",
                                           "exception", value ? value : Py_None, "callback", cb);
            PyObject *r2 = ctxd ? PyObject_CallMethodOneArg(self->loop, str_call_exception_handler, ctxd)
                                : NULL;
            if (!r2) PyErr_WriteUnraisable(cb);
            Py_XDECREF(r2);
            Py_XDECREF(ctxd);
            Py_XDECREF(value);
        }
    }
    Py_DECREF(q);
    Py_RETURN_NONE;
}

static PyObject *ws_new_waiter(Waiters *self, PyObject *Py_UNUSED(ignored)) {
    return waiter_new((PyObject *)self);
}

static PyMethodDef ws_methods[] = {
    {"_flush", (PyCFunction)ws_flush, METH_NOARGS, "run the queued callbacks (the loop calls it)"},
    {"new", (PyCFunction)ws_new_waiter, METH_NOARGS, "a new pending Waiter"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef ws_members[] = {
    {"loop", T_OBJECT, offsetof(Waiters, loop), READONLY, "the event loop"},
    {"flushes", T_ULONGLONG, offsetof(Waiters, flushes), READONLY, "flushes run"},
    {"calls", T_ULONGLONG, offsetof(Waiters, calls), READONLY, "callbacks run by flushes"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject WaitersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asyncfabric.engine._fastpath.Waiters",
    .tp_basicsize = sizeof(Waiters),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Waiters(loop): makes Waiters and runs their callbacks, one call_soon per burst.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ws_init,
    .tp_traverse = (traverseproc)ws_traverse,
    .tp_clear = (inquiry)ws_clear,
    .tp_dealloc = (destructor)ws_dealloc,
    .tp_methods = ws_methods,
    .tp_members = ws_members,
};

/* ---------------------------------------------------------------- Waiter */

PyObject *waiter_new(PyObject *waiters) {
    Waiter *w = PyObject_GC_New(Waiter, &WaiterType);
    if (!w) return NULL;
    Py_INCREF(waiters);
    w->owner = (Waiters *)waiters;
    w->result = w->exc = w->cancel_msg = w->cb0 = w->ctx0 = w->more = NULL;
    w->state = PENDING;
    w->blocking = 0;
    PyObject_GC_Track(w);
    return (PyObject *)w;
}

int waiter_pending(PyObject *w) { return ((Waiter *)w)->state == PENDING; }

static int w_traverse(Waiter *self, visitproc visit, void *arg) {
    Py_VISIT(self->owner);
    Py_VISIT(self->result);
    Py_VISIT(self->exc);
    Py_VISIT(self->cancel_msg);
    Py_VISIT(self->cb0);
    Py_VISIT(self->ctx0);
    Py_VISIT(self->more);
    return 0;
}

static int w_clear(Waiter *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->result);
    Py_CLEAR(self->exc);
    Py_CLEAR(self->cancel_msg);
    Py_CLEAR(self->cb0);
    Py_CLEAR(self->ctx0);
    Py_CLEAR(self->more);
    return 0;
}

static void w_dealloc(Waiter *self) {
    PyObject_GC_UnTrack(self);
    w_clear(self);
    PyObject_GC_Del(self);
}

/* The state left PENDING: hand every callback to the owner's queue. */
static int w_schedule(Waiter *self) {
    PyObject *cb0 = self->cb0, *ctx0 = self->ctx0, *more = self->more;
    self->cb0 = self->ctx0 = self->more = NULL;
    int rc = 0;
    if (cb0) rc = ws_push(self->owner, cb0, (PyObject *)self, ctx0);
    if (more && rc == 0) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(more) && rc == 0; i++) {
            PyObject *t = PyList_GET_ITEM(more, i);
            rc = ws_push(self->owner, PyTuple_GET_ITEM(t, 0), (PyObject *)self, PyTuple_GET_ITEM(t, 1));
        }
    }
    Py_XDECREF(cb0);
    Py_XDECREF(ctx0);
    Py_XDECREF(more);
    return rc;
}

static PyObject *invalid_state(const char *what) {
    PyErr_SetString(InvalidStateError, what);
    return NULL;
}

int waiter_set_result(PyObject *o, PyObject *v) {
    Waiter *self = (Waiter *)o;
    if (self->state != PENDING) {
        invalid_state("invalid state: the waiter is done");
        return -1;
    }
    Py_INCREF(v);
    self->result = v;
    self->state = FINISHED;
    return w_schedule(self);
}

static PyObject *w_set_result(Waiter *self, PyObject *v) {
    if (waiter_set_result((PyObject *)self, v) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *w_set_exception(Waiter *self, PyObject *exc) {
    if (self->state != PENDING) return invalid_state("invalid state: the waiter is done");
    PyObject *e;
    if (PyExceptionClass_Check(exc)) {
        if (!(e = PyObject_CallNoArgs(exc))) return NULL;
    } else {
        Py_INCREF(exc);
        e = exc;
    }
    if (!PyExceptionInstance_Check(e)) {
        Py_DECREF(e);
        PyErr_SetString(PyExc_TypeError, "set_exception takes an exception");
        return NULL;
    }
    if (PyErr_GivenExceptionMatches(e, PyExc_StopIteration)) {
        Py_DECREF(e);
        PyErr_SetString(PyExc_TypeError, "StopIteration interacts badly with generators "
                                         "and cannot be raised into a waiter");
        return NULL;
    }
    self->exc = e;
    self->state = FINISHED;
    if (w_schedule(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *w_cancel(Waiter *self, PyObject *args, PyObject *kw) {
    PyObject *msg = Py_None;
    static char *names[] = {"msg", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:cancel", names, &msg)) return NULL;
    if (self->state != PENDING) Py_RETURN_FALSE;
    Py_INCREF(msg);
    self->cancel_msg = msg;
    self->state = CANCELLED;
    if (w_schedule(self) < 0) return NULL;
    Py_RETURN_TRUE;
}

static PyObject *w_done(Waiter *self, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(self->state != PENDING);
}

static PyObject *w_cancelled(Waiter *self, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(self->state == CANCELLED);
}

static void raise_cancelled(Waiter *self) {
    if (self->cancel_msg && self->cancel_msg != Py_None)
        PyErr_SetObject(CancelledError, self->cancel_msg);
    else
        PyErr_SetNone(CancelledError);
}

static PyObject *w_result(Waiter *self, PyObject *Py_UNUSED(ignored)) {
    if (self->state == CANCELLED) {
        raise_cancelled(self);
        return NULL;
    }
    if (self->state != FINISHED) return invalid_state("Result is not ready.");
    if (self->exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->exc), self->exc);
        return NULL;
    }
    Py_INCREF(self->result);
    return self->result;
}

static PyObject *w_exception(Waiter *self, PyObject *Py_UNUSED(ignored)) {
    if (self->state == CANCELLED) {
        raise_cancelled(self);
        return NULL;
    }
    if (self->state != FINISHED) return invalid_state("Exception is not set.");
    if (self->exc) {
        Py_INCREF(self->exc);
        return self->exc;
    }
    Py_RETURN_NONE;
}

static PyObject *w_add_done_callback(Waiter *self, PyObject *args, PyObject *kw) {
    PyObject *fn, *ctx = Py_None;
    static char *names[] = {"", "context", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$O:add_done_callback", names, &fn, &ctx))
        return NULL;
    PyObject *c = ctx;
    if (c == Py_None) {
        if (!(c = PyContext_CopyCurrent())) return NULL;
    } else {
        Py_INCREF(c);
    }
    int rc = 0;
    if (self->state != PENDING) {
        rc = ws_push(self->owner, fn, (PyObject *)self, c);
    } else if (!self->cb0 && !self->more) {
        Py_INCREF(fn);
        self->cb0 = fn;
        self->ctx0 = c;
        Py_RETURN_NONE;
    } else {
        PyObject *t = PyTuple_Pack(2, fn, c);
        if (!t || (!self->more && !(self->more = PyList_New(0))) || PyList_Append(self->more, t) < 0)
            rc = -1;
        Py_XDECREF(t);
    }
    Py_DECREF(c);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *w_remove_done_callback(Waiter *self, PyObject *fn) {
    long removed = 0;
    if (self->cb0) {
        int eq = PyObject_RichCompareBool(self->cb0, fn, Py_EQ);
        if (eq < 0) return NULL;
        if (eq) {
            Py_CLEAR(self->cb0);
            Py_CLEAR(self->ctx0);
            removed++;
        }
    }
    if (self->more) {
        PyObject *keep = PyList_New(0);
        if (!keep) return NULL;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->more); i++) {
            PyObject *t = PyList_GET_ITEM(self->more, i);
            int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(t, 0), fn, Py_EQ);
            if (eq < 0 || (!eq && PyList_Append(keep, t) < 0)) {
                Py_DECREF(keep);
                return NULL;
            }
            removed += eq;
        }
        Py_SETREF(self->more, keep);
    }
    return PyLong_FromLong(removed);
}

static PyObject *w_get_loop(Waiter *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->owner || !self->owner->loop) return invalid_state("the waiter has no loop");
    Py_INCREF(self->owner->loop);
    return self->owner->loop;
}

static PyObject *w_self(PyObject *self) {
    Py_INCREF(self);
    return self;
}

static PyObject *w_await(PyObject *self, PyObject *Py_UNUSED(ignored)) { return w_self(self); }

/* The awaiting coroutine's `yield from`: the waiter itself while pending (a
 * task then registers its wake-up), its result or exception once done. */
static PyObject *w_next(Waiter *self) {
    if (self->state == PENDING) {
        self->blocking = 1;
        Py_INCREF(self);
        return (PyObject *)self;
    }
    PyObject *r = w_result(self, NULL);
    if (!r) return NULL;
    if (r == Py_None) {
        Py_DECREF(r);
        return NULL; /* StopIteration: the await's value is None */
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, r);
    Py_DECREF(r);
    if (stop) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *w_get_blocking(Waiter *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->blocking);
}

static int w_set_blocking(Waiter *self, PyObject *v, void *Py_UNUSED(closure)) {
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete _asyncio_future_blocking");
        return -1;
    }
    int b = PyObject_IsTrue(v);
    if (b < 0) return -1;
    self->blocking = b;
    return 0;
}

static PyObject *w_get_loop_attr(Waiter *self, void *Py_UNUSED(closure)) {
    return w_get_loop(self, NULL);
}

static PyObject *w_repr(Waiter *self) {
    static const char *names[] = {"pending", "finished", "cancelled"};
    return PyUnicode_FromFormat("<asyncfabric Waiter %s>", names[self->state]);
}

static PyMethodDef w_methods[] = {
    {"done", (PyCFunction)w_done, METH_NOARGS, "whether it ended (result, exception or cancel)"},
    {"cancelled", (PyCFunction)w_cancelled, METH_NOARGS, "whether it was cancelled"},
    {"result", (PyCFunction)w_result, METH_NOARGS, "the result, or raise its exception"},
    {"exception", (PyCFunction)w_exception, METH_NOARGS, "its exception, or None"},
    {"set_result", (PyCFunction)w_set_result, METH_O, "end it with a result"},
    {"set_exception", (PyCFunction)w_set_exception, METH_O, "end it with an exception"},
    {"cancel", (PyCFunction)(void (*)(void))w_cancel, METH_VARARGS | METH_KEYWORDS,
     "cancel(msg=None): cancel it if pending; whether it was"},
    {"add_done_callback", (PyCFunction)(void (*)(void))w_add_done_callback,
     METH_VARARGS | METH_KEYWORDS, "add_done_callback(fn, *, context=None)"},
    {"remove_done_callback", (PyCFunction)w_remove_done_callback, METH_O,
     "remove every registration of fn; how many"},
    {"get_loop", (PyCFunction)w_get_loop, METH_NOARGS, "the event loop"},
    {"__await__", (PyCFunction)(void (*)(void))w_await, METH_NOARGS, "itself, as its own iterator"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef w_getset[] = {
    {"_asyncio_future_blocking", (getter)w_get_blocking, (setter)w_set_blocking,
     "asyncio's mark of a future-like object a task waits on", NULL},
    {"_loop", (getter)w_get_loop_attr, NULL, "the event loop", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyAsyncMethods w_async = {
    .am_await = (unaryfunc)w_self,
};

PyTypeObject WaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asyncfabric.engine._fastpath.Waiter",
    .tp_basicsize = sizeof(Waiter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A future-like waiter for one transfer (see _waiter.c).",
    .tp_traverse = (traverseproc)w_traverse,
    .tp_clear = (inquiry)w_clear,
    .tp_dealloc = (destructor)w_dealloc,
    .tp_repr = (reprfunc)w_repr,
    .tp_as_async = &w_async,
    .tp_iter = (getiterfunc)w_self,
    .tp_iternext = (iternextfunc)w_next,
    .tp_methods = w_methods,
    .tp_getset = w_getset,
};

int waiter_module_init(PyObject *m) {
    PyObject *exc = PyImport_ImportModule("asyncio.exceptions");
    if (!exc) return -1;
    CancelledError = PyObject_GetAttrString(exc, "CancelledError");
    InvalidStateError = PyObject_GetAttrString(exc, "InvalidStateError");
    Py_DECREF(exc);
    str_call_soon = PyUnicode_InternFromString("call_soon");
    str_flush = PyUnicode_InternFromString("_flush");
    str_call_exception_handler = PyUnicode_InternFromString("call_exception_handler");
    if (!CancelledError || !InvalidStateError || !str_call_soon || !str_flush ||
        !str_call_exception_handler)
        return -1;
    if (PyType_Ready(&WaitersType) < 0 || PyType_Ready(&WaiterType) < 0) return -1;
    Py_INCREF(&WaitersType);
    if (PyModule_AddObject(m, "Waiters", (PyObject *)&WaitersType) < 0) {
        Py_DECREF(&WaitersType);
        return -1;
    }
    Py_INCREF(&WaiterType);
    if (PyModule_AddObject(m, "Waiter", (PyObject *)&WaiterType) < 0) {
        Py_DECREF(&WaiterType);
        return -1;
    }
    return 0;
}
