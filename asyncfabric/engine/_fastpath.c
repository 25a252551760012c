/* The engine's native fast path: a write, a write of an immediate alone, and a
 * counter's spin-take, from Python to the transport's C table
 * (transport/native_ops.h) in one C call.
 *
 * Why: the Python path of `await engine.write(...)` checks its arguments in a
 * chain of small methods (engine, region, slice, descriptor route) before the
 * transport's post; at a few microseconds a round trip that chain is most of
 * the cost. This module makes the same checks on the same objects, reading
 * their slots directly, and posts through the table.
 *
 * It never decides anything the Python path would not: whenever a check it
 * makes does not pass (a type it does not know, a region not of this engine
 * or closed, a destination without a cached route, a self-target, an
 * immediate out of range, a closed gate...), it answers NOT_HERE and the
 * engine takes its Python path, which makes the full checks and raises the
 * errors. Engine.write and write_imm (engine.py) own the protocol of answers.
 *
 * The engine owns the FastPath object and turns it off (`on = False`) before
 * its transport closes; a wrapper that takes over the hot paths closes the
 * table's gate. Either way every call from then on answers NOT_HERE.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>

#include "native_ops.h"
#include "_waiter.h"

/* Answers of write() (a token, > LAST_CODE, means: await it). */
enum { DONE = 0, DONE_EVENTS = 1, NOT_HERE = 2, FAILED = 3, LAST_CODE = 15 };
/* Answers of take() below zero (otherwise the table's bits). */
enum { TAKE_NOT_HERE = -1, TAKE_BUSY = -2 };
/* Larger writes are posted without the GIL: a post can wait inside the provider
 * (shm spins on the target's lock while the target copies). */
#define NOGIL_BYTES (64u << 10)

/* Where a slot of a class lives in its instances. */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t region, offset, nbytes;
} slice_slots;

typedef struct {
    PyObject_HEAD
    const af_native_ops *ops;
    void *ctx;
    const int *gate;
    PyObject *keep;   /* the NativeOps (owns the gate) */
    PyObject *engine; /* borrowed: the engine owns this object */
    PyObject *uid;    /* the engine's route key in a descriptor's _cache */
    PyObject *ready;  /* the asyncio loop's ready deque, or NULL */
    PyObject *new_waiter; /* the loop adapter's waiter factory (write_wait), or NULL */
    PyObject *waiters;    /* a Waiters (_waiter.c): write_wait's waiters come from it, or NULL */
    PyTypeObject *region_t, *desc_t, *route_t, *remote_t;
    slice_slots src, dst;
    Py_ssize_t r_engine, r_closed, r_fast, r_inflight; /* Region */
    Py_ssize_t rt_remote, rt_self;         /* the engine's _Route */
    Py_ssize_t rm_native;                  /* transport.contract.Remote */
    uint64_t token;
    unsigned long long posts; /* posts made here (tests check the path is taken) */
    unsigned long long ends;  /* transfer ends resolved here (complete) */
    int on;
    int status; /* the status of the last FAILED write */
    int act;    /* what write_wait left to the engine's Python (ACT_* bits) */
} FastPath;

/* write_wait's `act`: the engine drains what it could not end here (a hold,
 * a message, a closed region...), and spins for the transfer (the loop has
 * nothing else ready). */
enum { ACT_DRAIN = 1, ACT_SPIN = 2 };

static PyObject *str_cache, *str_nbytes, *str_done, *str_set_result, *int_one;

/* The offset of slot `name` of `t` (a __slots__ member), or -1 with an error set. */
static Py_ssize_t slot_offset(PyTypeObject *t, const char *name) {
    PyObject *d = PyObject_GetAttrString((PyObject *)t, name);
    if (!d) return -1;
    Py_ssize_t off = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX || m->type == T_OBJECT) off = m->offset;
    }
    Py_DECREF(d);
    if (off < 0) PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", t->tp_name, name);
    return off;
}

/* A slot's value, borrowed; NULL when unset (no error is set). */
static inline PyObject *slot(PyObject *o, Py_ssize_t off) { return *(PyObject **)((char *)o + off); }

