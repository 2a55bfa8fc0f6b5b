/* binding.h - what the files of the CPython binding (qvit._C) share.
 *
 * The binding is three layers, each in its own file:
 *   tensor_intake.c  DLPack in: structs, capsules, torch's exchange API, and
 *                    the checks memory safety needs (device, dtype, extent,
 *                    contiguity, alignment, overlap);
 *   argparse.c       a generic METH_FASTCALL argument parser fed by a
 *                    declarative spec per function (the manner of CPython's
 *                    Argument Clinic), writing typed fields of a C struct;
 *   fq_bind.c        fq_forward / fq_backward: the spec of each, its typed
 *                    _impl, and ONE driver shared by both
 *                    (parse -> view -> check -> fill params -> dispatch ->
 *                    release, with one cleanup path);
 * and module.c holds the small functions, the method table and module init.
 * Below the binding nothing includes Python.h (qvit.h is the kernels' API).
 */
#ifndef QVIT_BINDING_H
#define QVIT_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

#include "dlpack.h"
#include "qvit.h"

/* ------------------------------------------------------------------------ */
/* argparse.c */

typedef enum qv_arg_kind {
    QV_ARG_OBJECT,   /* PyObject * (borrowed); an optional None is stored as NULL */
    QV_ARG_INT,      /* int: anything with __index__, within int32 */
    QV_ARG_DOUBLE,   /* double: anything with __float__ */
    QV_ARG_BOOL      /* int32_t 0 / 1: the truth value */
} qv_arg_kind;

/* One parameter of a function. Positional-or-keyword parameters come first
 * (npos of them, each must be given); the rest are keyword-only. An object
 * parameter that is not `required` may be None, stored as NULL (absent). */
typedef struct qv_arg_spec {
    const char *name;
    qv_arg_kind kind;
    int required;      /* keyword-only: must be given; object: None stays Py_None */
    size_t offset;     /* offsetof the field in the function's argument struct */
    double dflt;       /* default of an optional INT / DOUBLE / BOOL */
} qv_arg_spec;

#define QV_MAX_ARGS 20

typedef struct qv_parser {
    const char *fname;
    const qv_arg_spec *specs;
    int nargs;
    int npos;
} qv_parser;

/* Fills the struct at `out` from a METH_FASTCALL | METH_KEYWORDS call.
 * `interned` holds the interned names of the specs (qv_parser_intern);
 * keyword lookups compare pointers first. 0, or -1 with TypeError /
 * ValueError set. */
int qv_parse(const qv_parser *ps, PyObject *const *interned, PyObject *const *args,
             Py_ssize_t nargs, PyObject *kwnames, void *out);
int qv_parser_intern(const qv_parser *ps, PyObject **interned);
void qv_parser_clear(const qv_parser *ps, PyObject **interned);

/* ------------------------------------------------------------------------ */
/* Module state */

enum { QV_PARSER_FWD, QV_PARSER_BWD, QV_PARSER_COUNT };

typedef struct qvit_state {
    PyObject *KernelError;
    PyObject *tensor_type;         /* torch._C.TensorBase, or NULL */
    PyObject *api_owner;           /* keeps the exchange API capsule / int alive */
    const DLPackExchangeAPI *api;  /* NULL until set_exchange_api() */
    PyObject *str_dlpack;          /* "__dlpack__" */
    PyObject *max_version;         /* (1, 0) */
    PyObject *kwnames_max_version; /* ("max_version",) */
    PyObject *names[QV_PARSER_COUNT][QV_MAX_ARGS]; /* interned argument names */
} qvit_state;

static inline qvit_state *qv_state(PyObject *module)
{
    return (qvit_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------ */
/* tensor_intake.c */

/* A tensor seen through DLPack for the length of one call. */
typedef struct tview {
    DLTensor t;
    const char *name;                      /* argument name, for messages */
    PyObject *capsule;                     /* owned capsule, or NULL */
    DLManagedTensor *legacy;               /* deleter to call, or NULL */
    DLManagedTensorVersioned *versioned;   /* deleter to call, or NULL */
    int read_only;
    int valid;
} tview;

/* Views obj (a torch tensor via the exchange API, a DLPack capsule, or
 * anything with __dlpack__); 0, or -1 with an exception naming `name`. */
int view_get(qvit_state *st, PyObject *obj, const char *name, tview *v);
/* Returns what view_get took; safe on a zeroed or already released view. */
void view_release(tview *v);
void *view_data(const tview *v);
int64_t view_numel(const tview *v);
int view_contiguous(const tview *v);
/* qvit_dtype of the view, or -1 when it is not one of the four. */
int view_dtype(const tview *v);
const char *dtype_name(qvit_dtype d);
void describe_shape(const tview *v, char *buf, size_t n);

/* Device (CPU / CUDA, x's), dtype (== want_dtype, or any of the four when
 * want_dtype < 0), extent, contiguity, writability and data pointer of v. */
int check_tensor(const tview *v, const tview *x, int want_dtype, int writable);
/* v has the shape of ref (`what` names ref in the message). */
int check_shape_like(const tview *v, const tview *ref, const char *what);
/* No output shares memory with an input or another output (NULL skipped). */
int check_no_overlap(const tview *const *outs, int n_out, const tview *const *ins, int n_in);

/* ------------------------------------------------------------------------ */
/* fq_bind.c */

/* The specs of fq_forward / fq_backward (module init interns their names). */
extern const qv_parser qv_fq_parsers[QV_PARSER_COUNT];
/* fq_forward and fq_backward, added to the module at init. */
extern PyMethodDef qv_fq_methods[];

#endif /* QVIT_BINDING_H */
