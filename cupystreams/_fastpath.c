/*
 * The hot paths in C: take an idle stream, make a lease, enter it, give it
 * back; take an idle event and give it back.
 *
 * Why C: an uncontended acquire + release in Python costs 0.44 us on a fast
 * CPU and 0.7-1.0 us on the GPU hosts (measured in BENCHMARKS.md), over the
 * 0.6 us goal before any CUDA call. The same steps here cost a few C calls.
 *
 * Only what the hot paths touch lives here: six small base types whose
 * Python subclasses (Lane, PooledStream, StreamLease, CudaStreamPool,
 * PooledEvent, EventPool) add everything else, and CuPy's device and stream
 * switch (make_current / restore_current). Python code reads and writes these fields by their usual
 * names, so waiting, affinity keys, close() and statistics stay in Python.
 * Anything unusual on the hot path (a key, a timeout, waiters, a capturing or
 * closed stream, a bad argument) is handed to the Python slow path unchanged.
 *
 * Atomicity: each fast path runs from its checks to its state change holding
 * the GIL, with no Python code in between (the capture check is one driver
 * call that does not release the GIL). Two threads racing on one lease or one
 * lane therefore see each other's changes whole, as list.pop() and
 * list.append() are atomic for Python code. Objects are allocated *before*
 * the checks: allocating a tracked object can start the garbage collector,
 * which runs finalizers (Python code, which may switch threads).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

/* Set once by configure(); the hot path compares states by identity. */
static PyTypeObject *lease_class;  /* StreamLease: a subclass of LeaseCore */
static PyTypeObject *event_class;  /* PooledEvent: a subclass of EventCore */
static PyObject *lease_error;      /* cupystreams.LeaseError */
static PyObject *state_leased;     /* StreamState.LEASED */
static PyObject *state_idle;       /* StreamState.IDLE */

/* cuStreamIsCapturing(CUstream, CUstreamCaptureStatus *): 0 is CUDA_SUCCESS. */
typedef int (*capture_query_t)(void *stream, int *status);
static capture_query_t capture_query;

static PyTypeObject *deque_type;       /* collections.deque */
static PyObject *str_acquire;          /* "_acquire" */
static PyObject *str_release_slow;     /* "_release_slow" */
static PyObject *str_pool;             /* "_pool" */
static PyObject *str_hand_off_locked;  /* "hand_off_locked" */
static PyObject *str_release_dropped;  /* "_release_dropped" */
static PyObject *str_check_open;       /* "_check_open" */
static PyObject *str_enter;            /* "enter" */
static PyObject *str_exit;             /* "exit" */
static PyObject *str_release;          /* "release" */
static PyObject *str_use;              /* "use" */
static PyObject *str_acquire_slow;     /* "_acquire_slow" */

/* CuPy's calls for making a device and stream current; set by configure_cupy(). */
static PyObject *cupy_get_device;          /* cupy.cuda.runtime.getDevice */
static PyObject *cupy_set_device;          /* cupy.cuda.runtime.setDevice */
static PyObject *cupy_get_current_stream;  /* cupy.cuda.get_current_stream */

/* The pending exception as one object (NULL if none), cleared; and back. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_DECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

static void
give_exception(PyObject *exception)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exception);
#else
    if (exception != NULL) {
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exception)), exception,
                      PyException_GetTraceback(exception));
    }
#endif
}

/* A getter for an object field at the offset `closure`: None while unset. */
static PyObject *
get_object_or_none(PyObject *self, void *closure)
{
    PyObject *value = *(PyObject **)((char *)self + (Py_ssize_t)closure);
    return Py_NewRef(value != NULL ? value : Py_None);
}

/* list.pop() without the shrink, for a list known not to be empty: the
 * list's reference to the item becomes the caller's. */
static inline PyObject *
pop_last(PyObject *list)
{
    Py_ssize_t last = PyList_GET_SIZE(list) - 1;
    PyObject *item = PyList_GET_ITEM(list, last);
    PyList_SET_ITEM(list, last, NULL);
    Py_SET_SIZE(list, last);
    return item;
}

/* With an exception pending: give it `earlier` (stolen; may be NULL) as its context. */
static void
chain_exception(PyObject *earlier)
{
    if (earlier == NULL) {
        return;
    }
    PyObject *current = take_exception();
    if (current == NULL) {
        give_exception(earlier);
        return;
    }
    PyException_SetContext(current, earlier);
    give_exception(current);
}

static inline long long
now_ns(void)
{
    /* The clock of time.perf_counter_ns(), which the Python side also reads. */
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return (long long)t;
#else
    return (long long)_PyTime_GetPerfCounter();
#endif
}

/* ------------------------------------------------------- the current stream */

static int
cupy_configured(void)
{
    if (cupy_set_device == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cupystreams._fastpath: configure_cupy() was not called");
        return 0;
    }
    return 1;
}

/* The current device: a new reference, and its number in `*device`. */
static PyObject *
current_device(long *device)
{
    PyObject *now = PyObject_CallNoArgs(cupy_get_device);
    if (now != NULL && (*device = PyLong_AsLong(now)) == -1 && PyErr_Occurred()) {
        Py_CLEAR(now);
    }
    return now;
}

