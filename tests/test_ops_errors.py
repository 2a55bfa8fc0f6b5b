"""Bad input to qvit.ops.fake_quant: the right exception, a message naming the problem.

Argument checks that need no data run in Python before the dispatcher (so
they hold on every device and under torch.compile); checks of parameter
*values* (scale <= 0 / NaN / Inf, NaN bits, non-finite offsets) are done by
the CPU kernel, which reads the small parameter tables anyway. The CUDA path
does not check values: it never reads parameters back to the host.
"""
import warnings

import pytest
import torch

from qvit.ops import torch_ops as ops

NAN, INF = float("nan"), float("inf")

with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
    warnings.simplefilter("ignore", UserWarning)
    _CSR = torch.randn(4, 6).to_sparse_csr()


def args(**over):
    a = dict(x=torch.randn(4, 6), scale=torch.full((1, 7), 0.1), bits=torch.tensor([4.0]),
             offset=None, signed=True, dim=0, bits_range=(2, 8), grad_scale=None)
    a.update(over)
    return a


def call(a):
    kw = dict(a)
    x, scale, bits, offset = kw.pop("x"), kw.pop("scale"), kw.pop("bits"), kw.pop("offset")
    return ops.fake_quant(x, scale, bits, offset, **kw)


BAD_ARGS = [
    # (overrides, exception, message regex)
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scale=0.1), TypeError, "scale must be a torch.Tensor"),
    (dict(bits=4), TypeError, "bits must be a torch.Tensor"),
    (dict(offset=0.0), TypeError, "offset must be a torch.Tensor or None"),
    (dict(signed=1), TypeError, "signed must be a bool"),
    (dict(dim=0.0), TypeError, "dim must be an int"),
    (dict(bits_range=(2.0, 8)), TypeError, "bits_range must be a pair of ints"),
    (dict(bits_range=(2, 8, 9)), TypeError, "bits_range must be a pair of ints"),
    (dict(bits_range="28"), TypeError, "bits_range must be a pair of ints"),
    (dict(grad_scale="1"), TypeError, "grad_scale must be None or a float"),
    (dict(x=torch.randint(0, 5, (4, 6))), TypeError, "x must be float32.*got torch.int64"),
    (dict(x=torch.randn(4, 6).to(torch.complex64)), TypeError, "x must be float32"),
    (dict(scale=torch.full((1, 7), 0.1, dtype=torch.float64)), TypeError,
     "scale must be float32 for a float32 x, got float64"),
    (dict(scale=torch.full((1, 7), 0.1, dtype=torch.float16)), TypeError, "scale must be float32"),
    (dict(bits=torch.tensor([4])), TypeError, "bits must be float32.*got int64"),
    (dict(offset=torch.zeros(1, 7, dtype=torch.bfloat16)), TypeError, "offset must be float32"),
    (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError,
     "scale must be float64 for a float64 x"),
    (dict(x=torch.randn(4, 6).half(), scale=torch.full((1, 7), 0.1).half()), TypeError,
     "scale must be float32 for a float16 x"),
    (dict(x=torch.randn(4, 6).to_sparse()), TypeError,
     r"x must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    (dict(x=_CSR), TypeError, "x must be a dense.*sparse_csr"),
    (dict(x=torch.randn(4, 6).to_mkldnn()), TypeError, "x must be a dense.*_mkldnn"),
    (dict(scale=torch.full((1, 7), 0.1).to_sparse()), TypeError, "scale must be a dense"),
    (dict(offset=torch.zeros(1, 7).to_sparse()), TypeError, "offset must be a dense"),
    (dict(scale=torch.full((1, 7), 0.1, device="meta")), ValueError,
     "scale is on meta but x is on cpu"),
    (dict(bits=torch.tensor([4.0], device="meta")), ValueError, "bits is on meta"),
    (dict(bits_range=(0, 8)), ValueError, "1 <= min <= max <= 24"),
    (dict(bits_range=(8, 2)), ValueError, "1 <= min <= max <= 24"),
    (dict(bits_range=(2, 25)), ValueError, "1 <= min <= max <= 24"),
    (dict(bits_range=(1, 8), scale=torch.full((1, 8), 0.1)), ValueError,
     "signed quantizer needs bits_range min >= 2"),
    (dict(grad_scale=-1.0), ValueError, "grad_scale must be finite and >= 0"),
    (dict(grad_scale=NAN), ValueError, "grad_scale must be finite"),
    (dict(bits=torch.tensor(4.0)), ValueError, "bits must be a 1-D tensor"),
    (dict(bits=torch.empty(0)), ValueError, "bits must be a 1-D tensor .G. with G >= 1"),
    (dict(bits=torch.ones(2, 2) * 4), ValueError, "bits must be a 1-D tensor"),
    (dict(scale=torch.full((7,), 0.1)), ValueError, r"scale must have shape \[1, 7\]"),
    (dict(scale=torch.full((1, 6), 0.1)), ValueError, r"scale must have shape \[1, 7\]"),
    (dict(bits=torch.full((2,), 4.0), scale=torch.full((3, 7), 0.1)), ValueError,
     r"scale must have shape \[1, 7\] or \[2, 7\]"),
    (dict(offset=torch.zeros(2, 7)), ValueError, "offset must have the shape of scale"),
    (dict(bits=torch.full((4,), 4.0), dim=1), ValueError, "not divisible by the 4 groups"),
    (dict(bits=torch.full((3,), 4.0), dim=5), ValueError, "dim=5 is out of range"),
    (dict(x=torch.tensor(1.0), bits=torch.full((2,), 4.0)), ValueError, "0-d tensor"),
]


