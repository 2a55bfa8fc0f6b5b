/* module.c - qvit._C, the CPython binding of the fake-quant kernels.
 *
 * Plain C API, multi-phase init (PEP 489), all state in the module object.
 * Tensors arrive through DLPack: torch tensors through torch's DLPack C
 * exchange API once set_exchange_api() registered it (no Python frames, no
 * requires_grad refusal), anything else through __dlpack__ (NumPy) or a raw
 * "dltensor" / "dltensor_versioned" capsule. Every function follows one
 * shape: parse -> view tensors -> validate -> (release the GIL) call the
 * kernel -> map the status -> release views -> return. No arithmetic on
 * tensor data happens here; the kernels live in fq_cpu.c / fq_cuda.cu.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "cpu_pool.h"
#include "dlpack.h"
#include "qvit.h"

/* Below this many elements the GIL is kept: releasing costs more than the loop. */
#define QVIT_GIL_RELEASE_MIN 16384

typedef struct qvit_state {
    PyObject *KernelError;
    PyObject *tensor_type;         /* torch._C.TensorBase, or NULL */
    PyObject *api_owner;           /* keeps the exchange API capsule / int alive */
    const DLPackExchangeAPI *api;  /* NULL until set_exchange_api() */
    PyObject *str_dlpack;          /* "__dlpack__" */
    PyObject *max_version;         /* (1, 0) */
    PyObject *kwnames_max_version; /* ("max_version",) */
    PyObject *names_fwd[11];       /* interned argument names of fq_forward */
    PyObject *names_bwd[17];       /* ... and of fq_backward */
} qvit_state;

static inline qvit_state *get_state(PyObject *module)
{
    return (qvit_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------ */
/* Tensor views */

typedef struct tview {
    DLTensor t;
    const char *name;                      /* argument name, for messages */
    PyObject *capsule;                     /* owned capsule, or NULL */
    DLManagedTensor *legacy;               /* deleter to call, or NULL */
    DLManagedTensorVersioned *versioned;   /* deleter to call, or NULL */
    int read_only;
    int valid;
} tview;

static void view_release(tview *v)
{
    if (v->versioned && v->versioned->deleter) {
        v->versioned->deleter(v->versioned);
    }
    if (v->legacy && v->legacy->deleter) {
        v->legacy->deleter(v->legacy);
    }
    v->versioned = NULL;
    v->legacy = NULL;
    Py_CLEAR(v->capsule);
    v->valid = 0;
}

/* Takes ownership of the DLPack capsule `cap` (a new reference). */
static int view_from_capsule(tview *v, PyObject *cap)
{
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!mt) {
            Py_DECREF(cap);
            return -1;
        }
        if (mt->version.major != QVIT_DLPACK_MAJOR) {
            /* Not renamed: the capsule's destructor still owns the tensor. */
            PyErr_Format(PyExc_TypeError,
                         "qvit: %s is a DLPack %u.%u tensor; only major version 1 is supported",
                         v->name, (unsigned)mt->version.major, (unsigned)mt->version.minor);
            Py_DECREF(cap);
            return -1;
        }
        if (PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) {
            Py_DECREF(cap);
            return -1;
        }
        v->versioned = mt;
        v->t = mt->dl_tensor;
        v->read_only = (mt->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = PyCapsule_GetPointer(cap, "dltensor");
        if (!mt) {
            Py_DECREF(cap);
            return -1;
        }
        if (PyCapsule_SetName(cap, "used_dltensor") < 0) {
            Py_DECREF(cap);
            return -1;
        }
        v->legacy = mt;
        v->t = mt->dl_tensor;
    } else {
        PyErr_Format(PyExc_TypeError,
                     "qvit: %s is not a usable DLPack capsule (already consumed, or not a "
                     "'dltensor' / 'dltensor_versioned' capsule)", v->name);
        Py_DECREF(cap);
        return -1;
    }
    v->capsule = cap;
    v->valid = 1;
    return 0;
}

/* Calls obj.__dlpack__(max_version=(1, 0)); older producers reject the
 * keyword with TypeError and are asked again without it. */
static PyObject *call_dlpack(qvit_state *st, PyObject *obj, const char *name)
{
    PyObject *meth = PyObject_GetAttr(obj, st->str_dlpack);
    if (!meth) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "qvit: %s must be a tensor supporting DLPack (a torch tensor, a NumPy "
                         "array or a DLPack capsule), got %.200s", name, Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    PyObject *args[1] = {st->max_version};
    PyObject *cap = PyObject_Vectorcall(meth, args, 0, st->kwnames_max_version);
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        cap = PyObject_CallNoArgs(meth);
    }
    Py_DECREF(meth);
    return cap;
}