/* Call cupy_set_device(target) when the current device `now` is not `target`. */
static int
switch_device(long now, PyObject *target)
{
    long wanted = PyLong_AsLong(target);
    if (wanted == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (now == wanted) {
        return 0;
    }
    PyObject *done = PyObject_CallOneArg(cupy_set_device, target);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* switch_device(now, target) after a step that may have failed (its exception
 * pending): that failure is still raised, and a failed switch is raised with it
 * as its context. -1 when either failed. */
static int
switch_device_after(long now, PyObject *target)
{
    PyObject *failure = take_exception();
    if (switch_device(now, target) < 0) {
        chain_exception(failure);
        return -1;
    }
    give_exception(failure);
    return failure == NULL ? 0 : -1;
}

/* Make `device` and its CuPy `stream` current; returns (previous device,
 * previous stream of `device`) for restore_current. Undoes the device switch
 * if a later step fails. */
static PyObject *
make_current(long device, PyObject *stream)
{
    long previous;
    PyObject *previous_device = cupy_configured() ? current_device(&previous) : NULL;
    if (previous_device == NULL) {
        return NULL;
    }
    PyObject *result = NULL, *previous_stream = NULL, *used = NULL;
    PyObject *target = PyLong_FromLong(device);
    /* CuPy checks the device before a stream becomes current. */
    if (target != NULL && switch_device(previous, target) == 0) {
        previous_stream = PyObject_CallOneArg(cupy_get_current_stream, target);
        if (previous_stream != NULL
            && (used = PyObject_CallMethodNoArgs(stream, str_use)) != NULL) {
            result = PyTuple_Pack(2, previous_device, previous_stream);
        }
        if (result == NULL) {
            (void)switch_device_after(device, previous_device);  /* undo */
        }
    }
    Py_XDECREF(used);
    Py_XDECREF(previous_stream);
    Py_XDECREF(target);
    Py_DECREF(previous_device);
    return result;
}

/* Undo make_current(device, ...), which returned `saved`. The block may have
 * left another device current: the stream is restored on `device` all the
 * same, and the device that was current before make_current comes back even
 * if restoring the stream fails. */
static PyObject *
restore_current(long device, PyObject *saved)
{
    if (!PyTuple_Check(saved) || PyTuple_GET_SIZE(saved) != 2) {
        PyErr_SetString(PyExc_TypeError, "restore_current needs what make_current returned");
        return NULL;
    }
    long now;
    PyObject *now_object = cupy_configured() ? current_device(&now) : NULL;
    if (now_object == NULL) {
        return NULL;
    }
    Py_DECREF(now_object);
    PyObject *target = PyLong_FromLong(device);
    int switched = target == NULL ? -1 : switch_device(now, target);
    Py_XDECREF(target);
    if (switched < 0) {
        return NULL;
    }
    PyObject *restored = PyObject_CallMethodNoArgs(PyTuple_GET_ITEM(saved, 1), str_use);
    Py_XDECREF(restored);
    if (switch_device_after(device, PyTuple_GET_ITEM(saved, 0)) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ LaneCore */

typedef struct {
    PyObject_HEAD
    PyObject *idle;     /* list of idle StreamCore: popped and appended at its end */
    PyObject *waiters;  /* threads waiting for a stream; non-empty means slow path */
} LaneCore;

static PyTypeObject LaneCoreType;

static int
lane_traverse(LaneCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->idle);
    Py_VISIT(self->waiters);
    return 0;
}

static int
lane_clear(LaneCore *self)
{
    Py_CLEAR(self->idle);
    Py_CLEAR(self->waiters);
    return 0;
}

static void
lane_dealloc(LaneCore *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lane_set_idle(LaneCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "Lane.idle must be a list");
        return -1;
    }
    Py_XSETREF(self->idle, Py_NewRef(value));
    return 0;
}

static int
lane_set_waiters(LaneCore *self, PyObject *value, void *closure)
{
    /* A deque's len() runs no Python code, which the hot path relies on. */
    if (value == NULL || !PyObject_TypeCheck(value, deque_type)) {
        PyErr_SetString(PyExc_TypeError, "Lane.waiters must be a collections.deque");
        return -1;
    }
    Py_XSETREF(self->waiters, Py_NewRef(value));
    return 0;
}

static PyGetSetDef lane_getset[] = {
    {"idle", get_object_or_none, (setter)lane_set_idle,
     "The idle streams, a list; the hot path pops and appends at its end.",
     (void *)offsetof(LaneCore, idle)},
    {"waiters", get_object_or_none, (setter)lane_set_waiters,
     "Threads waiting for a stream, oldest first.", (void *)offsetof(LaneCore, waiters)},
    {NULL},
};

static PyTypeObject LaneCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.LaneCore",
    .tp_doc = "What the hot path reads of a Lane: its idle list and its waiters.",
    .tp_basicsize = sizeof(LaneCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_getset = lane_getset,
};

/* Nothing waits and a stream is idle: the only case the hot path handles. */
static inline int
lane_ready(LaneCore *lane)
{
    if (lane->idle == NULL || lane->waiters == NULL) {
        return 0;
    }
    Py_ssize_t waiting = PyObject_Length(lane->waiters);
    if (waiting != 0) {
        if (waiting < 0) {
            PyErr_Clear();  /* the slow path meets the same error and reports it */
        }
        return 0;
    }
    return PyList_GET_SIZE(lane->idle) > 0;
}

/* ---------------------------------------------------------------- StreamCore */

typedef struct {
    PyObject_HEAD
    PyObject *state;                   /* a StreamState member */
    PyObject *lane;                    /* its kind's LaneCore */
    PyObject *handle;                  /* the backend's stream; None once the pool closed */
    PyObject *backend;
    long device;
    char cupy_current;                 /* entering is make_current(device, handle), here */
    long long acquisitions;
    long long lease_start;             /* perf-counter ns when the current lease began */
    long long active_ns;               /* leased time of the finished leases */
    unsigned long long capture_handle; /* CUstream to ask about graph capture; 0: never */
} StreamCore;

static PyTypeObject StreamCoreType;

static int
stream_traverse(StreamCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->state);
    Py_VISIT(self->lane);
    Py_VISIT(self->handle);
    Py_VISIT(self->backend);
    return 0;
}

static int
stream_clear(StreamCore *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->lane);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->backend);
    return 0;
}

static void
stream_dealloc(StreamCore *self)
{
    PyObject_GC_UnTrack(self);
    stream_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
stream_set_lane(StreamCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyObject_TypeCheck(value, &LaneCoreType)) {
        PyErr_SetString(PyExc_TypeError, "PooledStream._lane must be a Lane");
        return -1;
    }
    Py_XSETREF(self->lane, Py_NewRef(value));
    return 0;
}