static int slice_init(slice_slots *s, PyObject *type, const char *ref) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: expected a class");
        return -1;
    }
    s->type = (PyTypeObject *)type;
    Py_INCREF(type);
    if ((s->region = slot_offset(s->type, ref)) < 0) return -1;
    if ((s->offset = slot_offset(s->type, "offset")) < 0) return -1;
    if ((s->nbytes = slot_offset(s->type, "nbytes")) < 0) return -1;
    return 0;
}

static int u64(PyObject *o, uint64_t *out) {
    if (!o || !PyLong_CheckExact(o)) return -1;
    uint64_t v = PyLong_AsUnsignedLongLong(o);
    if (v == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = v;
    return 0;
}

/* FastPath(engine, uid, table, ctx, gate, keep, ready, RegionSlice, RemoteSlice,
 *          Region, Descriptor, _Route, Remote) */
static int fp_init(FastPath *self, PyObject *args, PyObject *kw) {
    PyObject *engine, *uid, *keep, *ready, *sl, *rsl, *reg, *desc, *route, *remote;
    unsigned long long table, ctx, gate;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "FastPath takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OSKKKOOOOOOOO", &engine, &uid, &table, &ctx, &gate, &keep,
                          &ready, &sl, &rsl, &reg, &desc, &route, &remote))
        return -1;
    const af_native_ops *ops = (const af_native_ops *)(uintptr_t)table;
    if (!ops || ops->abi != AF_NATIVE_ABI || !ctx || !gate) {
        PyErr_SetString(PyExc_ValueError,
                        "FastPath: the transport's native table is missing or of another ABI");
        return -1;
    }
    self->ops = ops;
    self->ctx = (void *)(uintptr_t)ctx;
    self->gate = (const int *)(uintptr_t)gate;
    self->engine = engine;
    Py_INCREF(uid);
    self->uid = uid;
    Py_INCREF(keep);
    self->keep = keep;
    if (ready != Py_None) {
        Py_INCREF(ready);
        self->ready = ready;
    }
    if (slice_init(&self->src, sl, "region") || slice_init(&self->dst, rsl, "descriptor"))
        return -1;
    if (!PyType_Check(reg) || !PyType_Check(desc) || !PyType_Check(route) || !PyType_Check(remote)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: expected classes");
        return -1;
    }
    self->region_t = (PyTypeObject *)reg;
    self->desc_t = (PyTypeObject *)desc;
    self->route_t = (PyTypeObject *)route;
    self->remote_t = (PyTypeObject *)remote;
    Py_INCREF(reg);
    Py_INCREF(desc);
    Py_INCREF(route);
    Py_INCREF(remote);
    if ((self->r_engine = slot_offset(self->region_t, "_engine")) < 0) return -1;
    if ((self->r_closed = slot_offset(self->region_t, "_closed")) < 0) return -1;
    if ((self->r_fast = slot_offset(self->region_t, "_fast")) < 0) return -1;
    if ((self->r_inflight = slot_offset(self->region_t, "_inflight")) < 0) return -1;
    if ((self->rt_remote = slot_offset(self->route_t, "remote")) < 0) return -1;
    if ((self->rt_self = slot_offset(self->route_t, "self_target")) < 0) return -1;
    if ((self->rm_native = slot_offset(self->remote_t, "native")) < 0) return -1;
    self->token = 16; /* tokens 0-15 are answers */
    self->on = 1;
    return 0;
}

