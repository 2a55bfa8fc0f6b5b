/* fq_bind.c - qvit._C.fq_forward and fq_backward.
 *
 * Each function is a spec (its parameters, for the generic parser of
 * argparse.c), a typed _impl taking the parsed struct, and the one driver
 * both share: parse -> view -> check -> fill params -> dispatch -> release,
 * with one cleanup path. Tensors are named by role; a direction uses a
 * subset of the roles. No arithmetic on tensor data happens here.
 */
#include "binding.h"

#include <string.h>

/* Below this many elements the GIL is kept: releasing costs more than the loop. */
#define QVIT_GIL_RELEASE_MIN 16384

/* Tensor roles, in the order they are viewed and checked. */
enum {
    R_GY, R_X, R_SCALE, R_BITS, R_OFFSET,   /* inputs */
    R_Y, R_GX, R_GS, R_GB, R_GO,            /* outputs */
    R_COUNT
};

/* name; dtype (1: the parameters' dtype, 0: x's); the role whose shape it
 * must have and whose NumPy array an output given as None copies (-1: none,
 * the layout rules check it). */
static const struct role {
    const char *name;
    int param;
    int like;
} ROLES[R_COUNT] = {
    [R_GY] = {"grad_y", 0, R_X},
    [R_X] = {"x", 0, -1},
    [R_SCALE] = {"scale", 1, -1},
    [R_BITS] = {"bits", 1, -1},
    [R_OFFSET] = {"offset", 1, R_SCALE},
    [R_Y] = {"y", 0, R_X},
    [R_GX] = {"grad_x", 0, R_X},
    [R_GS] = {"grad_scale", 1, R_SCALE},
    [R_GB] = {"grad_bits", 1, R_BITS},
    [R_GO] = {"grad_offset", 1, R_OFFSET},
};

static const int FWD_ROLES[] = {R_X, R_SCALE, R_BITS, R_OFFSET, R_Y};
static const int BWD_ROLES[] = {R_GY, R_X, R_SCALE, R_BITS, R_OFFSET, R_GX, R_GS, R_GB, R_GO};

/* The parsed arguments of either function (the _impls' typed input). */
typedef struct fq_args {
    PyObject *t[R_COUNT];   /* tensors by role (borrowed); NULL: absent or None */
    int dim, bits_min, bits_max, num_threads;
    int32_t is_signed;
    double lsq_grad_scale;
    PyObject *stream;       /* NULL: torch's current stream */
    PyObject *workspace;    /* NULL: none */
} fq_args;

#define T_AT(r) (offsetof(fq_args, t) + (size_t)(r) * sizeof(PyObject *))
#define F_AT(f) offsetof(fq_args, f)

static const qv_arg_spec FWD_SPEC[] = {
    {"x", QV_ARG_OBJECT, 1, T_AT(R_X), 0},
    {"scale", QV_ARG_OBJECT, 1, T_AT(R_SCALE), 0},
    {"bits", QV_ARG_OBJECT, 1, T_AT(R_BITS), 0},
    {"offset", QV_ARG_OBJECT, 0, T_AT(R_OFFSET), 0},
    {"y", QV_ARG_OBJECT, 0, T_AT(R_Y), 0},
    {"dim", QV_ARG_INT, 1, F_AT(dim), 0},
    {"signed", QV_ARG_BOOL, 1, F_AT(is_signed), 0},
    {"bits_min", QV_ARG_INT, 1, F_AT(bits_min), 0},
    {"bits_max", QV_ARG_INT, 1, F_AT(bits_max), 0},
    {"num_threads", QV_ARG_INT, 0, F_AT(num_threads), 0},
    {"stream", QV_ARG_OBJECT, 0, F_AT(stream), 0},
};

