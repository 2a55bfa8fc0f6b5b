/* tensor_intake.c - tensors into the binding through DLPack, and the checks
 * that memory safety needs before a pointer reaches a kernel.
 *
 * Torch tensors come through torch's DLPack C exchange API once
 * set_exchange_api() registered it (no Python frames, no requires_grad
 * refusal); anything else through __dlpack__ (NumPy) or a raw "dltensor" /
 * "dltensor_versioned" capsule. The argument-level rules (shapes of the
 * parameter tables, bit-width range) are the driver's (fq_bind.c).
 */
#include "binding.h"

#include <string.h>

void view_release(tview *v)
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

int view_get(qvit_state *st, PyObject *obj, const char *name, tview *v)
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

void *view_data(const tview *v)
{
    return v->t.data ? (char *)v->t.data + v->t.byte_offset : NULL;
}

/* Callers have passed check_extent (sizes >= 0, product within int64); an
 * empty tensor is 0 before any product of the other, possibly huge, sizes. */
int64_t view_numel(const tview *v)
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

int view_contiguous(const tview *v)
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

const char *dtype_name(qvit_dtype d)
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
int view_dtype(const tview *v)
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

void describe_shape(const tview *v, char *buf, size_t n)
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

int check_tensor(const tview *v, const tview *x, int want_dtype, int writable)
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

int check_shape_like(const tview *v, const tview *ref, const char *what)
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
int check_no_overlap(const tview *const *outs, int n_out, const tview *const *ins, int n_in)
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
