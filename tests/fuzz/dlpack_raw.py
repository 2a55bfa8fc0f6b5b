"""Hand-built DLPack capsules (ctypes), for inputs no real producer makes.

A raw capsule lets a test claim any shape, strides, dtype, device, byte
offset or version, with or without memory behind it: negative or
overflowing sizes, a NULL data pointer, an unknown device, a DLPack 2.x
tensor, a read-only flag on an output. The structs mirror csrc/dlpack.h
(DLPack 1.x ABI, 64-bit). The capsule has no destructor and its manager has
no deleter; the Python objects behind it (struct, shape / strides arrays,
backing buffer) are kept alive by the returned :class:`RawTensor`, which the
caller must hold for as long as the capsule may be used.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

# DLDeviceType / DLDataTypeCode values (csrc/dlpack.h)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_OPENCL, KDL_ROCM, KDL_CUDA_MANAGED = 1, 2, 3, 4, 10, 13
KDL_INT, KDL_UINT, KDL_FLOAT, KDL_OPAQUE, KDL_BFLOAT, KDL_COMPLEX, KDL_BOOL = 0, 1, 2, 3, 4, 5, 6
FLAG_READ_ONLY = 1

DTYPES = {
    # name: (code, bits)
    "float32": (KDL_FLOAT, 32), "float16": (KDL_FLOAT, 16), "float64": (KDL_FLOAT, 64),
    "bfloat16": (KDL_BFLOAT, 16), "int32": (KDL_INT, 32), "uint8": (KDL_UINT, 8),
    "bool": (KDL_BOOL, 8), "complex64": (KDL_COMPLEX, 64), "float8": (KDL_FLOAT, 8),
    "opaque": (KDL_OPAQUE, 32),
}


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
        ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER),
        ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor),
    ]


assert ctypes.sizeof(DLTensor) == 48 and ctypes.sizeof(DLManagedTensor) == 64
assert ctypes.sizeof(DLManagedTensorVersioned) == 80

_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class RawTensor:
    """A raw DLPack capsule and everything it points to.

    ``buffer``: a writable ctypes / NumPy object backing the data (or None:
    ``data`` is then the given integer address, e.g. 0). ``versioned``:
    a "dltensor_versioned" capsule (DLPack >= 1.0, ``version`` settable) or
    a legacy "dltensor" one. ``strides=None`` leaves the strides NULL
    (compact row-major by the DLPack rules).
    """

    def __init__(self, shape: Sequence[int], dtype="float32", *, buffer=None, data: int = 0,
                 strides: Optional[Sequence[int]] = None, device=(KDL_CPU, 0),
                 byte_offset: int = 0, versioned: bool = True, version=(1, 0),
                 read_only: bool = False, lanes: int = 1, ndim: Optional[int] = None):
        self.buffer = buffer
        code, bits = DTYPES[dtype] if isinstance(dtype, str) else dtype
        n = len(shape)
        self._shape = (ctypes.c_int64 * max(n, 1))(*[int(s) for s in shape])
        self._strides = None if strides is None else (ctypes.c_int64 * max(n, 1))(
            *[int(s) for s in strides])
        if buffer is not None:
            addr = buffer.ctypes.data if hasattr(buffer, "ctypes") else ctypes.addressof(buffer)
        else:
            addr = int(data)
        t = DLTensor()
        t.data = addr or None
        t.device = DLDevice(*device)
        t.ndim = n if ndim is None else ndim
        t.dtype = DLDataType(code, bits, lanes)
        t.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = (ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))
                     if self._strides is not None else None)
        t.byte_offset = byte_offset
        if versioned:
            self.managed = DLManagedTensorVersioned()
            self.managed.version = DLPackVersion(*version)
            self.managed.flags = FLAG_READ_ONLY if read_only else 0
            self.managed.dl_tensor = t
            name = b"dltensor_versioned"
        else:
            self.managed = DLManagedTensor()
            self.managed.dl_tensor = t
            name = b"dltensor"
        self.name = name
        self.capsule = _new_capsule(ctypes.addressof(self.managed), name, None)

    def fresh(self):
        """A new capsule over the same struct (a capsule is consumed by one use)."""
        self.capsule = _new_capsule(ctypes.addressof(self.managed), self.name, None)
        return self.capsule