static PyMemberDef stream_members[] = {
    {"state", T_OBJECT_EX, offsetof(StreamCore, state), 0,
     "IDLE, LEASED or CLOSED (a StreamState)."},
    {"_acquisitions", T_LONGLONG, offsetof(StreamCore, acquisitions), 0, NULL},
    {"_lease_start", T_LONGLONG, offsetof(StreamCore, lease_start), 0, NULL},
    {"_active_ns", T_LONGLONG, offsetof(StreamCore, active_ns), 0, NULL},
    {"_handle", T_OBJECT, offsetof(StreamCore, handle), 0, NULL},
    {"_backend", T_OBJECT, offsetof(StreamCore, backend), 0, NULL},
    {"_device", T_LONG, offsetof(StreamCore, device), 0, NULL},
    {"_cupy_current", T_BOOL, offsetof(StreamCore, cupy_current), 0, NULL},
    {NULL},
};

static PyObject *
stream_get_capture_handle(StreamCore *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->capture_handle);
}

/* Checked before it is stored: the release hands this value to the driver. */
static int
stream_set_capture_handle(StreamCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "PooledStream._capture_handle must be an int");
        return -1;
    }
    unsigned long long handle = PyLong_AsUnsignedLongLong(value);
    if (handle == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    self->capture_handle = handle;
    return 0;
}

static PyGetSetDef stream_getset[] = {
    {"_lane", get_object_or_none, (setter)stream_set_lane, "The lane of the stream's kind.",
     (void *)offsetof(StreamCore, lane)},
    {"_capture_handle", (getter)stream_get_capture_handle, (setter)stream_set_capture_handle,
     "The CUstream the release asks the driver about; 0: never capturing.", NULL},
    {NULL},
};

static PyTypeObject StreamCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.StreamCore",
    .tp_doc = "What the hot path reads and writes of a PooledStream.",
    .tp_basicsize = sizeof(StreamCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)stream_traverse,
    .tp_clear = (inquiry)stream_clear,
    .tp_dealloc = (destructor)stream_dealloc,
    .tp_members = stream_members,
    .tp_getset = stream_getset,
};

/* Non-zero when the release must go to Python: capturing, or the check failed
 * (the Python check then raises the driver's error). The driver call is made
 * holding the GIL, which keeps the release atomic: it only reads the stream's
 * capture state, and a host function running Python on the driver's callback
 * thread does not hold what it needs (the GPU stress tests release leases from
 * eight threads while host functions run, without a hang). */
static inline int
stream_may_be_capturing(StreamCore *stream)
{
    if (stream->capture_handle == 0) {
        return 0;
    }
    /* No query without a live stream (close() dropped it) or a driver call. */
    if (capture_query == NULL || stream->handle == NULL || stream->handle == Py_None) {
        return 1;
    }
    int status = 0;
    if (capture_query((void *)(uintptr_t)stream->capture_handle, &status) != 0) {
        return 1;
    }
    return status != 0;
}

/* ----------------------------------------------------------------- LeaseCore */

typedef struct {
    PyObject_HEAD
    PyObject *stream;  /* the StreamCore held; NULL once released */
    PyObject *key;     /* affinity key or NULL */
    PyObject *entered; /* the StreamCore made current by __enter__, or NULL */
    PyObject *saved;   /* what entering it saved, for __exit__ */
    PyObject *weakrefs;
    long long serial;  /* the stream's acquisition number: tags this lease's errors */
} LeaseCore;

static PyTypeObject LeaseCoreType;

/* An empty lease, allocated before the stream is taken (see the top comment). */
static inline LeaseCore *
alloc_lease(void)
{
    if (lease_class == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cupystreams._fastpath is not configured");
        return NULL;
    }
    return (LeaseCore *)lease_class->tp_alloc(lease_class, 0);
}

/* Hand `stream`, just taken from its lane, to the empty `lease`; steals the
 * reference to `stream`. Allocates nothing. */
static PyObject *
start_lease(LeaseCore *lease, StreamCore *stream, PyObject *key)
{
    stream->acquisitions += 1;
    stream->lease_start = now_ns();
    Py_XSETREF(stream->state, Py_NewRef(state_leased));
    lease->stream = (PyObject *)stream;
    lease->key = key == Py_None ? NULL : Py_XNewRef(key);
    lease->serial = stream->acquisitions;
    return (PyObject *)lease;
}

static int
lease_traverse(LeaseCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->stream);
    Py_VISIT(self->key);
    Py_VISIT(self->entered);
    Py_VISIT(self->saved);
    return 0;
}

static int
lease_clear(LeaseCore *self)
{
    Py_CLEAR(self->stream);
    Py_CLEAR(self->key);
    Py_CLEAR(self->entered);
    Py_CLEAR(self->saved);
    return 0;
}

