/* argparse.c - the generic argument parser of the binding.
 *
 * In the manner of CPython's Argument Clinic: each function declares its
 * parameters once (a qv_arg_spec table: name, kind, required, where the
 * value goes) and one parser fills a typed struct that the function's _impl
 * takes. METH_FASTCALL | METH_KEYWORDS: no tuple or dict is built per call,
 * so the hot ops allocate nothing that the cyclic GC tracks.
 */
#include "binding.h"

#include <string.h>

int qv_parser_intern(const qv_parser *ps, PyObject **interned)
{
    for (int i = 0; i < ps->nargs; i++) {
        if (!(interned[i] = PyUnicode_InternFromString(ps->specs[i].name))) {
            return -1;
        }
    }
    return 0;
}

void qv_parser_clear(const qv_parser *ps, PyObject **interned)
{
    for (int i = 0; i < ps->nargs; i++) {
        Py_CLEAR(interned[i]);
    }
}

/* An int argument (anything with __index__) within int32. */
static int conv_int(PyObject *o, const char *name, int *out)
{
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

static int conv_double(PyObject *o, const char *name, double *out)
{
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

static int conv_bool(PyObject *o, const char *name, int32_t *out)
{
    int t = PyObject_IsTrue(o);
    if (t < 0) {
        /* e.g. a NumPy array of several elements: say which argument */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "qvit: %s must be a bool, got %s with no single "
                     "truth value", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = t;
    return 0;
}

/* Stores one value (o == NULL: absent, the default) into its field. */
static int store(const qv_parser *ps, const qv_arg_spec *a, PyObject *o, int positional,
                 char *out)
{
    char *field = out + a->offset;
    if (!o && (positional || a->required)) {
        PyErr_Format(PyExc_TypeError, "%s() missing required %sargument '%s'", ps->fname,
                     positional ? "" : "keyword ", a->name);
        return -1;
    }
    switch (a->kind) {
    case QV_ARG_OBJECT:
        /* an optional object given as None is absent */
        *(PyObject **)field = (o == Py_None && !a->required) ? NULL : o;
        return 0;
    case QV_ARG_INT:
        if (!o) {
            *(int *)field = (int)a->dflt;
            return 0;
        }
        return conv_int(o, a->name, (int *)field);
    case QV_ARG_DOUBLE:
        if (!o) {
            *(double *)field = a->dflt;
            return 0;
        }
        return conv_double(o, a->name, (double *)field);
    case QV_ARG_BOOL:
        if (!o) {
            *(int32_t *)field = a->dflt != 0.0;
            return 0;
        }
        return conv_bool(o, a->name, (int32_t *)field);
    }
    PyErr_Format(PyExc_SystemError, "qvit: bad argument spec for %s", a->name);
    return -1;
}

int qv_parse(const qv_parser *ps, PyObject *const *interned, PyObject *const *args,
             Py_ssize_t nargs, PyObject *kwnames, void *out)
{
    PyObject *given[QV_MAX_ARGS] = {NULL};
    const int n = ps->nargs;
    if (nargs > ps->npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional arguments (%zd given)",
                     ps->fname, ps->npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        given[i] = args[i];
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
            if (PyUnicode_CompareWithASCIIString(key, ps->specs[i].name) == 0) {
                j = i;
            }
        }
        if (j < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         ps->fname, key);
            return -1;
        }
        if (given[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         ps->fname, ps->specs[j].name);
            return -1;
        }
        given[j] = args[nargs + k];
    }
    /* positional parameters first, so that a missing one is reported first */
    for (int i = 0; i < n; i++) {
        if (store(ps, &ps->specs[i], given[i], i < ps->npos, (char *)out) < 0) {
            return -1;
        }
    }
    return 0;
}
