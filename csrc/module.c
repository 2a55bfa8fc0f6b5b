/* module.c - qvit._C, the CPython binding of the fake-quant kernels.
 *
 * Plain C API, multi-phase init (PEP 489), all state in the module object.
 * This file holds the small functions, the method table and module init;
 * fq_forward / fq_backward live in fq_bind.c, tensor intake in
 * tensor_intake.c, the argument parser in argparse.c (binding.h).
 */
#include "binding.h"

#include <string.h>

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
        PyErr_Format(qv_state(module)->KernelError, "qvit: fq_workspace_bytes on CUDA device "
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
    qvit_state *st = qv_state(module);
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

PyDoc_STRVAR(cpu_isa_doc,
"cpu_isa($module, /)\n"
"--\n"
"\n"
"The x86-64 ISA level the CPU kernels run at now: \"v4\" (AVX-512), \"v3\" (AVX2),\n"
"\"v2\" (SSE4.2) or \"base\"; what the CPU supports, capped by the environment\n"
"variable QVIT_ISA (read at each call, as the dispatcher does).");

static PyObject *cpu_isa(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyUnicode_FromString(qvit_cpu_isa());
}

static PyMethodDef methods[] = {
    {"fq_workspace_bytes", fq_workspace_bytes, METH_VARARGS, fq_workspace_bytes_doc},
    {"set_exchange_api", set_exchange_api, METH_VARARGS, set_exchange_api_doc},
    {"cuda_built", cuda_built, METH_NOARGS, cuda_built_doc},
    {"cuda_device_count", cuda_device_count, METH_NOARGS, cuda_device_count_doc},
    {"cpu_isa", cpu_isa, METH_NOARGS, cpu_isa_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------------ */
/* Module */

static int qvit_exec(PyObject *module)
{
    qvit_state *st = qv_state(module);
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
    for (int k = 0; k < QV_PARSER_COUNT; k++) {
        if (qv_parser_intern(&qv_fq_parsers[k], st->names[k]) < 0) {
            return -1;
        }
    }
    if (PyModule_AddFunctions(module, qv_fq_methods) < 0) {
        return -1;
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
    qvit_state *st = qv_state(module);
    Py_VISIT(st->KernelError);
    Py_VISIT(st->tensor_type);
    Py_VISIT(st->api_owner);
    return 0;
}

static int qvit_clear(PyObject *module)
{
    qvit_state *st = qv_state(module);
    Py_CLEAR(st->KernelError);
    Py_CLEAR(st->tensor_type);
    Py_CLEAR(st->api_owner);
    Py_CLEAR(st->str_dlpack);
    Py_CLEAR(st->max_version);
    Py_CLEAR(st->kwnames_max_version);
    for (int k = 0; k < QV_PARSER_COUNT; k++) {
        qv_parser_clear(&qv_fq_parsers[k], st->names[k]);
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