static int view_get(qvit_state *st, PyObject *obj, const char *name, tview *v)
{
    memset(v, 0, sizeof *v);
    v->name = name;
    if (st->api && st->tensor_type && PyObject_TypeCheck(obj, (PyTypeObject *)st->tensor_type)) {
        if (st->api->dltensor_from_py_object_no_sync) {
            /* non-owning: shape / strides live as long as obj, i.e. this call */
            if (st->api->dltensor_from_py_object_no_sync(obj, &v->t) != 0) {
                if (!PyErr_Occurred()) {
                    PyErr_Format(PyExc_TypeError, "qvit: %s could not be viewed through DLPack",
                                 name);
                }
                return -1;
            }
            v->valid = 1;
            return 0;
        }
        if (st->api->managed_tensor_from_py_object_no_sync) {
            DLManagedTensorVersioned *mt = NULL;
            if (st->api->managed_tensor_from_py_object_no_sync(obj, &mt) != 0 || !mt) {
                if (!PyErr_Occurred()) {
                    PyErr_Format(PyExc_TypeError, "qvit: %s could not be viewed through DLPack",
                                 name);
                }
                return -1;
            }
            v->versioned = mt;
            v->t = mt->dl_tensor;
            v->read_only = (mt->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
            v->valid = 1;
            return 0;
        }
    }
    if (PyCapsule_CheckExact(obj)) {
        Py_INCREF(obj);
        return view_from_capsule(v, obj);
    }
    PyObject *cap = call_dlpack(st, obj, name);
    if (!cap) {
        return -1;
    }
    if (!PyCapsule_CheckExact(cap)) {
        PyErr_Format(PyExc_TypeError, "qvit: %s.__dlpack__() did not return a capsule", name);
        Py_DECREF(cap);
        return -1;
    }
    return view_from_capsule(v, cap);
}

static void *view_data(const tview *v)
{
    return v->t.data ? (char *)v->t.data + v->t.byte_offset : NULL;
}

/* Callers have passed check_extent (sizes >= 0, product within int64); an
 * empty tensor is 0 before any product of the other, possibly huge, sizes. */
static int64_t view_numel(const tview *v)
{
    for (int i = 0; i < v->t.ndim; i++) {
        if (v->t.shape[i] == 0) {
            return 0;
        }
    }
    int64_t n = 1;
    for (int i = 0; i < v->t.ndim; i++) {
        n *= v->t.shape[i];
    }
    return n;
}

static int view_contiguous(const tview *v)
{
    if (!v->t.strides) {
        return 1;
    }
    /* An empty tensor is contiguous whatever its strides (NumPy exports all-zero
     * strides for empty arrays, so the size-0 dimension must be found first). */
    for (int i = 0; i < v->t.ndim; i++) {
        if (v->t.shape[i] == 0) {
            return 1;
        }
    }
    int64_t expected = 1;
    for (int i = v->t.ndim - 1; i >= 0; i--) {
        if (v->t.shape[i] != 1 && v->t.strides[i] != expected) {
            return 0;
        }
        expected *= v->t.shape[i];
    }
    return 1;
}

static const char *dtype_name(qvit_dtype d)
{
    switch (d) {
    case QVIT_F32: return "float32";
    case QVIT_F16: return "float16";
    case QVIT_BF16: return "bfloat16";
    case QVIT_F64: return "float64";
    }
    return "?";
}

/* DLPack dtype -> qvit dtype, or -1. */
static int view_dtype(const tview *v)
{
    DLDataType d = v->t.dtype;
    if (d.lanes != 1) {
        return -1;
    }
    if (d.code == kDLFloat && d.bits == 32) {
        return QVIT_F32;
    }
    if (d.code == kDLFloat && d.bits == 16) {
        return QVIT_F16;
    }
    if (d.code == kDLBfloat && d.bits == 16) {
        return QVIT_BF16;
    }
    if (d.code == kDLFloat && d.bits == 64) {
        return QVIT_F64;
    }
    return -1;
}

static void describe_dtype(const tview *v, char *buf, size_t n)
{
    DLDataType d = v->t.dtype;
    const char *code = d.code == kDLFloat ? "float" : d.code == kDLBfloat ? "bfloat"
                     : d.code == kDLInt ? "int" : d.code == kDLUInt ? "uint"
                     : d.code == kDLBool ? "bool" : d.code == kDLComplex ? "complex" : "code";
    if (d.lanes != 1) {
        PyOS_snprintf(buf, n, "%s%u x %u lanes", code, (unsigned)d.bits, (unsigned)d.lanes);
    } else {
        PyOS_snprintf(buf, n, "%s%u", code, (unsigned)d.bits);
    }
}

static void describe_shape(const tview *v, char *buf, size_t n)
{
    size_t used = 0;
    used += (size_t)PyOS_snprintf(buf, n, "[");
    for (int i = 0; i < v->t.ndim && used + 24 < n; i++) {
        used += (size_t)PyOS_snprintf(buf + used, n - used, i ? ", %lld" : "%lld",
                                      (long long)v->t.shape[i]);
    }
    if (used + 2 <= n) {
        PyOS_snprintf(buf + used, n - used, "]");
    }
}

static const char *device_name(DLDeviceType t)
{
    switch (t) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed";
    case kDLROCM: return "rocm";
    default: return "non-CPU";
    }
}

/* Device, contiguity, dtype (== want, or any float type when want < 0) of one
 * tensor against the reference device of x. */
/* What a DLPack producer may claim but no real tensor has: ndim < 0, a
 * negative size, an element count beyond int64 (it would wrap in every size
 * computation), a data pointer not aligned to the element size (NumPy exports
 * unaligned views; the kernels load whole elements). */
static int check_extent(const tview *v)
{
    if (v->t.ndim < 0 || (v->t.ndim > 0 && !v->t.shape)) {
        PyErr_Format(PyExc_ValueError, "qvit: %s has an invalid DLPack shape (ndim=%d)", v->name,
                     (int)v->t.ndim);
        return -1;
    }
    int empty = 0;
    for (int i = 0; i < v->t.ndim; i++) {
        if (v->t.shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "qvit: %s has a negative size %lld in dimension %d",
                         v->name, (long long)v->t.shape[i], i);
            return -1;
        }
        empty |= v->t.shape[i] == 0;
    }
    if (empty) {
        return 0;
    }
    int64_t n = 1;
    for (int i = 0; i < v->t.ndim; i++) {
        if (n > INT64_MAX / v->t.shape[i]) {
            PyErr_Format(PyExc_ValueError, "qvit: %s claims more than 2^63 elements", v->name);
            return -1;
        }
        n *= v->t.shape[i];
    }
    size_t item = ((size_t)v->t.dtype.bits * v->t.dtype.lanes + 7) / 8;
    if (item > 1 && ((uintptr_t)view_data(v)) % item != 0) {
        PyErr_Format(PyExc_ValueError, "qvit: %s is not aligned to its %u-byte element size; "
                     "pass an aligned copy (e.g. numpy.ascontiguousarray / .copy())", v->name,
                     (unsigned)item);
        return -1;
    }
    return 0;
}