static void fp_dealloc(FastPath *self) {
    Py_XDECREF(self->uid);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->ready);
    Py_XDECREF(self->new_waiter);
    Py_XDECREF(self->waiters);
    Py_XDECREF(self->src.type);
    Py_XDECREF(self->dst.type);
    Py_XDECREF(self->region_t);
    Py_XDECREF(self->desc_t);
    Py_XDECREF(self->route_t);
    Py_XDECREF(self->remote_t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The target of `dst` (a RemoteSlice, or a whole Descriptor) for this engine:
 * its native form, offset and size, or -1 when the Python path must decide. */
static int target_of(FastPath *self, PyObject *dst, const void **native, uint64_t *roff,
                     uint64_t *nbytes) {
    PyObject *desc;
    if (Py_TYPE(dst) == self->dst.type) {
        desc = slot(dst, self->dst.region);
        if (!desc || u64(slot(dst, self->dst.offset), roff) ||
            u64(slot(dst, self->dst.nbytes), nbytes))
            return -1;
    } else if (Py_TYPE(dst) == self->desc_t) {
        desc = dst;
        *roff = 0;
        PyObject *n = PyObject_GetAttr(desc, str_nbytes);
        int bad = u64(n, nbytes);
        Py_XDECREF(n);
        if (bad) {
            PyErr_Clear();
            return -1;
        }
    } else {
        return -1;
    }
    PyObject *cache = PyObject_GetAttr(desc, str_cache);
    if (!cache) {
        PyErr_Clear();
        return -1;
    }
    PyObject *route = PyDict_CheckExact(cache) ? PyDict_GetItemWithError(cache, self->uid) : NULL;
    Py_DECREF(cache); /* the descriptor keeps it, and the route, alive */
    if (!route) {
        PyErr_Clear();
        return -1;
    }
    if (Py_TYPE(route) != self->route_t || slot(route, self->rt_self) != Py_False) return -1;
    PyObject *remote = slot(route, self->rt_remote);
    uint64_t addr;
    if (!remote || !PyObject_TypeCheck(remote, self->remote_t) ||
        u64(slot(remote, self->rm_native), &addr) || !addr)
        return -1;
    *native = (const void *)(uintptr_t)addr;
    return 0;
}

static int imm_of(PyObject *imm, int64_t *out) {
    if (imm == Py_None) {
        *out = -1; /* NO_IMM */
        return 0;
    }
    uint64_t v;
    if (u64(imm, &v) || v > 0xFFFFFFFFu) return -1;
    *out = (int64_t)v;
    return 0;
}

static PyObject *answer(FastPath *self, uint64_t token, int rc) {
    self->posts++;
    if (rc < 0) {
        self->status = rc;
        return PyLong_FromLong(FAILED);
    }
    if (rc == 1) return PyLong_FromLong(self->ops->pending(self->ctx) ? DONE_EVENTS : DONE);
    return PyLong_FromUnsignedLongLong(token);
}

/* write(src: RegionSlice | Region, dst: RemoteSlice | Descriptor, imm: int | None) -> answer */
static PyObject *fp_write(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "FastPath.write takes (src, dst, imm)");
        return NULL;
    }
    PyObject *src = args[0];
    const void *native;
    uint64_t roff, dn, soff, n, ptr, handle;
    int64_t imm;
    PyObject *region;
    if (!self->on || !*self->gate) goto not_here;
    if (Py_TYPE(src) == self->src.type) {
        region = slot(src, self->src.region);
        if (u64(slot(src, self->src.offset), &soff) || u64(slot(src, self->src.nbytes), &n))
            goto not_here;
    } else if (Py_TYPE(src) == self->region_t) {
        region = src;
        soff = 0;
        n = (uint64_t)-1; /* the region's size, below */
    } else {
        goto not_here;
    }
    if (!region || Py_TYPE(region) != self->region_t || slot(region, self->r_engine) != self->engine ||
        slot(region, self->r_closed) != Py_False)
        goto not_here;
    /* Region._fast: (address, handle, size) of a registration the table can post from */
    PyObject *fast = slot(region, self->r_fast);
    uint64_t size;
    if (!fast || !PyTuple_CheckExact(fast) || PyTuple_GET_SIZE(fast) != 3 ||
        u64(PyTuple_GET_ITEM(fast, 0), &ptr) || u64(PyTuple_GET_ITEM(fast, 1), &handle) ||
        u64(PyTuple_GET_ITEM(fast, 2), &size))
        goto not_here;
    if (n == (uint64_t)-1) n = size;
    if (target_of(self, args[1], &native, &roff, &dn) || dn != n || imm_of(args[2], &imm))
        goto not_here;
    uint64_t token = self->token++;
    int rc;
    if (n >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = self->ops->post_write(self->ctx, token, native, roff, ptr + soff, (int64_t)handle, n, imm);
        Py_END_ALLOW_THREADS
    } else {
        rc = self->ops->post_write(self->ctx, token, native, roff, ptr + soff, (int64_t)handle, n, imm);
    }
    return answer(self, token, rc);