static const qv_arg_spec BWD_SPEC[] = {
    {"grad_y", QV_ARG_OBJECT, 1, T_AT(R_GY), 0},
    {"x", QV_ARG_OBJECT, 1, T_AT(R_X), 0},
    {"scale", QV_ARG_OBJECT, 1, T_AT(R_SCALE), 0},
    {"bits", QV_ARG_OBJECT, 1, T_AT(R_BITS), 0},
    {"offset", QV_ARG_OBJECT, 0, T_AT(R_OFFSET), 0},
    {"grad_x", QV_ARG_OBJECT, 0, T_AT(R_GX), 0},
    {"grad_scale", QV_ARG_OBJECT, 0, T_AT(R_GS), 0},
    {"grad_bits", QV_ARG_OBJECT, 0, T_AT(R_GB), 0},
    {"grad_offset", QV_ARG_OBJECT, 0, T_AT(R_GO), 0},
    {"dim", QV_ARG_INT, 1, F_AT(dim), 0},
    {"signed", QV_ARG_BOOL, 1, F_AT(is_signed), 0},
    {"bits_min", QV_ARG_INT, 1, F_AT(bits_min), 0},
    {"bits_max", QV_ARG_INT, 1, F_AT(bits_max), 0},
    {"lsq_grad_scale", QV_ARG_DOUBLE, 0, F_AT(lsq_grad_scale), -1.0},
    {"num_threads", QV_ARG_INT, 0, F_AT(num_threads), 0},
    {"stream", QV_ARG_OBJECT, 0, F_AT(stream), 0},
    {"workspace", QV_ARG_OBJECT, 0, F_AT(workspace), 0},
};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

const qv_parser qv_fq_parsers[QV_PARSER_COUNT] = {
    [QV_PARSER_FWD] = {"fq_forward", FWD_SPEC, N_OF(FWD_SPEC), 5},
    [QV_PARSER_BWD] = {"fq_backward", BWD_SPEC, N_OF(BWD_SPEC), 9},
};

/* ------------------------------------------------------------------------ */
/* Steps of the driver */

/* Fills outer / groups / inner / scale_groups / bits range of p from x and
 * the parameter tensors, by the rules of qvit.h (qvit_bits_range_check,
 * qvit_group_layout), with a message naming what broke them. */