static int check_tensor(const tview *v, const tview *x, int want_dtype, int writable)
{
    char buf[64];
    if (v->t.device.device_type != kDLCPU && v->t.device.device_type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "qvit: %s is on an unsupported device (%s); "
                     "only CPU and CUDA tensors are accepted", v->name,
                     device_name(v->t.device.device_type));
        return -1;
    }
    if (v != x && (v->t.device.device_type != x->t.device.device_type ||
                   v->t.device.device_id != x->t.device.device_id)) {
        PyErr_Format(PyExc_ValueError, "qvit: %s is on %s:%d but x is on %s:%d; all tensors "
                     "must be on one device", v->name, device_name(v->t.device.device_type),
                     (int)v->t.device.device_id, device_name(x->t.device.device_type),
                     (int)x->t.device.device_id);
        return -1;
    }
    int dt = view_dtype(v);
    if (dt < 0) {
        describe_dtype(v, buf, sizeof buf);
        PyErr_Format(PyExc_TypeError, "qvit: %s has unsupported dtype %s; expected float32, "
                     "float16, bfloat16 or float64", v->name, buf);
        return -1;
    }
    if (want_dtype >= 0 && dt != want_dtype) {
        PyErr_Format(PyExc_TypeError, "qvit: %s must be %s (like %s), got %s", v->name,
                     dtype_name((qvit_dtype)want_dtype), v == x ? "x" : "its reference",
                     dtype_name((qvit_dtype)dt));
        return -1;
    }
    if (check_extent(v) < 0) {
        return -1;
    }
    if (!view_contiguous(v)) {
        PyErr_Format(PyExc_ValueError, "qvit: %s must be contiguous (row-major); call "
                     ".contiguous() first", v->name);
        return -1;
    }
    if (writable && v->read_only) {
        PyErr_Format(PyExc_ValueError, "qvit: %s is read-only; an output must be writable",
                     v->name);
        return -1;
    }
    if (view_numel(v) > 0 && !view_data(v)) {
        PyErr_Format(PyExc_ValueError, "qvit: %s has a NULL data pointer", v->name);
        return -1;
    }
    return 0;
}

static int same_shape(const tview *a, const tview *b)
{
    if (a->t.ndim != b->t.ndim) {
        return 0;
    }
    for (int i = 0; i < a->t.ndim; i++) {
        if (a->t.shape[i] != b->t.shape[i]) {
            return 0;
        }
    }
    return 1;
}

static int check_shape_like(const tview *v, const tview *ref, const char *what)
{
    if (!same_shape(v, ref)) {
        char a[160], b[160];
        describe_shape(v, a, sizeof a);
        describe_shape(ref, b, sizeof b);
        PyErr_Format(PyExc_ValueError, "qvit: %s has shape %s, expected %s (the shape of %s)",
                     v->name, a, b, what);
        return -1;
    }
    return 0;
}

static int view_bytes(const tview *v, char **lo, char **hi)
{
    int64_t n = view_numel(v);
    if (!v->valid || n <= 0 || !view_data(v)) {
        return 0;
    }
    *lo = (char *)view_data(v);
    *hi = *lo + n * (int64_t)((v->t.dtype.bits * v->t.dtype.lanes + 7) / 8);
    return 1;
}

/* Outputs may not share memory with inputs or with each other: the kernels
 * read and write through restrict pointers. NULL entries are skipped. */
static int check_no_overlap(const tview *const *outs, int n_out, const tview *const *ins, int n_in)
{
    for (int i = 0; i < n_out; i++) {
        char *alo, *ahi;
        if (!outs[i] || !view_bytes(outs[i], &alo, &ahi)) {
            continue;
        }
        for (int k = 0; k < n_in + i; k++) {
            const tview *o = k < n_in ? ins[k] : outs[k - n_in];
            char *blo, *bhi;
            if (!o || !view_bytes(o, &blo, &bhi)) {
                continue;
            }
            if (alo < bhi && blo < ahi) {
                PyErr_Format(PyExc_ValueError, "qvit: %s shares memory with %s; outputs must "
                             "not overlap the inputs or each other", outs[i]->name, o->name);
                return -1;
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Argument parsing (METH_FASTCALL | METH_KEYWORDS: no tuple or dict is built
 * per call, so the hot ops allocate nothing that the cyclic GC tracks) */

static const char *const FWD_NAMES[11] = {"x", "scale", "bits", "offset", "y", "dim", "signed",
                                          "bits_min", "bits_max", "num_threads", "stream"};
enum { FWD_NPOS = 5 };
static const char *const BWD_NAMES[17] = {"grad_y", "x", "scale", "bits", "offset", "grad_x",
                                          "grad_scale", "grad_bits", "grad_offset", "dim",
                                          "signed", "bits_min", "bits_max", "lsq_grad_scale",
                                          "num_threads", "stream", "workspace"};
enum { BWD_NPOS = 9 };

/* Fills out[0..n) (borrowed, NULL when absent) from positional arguments
 * (at most npos) and keywords (any of the n names). */
static int parse_fast(const char *fn, const char *const *names, PyObject *const *interned, int n,
                      int npos, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      PyObject **out)
{
    for (int i = 0; i < n; i++) {
        out[i] = NULL;
    }
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional arguments (%zd given)",
                     fn, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = args[i];
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = -1;
        for (int i = 0; i < n && j < 0; i++) {
            if (key == interned[i]) {
                j = i;
            }
        }
        for (int i = 0; i < n && j < 0; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                j = i;
            }
        }
        if (j < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fn,
                         key);
            return -1;
        }
        if (out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn,
                         names[j]);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < npos; i++) {
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
            return -1;
        }
    }
    return 0;
}

