/* module.c - the CPython binding qvit._C (skeleton). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "dlpack.h"
#include "qvit.h"

typedef struct {
    PyObject *KernelError;
} qvit_state;

static inline qvit_state *get_state(PyObject *module)
{
    return (qvit_state *)PyModule_GetState(module);
}

static PyObject *cuda_built(PyObject *module, PyObject *unused)
{
    (void)module; (void)unused;
#ifdef QVIT_WITH_CUDA
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "cuda_built($module, /)\n--\n\nTrue when CUDA kernels were compiled in."},
    {NULL, NULL, 0, NULL},
};

static int qvit_exec(PyObject *module)
{
    qvit_state *st = get_state(module);
    st->KernelError = PyErr_NewException("qvit._C.KernelError", PyExc_RuntimeError, NULL);
    if (!st->KernelError) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "KernelError", st->KernelError);
}

static int qvit_traverse(PyObject *module, visitproc visit, void *arg)
{
    qvit_state *st = get_state(module);
    Py_VISIT(st->KernelError);
    return 0;
}

static int qvit_clear(PyObject *module)
{
    qvit_state *st = get_state(module);
    Py_CLEAR(st->KernelError);
    return 0;
}

static void qvit_free(void *module) { qvit_clear((PyObject *)module); }

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, qvit_exec},
    {0, NULL},
};

static struct PyModuleDef qvit_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qvit._C",
    .m_size = sizeof(qvit_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = qvit_traverse,
    .m_clear = qvit_clear,
    .m_free = qvit_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&qvit_module); }