static int fill_layout(qvit_fq_params *p, const tview *x, const tview *scale, const tview *bits,
                       int dim, int bits_min, int bits_max, int is_signed)
{
    char a[160];
    switch (qvit_bits_range_check(bits_min, bits_max, is_signed)) {
    case QVIT_RANGE_OK:
        break;
    case QVIT_RANGE_SIGNED:
        PyErr_Format(PyExc_ValueError, "qvit: a signed quantizer needs bits_min >= 2, got %d",
                     bits_min);
        return -1;
    default:
        PyErr_Format(PyExc_ValueError, "qvit: bits_min / bits_max must satisfy 1 <= bits_min "
                     "<= bits_max <= %d, got bits_min=%d, bits_max=%d", QVIT_BITS_LIMIT,
                     bits_min, bits_max);
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
    const int nd = x->t.ndim;
    switch (qvit_group_layout(x->t.shape, nd, dim, G, &p->outer, &p->inner)) {
    case QVIT_LAYOUT_OK:
        break;
    case QVIT_LAYOUT_0D:
        PyErr_Format(PyExc_ValueError, "qvit: a 0-d x cannot be split into %lld groups",
                     (long long)G);
        return -1;
    case QVIT_LAYOUT_DIM:
        PyErr_Format(PyExc_ValueError, "qvit: dim=%d is out of range for x with %d dimensions",
                     dim, nd);
        return -1;
    default: {
        const int d = dim < 0 ? dim + nd : dim;
        PyErr_Format(PyExc_ValueError, "qvit: dimension %d of x has size %lld, which is not "
                     "divisible by the %lld groups of bits", d, (long long)x->t.shape[d],
                     (long long)G);
        return -1;
    }
    }
    p->groups = G;
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


#ifdef QVIT_WITH_CUDA
/* The CUDA backward's scratch: a uint8 tensor of at least
 * qvit_fq_cuda_workspace_bytes() on x's device, viewed into *ws. */
static int take_workspace(qvit_state *st, qvit_fq_params *p, const tview *x, PyObject *obj,
                          tview *ws)
{
    int64_t need = qvit_fq_cuda_workspace_bytes(p);
    if (need < 0) {
        raise_status(st, QVIT_ERR_CUDA, 1);
        return -1;
    }
    if (need == 0) {
        return 0;
    }
    if (!obj) {
        PyErr_Format(PyExc_ValueError, "qvit: workspace is required on CUDA: a uint8 tensor of "
                     "fq_workspace_bytes() = %lld bytes on x's device", (long long)need);
        return -1;
    }
    if (view_get(st, obj, "workspace", ws) < 0) {
        return -1;
    }
    if (ws->t.dtype.code != kDLUInt || ws->t.dtype.bits != 8 || ws->t.dtype.lanes != 1 ||
        ws->t.device.device_type != kDLCUDA || ws->t.device.device_id != x->t.device.device_id ||
        !view_contiguous(ws) || ws->read_only) {
        PyErr_SetString(PyExc_ValueError, "qvit: workspace must be a contiguous, writable uint8 "
                        "tensor on x's CUDA device");
        return -1;
    }
    if (view_numel(ws) < need) {
        PyErr_Format(PyExc_ValueError, "qvit: workspace has %lld bytes, the backward needs %lld "
                     "(fq_workspace_bytes)", (long long)view_numel(ws), (long long)need);
        return -1;
    }
    p->workspace = view_data(ws);
    p->workspace_bytes = view_numel(ws);
    return 0;
}
#endif

/* Runs the kernel of p (CUDA or CPU, the GIL released above a size). */
static int dispatch(qvit_state *st, qvit_fq_params *p, const tview *x, PyObject *workspace,
                    tview *ws, int backward)
{
    qvit_status s;
    const int is_cuda = x->t.device.device_type == kDLCUDA;
    if (is_cuda) {
#ifdef QVIT_WITH_CUDA
        if (backward && take_workspace(st, p, x, workspace, ws) < 0) {
            return -1;
        }
        s = backward ? qvit_fq_backward_cuda(p) : qvit_fq_forward_cuda(p);
#else
        (void)workspace;
        (void)ws;
        s = QVIT_ERR_NO_CUDA;
#endif
    } else if (view_numel(x) >= QVIT_GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        s = backward ? qvit_fq_backward_cpu(p) : qvit_fq_forward_cpu(p);
        Py_END_ALLOW_THREADS
    } else {
        s = backward ? qvit_fq_backward_cpu(p) : qvit_fq_forward_cpu(p);
    }
    if (s != QVIT_OK) {
        raise_status(st, s, is_cuda);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The driver */

static PyObject *fq_run(qvit_state *st, const fq_args *a, int backward)
{
    const int *roles = backward ? BWD_ROLES : FWD_ROLES;
    const int nroles = backward ? N_OF(BWD_ROLES) : N_OF(FWD_ROLES);
    const int has_offset = a->t[R_OFFSET] != NULL;
    tview v[R_COUNT], ws;
    PyObject *obj[R_COUNT] = {NULL};   /* owned: the tensors of each role */
    PyObject *result = NULL;
    qvit_fq_params p;
    memset(v, 0, sizeof v);
    memset(&ws, 0, sizeof ws);
    memset(&p, 0, sizeof p);

    /* view: the inputs, then the outputs (allocated as NumPy arrays when None) */
    for (int i = 0; i < nroles; i++) {
        const int r = roles[i];
        if ((r == R_OFFSET || r == R_GO) && !has_offset) {
            continue;
        }
        if (a->t[r]) {
            obj[r] = Py_NewRef(a->t[r]);
        } else if (!(obj[r] = numpy_empty_like(a->t[ROLES[r].like], ROLES[r].name,
                                               ROLES[ROLES[r].like].name))) {
            goto done;
        }
        if (view_get(st, obj[r], ROLES[r].name, &v[r]) < 0) {
            goto done;
        }
    }

    /* check: x, the other inputs, the layout, the outputs, overlaps */
    if (check_tensor(&v[R_X], &v[R_X], -1, 0) < 0) {
        goto done;
    }
    const int xdt = view_dtype(&v[R_X]);
    const int pdt = xdt == QVIT_F64 ? QVIT_F64 : QVIT_F32;
    const tview *ins[R_COUNT], *outs[R_COUNT];
    int n_in = 0, n_out = 0, layout_done = 0;
    for (int i = 0; i < nroles; i++) {
        const int r = roles[i];
        if (!v[r].valid || r == R_X) {
            continue;
        }
        if (r >= R_Y && !layout_done) {
            if (fill_layout(&p, &v[R_X], &v[R_SCALE], &v[R_BITS], a->dim, a->bits_min,
                            a->bits_max, a->is_signed) < 0) {
                goto done;
            }
            layout_done = 1;
        }
        const int like = ROLES[r].like;
        if (check_tensor(&v[r], &v[R_X], ROLES[r].param ? pdt : xdt, r >= R_Y) < 0 ||
            (like >= 0 && check_shape_like(&v[r], &v[like], ROLES[like].name) < 0)) {
            goto done;
        }
    }
    for (int r = 0; r < R_COUNT; r++) {
        if (v[r].valid) {
            if (r >= R_Y) {
                outs[n_out++] = &v[r];
            } else {
                ins[n_in++] = &v[r];
            }
        }
    }
    if (check_no_overlap(outs, n_out, ins, n_in) < 0) {
        goto done;
    }

    /* fill params */
    p.has_offset = has_offset;
    p.grad_scale = backward && a->lsq_grad_scale >= 0.0 ? a->lsq_grad_scale : -1.0;
    p.x_dtype = (qvit_dtype)xdt;
    p.param_dtype = (qvit_dtype)pdt;
    p.x = view_data(&v[R_X]);
    p.grad_y = view_data(&v[R_GY]);
    p.scale = view_data(&v[R_SCALE]);
    p.bits = view_data(&v[R_BITS]);
    p.offset = view_data(&v[R_OFFSET]);
    p.y = view_data(&v[R_Y]);
    p.grad_x = view_data(&v[R_GX]);
    p.grad_scale_out = view_data(&v[R_GS]);
    p.grad_bits = view_data(&v[R_GB]);
    p.grad_offset = view_data(&v[R_GO]);
    p.num_threads = a->num_threads;
    if (resolve_device(st, &p, &v[R_X], a->stream) < 0 ||
        dispatch(st, &p, &v[R_X], a->workspace, &ws, backward) < 0) {
        goto done;
    }
    result = backward ? PyTuple_Pack(4, obj[R_GX], obj[R_GS], obj[R_GB],
                                     has_offset ? obj[R_GO] : Py_None)
                      : Py_NewRef(obj[R_Y]);
done:
    view_release(&ws);
    for (int r = R_COUNT - 1; r >= 0; r--) {
        view_release(&v[r]);
        Py_XDECREF(obj[r]);
    }
    return result;
}

/* ------------------------------------------------------------------------ */
/* The functions */

PyDoc_STRVAR(qv_fq_forward_doc,
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

static PyObject *fq_forward_impl(qvit_state *st, const fq_args *a)
{
    return fq_run(st, a, 0);
}

/* Parse the arguments with parser `which` into an fq_args, then run `impl`. */
static PyObject *fq_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames, int which,
                          PyObject *(*impl)(qvit_state *, const fq_args *))
{
    qvit_state *st = qv_state(module);
    fq_args a;
    memset(&a, 0, sizeof a);
    if (qv_parse(&qv_fq_parsers[which], st->names[which], args, nargs, kwnames, &a) < 0) {
        return NULL;
    }
    return impl(st, &a);
}

static PyObject *qv_fq_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    return fq_entry(module, args, nargs, kwnames, QV_PARSER_FWD, fq_forward_impl);
}

PyDoc_STRVAR(qv_fq_backward_doc,
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

static PyObject *fq_backward_impl(qvit_state *st, const fq_args *a)
{
    if (a->lsq_grad_scale != a->lsq_grad_scale) {
        PyErr_SetString(PyExc_ValueError, "qvit: lsq_grad_scale must not be NaN");
        return NULL;
    }
    if (!a->t[R_OFFSET] && a->t[R_GO]) {
        PyErr_SetString(PyExc_ValueError, "qvit: grad_offset must be None when offset is None");
        return NULL;
    }
    return fq_run(st, a, 1);
}

static PyObject *qv_fq_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    return fq_entry(module, args, nargs, kwnames, QV_PARSER_BWD, fq_backward_impl);
}

PyMethodDef qv_fq_methods[] = {
    {"fq_forward", (PyCFunction)(void (*)(void))qv_fq_forward, METH_FASTCALL | METH_KEYWORDS,
     qv_fq_forward_doc},
    {"fq_backward", (PyCFunction)(void (*)(void))qv_fq_backward, METH_FASTCALL | METH_KEYWORDS,
     qv_fq_backward_doc},
    {NULL, NULL, 0, NULL},
};