/* An int argument (anything with __index__); required when dflt_ok is 0. */
static int arg_int(PyObject *o, const char *fn, const char *name, int dflt_ok, int dflt, int *out)
{
    if (!o) {
        if (!dflt_ok) {
            PyErr_Format(PyExc_TypeError, "%s() missing required keyword argument '%s'", fn,
                         name);
            return -1;
        }
        *out = dflt;
        return 0;
    }
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "qvit: %s must be an int, got %.200s", name,
                         Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "qvit: %s=%ld is out of range", name, v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int arg_double(PyObject *o, const char *name, double dflt, double *out)
{
    if (!o) {
        *out = dflt;
        return 0;
    }
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "qvit: %s must be a float, got %.200s", name,
                         Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Argument helpers */

static int parse_signed(PyObject *obj, int32_t *out)
{
    if (!obj) {
        PyErr_SetString(PyExc_TypeError, "qvit: missing required keyword argument 'signed'");
        return -1;
    }
    int t = PyObject_IsTrue(obj);
    if (t < 0) {
        /* e.g. a NumPy array of several elements: say which argument */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "qvit: signed must be a bool, got %s with no single "
                     "truth value", Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = t;
    return 0;
}

/* Fills outer / groups / inner / scale_groups / bits range of p from x and
 * the parameter tensors; the same rules as qvit.reference.group_shape. */
static int fill_layout(qvit_fq_params *p, const tview *x, const tview *scale, const tview *bits,
                       const tview *offset, int dim, int bits_min, int bits_max, int is_signed)
{
    char a[160];
    if (bits_min < 1 || bits_max < bits_min || bits_max > 16) {
        PyErr_Format(PyExc_ValueError, "qvit: bits_min / bits_max must satisfy 1 <= bits_min "
                     "<= bits_max <= 16, got bits_min=%d, bits_max=%d", bits_min, bits_max);
        return -1;
    }
    if (is_signed && bits_min < 2) {
        PyErr_Format(PyExc_ValueError, "qvit: a signed quantizer needs bits_min >= 2, got %d",
                     bits_min);
        return -1;
    }
    if (bits->t.ndim != 1 || bits->t.shape[0] < 1) {
        describe_shape(bits, a, sizeof a);
        PyErr_Format(PyExc_ValueError, "qvit: bits must be 1-D [G] with G >= 1, got shape %s", a);
        return -1;
    }
    int64_t G = bits->t.shape[0];
    int64_t K = (int64_t)bits_max - bits_min + 1;
    if (scale->t.ndim != 2 || scale->t.shape[1] != K ||
        (scale->t.shape[0] != 1 && scale->t.shape[0] != G)) {
        describe_shape(scale, a, sizeof a);
        PyErr_Format(PyExc_ValueError, "qvit: scale must be [1, %lld] or [%lld, %lld] "
                     "(K = bits_max - bits_min + 1 = %lld columns), got shape %s",
                     (long long)K, (long long)G, (long long)K, (long long)K, a);
        return -1;
    }
    if (offset && check_shape_like(offset, scale, "scale") < 0) {
        return -1;
    }
    int64_t numel = view_numel(x);
    int64_t outer = 1, inner = numel;
    if (G > 1) {
        int nd = x->t.ndim;
        if (nd == 0) {
            PyErr_Format(PyExc_ValueError, "qvit: a 0-d x cannot be split into %lld groups",
                         (long long)G);
            return -1;
        }
        if (dim < -nd || dim >= nd) {
            PyErr_Format(PyExc_ValueError, "qvit: dim=%d is out of range for x with %d "
                         "dimensions", dim, nd);
            return -1;
        }
        int d = dim < 0 ? dim + nd : dim;
        int64_t size = x->t.shape[d];
        if (size % G != 0) {
            PyErr_Format(PyExc_ValueError, "qvit: dimension %d of x has size %lld, which is not "
                         "divisible by the %lld groups of bits", d, (long long)size,
                         (long long)G);
            return -1;
        }
        if (numel == 0) {
            /* nothing to index; the other sizes may be huge and their partial
             * products overflow int64 (a raw capsule [0, 2^40, 2^40]) */
            outer = 0;
            inner = 0;
        } else {
            outer = 1;
            for (int i = 0; i < d; i++) {
                outer *= x->t.shape[i];
            }
            inner = size / G;
            for (int i = d + 1; i < nd; i++) {
                inner *= x->t.shape[i];
            }
        }
    }
    p->outer = outer;
    p->groups = G;
    p->inner = inner;
    p->scale_groups = scale->t.shape[0];
    p->bits_min = bits_min;
    p->bits_max = bits_max;
    p->is_signed = is_signed;
    return 0;
}

/* Maps a kernel status to a Python exception (NULL return convenience). */
static void raise_status(qvit_state *st, qvit_status s, int is_cuda)
{
    switch (s) {
    case QVIT_OK:
        break;
    case QVIT_ERR_BAD_SCALE:
        PyErr_SetString(PyExc_ValueError, "qvit: scale has an entry that is not finite or not "
                        "> 0; every scale must be a positive finite number");
        break;
    case QVIT_ERR_BAD_BITS:
        PyErr_SetString(PyExc_ValueError, "qvit: bits has an entry that is not finite");
        break;
    case QVIT_ERR_BAD_OFFSET:
        PyErr_SetString(PyExc_ValueError, "qvit: offset has an entry that is not finite");
        break;
    case QVIT_ERR_NO_MEMORY:
        PyErr_SetString(PyExc_MemoryError, "qvit: out of memory for the kernel's scratch");
        break;
    case QVIT_ERR_DTYPE:
        PyErr_SetString(PyExc_TypeError, "qvit: unsupported dtype combination: scale, bits and "
                        "offset must be float32 (float64 when x is float64)");
        break;
    case QVIT_ERR_NO_CUDA:
        PyErr_SetString(PyExc_RuntimeError, "qvit: qvit._C was built without CUDA");
        break;
    case QVIT_ERR_CUDA:
#ifdef QVIT_WITH_CUDA
        PyErr_Format(st->KernelError, "qvit: CUDA error: %s", qvit_cuda_last_error());
#else
        PyErr_SetString(st->KernelError, "qvit: CUDA error");
#endif
        break;
    case QVIT_ERR_BAD_ARG:
    default:
        PyErr_Format(PyExc_ValueError, "qvit: inconsistent sizes or flags passed to the %s "
                     "kernel (status %d)", is_cuda ? "CUDA" : "CPU", (int)s);
        break;
    }
}

/* Device checks shared by forward and backward: CUDA only when built, and
 * the stream for it. */
static int resolve_device(qvit_state *st, qvit_fq_params *p, const tview *x, PyObject *stream)
{
    if (x->t.device.device_type == kDLCPU) {
        p->device = -1;
        p->stream = NULL;
        return 0;
    }
#ifdef QVIT_WITH_CUDA
    p->device = x->t.device.device_id;
    if (stream && stream != Py_None) {
        void *s = PyLong_AsVoidPtr(stream);
        if (!s && PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "qvit: stream must be None or an int "
                            "(a cudaStream_t)");
            return -1;
        }
        p->stream = s;
        return 0;
    }
    if (st->api && st->api->current_work_stream) {
        void *s = NULL;
        if (st->api->current_work_stream(kDLCUDA, x->t.device.device_id, &s) != 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_RuntimeError, "qvit: could not get torch's current "
                                "CUDA stream");
            }
            return -1;
        }
        p->stream = s;
        return 0;
    }
    PyErr_SetString(PyExc_ValueError, "qvit: stream=None needs torch's DLPack exchange API "
                    "(set_exchange_api); pass the cudaStream_t as stream=");
    return -1;
#else
    (void)st;
    (void)p;
    (void)stream;
    PyErr_Format(PyExc_ValueError, "qvit: %s is a CUDA tensor but qvit._C was built without "
                 "CUDA (rebuild with nvcc available, or QVIT_CUDA=1)", x->name);
    return -1;
#endif
}

/* numpy.empty(shape, dtype=like.dtype) for an output given as None, when
 * `like` is a NumPy array; NULL with an exception otherwise. */