not_here:
    return PyLong_FromLong(NOT_HERE);
}

static long complete_into(FastPath *self, PyObject *ops, PyObject *left);

/* write_wait(src, dst, imm, ops, left) -> write()'s answer, except a token: then the
 * transfer's waiter, made by new_waiter and registered as Engine._waiter does
 * (ops[token] = (waiter, region), the region's in-flight count raised); the
 * engine awaits it, draining and spinning first as `act` says (below). */
static PyObject *fp_write_wait(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyDict_CheckExact(args[3]) || !PyList_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "FastPath.write_wait takes (src, dst, imm, ops: dict, left: list)");
        return NULL;
    }
    PyObject *r = fp_write(self, args, 3);
    if (!r || !self->new_waiter) return r;
    uint64_t v = PyLong_AsUnsignedLongLong(r);
    if (v <= LAST_CODE) return r;
    /* fp_write took it: src is a RegionSlice or a Region of this engine */
    PyObject *region = Py_TYPE(args[0]) == self->src.type ? slot(args[0], self->src.region) : args[0];
    PyObject **inflight = (PyObject **)((char *)region + self->r_inflight);
    PyObject *more = *inflight && PyLong_CheckExact(*inflight) ? PyNumber_Add(*inflight, int_one) : NULL;
    PyObject *w = !more ? NULL
                  : self->waiters && Py_TYPE(self->waiters) == &WaitersType
                      ? waiter_new(self->waiters)
                      : PyObject_CallNoArgs(self->new_waiter);
    PyObject *entry = w ? PyTuple_Pack(2, w, region) : NULL;
    if (!entry || PyDict_SetItem(args[3], r, entry) < 0) {
        /* posted, but nobody will wait: its end finds no entry and is dropped */
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Region._inflight is not an int");
        Py_XDECREF(more);
        Py_XDECREF(w);
        Py_XDECREF(entry);
        Py_DECREF(r);
        return NULL;
    }
    Py_SETREF(*inflight, more);
    Py_DECREF(entry);
    Py_DECREF(r);
    /* What Engine._after_call and _spin_for would do next, decided here: end
     * the transfers whose ends the post's reap queued (complete()), and leave
     * to the engine only what it must do itself. Nothing ends synchronously:
     * set_result schedules the waiters' callbacks. */
    int act = 0;
    if (self->ops->pending(self->ctx)) {
        if (complete_into(self, args[3], args[4]) < 0) {
            PyErr_WriteUnraisable((PyObject *)self); /* the engine's drain tries again */
            act |= ACT_DRAIN;
        }
        if (PyList_GET_SIZE(args[4]) || self->ops->pending(self->ctx)) act |= ACT_DRAIN;
    }
    /* a waiter nobody awaits yet has no callbacks: ending it readies nothing */
    Py_ssize_t nready = self->ready ? PyObject_Length(self->ready) : 0;
    if (nready < 0) {
        PyErr_Clear();
        nready = 0;
    }
    if (!nready) act |= ACT_SPIN;
    self->act = act;
    return w;
}

/* write_imm(dst: RemoteSlice | Descriptor, imm: int) -> answer */
static PyObject *fp_write_imm(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "FastPath.write_imm takes (dst, imm)");
        return NULL;
    }
    const void *native;
    uint64_t roff, dn;
    int64_t imm;
    if (!self->on || !*self->gate || args[1] == Py_None || target_of(self, args[0], &native, &roff, &dn) ||
        imm_of(args[1], &imm))
        return PyLong_FromLong(NOT_HERE);
    uint64_t token = self->token++;
    return answer(self, token, self->ops->post_write(self->ctx, token, native, roff, 0, -1, 0, imm));
}

/* take(imm, want, ns) -> the table's bits, TAKE_BUSY (the loop has callbacks
 * ready: do not spin), or TAKE_NOT_HERE */
