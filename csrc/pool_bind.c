/* pool_bind.c - the Python face of the CPU output cache (cpu_pool.h). */
#include "binding.h"

#include <string.h>
#include "cpu_pool.h"

/* The legacy (unversioned) DLPack struct: every torch >= 1.x consumes it, the
 * versioned one only newer releases. */
typedef struct pool_tensor {
    DLManagedTensor mt; /* first: the deleter casts back */
    size_t nbytes;
    int64_t shape[];
} pool_tensor;

static void pool_tensor_deleter(DLManagedTensor *self)
{
    pool_tensor *pt = (pool_tensor *)self;
    qvit_pool_free(self->dl_tensor.data, pt->nbytes);
    free(pt);
}

/* A capsule nobody consumed still owns its tensor (DLPack's capsule rule). */
static void pool_capsule_destructor(PyObject *cap)
{
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (mt && mt->deleter) {
            mt->deleter(mt);
        }
    }
}

#define QVIT_POOL_MAX_NDIM 64

PyDoc_STRVAR(cpu_empty_doc,
"cpu_empty($module, shape, dtype, /)\n"
"--\n"
"\n"
"A new contiguous CPU tensor of `shape` and `dtype` (\"float32\", \"float16\",\n"
"\"bfloat16\", \"float64\") backed by qvit's output cache, as an unconsumed\n"
"\"dltensor\" capsule for torch.from_dlpack. The\n"
"memory goes back to the cache when the consumer frees it. Contents are\n"
"unspecified.");

static PyObject *cpu_empty(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *shape_obj;
    const char *dtype;
    if (!PyArg_ParseTuple(args, "Os:cpu_empty", &shape_obj, &dtype)) {
        return NULL;
    }
    DLDataType dt;
    if (strcmp(dtype, "float32") == 0) {
        dt.code = kDLFloat, dt.bits = 32;
    } else if (strcmp(dtype, "float16") == 0) {
        dt.code = kDLFloat, dt.bits = 16;
    } else if (strcmp(dtype, "bfloat16") == 0) {
        dt.code = kDLBfloat, dt.bits = 16;
    } else if (strcmp(dtype, "float64") == 0) {
        dt.code = kDLFloat, dt.bits = 64;
    } else {
        PyErr_Format(PyExc_ValueError, "qvit: cpu_empty: dtype must be float32, float16, "
                     "bfloat16 or float64, got '%s'", dtype);
        return NULL;
    }
    dt.lanes = 1;
    PyObject *seq = PySequence_Fast(shape_obj, "qvit: cpu_empty: shape must be a sequence of ints");
    if (!seq) {
        return NULL;
    }
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(seq);
    if (nd > QVIT_POOL_MAX_NDIM) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "qvit: cpu_empty: at most %d dims, got %zd",
                     QVIT_POOL_MAX_NDIM, nd);
        return NULL;
    }
    int64_t dims[QVIT_POOL_MAX_NDIM];
    uint64_t numel = 1;
    int too_big = 0;
    for (Py_ssize_t i = 0; i < nd; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyLong_Check(o)) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_TypeError, "qvit: cpu_empty: shape[%zd] must be an int, got %s",
                         i, Py_TYPE(o)->tp_name);
            return NULL;
        }
        long long d = PyLong_AsLongLong(o);
        if (d == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (d < 0) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "qvit: cpu_empty: shape[%zd] is negative (%lld)", i, d);
            return NULL;
        }
        dims[i] = (int64_t)d;
        if (d != 0 && numel > (uint64_t)PY_SSIZE_T_MAX / (uint64_t)d) {
            too_big = 1;
        }
        numel *= (uint64_t)d;
    }
    Py_DECREF(seq);
    uint64_t item = dt.bits / 8;
    if (too_big || numel > (uint64_t)PY_SSIZE_T_MAX / item) {
        PyErr_SetString(PyExc_ValueError, "qvit: cpu_empty: the tensor's size overflows");
        return NULL;
    }
    size_t nbytes = (size_t)(numel * item);
    pool_tensor *pt = (pool_tensor *)malloc(sizeof(pool_tensor) + (size_t)nd * sizeof(int64_t));
    if (!pt) {
        return PyErr_NoMemory();
    }
    void *data = qvit_pool_alloc(nbytes);
    if (!data) {
        free(pt);
        return PyErr_NoMemory();
    }
    memset(&pt->mt, 0, sizeof pt->mt);
    pt->nbytes = nbytes;
    for (Py_ssize_t i = 0; i < nd; i++) {
        pt->shape[i] = dims[i];
    }
    pt->mt.manager_ctx = NULL;
    pt->mt.deleter = pool_tensor_deleter;
    pt->mt.dl_tensor.data = data;
    pt->mt.dl_tensor.device.device_type = kDLCPU;
    pt->mt.dl_tensor.device.device_id = 0;
    pt->mt.dl_tensor.ndim = (int32_t)nd;
    pt->mt.dl_tensor.dtype = dt;
    pt->mt.dl_tensor.shape = pt->shape;
    pt->mt.dl_tensor.strides = NULL;
    pt->mt.dl_tensor.byte_offset = 0;
    PyObject *cap = PyCapsule_New(&pt->mt, "dltensor", pool_capsule_destructor);
    if (!cap) {
        pool_tensor_deleter(&pt->mt);
        return NULL;
    }
    return cap;
}

PyDoc_STRVAR(cpu_pool_stats_doc,
"cpu_pool_stats($module, /)\n"
"--\n"
"\n"
"The output cache's counters: cached_bytes, cached_blocks, live_bytes,\n"
"limit_bytes, hits, misses.");

static PyObject *cpu_pool_stats(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    qvit_pool_stats s;
    qvit_pool_get_stats(&s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "cached_bytes",
                         (unsigned long long)s.cached_bytes, "cached_blocks",
                         (unsigned long long)s.cached_blocks, "live_bytes",
                         (unsigned long long)s.live_bytes, "limit_bytes",
                         (unsigned long long)s.limit_bytes, "hits", (unsigned long long)s.hits,
                         "misses", (unsigned long long)s.misses);
}

PyDoc_STRVAR(cpu_pool_release_doc,
"cpu_pool_release($module, /)\n"
"--\n"
"\n"
"Returns every cached block to the system; returns the bytes released.");

static PyObject *cpu_pool_release(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(qvit_pool_release());
}

PyDoc_STRVAR(cpu_pool_set_limit_doc,
"cpu_pool_set_limit($module, nbytes, /)\n"
"--\n"
"\n"
"Caps the bytes the output cache keeps (0: keep nothing); returns the old cap.");

static PyObject *cpu_pool_set_limit(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "qvit: cpu_pool_set_limit: nbytes must be an int, got %s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "qvit: cpu_pool_set_limit: nbytes must be >= 0, got %lld",
                     v);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(qvit_pool_set_limit((uint64_t)v));
}

PyMethodDef qv_pool_methods[] = {
    {"cpu_empty", cpu_empty, METH_VARARGS, cpu_empty_doc},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS, cpu_pool_stats_doc},
    {"cpu_pool_release", cpu_pool_release, METH_NOARGS, cpu_pool_release_doc},
    {"cpu_pool_set_limit", cpu_pool_set_limit, METH_O, cpu_pool_set_limit_doc},
    {NULL, NULL, 0, NULL},
};