static PyObject *numpy_empty_like(PyObject *like, const char *out_name, const char *like_name)
{
    PyObject *name = PyUnicode_FromString("numpy");
    if (!name) {
        return NULL;
    }
    PyObject *mod = PyImport_GetModule(name);
    Py_DECREF(name);
    PyObject *result = NULL;
    if (!mod) {
        if (!PyErr_Occurred()) {
            goto not_numpy;
        }
        return NULL;
    }
    PyObject *ndarray = PyObject_GetAttrString(mod, "ndarray");
    if (!ndarray) {
        Py_DECREF(mod);
        return NULL;
    }
    int is = PyObject_IsInstance(like, ndarray);
    Py_DECREF(ndarray);
    if (is < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    if (!is) {
        Py_DECREF(mod);
        goto not_numpy;
    }
    PyObject *shape = PyObject_GetAttrString(like, "shape");
    PyObject *dtype = shape ? PyObject_GetAttrString(like, "dtype") : NULL;
    if (dtype) {
        result = PyObject_CallMethod(mod, "empty", "OO", shape, dtype);
    }
    Py_XDECREF(shape);
    Py_XDECREF(dtype);
    Py_DECREF(mod);
    return result;
not_numpy:
    PyErr_Format(PyExc_TypeError, "qvit: %s=None is only allowed when %s is a NumPy array; "
                 "pass an output tensor", out_name, like_name);
    return NULL;
}

static int optional_arg(PyObject *obj)
{
    return obj && obj != Py_None;
}

/* ------------------------------------------------------------------------ */
/* fq_forward */

PyDoc_STRVAR(fq_forward_doc,
"fq_forward($module, x, scale, bits, offset, y, *, dim, signed, bits_min, bits_max,\n"
"           num_threads=0, stream=None)\n"
"--\n"
"\n"
"Learnable fake quantization, forward: y = round(clamp((x - beta) / s, Qn, Qp)) * s + beta.\n"
"\n"
"x (float32/float16/bfloat16/float64, contiguous) is split along `dim` into\n"
"G = bits.numel() groups; group g uses scale[g or 0, round(clamp(bits[g])) - bits_min].\n"
"scale, bits, offset are float32 (float64 with a float64 x). offset may be None.\n"
"y: the output (x's shape, dtype, device; contiguous). None allocates a NumPy\n"
"array when x is a NumPy array. Returns y. Raises ValueError for non-finite bits or\n"
"offsets and non-positive or non-finite scales (CPU).");

static PyObject *fq_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    qvit_state *st = get_state(module);
    PyObject *a[11];
    if (parse_fast("fq_forward", FWD_NAMES, st->names_fwd, 11, FWD_NPOS, args, nargs, kwnames,
                   a) < 0) {
        return NULL;
    }
    PyObject *ox = a[0], *oscale = a[1], *obits = a[2], *ooffset = a[3], *oy = a[4];
    PyObject *osigned = a[6], *ostream = a[10] ? a[10] : Py_None;
    int dim, bits_min, bits_max, num_threads;
    if (arg_int(a[5], "fq_forward", "dim", 0, 0, &dim) < 0 ||
        arg_int(a[7], "fq_forward", "bits_min", 0, 0, &bits_min) < 0 ||
        arg_int(a[8], "fq_forward", "bits_max", 0, 0, &bits_max) < 0 ||
        arg_int(a[9], "fq_forward", "num_threads", 1, 0, &num_threads) < 0) {
        return NULL;
    }
    qvit_fq_params p;
    memset(&p, 0, sizeof p);
    if (parse_signed(osigned, &p.is_signed) < 0) {
        return NULL;
    }

    PyObject *result = NULL, *y_obj = NULL;
    tview x = {0}, scale = {0}, bits = {0}, offset = {0}, y = {0};
    int has_offset = optional_arg(ooffset);
    if (view_get(st, ox, "x", &x) < 0 || view_get(st, oscale, "scale", &scale) < 0 ||
        view_get(st, obits, "bits", &bits) < 0 ||
        (has_offset && view_get(st, ooffset, "offset", &offset) < 0)) {
        goto done;
    }
    if (optional_arg(oy)) {
        y_obj = Py_NewRef(oy);
    } else if (!(y_obj = numpy_empty_like(ox, "y", "x"))) {
        goto done;
    }
    if (view_get(st, y_obj, "y", &y) < 0) {
        goto done;
    }
    if (check_tensor(&x, &x, -1, 0) < 0) {
        goto done;
    }
    int xdt = view_dtype(&x);
    int pdt = xdt == QVIT_F64 ? QVIT_F64 : QVIT_F32;
    if (check_tensor(&scale, &x, pdt, 0) < 0 || check_tensor(&bits, &x, pdt, 0) < 0 ||
        (has_offset && check_tensor(&offset, &x, pdt, 0) < 0) ||
        check_tensor(&y, &x, xdt, 1) < 0 || check_shape_like(&y, &x, "x") < 0) {
        goto done;
    }
    if (fill_layout(&p, &x, &scale, &bits, has_offset ? &offset : NULL, dim, bits_min, bits_max,
                    p.is_signed) < 0) {
        goto done;
    }
    {
        const tview *outs[1] = {&y};
        const tview *ins[4] = {&x, &scale, &bits, has_offset ? &offset : NULL};
        if (check_no_overlap(outs, 1, ins, 4) < 0) {
            goto done;
        }
    }
    p.has_offset = has_offset;
    p.grad_scale = -1.0;
    p.x_dtype = (qvit_dtype)xdt;
    p.param_dtype = (qvit_dtype)pdt;
    p.x = view_data(&x);
    p.scale = view_data(&scale);
    p.bits = view_data(&bits);
    p.offset = has_offset ? view_data(&offset) : NULL;
    p.y = view_data(&y);
    p.num_threads = num_threads;
    if (resolve_device(st, &p, &x, ostream) < 0) {
        goto done;
    }

    qvit_status s;
    int is_cuda = x.t.device.device_type == kDLCUDA;
    if (is_cuda) {
#ifdef QVIT_WITH_CUDA
        s = qvit_fq_forward_cuda(&p);
#else
        s = QVIT_ERR_NO_CUDA;
#endif
    } else if (view_numel(&x) >= QVIT_GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        s = qvit_fq_forward_cpu(&p);
        Py_END_ALLOW_THREADS
    } else {
        s = qvit_fq_forward_cpu(&p);
    }
    if (s != QVIT_OK) {
        raise_status(st, s, is_cuda);
        goto done;
    }
    result = Py_NewRef(y_obj);
done:
    view_release(&y);
    view_release(&offset);
    view_release(&bits);
    view_release(&scale);
    view_release(&x);
    Py_XDECREF(y_obj);
    return result;
}