static void
lease_dealloc(LeaseCore *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    lease_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A lease collected while still held goes back through Python, which warns. */
static void
lease_finalize(LeaseCore *self)
{
    if (self->stream == NULL) {
        return;
    }
    PyObject *pending = take_exception();
    PyObject *result = PyObject_CallMethodNoArgs((PyObject *)self, str_release_dropped);
    if (result == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    Py_XDECREF(result);
    give_exception(pending);
}

static PyObject *
release_slow(LeaseCore *self, PyObject *stream)
{
    Py_INCREF(stream);
    PyObject *pool = PyObject_GetAttr(stream, str_pool);
    PyObject *result = NULL;
    if (pool != NULL) {
        result = PyObject_CallMethodObjArgs(pool, str_release_slow, (PyObject *)self, stream, NULL);
        Py_DECREF(pool);
    }
    Py_DECREF(stream);
    return result;
}

PyDoc_STRVAR(lease_release_doc,
"release($self, /)\n--\n\n"
"Return the stream to the pool; a second call raises ``LeaseError``.\n\n"
"Raises:\n"
"    LeaseError: Released already, or the stream is still capturing a\n"
"        CUDA graph (end the capture first).");

static PyObject *
lease_release(LeaseCore *self, PyObject *Py_UNUSED(ignored))
{
    StreamCore *stream = (StreamCore *)self->stream;
    if (stream == NULL) {
        PyErr_SetString(lease_error, "this lease was already released");
        return NULL;
    }
    LaneCore *lane = (LaneCore *)stream->lane;
    if (self->key != NULL || stream->state != state_leased || lane == NULL
        || lane->idle == NULL || stream_may_be_capturing(stream)) {
        return release_slow(self, (PyObject *)stream);
    }
    /* The lease's reference moves to the idle list. */
    self->stream = NULL;
    stream->active_ns += now_ns() - stream->lease_start;
    Py_XSETREF(stream->state, Py_NewRef(state_idle));
    int appended = PyList_Append(lane->idle, (PyObject *)stream);
    Py_DECREF(stream);
    if (appended < 0) {
        return NULL;
    }
    Py_ssize_t waiting = lane->waiters == NULL ? 0 : PyObject_Length(lane->waiters);
    if (waiting < 0) {
        return NULL;
    }
    if (waiting > 0) {
        /* Under the pool's lock, the oldest waiter gets a stream. */
        return PyObject_CallMethodNoArgs((PyObject *)lane, str_hand_off_locked);
    }
    Py_RETURN_NONE;
}

/* Make `handle`, the stream's backend stream, current: CuPy's switch in C, or
 * the backend's enter(). Returns what switch_back needs. */
static PyObject *
switch_to(StreamCore *stream, PyObject *handle)
{
    if (stream->cupy_current) {
        return make_current(stream->device, handle);
    }
    if (stream->backend == NULL) {
        PyErr_SetString(PyExc_TypeError, "this stream has no backend");
        return NULL;
    }
    return PyObject_CallMethodOneArg(stream->backend, str_enter, handle);
}

/* Undo switch_to(stream, ...), which returned `saved`. */
static PyObject *
switch_back(StreamCore *stream, PyObject *saved)
{
    if (stream->cupy_current) {
        return restore_current(stream->device, saved);
    }
    if (stream->backend == NULL) {
        PyErr_SetString(PyExc_TypeError, "this stream has no backend");
        return NULL;
    }
    return PyObject_CallMethodOneArg(stream->backend, str_exit, saved);
}

PyDoc_STRVAR(lease_enter_doc,
"__enter__($self, /)\n--\n\n"
"Make the lease's device and stream current on this thread (CuPy's and the pool's).");

static PyObject *
lease_enter(LeaseCore *self, PyObject *Py_UNUSED(ignored))
{
    StreamCore *stream = (StreamCore *)self->stream;
    if (stream == NULL) {
        PyErr_SetString(lease_error, "this lease was released; acquire a new one");
        return NULL;
    }
    /* close() drops the handle after marking the pool closed: a missing
     * handle is a close() that raced this call, and Python says so. */
    PyObject *handle = stream->handle;
    if (handle == NULL || handle == Py_None || stream->state != state_leased) {
        PyObject *open = PyObject_CallMethodNoArgs((PyObject *)stream, str_check_open);
        if (open == NULL) {
            return NULL;
        }
        Py_DECREF(open);
        handle = stream->handle;
        if (handle == NULL || handle == Py_None) {
            PyErr_SetString(lease_error, "this lease's stream is gone; acquire a new one");
            return NULL;
        }
    }
    if (self->entered != NULL) {
        PyErr_SetString(lease_error, "this lease is already entered; a lease is entered once");
        return NULL;
    }
    /* Claimed before the switch, which runs Python code: a second __enter__
     * meanwhile (another thread, a finalizer) is refused, not interleaved. */
    self->entered = Py_NewRef((PyObject *)stream);
    Py_INCREF(handle);
    PyObject *saved = switch_to(stream, handle);
    Py_DECREF(handle);
    if (saved == NULL) {
        Py_CLEAR(self->entered);
        return NULL;
    }
    Py_XSETREF(self->saved, saved);
    return Py_NewRef((PyObject *)self);
}

PyDoc_STRVAR(lease_exit_doc,
"__exit__($self, exc_type, exc, traceback, /)\n--\n\n"
"Restore the device and stream current before ``__enter__``, then release.");

static PyObject *
lease_exit(LeaseCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "__exit__() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *entered = self->entered, *saved = self->saved;
    self->entered = self->saved = NULL;
    PyObject *failure = NULL;
    if (entered != NULL && saved != NULL) {  /* no saved: an __enter__ still under way */
        /* The stream entered, not the lease's: the block may have released it. */
        PyObject *restored = switch_back((StreamCore *)entered, saved);
        if (restored == NULL) {
            failure = take_exception();
        }
        Py_XDECREF(restored);
    }
    Py_XDECREF(entered);
    Py_XDECREF(saved);
    if (self->stream != NULL) {
        /* A subclass (a traced lease) may wrap release(). */
        PyObject *released = Py_IS_TYPE(self, lease_class)
                                 ? lease_release(self, NULL)
                                 : PyObject_CallMethodNoArgs((PyObject *)self, str_release);
        if (released == NULL) {
            chain_exception(failure);
            return NULL;
        }
        Py_DECREF(released);
    }
    if (failure != NULL) {
        give_exception(failure);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(lease_take_stream_doc,
"_take_stream($self, /)\n--\n\n"
"End the lease here and return its stream (None if it had ended): for the\n"
"pool's slow paths, which then decide where the stream goes.");

static PyObject *
lease_take_stream(LeaseCore *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *stream = self->stream;
    self->stream = NULL;
    return stream != NULL ? stream : Py_NewRef(Py_None);
}

static PyMethodDef lease_methods[] = {
    {"release", (PyCFunction)lease_release, METH_NOARGS, lease_release_doc},
    {"__enter__", (PyCFunction)lease_enter, METH_NOARGS, lease_enter_doc},
    {"__exit__", (PyCFunction)(void (*)(void))lease_exit, METH_FASTCALL, lease_exit_doc},
    {"_take_stream", (PyCFunction)lease_take_stream, METH_NOARGS, lease_take_stream_doc},
    {NULL},
};

static PyMemberDef lease_members[] = {
    {"_stream", T_OBJECT, offsetof(LeaseCore, stream), READONLY,
     "The stream held, or None once released."},
    {"_key", T_OBJECT, offsetof(LeaseCore, key), READONLY, NULL},
    {"_serial", T_LONGLONG, offsetof(LeaseCore, serial), READONLY, NULL},
    {NULL},
};

static PyTypeObject LeaseCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.LeaseCore",
    .tp_doc = "What the hot path reads and writes of a StreamLease.",
    .tp_basicsize = sizeof(LeaseCore),
    .tp_weaklistoffset = offsetof(LeaseCore, weakrefs),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)lease_traverse,
    .tp_clear = (inquiry)lease_clear,
    .tp_dealloc = (destructor)lease_dealloc,
    .tp_finalize = (destructor)lease_finalize,
    .tp_methods = lease_methods,
    .tp_members = lease_members,
};

/* ------------------------------------------------------------------ PoolCore */

enum { COMPUTE, COMM, HIGH_PRIORITY, KINDS };

typedef struct {
    PyObject_HEAD
    PyObject *lanes[KINDS];
    char closed;
} PoolCore;

static PyTypeObject PoolCoreType;

static int
pool_traverse(PoolCore *self, visitproc visit, void *arg)
{
    for (int kind = 0; kind < KINDS; kind++) {
        Py_VISIT(self->lanes[kind]);
    }
    return 0;
}

static int
pool_clear(PoolCore *self)
{
    for (int kind = 0; kind < KINDS; kind++) {
        Py_CLEAR(self->lanes[kind]);
    }
    return 0;
}

static void
pool_dealloc(PoolCore *self)
{
    PyObject_GC_UnTrack(self);
    pool_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
pool_set_lane(PoolCore *self, PyObject *value, void *offset)
{
    if (value == NULL || !PyObject_TypeCheck(value, &LaneCoreType)) {
        PyErr_SetString(PyExc_TypeError, "a pool's lanes must be Lanes");
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)self + (Py_ssize_t)offset), Py_NewRef(value));
    return 0;
}

/* Parse (args, kwnames) of a vectorcall into `values` (defaults preset) by
 * the parameter `names`; errors read as Python's own. */
static int
parse_arguments(const char *function, const char *const *names, PyObject **values, int count,
                PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs > count) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", function,
                     count, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        values[i] = args[i];
    }
    Py_ssize_t given = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < given; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int index = -1;
        for (int i = 0; i < count && index < 0; i++) {
            if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) {
                index = i;
            }
        }
        if (index < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         function, name);
            return -1;
        }
        if (index < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", function,
                         names[index]);
            return -1;
        }
        values[index] = args[nargs + k];
    }
    return 0;
}

