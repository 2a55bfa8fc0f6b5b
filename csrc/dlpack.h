/* dlpack.h - the DLPack ABI as qvit uses it, declared by this project.
 *
 * Written from the DLPack specification (data-apis / dmlc DLPack 1.x): the
 * tensor structs, the legacy and versioned managed tensors, and the C
 * exchange API table that torch (>= 2.10) publishes on its tensor class.
 * Only what the binding needs is declared; the layouts are pinned by the
 * static asserts at the bottom (x86-64 / aarch64 LP64 sizes).
 */
#ifndef QVIT_DLPACK_H
#define QVIT_DLPACK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QVIT_DLPACK_MAJOR 1

typedef struct DLPackVersion {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct DLDevice {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6
} DLDataTypeCode;

typedef struct DLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

/* strides are in elements; NULL strides mean compact row-major (older
 * producers). The data to use starts at (char *)data + byte_offset. */
typedef struct DLTensor {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;

/* Legacy capsule payload ("dltensor"). */
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

#define DLPACK_FLAG_BITMASK_READ_ONLY (UINT64_C(1) << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (UINT64_C(1) << 1)
#define DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED (UINT64_C(1) << 2)

/* Versioned capsule payload ("dltensor_versioned", DLPack >= 1.0). If
 * version.major differs from 1 only the deleter may be used. */
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/* The C exchange API (DLPack 1.2 / 1.3): a table found on the producer's
 * tensor type. Functions return 0 on success, -1 with a Python error set. */
typedef struct DLPackExchangeAPIHeader {
    DLPackVersion version;
    struct DLPackExchangeAPIHeader *prev_api;
} DLPackExchangeAPIHeader;

typedef int (*DLPackManagedTensorAllocator)(
    DLTensor *prototype, DLManagedTensorVersioned **out, void *error_ctx,
    void (*set_error)(void *error_ctx, const char *kind, const char *message));
typedef int (*DLPackManagedTensorFromPyObjectNoSync)(void *py_object,
                                                     DLManagedTensorVersioned **out);
typedef int (*DLPackManagedTensorToPyObjectNoSync)(DLManagedTensorVersioned *tensor,
                                                   void **out_py_object);
typedef int (*DLPackDLTensorFromPyObjectNoSync)(void *py_object, DLTensor *out);
typedef int (*DLPackCurrentWorkStream)(DLDeviceType device_type, int32_t device_id,
                                       void **out_current_stream);

typedef struct DLPackExchangeAPI {
    DLPackExchangeAPIHeader header;
    DLPackManagedTensorAllocator managed_tensor_allocator;
    DLPackManagedTensorFromPyObjectNoSync managed_tensor_from_py_object_no_sync;
    DLPackManagedTensorToPyObjectNoSync managed_tensor_to_py_object_no_sync;
    DLPackDLTensorFromPyObjectNoSync dltensor_from_py_object_no_sync; /* may be NULL */
    DLPackCurrentWorkStream current_work_stream;
} DLPackExchangeAPI;

#if defined(__cplusplus)
#define QVIT_STATIC_ASSERT static_assert
#else
#define QVIT_STATIC_ASSERT _Static_assert
#endif

#if UINTPTR_MAX == UINT64_MAX
QVIT_STATIC_ASSERT(sizeof(DLDevice) == 8, "DLDevice ABI");
QVIT_STATIC_ASSERT(sizeof(DLDataType) == 4, "DLDataType ABI");
QVIT_STATIC_ASSERT(sizeof(DLTensor) == 48, "DLTensor ABI");
QVIT_STATIC_ASSERT(offsetof(DLTensor, byte_offset) == 40, "DLTensor ABI");
QVIT_STATIC_ASSERT(sizeof(DLManagedTensor) == 64, "DLManagedTensor ABI");
QVIT_STATIC_ASSERT(sizeof(DLManagedTensorVersioned) == 80, "DLManagedTensorVersioned ABI");
QVIT_STATIC_ASSERT(offsetof(DLManagedTensorVersioned, dl_tensor) == 32,
                   "DLManagedTensorVersioned ABI");
QVIT_STATIC_ASSERT(sizeof(DLPackExchangeAPI) == 56, "DLPackExchangeAPI ABI");
#endif

#ifdef __cplusplus
}
#endif

#endif /* QVIT_DLPACK_H */