/* ------------------------------------------------------------------------ */
/* fq_backward */

PyDoc_STRVAR(fq_backward_doc,
"fq_backward($module, grad_y, x, scale, bits, offset, grad_x, grad_scale, grad_bits,\n"
"            grad_offset, *, dim, signed, bits_min, bits_max, lsq_grad_scale=-1.0,\n"
"            num_threads=0, stream=None, workspace=None)\n"
"--\n"
"\n"
"Learnable fake quantization, backward (one fused pass over x and grad_y).\n"
"\n"
"Writes grad_x (like x), grad_scale ([Gs, K], zeros in inactive entries), grad_bits\n"
"([G]) and grad_offset (like offset, or None without offset), in the parameters' dtype.\n"
"Outputs given as None are allocated as NumPy arrays when the inputs are NumPy arrays.\n"
"lsq_grad_scale < 0 selects the LSQ factor 1/sqrt(N_g * Qp); >= 0 is a constant.\n"
"Deterministic: the same inputs give bitwise equal results for any num_threads.\n"
"workspace: CUDA scratch (uint8, fq_workspace_bytes() bytes) on x's device.\n"
"Returns (grad_x, grad_scale, grad_bits, grad_offset).");

static PyObject *fq_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    qvit_state *st = get_state(module);
    PyObject *a[17];
    if (parse_fast("fq_backward", BWD_NAMES, st->names_bwd, 17, BWD_NPOS, args, nargs, kwnames,
                   a) < 0) {
        return NULL;
    }
    PyObject *ogy = a[0], *ox = a[1], *oscale = a[2], *obits = a[3], *ooffset = a[4];
    PyObject *ogx = a[5], *ogs = a[6], *ogb = a[7], *ogo = a[8];
    PyObject *osigned = a[10], *ostream = a[15] ? a[15] : Py_None;
    PyObject *ows = a[16] ? a[16] : Py_None;
#ifndef QVIT_WITH_CUDA
    (void)ows; /* the workspace only matters on CUDA */
#endif
    int dim, bits_min, bits_max, num_threads;
    double lsq;
    if (arg_int(a[9], "fq_backward", "dim", 0, 0, &dim) < 0 ||
        arg_int(a[11], "fq_backward", "bits_min", 0, 0, &bits_min) < 0 ||
        arg_int(a[12], "fq_backward", "bits_max", 0, 0, &bits_max) < 0 ||
        arg_double(a[13], "lsq_grad_scale", -1.0, &lsq) < 0 ||
        arg_int(a[14], "fq_backward", "num_threads", 1, 0, &num_threads) < 0) {
        return NULL;
    }
    if (lsq != lsq) {
        PyErr_SetString(PyExc_ValueError, "qvit: lsq_grad_scale must not be NaN");
        return NULL;
    }
    qvit_fq_params p;
    memset(&p, 0, sizeof p);
    if (parse_signed(osigned, &p.is_signed) < 0) {
        return NULL;
    }

    PyObject *result = NULL;
    PyObject *gx_obj = NULL, *gs_obj = NULL, *gb_obj = NULL, *go_obj = NULL;
    tview gy = {0}, x = {0}, scale = {0}, bits = {0}, offset = {0};
    tview gx = {0}, gs = {0}, gb = {0}, go = {0}, ws = {0};
    int has_offset = optional_arg(ooffset);
    if (!has_offset && optional_arg(ogo)) {
        PyErr_SetString(PyExc_ValueError, "qvit: grad_offset must be None when offset is None");
        return NULL;
    }
    if (view_get(st, ogy, "grad_y", &gy) < 0 || view_get(st, ox, "x", &x) < 0 ||
        view_get(st, oscale, "scale", &scale) < 0 || view_get(st, obits, "bits", &bits) < 0 ||
        (has_offset && view_get(st, ooffset, "offset", &offset) < 0)) {
        goto done;
    }
    if (!(gx_obj = optional_arg(ogx) ? Py_NewRef(ogx) : numpy_empty_like(ox, "grad_x", "x")) ||
        !(gs_obj = optional_arg(ogs) ? Py_NewRef(ogs)
                                     : numpy_empty_like(oscale, "grad_scale", "scale")) ||
        !(gb_obj = optional_arg(ogb) ? Py_NewRef(ogb)
                                     : numpy_empty_like(obits, "grad_bits", "bits"))) {
        goto done;
    }
    if (has_offset && !(go_obj = optional_arg(ogo) ? Py_NewRef(ogo)
                                   : numpy_empty_like(ooffset, "grad_offset", "offset"))) {
        goto done;
    }
    if (view_get(st, gx_obj, "grad_x", &gx) < 0 || view_get(st, gs_obj, "grad_scale", &gs) < 0 ||
        view_get(st, gb_obj, "grad_bits", &gb) < 0 ||
        (has_offset && view_get(st, go_obj, "grad_offset", &go) < 0)) {
        goto done;
    }
    if (check_tensor(&x, &x, -1, 0) < 0) {
        goto done;
    }
    int xdt = view_dtype(&x);
    int pdt = xdt == QVIT_F64 ? QVIT_F64 : QVIT_F32;
    if (check_tensor(&gy, &x, xdt, 0) < 0 || check_shape_like(&gy, &x, "x") < 0 ||
        check_tensor(&scale, &x, pdt, 0) < 0 || check_tensor(&bits, &x, pdt, 0) < 0 ||
        (has_offset && check_tensor(&offset, &x, pdt, 0) < 0) ||
        check_tensor(&gx, &x, xdt, 1) < 0 || check_shape_like(&gx, &x, "x") < 0) {
        goto done;
    }
    if (fill_layout(&p, &x, &scale, &bits, has_offset ? &offset : NULL, dim, bits_min, bits_max,
                    p.is_signed) < 0) {
        goto done;
    }
    if (check_tensor(&gs, &x, pdt, 1) < 0 || check_shape_like(&gs, &scale, "scale") < 0 ||
        check_tensor(&gb, &x, pdt, 1) < 0 || check_shape_like(&gb, &bits, "bits") < 0 ||
        (has_offset && (check_tensor(&go, &x, pdt, 1) < 0 ||
                        check_shape_like(&go, &offset, "offset") < 0))) {
        goto done;
    }
    {
        const tview *outs[4] = {&gx, &gs, &gb, has_offset ? &go : NULL};
        const tview *ins[5] = {&gy, &x, &scale, &bits, has_offset ? &offset : NULL};
        if (check_no_overlap(outs, 4, ins, 5) < 0) {
            goto done;
        }
    }
    p.has_offset = has_offset;
    p.grad_scale = lsq < 0.0 ? -1.0 : lsq;
    p.x_dtype = (qvit_dtype)xdt;
    p.param_dtype = (qvit_dtype)pdt;
    p.x = view_data(&x);
    p.grad_y = view_data(&gy);
    p.scale = view_data(&scale);
    p.bits = view_data(&bits);
    p.offset = has_offset ? view_data(&offset) : NULL;
    p.grad_x = view_data(&gx);
    p.grad_scale_out = view_data(&gs);
    p.grad_bits = view_data(&gb);
    p.grad_offset = has_offset ? view_data(&go) : NULL;
    p.num_threads = num_threads;
    if (resolve_device(st, &p, &x, ostream) < 0) {
        goto done;
    }

    qvit_status s;
    int is_cuda = x.t.device.device_type == kDLCUDA;
    if (is_cuda) {
#ifdef QVIT_WITH_CUDA
        int64_t need = qvit_fq_cuda_workspace_bytes(&p);
        if (need < 0) {
            raise_status(st, QVIT_ERR_CUDA, 1);
            goto done;
        }
        if (need > 0) {
            if (!optional_arg(ows)) {
                PyErr_Format(PyExc_ValueError, "qvit: workspace is required on CUDA: a uint8 "
                             "tensor of fq_workspace_bytes() = %lld bytes on x's device",
                             (long long)need);
                goto done;
            }
            if (view_get(st, ows, "workspace", &ws) < 0) {
                goto done;
            }
            if (ws.t.dtype.code != kDLUInt || ws.t.dtype.bits != 8 || ws.t.dtype.lanes != 1 ||
                ws.t.device.device_type != kDLCUDA ||
                ws.t.device.device_id != x.t.device.device_id || !view_contiguous(&ws) ||
                ws.read_only) {
                PyErr_SetString(PyExc_ValueError, "qvit: workspace must be a contiguous, "
                                "writable uint8 tensor on x's CUDA device");
                goto done;
            }
            if (view_numel(&ws) < need) {
                PyErr_Format(PyExc_ValueError, "qvit: workspace has %lld bytes, the backward "
                             "needs %lld (fq_workspace_bytes)", (long long)view_numel(&ws),
                             (long long)need);
                goto done;
            }
            p.workspace = view_data(&ws);
            p.workspace_bytes = view_numel(&ws);
        }
        s = qvit_fq_backward_cuda(&p);
#else
        s = QVIT_ERR_NO_CUDA;
#endif
    } else if (view_numel(&x) >= QVIT_GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        s = qvit_fq_backward_cpu(&p);
        Py_END_ALLOW_THREADS
    } else {
        s = qvit_fq_backward_cpu(&p);
    }
    if (s != QVIT_OK) {
        raise_status(st, s, is_cuda);
        goto done;
    }
    result = PyTuple_Pack(4, gx_obj, gs_obj, gb_obj, has_offset ? go_obj : Py_None);