static PyObject *fp_take(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t imm, want, ns;
    if (nargs != 3 || u64(args[0], &imm) || u64(args[1], &want) || u64(args[2], &ns) ||
        imm > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_TypeError, "FastPath.take takes (imm, want, ns), ints >= 0");
        return NULL;
    }
    if (!self->on || !*self->gate) return PyLong_FromLong(TAKE_NOT_HERE);
    if (self->ready) {
        Py_ssize_t n = PyObject_Length(self->ready);
        if (n < 0) return NULL;
        if (n) return PyLong_FromLong(TAKE_BUSY);
    }
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = self->ops->take_spin(self->ctx, (uint32_t)imm, want, ns);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}

/* The end of one plain transfer `tok` (OpDone(tok), status 0): what
 * Engine._on_op does for it, here when its entry is (waiter, Region or None)
 * and the region is open. 1: done here; 0: the engine's Python must handle
 * it (a batch's or trigger's hold, a sub-entry, a closed region). */
static int complete_one(FastPath *self, PyObject *ops, uint64_t tok) {
    if (tok >> 63) return 0; /* SUB_BIT: an entry of a batch (transport/batching.py) */
    PyObject *key = PyLong_FromUnsignedLongLong(tok);
    if (!key) return -1;
    PyObject *entry = PyDict_GetItemWithError(ops, key); /* borrowed */
    if (!entry) {
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 1; /* nobody waits for it (the Python path returns too) */
    }
    PyObject *region = PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2
                           ? PyTuple_GET_ITEM(entry, 1) : NULL;
    if (!region || (region != Py_None && (Py_TYPE(region) != self->region_t ||
                                          slot(region, self->r_closed) != Py_False))) {
        Py_DECREF(key);
        return 0;
    }
    if (region != Py_None) {
        PyObject **inflight = (PyObject **)((char *)region + self->r_inflight);
        PyObject *less = *inflight && PyLong_CheckExact(*inflight)
                             ? PyNumber_Subtract(*inflight, int_one) : NULL;
        if (!less) {
            Py_DECREF(key);
            PyErr_Clear();
            return 0;
        }
        Py_SETREF(*inflight, less);
    }
    PyObject *w = PyTuple_GET_ITEM(entry, 0);
    Py_INCREF(w);
    int rc = PyDict_DelItem(ops, key);
    Py_DECREF(key);
    if (rc == 0 && Py_TYPE(w) == &WaiterType) {
        rc = waiter_pending(w) ? waiter_set_result(w, Py_None) : 0;
    } else if (rc == 0) {
        PyObject *done = PyObject_CallMethodNoArgs(w, str_done);
        rc = done ? PyObject_IsTrue(done) : -1;
        Py_XDECREF(done);
        if (rc == 0) {
            PyObject *r = PyObject_CallMethodOneArg(w, str_set_result, Py_None);
            rc = r ? 1 : -1;
            Py_XDECREF(r);
        }
    }
    Py_DECREF(w);
    return rc < 0 ? -1 : 1;
}

/* complete(ops, left) -> how many transfers ended here. Takes the leading
 * plain ends from the transport's queue (native_ops.h take_done) and ends
 * them as Engine._on_op would; the tokens it leaves to the engine's Python
 * go to the list `left`, in order, before anything drain() returns. */
static long complete_into(FastPath *self, PyObject *ops, PyObject *left) {
    long handled = 0;
    if (!self->on || !*self->gate || !self->ops->take_done) return 0;
    uint64_t tok[64];
    uint32_t n;
    do {
        n = self->ops->take_done(self->ctx, tok, 64);
        for (uint32_t i = 0; i < n; i++) {
            int r = complete_one(self, ops, tok[i]);
            if (r > 0) {
                handled++;
                self->ends++;
                continue;
            }
            if (r < 0) /* a waiter's own failure: report it, and lose no other end */
                PyErr_WriteUnraisable((PyObject *)self);
            PyObject *t = PyLong_FromUnsignedLongLong(tok[i]);
            if (!t || PyList_Append(left, t) < 0) {
                Py_XDECREF(t);
                return -1;
            }
            Py_DECREF(t);
        }
    } while (n == 64 && self->on && *self->gate);
    return handled;
}