@pytest.mark.parametrize("over,exc,msg", BAD_ARGS, ids=[m for _, _, m in BAD_ARGS])
def test_bad_arguments(over, exc, msg):
    with pytest.raises(exc, match=msg):
        call(args(**over))


BAD_VALUES = [
    (dict(scale=torch.zeros(1, 7)), "scale"),
    (dict(scale=torch.full((1, 7), -0.1)), "scale"),
    (dict(scale=torch.full((1, 7), NAN)), "scale"),
    (dict(scale=torch.full((1, 7), INF)), "scale"),
    (dict(bits=torch.tensor([NAN])), "bits"),
    (dict(offset=torch.full((1, 7), INF)), "offset"),
    (dict(offset=torch.full((1, 7), NAN)), "offset"),
]


@pytest.mark.parametrize("over,name", BAD_VALUES, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_VALUES)])
def test_bad_parameter_values_cpu(needs_c, over, name):
    with pytest.raises(ValueError, match=name):
        call(args(**over))


def test_bad_value_in_an_inactive_entry_is_rejected(needs_c):
    # The whole table is checked, not only the active entry: a bad inactive
    # entry would surface later, when the bit-width moves onto it.
    scale = torch.full((1, 7), 0.1)
    scale[0, 6] = -1.0
    with pytest.raises(ValueError, match="scale"):
        call(args(scale=scale))


@pytest.mark.parametrize("name", ["scale", "bits", "offset"])
def test_bad_values_in_backward_too(needs_c, name):
    x = torch.randn(4, 6)
    p = dict(scale=torch.full((1, 7), 0.1), bits=torch.tensor([4.0]), offset=torch.zeros(1, 7))
    p[name] = torch.full_like(p[name], NAN)
    with pytest.raises(ValueError, match=name):
        torch.ops.qvit.fq_backward.default(torch.ones_like(x), x, p["scale"], p["bits"],
                                           p["offset"], 0, True, 2, 8, -1.0)


def test_grad_y_shape_mismatch_in_raw_op(needs_c):
    x = torch.randn(4, 6)
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.qvit.fq_backward.default(torch.randn(4, 5), x, torch.full((1, 7), 0.1),
                                           torch.tensor([4.0]), None, 0, True, 2, 8, -1.0)


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_C_IMPORT_ERROR", "ImportError: libfoo.so: cannot open")
    with pytest.raises(RuntimeError, match="qvit._C could not be imported.*libfoo.so"):
        call(args())
    assert ops.backend_info()["c_loaded"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mix")
def test_device_mix_cuda():
    with pytest.raises(ValueError, match="scale is on cuda"):
        call(args(scale=torch.full((1, 7), 0.1, device="cuda")))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_x_is_refused(layout):
    nt = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)], layout=layout)
    with pytest.raises(TypeError, match="x must be a dense .strided. tensor, got a nested tensor"):
        ops.fake_quant(nt, torch.full((1, 7), 0.1), torch.tensor([4.0]))