done:
    view_release(&ws);
    view_release(&go);
    view_release(&gb);
    view_release(&gs);
    view_release(&gx);
    view_release(&offset);
    view_release(&bits);
    view_release(&scale);
    view_release(&x);
    view_release(&gy);
    Py_XDECREF(go_obj);
    Py_XDECREF(gb_obj);
    Py_XDECREF(gs_obj);
    Py_XDECREF(gx_obj);
    return result;
}

/* ------------------------------------------------------------------------ */
/* Small functions */

PyDoc_STRVAR(fq_workspace_bytes_doc,
"fq_workspace_bytes($module, outer, groups, inner, device, /)\n"
"--\n"
"\n"
"Bytes of CUDA scratch the backward needs for x viewed as [outer, groups, inner]\n"
"on CUDA device `device` (0 when CUDA is not built).");

static PyObject *fq_workspace_bytes(PyObject *module, PyObject *args)
{
    long long outer, groups, inner;
    int device;
    if (!PyArg_ParseTuple(args, "LLLi:fq_workspace_bytes", &outer, &groups, &inner, &device)) {
        return NULL;
    }
    if (outer < 0 || groups < 1 || inner < 0) {
        PyErr_Format(PyExc_ValueError, "qvit: fq_workspace_bytes needs outer >= 0, groups >= 1, "
                     "inner >= 0, got (%lld, %lld, %lld)", outer, groups, inner);
        return NULL;
    }
    if (device < 0) {
        PyErr_Format(PyExc_ValueError, "qvit: device must be a CUDA device index >= 0, got %d",
                     device);
        return NULL;
    }
#ifdef QVIT_WITH_CUDA
    qvit_fq_params p;
    memset(&p, 0, sizeof p);
    p.outer = outer;
    p.groups = groups;
    p.inner = inner;
    p.scale_groups = 1;
    p.device = device;
    int64_t bytes = qvit_fq_cuda_workspace_bytes(&p);
    if (bytes < 0) {
        /* the device could not be queried (no driver, bad ordinal) */
        PyErr_Format(get_state(module)->KernelError, "qvit: fq_workspace_bytes on CUDA device "
                     "%d: %s", device, qvit_cuda_last_error());
        return NULL;
    }
    return PyLong_FromLongLong((long long)bytes);
#else
    return PyLong_FromLong(0);
#endif
}

PyDoc_STRVAR(set_exchange_api_doc,
"set_exchange_api($module, api, tensor_type, /)\n"
"--\n"
"\n"
"Registers torch's DLPack C exchange API (a PyCapsule named \"dlpack_exchange_api\",\n"
"or an int pointer for the older spelling) and the tensor class to type-check\n"
"against (torch._C.TensorBase). api=None unregisters it.");