/* The uncontended acquire; anything else goes to CudaStreamPool._acquire. */
static PyObject *
pool_acquire(PoolCore *self, int kind, PyObject *key, PyObject *blocking, PyObject *timeout)
{
    if (self->lanes[kind] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the pool was not initialized");
        return NULL;
    }
    /* Our own reference: an allocation below may run code that drops the pool's. */
    LaneCore *lane = (LaneCore *)Py_NewRef(self->lanes[kind]);
    PyObject *result = NULL;
    if (key == Py_None && timeout == Py_None && (blocking == Py_True || blocking == Py_False)
        && !self->closed && lane_ready(lane)) {
        LeaseCore *lease = alloc_lease();
        if (lease == NULL) {
            goto finish;
        }
        /* Checked again: the allocation may have run other threads. */
        if (!self->closed && lane_ready(lane)) {
            PyObject *idle = lane->idle;
            if (PyObject_TypeCheck(PyList_GET_ITEM(idle, PyList_GET_SIZE(idle) - 1),
                                   &StreamCoreType)) {
                /* The list's reference becomes the lease's. */
                result = start_lease(lease, (StreamCore *)pop_last(idle), Py_None);
                goto finish;
            }
        }
        Py_DECREF(lease);  /* holds no stream: goes without a trace */
    }
    result = PyObject_CallMethodObjArgs((PyObject *)self, str_acquire, (PyObject *)lane, key,
                                        blocking, timeout, NULL);
finish:
    Py_DECREF(lane);
    return result;
}

static const char *const keyed_names[] = {"affinity_key", "blocking", "timeout"};
static const char *const unkeyed_names[] = {"blocking", "timeout"};

PyDoc_STRVAR(acquire_compute_doc,
"acquire_compute($self, /, affinity_key=None, blocking=True, timeout=None)\n--\n\n"
"Lease a compute stream.\n\n"
"Args:\n"
"    affinity_key: Orders this lease after every earlier lease with the\n"
"        same key, on whatever stream it gets; at most one live lease\n"
"        per key.\n"
"    blocking: Wait for a stream (first come, first served); False\n"
"        raises ``PoolExhaustedError`` at once when none is idle.\n"
"    timeout: Seconds to wait at most (None: no limit).\n\n"
"Raises:\n"
"    PoolExhaustedError, PoolTimeoutError, PoolClosedError, LeaseError.");

static PyObject *
pool_acquire_keyed(PoolCore *self, int kind, const char *function, PyObject *const *args,
                   Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *values[3] = {Py_None, Py_True, Py_None};
    if ((nargs != 0 || kwnames != NULL)
        && parse_arguments(function, keyed_names, values, 3, args, nargs, kwnames) < 0) {
        return NULL;
    }
    return pool_acquire(self, kind, values[0], values[1], values[2]);
}

static PyObject *
pool_acquire_compute(PoolCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return pool_acquire_keyed(self, COMPUTE, "acquire_compute", args, nargs, kwnames);
}

PyDoc_STRVAR(acquire_comm_doc,
"acquire_comm($self, /, affinity_key=None, blocking=True, timeout=None)\n--\n\n"
"Lease a communication stream; arguments as ``acquire_compute``.");

static PyObject *
pool_acquire_comm(PoolCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return pool_acquire_keyed(self, COMM, "acquire_comm", args, nargs, kwnames);
}

PyDoc_STRVAR(acquire_high_priority_doc,
"acquire_high_priority($self, /, blocking=True, timeout=None)\n--\n\n"
"Lease a high-priority stream; arguments as ``acquire_compute``.");