static PyObject *fp_complete(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_CheckExact(args[0]) || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "FastPath.complete takes (ops: dict, left: list)");
        return NULL;
    }
    long handled = complete_into(self, args[0], args[1]);
    return handled < 0 ? NULL : PyLong_FromLong(handled);
}

static PyObject *fp_next_token(FastPath *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromUnsignedLongLong(self->token++);
}

static PyMethodDef fp_methods[] = {
    {"write", (PyCFunction)(void (*)(void))fp_write, METH_FASTCALL,
     "write(src, dst, imm) -> 0 done, 1 done with events to drain, 2 not here (take the "
     "Python path), 3 failed (see status), or a token to await"},
    {"write_wait", (PyCFunction)(void (*)(void))fp_write_wait, METH_FASTCALL,
     "write_wait(src, dst, imm, ops, left) -> write()'s answer, or instead of a token the "
     "transfer's registered waiter"},
    {"write_imm", (PyCFunction)(void (*)(void))fp_write_imm, METH_FASTCALL,
     "write_imm(dst, imm) -> the answers of write()"},
    {"take", (PyCFunction)(void (*)(void))fp_take, METH_FASTCALL,
     "take(imm, want, ns) -> TAKEN/EVENTS_READY/NOT_POLLED bits, -2 (loop busy: do not "
     "spin) or -1 (not here)"},
    {"complete", (PyCFunction)(void (*)(void))fp_complete, METH_FASTCALL,
     "complete(ops, left) -> transfers ended here; the tokens for the engine's Python go to left"},
    {"next_token", (PyCFunction)fp_next_token, METH_NOARGS, "a fresh op token (shared with write)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fp_members[] = {
    {"on", T_INT, offsetof(FastPath, on), 0, "0: every call answers 'not here'"},
    {"waiters", T_OBJECT, offsetof(FastPath, waiters), 0,
     "a Waiters: write_wait's waiters come from it (None: from new_waiter)"},
    {"new_waiter", T_OBJECT, offsetof(FastPath, new_waiter), 0,
     "the waiter factory of write_wait (None: it answers tokens, as write does)"},
    {"status", T_INT, offsetof(FastPath, status), READONLY, "the status of the last failed post"},
    {"act", T_INT, offsetof(FastPath, act), READONLY,
     "what the last write_wait left to the engine: 1 drain, 2 spin (bits)"},
    {"posts", T_ULONGLONG, offsetof(FastPath, posts), READONLY, "posts made through the table"},
    {"ends", T_ULONGLONG, offsetof(FastPath, ends), READONLY, "transfer ends resolved by complete()"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asyncfabric.engine._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's native fast path over a transport's native table.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fp_init,
    .tp_dealloc = (destructor)fp_dealloc,
    .tp_methods = fp_methods,
    .tp_members = fp_members,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "asyncfabric.engine._fastpath",
    "The engine's native fast path (see _fastpath.c).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&FastPathType) < 0) return NULL;
    str_cache = PyUnicode_InternFromString("_cache");
    str_nbytes = PyUnicode_InternFromString("nbytes");
    str_done = PyUnicode_InternFromString("done");
    str_set_result = PyUnicode_InternFromString("set_result");
    int_one = PyLong_FromLong(1);
    if (!str_cache || !str_nbytes || !str_done || !str_set_result || !int_one) return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m) return NULL;
    if (waiter_module_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FastPathType);
    if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddIntConstant(m, "DONE", DONE) < 0 ||
        PyModule_AddIntConstant(m, "DONE_EVENTS", DONE_EVENTS) < 0 ||
        PyModule_AddIntConstant(m, "NOT_HERE", NOT_HERE) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", FAILED) < 0 ||
        PyModule_AddIntConstant(m, "LAST_CODE", LAST_CODE) < 0 ||
        PyModule_AddIntConstant(m, "TAKE_NOT_HERE", TAKE_NOT_HERE) < 0 ||
        PyModule_AddIntConstant(m, "TAKE_BUSY", TAKE_BUSY) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