static PyObject *set_exchange_api(PyObject *module, PyObject *args)
{
    qvit_state *st = get_state(module);
    PyObject *api, *type;
    if (!PyArg_ParseTuple(args, "OO:set_exchange_api", &api, &type)) {
        return NULL;
    }
    if (api == Py_None) {
        st->api = NULL;
        Py_CLEAR(st->api_owner);
        Py_CLEAR(st->tensor_type);
        Py_RETURN_NONE;
    }
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "qvit: tensor_type must be a type "
                        "(torch._C.TensorBase)");
        return NULL;
    }
    const DLPackExchangeAPI *ptr = NULL;
    if (PyCapsule_CheckExact(api)) {
        ptr = PyCapsule_GetPointer(api, "dlpack_exchange_api");
        if (!ptr) {
            return NULL;
        }
    } else if (PyLong_Check(api)) {
        ptr = PyLong_AsVoidPtr(api);
        if (!ptr) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "qvit: api is a NULL pointer");
            }
            return NULL;
        }
    } else {
        PyErr_Format(PyExc_TypeError, "qvit: api must be a 'dlpack_exchange_api' capsule or an "
                     "int pointer, got %.200s", Py_TYPE(api)->tp_name);
        return NULL;
    }
    if (ptr->header.version.major != QVIT_DLPACK_MAJOR) {
        PyErr_Format(PyExc_ValueError, "qvit: the exchange API has DLPack version %u.%u; only "
                     "major version 1 is supported", (unsigned)ptr->header.version.major,
                     (unsigned)ptr->header.version.minor);
        return NULL;
    }
    if (!ptr->dltensor_from_py_object_no_sync && !ptr->managed_tensor_from_py_object_no_sync) {
        PyErr_SetString(PyExc_ValueError, "qvit: the exchange API provides no way to view a "
                        "tensor");
        return NULL;
    }
    Py_INCREF(api);
    Py_INCREF(type);
    Py_XSETREF(st->api_owner, api);
    Py_XSETREF(st->tensor_type, type);
    st->api = ptr;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cuda_built_doc,
"cuda_built($module, /)\n"
"--\n"
"\n"
"True when the CUDA kernels were compiled into this build.");

static PyObject *cuda_built(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
#ifdef QVIT_WITH_CUDA
    return PyBool_FromLong(qvit_cuda_built());
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(cuda_device_count_doc,
"cuda_device_count($module, /)\n"
"--\n"
"\n"
"Number of CUDA devices the runtime sees; <= 0 without CUDA, a GPU or a driver\n"
"(a negative value is the CUDA runtime's error code).");

static PyObject *cuda_device_count(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
#ifdef QVIT_WITH_CUDA
    return PyLong_FromLong(qvit_cuda_device_count());
#else
    return PyLong_FromLong(0);
#endif
}

/* ------------------------------------------------------------------------ */
/* Pooled CPU outputs (cpu_pool.h) */

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

static PyMethodDef methods[] = {
    {"fq_forward", (PyCFunction)(void (*)(void))fq_forward, METH_FASTCALL | METH_KEYWORDS,
     fq_forward_doc},
    {"fq_backward", (PyCFunction)(void (*)(void))fq_backward, METH_FASTCALL | METH_KEYWORDS,
     fq_backward_doc},
    {"fq_workspace_bytes", fq_workspace_bytes, METH_VARARGS, fq_workspace_bytes_doc},
    {"set_exchange_api", set_exchange_api, METH_VARARGS, set_exchange_api_doc},
    {"cuda_built", cuda_built, METH_NOARGS, cuda_built_doc},
    {"cuda_device_count", cuda_device_count, METH_NOARGS, cuda_device_count_doc},
    {"cpu_empty", cpu_empty, METH_VARARGS, cpu_empty_doc},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS, cpu_pool_stats_doc},
    {"cpu_pool_release", cpu_pool_release, METH_NOARGS, cpu_pool_release_doc},
    {"cpu_pool_set_limit", cpu_pool_set_limit, METH_O, cpu_pool_set_limit_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------------ */
/* Module */

static int qvit_exec(PyObject *module)
{
    qvit_state *st = get_state(module);
    st->KernelError = PyErr_NewExceptionWithDoc(
        "qvit._C.KernelError", "A CUDA kernel or runtime call failed; the message carries "
        "the CUDA error string.", PyExc_RuntimeError, NULL);
    if (!st->KernelError) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "KernelError", st->KernelError) < 0) {
        return -1;
    }
    st->str_dlpack = PyUnicode_InternFromString("__dlpack__");
    st->max_version = Py_BuildValue("(ii)", 1, 0);
    st->kwnames_max_version = Py_BuildValue("(s)", "max_version");
    if (!st->str_dlpack || !st->max_version || !st->kwnames_max_version) {
        return -1;
    }
    for (int i = 0; i < 11; i++) {
        if (!(st->names_fwd[i] = PyUnicode_InternFromString(FWD_NAMES[i]))) {
            return -1;
        }
    }
    for (int i = 0; i < 17; i++) {
        if (!(st->names_bwd[i] = PyUnicode_InternFromString(BWD_NAMES[i]))) {
            return -1;
        }
    }
#ifdef QVIT_WITH_CUDA
    const int with_cuda = 1;
#else
    const int with_cuda = 0;
#endif
    if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) {
        return -1;
    }
    return 0;
}

static int qvit_traverse(PyObject *module, visitproc visit, void *arg)
{
    qvit_state *st = get_state(module);
    Py_VISIT(st->KernelError);
    Py_VISIT(st->tensor_type);
    Py_VISIT(st->api_owner);
    return 0;
}

static int qvit_clear(PyObject *module)
{
    qvit_state *st = get_state(module);
    Py_CLEAR(st->KernelError);
    Py_CLEAR(st->tensor_type);
    Py_CLEAR(st->api_owner);
    Py_CLEAR(st->str_dlpack);
    Py_CLEAR(st->max_version);
    Py_CLEAR(st->kwnames_max_version);
    for (int i = 0; i < 11; i++) {
        Py_CLEAR(st->names_fwd[i]);
    }
    for (int i = 0; i < 17; i++) {
        Py_CLEAR(st->names_bwd[i]);
    }
    st->api = NULL;
    return 0;
}

static void qvit_free(void *module)
{
    qvit_clear((PyObject *)module);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, qvit_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef qvit_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qvit._C",
    .m_doc = "qvit's C kernels (fake quantization forward / backward) behind DLPack.",
    .m_size = sizeof(qvit_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = qvit_traverse,
    .m_clear = qvit_clear,
    .m_free = qvit_free,
};

PyMODINIT_FUNC PyInit__C(void)
{
    return PyModuleDef_Init(&qvit_module);
}