static PyObject *
pool_acquire_high_priority(PoolCore *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *values[2] = {Py_True, Py_None};
    if ((nargs != 0 || kwnames != NULL)
        && parse_arguments("acquire_high_priority", unkeyed_names, values, 2, args, nargs,
                           kwnames) < 0) {
        return NULL;
    }
    return pool_acquire(self, HIGH_PRIORITY, Py_None, values[0], values[1]);
}

static PyMethodDef pool_methods[] = {
    {"acquire_compute", (PyCFunction)(void (*)(void))pool_acquire_compute,
     METH_FASTCALL | METH_KEYWORDS, acquire_compute_doc},
    {"acquire_comm", (PyCFunction)(void (*)(void))pool_acquire_comm,
     METH_FASTCALL | METH_KEYWORDS, acquire_comm_doc},
    {"acquire_high_priority", (PyCFunction)(void (*)(void))pool_acquire_high_priority,
     METH_FASTCALL | METH_KEYWORDS, acquire_high_priority_doc},
    {NULL},
};

static PyMemberDef pool_members[] = {
    {"_closed", T_BOOL, offsetof(PoolCore, closed), 0, NULL},
    {NULL},
};

static PyGetSetDef pool_getset[] = {
    {"_compute", get_object_or_none, (setter)pool_set_lane, NULL,
     (void *)offsetof(PoolCore, lanes[COMPUTE])},
    {"_comm", get_object_or_none, (setter)pool_set_lane, NULL,
     (void *)offsetof(PoolCore, lanes[COMM])},
    {"_high", get_object_or_none, (setter)pool_set_lane, NULL,
     (void *)offsetof(PoolCore, lanes[HIGH_PRIORITY])},
    {NULL},
};

static PyTypeObject PoolCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.PoolCore",
    .tp_doc = "What the hot path reads of a CudaStreamPool, and its acquire methods.",
    .tp_basicsize = sizeof(PoolCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)pool_traverse,
    .tp_clear = (inquiry)pool_clear,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_methods = pool_methods,
    .tp_members = pool_members,
    .tp_getset = pool_getset,
};

/* ----------------------------------------------------------------- EventCore */

typedef struct {
    PyObject_HEAD
    PyObject *handle;    /* the backend's event; NULL once released */
    PyObject *pool;      /* its EventPoolCore */
    long long event_id;
    char held;           /* cleared, once, by the release that wins */
} EventCore;

static PyTypeObject EventCoreType;

static int
event_traverse(EventCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handle);
    Py_VISIT(self->pool);
    return 0;
}

static int
event_clear(EventCore *self)
{
    Py_CLEAR(self->handle);
    Py_CLEAR(self->pool);
    return 0;
}

static void
event_dealloc(EventCore *self)
{
    PyObject_GC_UnTrack(self);
    event_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An empty event, allocated before anything is taken (see the top comment). */
static inline EventCore *
alloc_event(void)
{
    if (event_class == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cupystreams._fastpath is not configured");
        return NULL;
    }
    return (EventCore *)event_class->tp_alloc(event_class, 0);
}

/* Make the empty `event` a held event of `pool` for `handle`: a new object for
 * every acquire, so that a released one stays dead after its CUDA event is
 * handed to someone else. Allocates nothing. */
static PyObject *
start_event(EventCore *event, PyObject *pool, PyObject *handle, long long event_id)
{
    event->handle = Py_NewRef(handle);
    event->pool = Py_NewRef(pool);
    event->event_id = event_id;
    event->held = 1;
    return (PyObject *)event;
}

PyDoc_STRVAR(event_take_hold_doc,
"_take_hold($self, /)\n--\n\n"
"End the hold here: the backend event for the one caller that ends it, None\n"
"after that. A released event keeps no reference to its backend event.");

static PyObject *
event_take_hold(EventCore *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *handle = self->held ? self->handle : NULL;
    self->held = 0;
    self->handle = NULL;
    return handle != NULL ? handle : Py_NewRef(Py_None);
}

static PyMethodDef event_methods[] = {
    {"_take_hold", (PyCFunction)event_take_hold, METH_NOARGS, event_take_hold_doc},
    {NULL},
};

static PyMemberDef event_members[] = {
    {"_handle", T_OBJECT, offsetof(EventCore, handle), READONLY, NULL},
    {"_pool", T_OBJECT, offsetof(EventCore, pool), READONLY, NULL},
    {"event_id", T_LONGLONG, offsetof(EventCore, event_id), READONLY,
     "The event's number in its pool, for messages."},
    {"_held", T_BOOL, offsetof(EventCore, held), READONLY, NULL},
    {NULL},
};

static PyTypeObject EventCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.EventCore",
    .tp_doc = "What the hot path reads and writes of a PooledEvent.",
    .tp_basicsize = sizeof(EventCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)event_traverse,
    .tp_clear = (inquiry)event_clear,
    .tp_dealloc = (destructor)event_dealloc,
    .tp_methods = event_methods,
    .tp_members = event_members,
};

/* ------------------------------------------------------------- EventPoolCore */

typedef struct {
    PyObject_HEAD
    PyObject *idle;           /* list of (handle, event_id), popped and appended at its end */
    PyObject *closed_reason;  /* why the pool stopped serving, or NULL/None while it serves */
    Py_ssize_t max_size;      /* bound on the idle events kept */
} EventPoolCore;

static PyTypeObject EventPoolCoreType;

static int
event_pool_traverse(EventPoolCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->idle);
    Py_VISIT(self->closed_reason);
    return 0;
}

static int
event_pool_clear(EventPoolCore *self)
{
    Py_CLEAR(self->idle);
    Py_CLEAR(self->closed_reason);
    return 0;
}

