/* The fast path's waiter (_waiter.c): what `await engine.write(...)` awaits
 * on asyncio's base event loop, in place of an asyncio.Future. */
#ifndef ASYNCFABRIC_WAITER_H
#define ASYNCFABRIC_WAITER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern PyTypeObject WaiterType;
extern PyTypeObject WaitersType;

/* Ready both types and add them to module m; 0 or -1 (exception set). */
int waiter_module_init(PyObject *m);

/* A new pending waiter of `waiters`, or NULL. The caller checks that it is a
 * Waiters (Py_TYPE == &WaitersType): nothing here looks again. */
PyObject *waiter_new(PyObject *waiters);

/* Whether w is pending (1), done (0); for a Waiter only. */
int waiter_pending(PyObject *w);

/* End w with result `v` and schedule its callbacks; 0, or -1 (exception set). */
int waiter_set_result(PyObject *w, PyObject *v);

#endif