static void
event_pool_dealloc(EventPoolCore *self)
{
    PyObject_GC_UnTrack(self);
    event_pool_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int
event_pool_serving(EventPoolCore *self)
{
    return (self->closed_reason == NULL || self->closed_reason == Py_None) && self->idle != NULL;
}

PyDoc_STRVAR(event_pool_acquire_doc,
"acquire($self, /)\n--\n\n"
"Take an idle event, creating one if none is idle.");

static PyObject *
event_pool_acquire(EventPoolCore *self, PyObject *Py_UNUSED(ignored))
{
    if (event_pool_serving(self) && PyList_GET_SIZE(self->idle) > 0) {
        EventCore *event = alloc_event();
        if (event == NULL) {
            return NULL;
        }
        /* Checked again: the allocation may have run other threads. */
        PyObject *idle = self->idle;
        Py_ssize_t size = event_pool_serving(self) ? PyList_GET_SIZE(idle) : 0;
        PyObject *entry = size == 0 ? NULL : PyList_GET_ITEM(idle, size - 1);
        if (entry != NULL && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2
            && PyLong_CheckExact(PyTuple_GET_ITEM(entry, 1))) {
            long long event_id = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
            if (event_id == -1 && PyErr_Occurred()) {
                Py_DECREF(event);
                return NULL;
            }
            start_event(event, (PyObject *)self, PyTuple_GET_ITEM(entry, 0), event_id);
            Py_DECREF(pop_last(idle));  /* the entry's handle is the event's now */
            return (PyObject *)event;
        }
        Py_DECREF(event);
    }
    return PyObject_CallMethodNoArgs((PyObject *)self, str_acquire_slow);
}

PyDoc_STRVAR(event_pool_release_doc,
"release($self, event, /)\n--\n\n"
"Return ``event``; releasing twice or to another pool raises ``LeaseError``.");

static PyObject *
event_pool_release(EventPoolCore *self, PyObject *argument)
{
    if (PyObject_TypeCheck(argument, &EventCoreType) && event_pool_serving(self)) {
        EventCore *event = (EventCore *)argument;
        if (event->pool == (PyObject *)self && event->held && event->handle != NULL) {
            PyObject *id = PyLong_FromLongLong(event->event_id);
            PyObject *entry = id == NULL ? NULL : PyTuple_Pack(2, event->handle, id);
            Py_XDECREF(id);
            if (entry == NULL) {
                return NULL;  /* still held: nothing changed */
            }
            /* Checked after the allocations, which may have run other threads. */
            if (event->held && event_pool_serving(self)
                && PyList_GET_SIZE(self->idle) < self->max_size) {
                int appended = PyList_Append(self->idle, entry);
                Py_DECREF(entry);
                if (appended < 0) {
                    return NULL;  /* still held: nothing changed */
                }
                /* Released: the entry holds the backend event now, not this
                 * object, which may be freed late (in a garbage collection
                 * on a CUDA callback thread, where CUDA calls fail). */
                event->held = 0;
                Py_CLEAR(event->handle);
                Py_RETURN_NONE;
            }
            Py_DECREF(entry);
        }
    }
    /* Errors, a full or closed pool: Python decides. */
    return PyObject_CallMethodOneArg((PyObject *)self, str_release_slow, argument);
}

static PyMethodDef event_pool_methods[] = {
    {"acquire", (PyCFunction)event_pool_acquire, METH_NOARGS, event_pool_acquire_doc},
    {"release", (PyCFunction)event_pool_release, METH_O, event_pool_release_doc},
    {NULL},
};

static int
event_pool_set_idle(EventPoolCore *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "EventPool._idle must be a list");
        return -1;
    }
    Py_XSETREF(self->idle, Py_NewRef(value));
    return 0;
}

static PyMemberDef event_pool_members[] = {
    {"_closed_reason", T_OBJECT, offsetof(EventPoolCore, closed_reason), 0, NULL},
    {"max_size", T_PYSSIZET, offsetof(EventPoolCore, max_size), 0,
     "Bound on the idle events kept; a release beyond it destroys the event."},
    {NULL},
};

static PyGetSetDef event_pool_getset[] = {
    {"_idle", get_object_or_none, (setter)event_pool_set_idle,
     "Idle events as (handle, event_id), a list.", (void *)offsetof(EventPoolCore, idle)},
    {NULL},
};

static PyTypeObject EventPoolCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cupystreams._fastpath.EventPoolCore",
    .tp_doc = "What the hot path reads of an EventPool, and its acquire and release.",
    .tp_basicsize = sizeof(EventPoolCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)event_pool_traverse,
    .tp_clear = (inquiry)event_pool_clear,
    .tp_dealloc = (destructor)event_pool_dealloc,
    .tp_methods = event_pool_methods,
    .tp_members = event_pool_members,
    .tp_getset = event_pool_getset,
};

/* -------------------------------------------------------------------- module */

PyDoc_STRVAR(new_event_doc,
"new_event(pool, handle, event_id, /)\n--\n\n"
"A fresh held ``PooledEvent`` of ``pool`` for the backend event ``handle``.");

static PyObject *
module_new_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyObject_TypeCheck(args[0], &EventPoolCoreType)) {
        PyErr_SetString(PyExc_TypeError, "new_event(pool, handle, event_id) takes an EventPool");
        return NULL;
    }
    long long event_id = PyLong_AsLongLong(args[2]);
    if (event_id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    EventCore *event = alloc_event();
    if (event == NULL) {
        return NULL;
    }
    return start_event(event, args[0], args[1], event_id);
}


PyDoc_STRVAR(new_lease_doc,
"new_lease(stream, key, /)\n--\n\n"
"Hand ``stream``, just taken from its lane, to a fresh lease with affinity ``key``.");

static PyObject *
module_new_lease(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyObject_TypeCheck(args[0], &StreamCoreType)) {
        PyErr_SetString(PyExc_TypeError, "new_lease(stream, key) takes a PooledStream and a key");
        return NULL;
    }
    LeaseCore *lease = alloc_lease();
    if (lease == NULL) {
        return NULL;
    }
    return start_lease(lease, (StreamCore *)Py_NewRef(args[0]), args[1]);
}

PyDoc_STRVAR(now_ns_doc,
"now_ns($module, /)\n--\n\n"
"The perf-counter clock in ns (as ``time.perf_counter_ns()``), as leases read it.");

static PyObject *
module_now_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(now_ns());
}

PyDoc_STRVAR(configure_doc,
"configure($module, /, lease_class, event_class, lease_error, leased, idle)\n--\n\n"
"Name the Python objects the hot path creates, raises and compares; once, at import.");

static int
is_strict_subclass(PyObject *cls, PyTypeObject *base)
{
    return PyType_Check(cls) && (PyTypeObject *)cls != base
           && PyType_IsSubtype((PyTypeObject *)cls, base);
}

static PyObject *
module_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"lease_class", "event_class", "lease_error", "leased", "idle",
                               NULL};
    PyObject *cls, *events, *error, *leased, *idle;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO:configure", keywords, &cls, &events,
                                     &error, &leased, &idle)) {
        return NULL;
    }
    if (!is_strict_subclass(cls, &LeaseCoreType) || !is_strict_subclass(events, &EventCoreType)) {
        PyErr_SetString(PyExc_TypeError,
                        "lease_class and event_class must subclass LeaseCore and EventCore");
        return NULL;
    }
    Py_XSETREF(lease_class, (PyTypeObject *)Py_NewRef(cls));
    Py_XSETREF(event_class, (PyTypeObject *)Py_NewRef(events));
    Py_XSETREF(lease_error, Py_NewRef(error));
    Py_XSETREF(state_leased, Py_NewRef(leased));
    Py_XSETREF(state_idle, Py_NewRef(idle));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_capture_query_doc,
"set_capture_query($module, address, /)\n--\n\n"
"Use the driver's ``cuStreamIsCapturing`` at ``address`` for the release check.\n\n"
"Without it, a stream with a capture handle always releases through Python.");

static PyObject *
module_set_capture_query(PyObject *module, PyObject *address)
{
    void *pointer = PyLong_AsVoidPtr(address);
    if (pointer == NULL && PyErr_Occurred()) {
        return NULL;
    }
    capture_query = (capture_query_t)pointer;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(make_current_doc,
"make_current($module, device, stream, /)\n--\n\n"
"Make ``device`` and its CuPy ``stream`` current on this thread.\n\n"
"Returns what ``restore_current`` needs to put back the previous device and\n"
"that device's previous stream. If a step fails, the device switch is undone.");

/* The (device, object) arguments of make_current and restore_current. */
static int
device_and_object(const char *usage, PyObject *const *args, Py_ssize_t nargs, long *device)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s takes 2 arguments", usage);
        return -1;
    }
    *device = PyLong_AsLong(args[0]);
    return *device == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
module_make_current(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long device;
    if (device_and_object("make_current(device, stream)", args, nargs, &device) < 0) {
        return NULL;
    }
    return make_current(device, args[1]);
}

PyDoc_STRVAR(restore_current_doc,
"restore_current($module, device, saved, /)\n--\n\n"
"Undo ``make_current(device, ...)``, which returned ``saved``.");

static PyObject *
module_restore_current(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long device;
    if (device_and_object("restore_current(device, saved)", args, nargs, &device) < 0) {
        return NULL;
    }
    return restore_current(device, args[1]);
}

PyDoc_STRVAR(configure_cupy_doc,
"configure_cupy($module, /, get_device, set_device, get_current_stream)\n--\n\n"
"Name CuPy's calls that make_current and restore_current make; once, at import.");

static PyObject *
module_configure_cupy(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"get_device", "set_device", "get_current_stream", NULL};
    PyObject *get_device, *set_device, *get_current_stream;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:configure_cupy", keywords, &get_device,
                                     &set_device, &get_current_stream)) {
        return NULL;
    }
    Py_XSETREF(cupy_get_device, Py_NewRef(get_device));
    Py_XSETREF(cupy_set_device, Py_NewRef(set_device));
    Py_XSETREF(cupy_get_current_stream, Py_NewRef(get_current_stream));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"make_current", (PyCFunction)(void (*)(void))module_make_current, METH_FASTCALL,
     make_current_doc},
    {"restore_current", (PyCFunction)(void (*)(void))module_restore_current, METH_FASTCALL,
     restore_current_doc},
    {"configure_cupy", (PyCFunction)(void (*)(void))module_configure_cupy,
     METH_VARARGS | METH_KEYWORDS, configure_cupy_doc},
    {"new_lease", (PyCFunction)(void (*)(void))module_new_lease, METH_FASTCALL, new_lease_doc},
    {"new_event", (PyCFunction)(void (*)(void))module_new_event, METH_FASTCALL, new_event_doc},
    {"now_ns", module_now_ns, METH_NOARGS, now_ns_doc},
    {"configure", (PyCFunction)(void (*)(void))module_configure, METH_VARARGS | METH_KEYWORDS,
     configure_doc},
    {"set_capture_query", module_set_capture_query, METH_O, set_capture_query_doc},
    {NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cupystreams._fastpath",
    .m_doc = "The lease hot path in C; see the comment at the top of _fastpath.c.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyTypeObject *types[] = {&LaneCoreType,  &StreamCoreType, &LeaseCoreType,
                             &PoolCoreType,  &EventCoreType,  &EventPoolCoreType};
    const char *names[] = {"LaneCore",  "StreamCore", "LeaseCore",
                           "PoolCore",  "EventCore",  "EventPoolCore"};
    struct {
        PyObject **slot;
        const char *text;
    } strings[] = {
        {&str_acquire, "_acquire"},
        {&str_release_slow, "_release_slow"},
        {&str_pool, "_pool"},
        {&str_hand_off_locked, "hand_off_locked"},
        {&str_release_dropped, "_release_dropped"},
        {&str_check_open, "_check_open"},
        {&str_enter, "enter"},
        {&str_exit, "exit"},
        {&str_release, "release"},
        {&str_use, "use"},
        {&str_acquire_slow, "_acquire_slow"},
    };
    for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++) {
        if (*strings[i].slot == NULL
            && (*strings[i].slot = PyUnicode_InternFromString(strings[i].text)) == NULL) {
            return NULL;
        }
    }
    if (deque_type == NULL) {
        PyObject *collections = PyImport_ImportModule("collections");
        PyObject *deque = collections ? PyObject_GetAttrString(collections, "deque") : NULL;
        Py_XDECREF(collections);
        if (deque == NULL) {
            return NULL;
        }
        deque_type = (PyTypeObject *)deque;
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0
            || PyModule_AddObjectRef(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    return module;
}
