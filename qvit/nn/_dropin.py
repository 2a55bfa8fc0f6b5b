"""Building quantized layers from timm's own constructor arguments.

Every drop-in layer is made the same way: the float layer it stands for is
built with the arguments given (timm's or torch's own constructor, so
parameter names, shapes and initialisation are timm's), then taken over by the
layer's ``from_float`` (see :mod:`._adopt`), which adds the quantizers a
:class:`~qvit.nn.config.QViTConfig` asks for. :func:`~qvit.quantize_model`
calls the same ``from_float`` on the modules of an existing model, so a model
built with the layers and a converted one are the same modules.

The quantization config comes from the ``qconfig=`` keyword, else from the
innermost :func:`default_qconfig` block, else ``QViTConfig()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Optional, Tuple, Union

from torch import nn

from .config import PRESETS, QuantizerConfig, QViTConfig, preset

__all__ = ["default_qconfig", "current_qconfig", "resolve_qconfig", "plain_site", "first_last_site",
           "DropIn"]

QConfigLike = Union[None, str, QViTConfig]

_DEFAULT: contextvars.ContextVar[Optional[QViTConfig]] = contextvars.ContextVar(
    "qvit_default_qconfig", default=None)


def _as_model_config(qconfig, layer: str) -> QViTConfig:
    if isinstance(qconfig, str):
        if qconfig not in PRESETS:
            raise ValueError(f"{layer}: qconfig={qconfig!r} is not a preset; expected one of {PRESETS}")
        return preset(qconfig)
    if not isinstance(qconfig, QViTConfig):
        raise TypeError(f"{layer}: qconfig must be a QViTConfig, a preset name or None, "
                        f"got {type(qconfig).__name__}")
    return qconfig


@contextlib.contextmanager
def default_qconfig(qconfig: Union[str, QViTConfig]):
    """Within the block, drop-in layers built without ``qconfig=`` use this one.

    Example::

        >>> with qvit.nn.default_qconfig("qvit_mixed"):
        ...     model = timm.create_model("deit_small_patch16_224", attn_layer=QAttention,
        ...                               mlp_layer=QMlp, embed_layer=QPatchEmbed)
    """
    token = _DEFAULT.set(_as_model_config(qconfig, "default_qconfig"))
    try:
        yield _DEFAULT.get()
    finally:
        _DEFAULT.reset(token)


def current_qconfig() -> QViTConfig:
    """The config a drop-in layer built now without ``qconfig=`` gets."""
    cfg = _DEFAULT.get()
    return cfg if cfg is not None else QViTConfig()


def resolve_qconfig(qconfig: QConfigLike, layer: str) -> QViTConfig:
    """``qconfig`` as a :class:`QViTConfig` (``None``: :func:`current_qconfig`)."""
    return current_qconfig() if qconfig is None else _as_model_config(qconfig, layer)


def plain_site(cfg: Optional[QuantizerConfig]) -> Optional[QuantizerConfig]:
    """A model-wide site config on a layer without heads: 'head' granularity means per-tensor."""
    if cfg is not None and cfg.granularity == "head":
        return cfg.replace(granularity="tensor")
    return cfg


def first_last_site(cfg: QuantizerConfig, bits: Optional[int]) -> QuantizerConfig:
    """The config of a patch-embed / classifier quantizer: ``first_last_bits`` initial bits."""
    cfg = plain_site(cfg)
    return cfg if bits is None else cfg.replace(bits=float(bits))


def layer_sites(qconfig, layer: str, first_last: bool
                ) -> Tuple[Optional[QuantizerConfig], Optional[QuantizerConfig]]:
    """``(weight, input)`` configs of a linear / conv layer.

    ``qconfig`` is a model-wide :class:`QViTConfig` (or preset name / ``None``):
    its ``weight`` and ``act`` sites, per-tensor where they say 'head'; or one
    :class:`QuantizerConfig` for both operands; or a ``(weight, input)`` pair
    (``None`` leaves that operand float). A config given for this one layer
    must fit it: 'head' granularity on a layer without heads is an error.
    """
    if isinstance(qconfig, QuantizerConfig):
        pair = (qconfig, qconfig)
    elif isinstance(qconfig, tuple):
        if len(qconfig) != 2 or not all(c is None or isinstance(c, QuantizerConfig) for c in qconfig):
            raise TypeError(f"{layer}: a qconfig pair must be (weight, input) QuantizerConfigs "
                            f"or None, got {qconfig!r}")
        pair = qconfig
    else:
        cfg = resolve_qconfig(qconfig, layer)
        if first_last:
            return (first_last_site(cfg.weight, cfg.first_last_bits),
                    first_last_site(cfg.act, cfg.first_last_bits))
        return plain_site(cfg.weight), plain_site(cfg.act)
    for what, c in zip(("weight", "input"), pair):
        if c is not None and c.granularity == "head":
            raise ValueError(f"{layer}: the {what} config asks for granularity='head', but this "
                             "layer has no heads (use 'tensor' or 'channel', or a QViTConfig, "
                             "whose 'head' sites are per-tensor outside attention)")
    return pair


def become(qmod: nn.Module, other: nn.Module) -> None:
    """Give the fresh ``qmod`` the whole state of ``other`` (same class): an
    ``nn.Module`` keeps all of it (parameters, buffers, children, hooks,
    attributes) in its ``__dict__``. Lets ``__init__`` reuse ``from_float``."""
    qmod.__dict__.update(other.__dict__)


def timm_class(path: str) -> type:
    """A timm class by ``"module:Name"``, imported on first use (``import qvit`` stays timm-free)."""
    mod, name = path.split(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except ImportError as exc:
        raise ImportError(f"building this layer from timm's arguments needs timm ({exc})") from exc


class DropIn:
    """Construction shared by the drop-in layers (a mixin, first base).

    Subclasses define ``_float_cls()`` (the layer they replace),
    ``from_float(module, qconfig=None, **options)`` and ``_OPTIONS`` (the
    keyword options of ``from_float`` that ``__init__`` also takes).
    """

    _OPTIONS: Tuple[str, ...] = ()

    @classmethod
    def _float_cls(cls) -> type:
        raise NotImplementedError

    def __init__(self, *args, qconfig=None, **kwargs):
        options = {k: kwargs.pop(k) for k in self._OPTIONS if k in kwargs}
        cls = type(self)
        fmod = cls._float_cls()(*args, **kwargs)
        become(self, cls.from_float(fmod, qconfig, **options))

    @classmethod
    def with_qconfig(cls, qconfig, **options) -> type:
        """A class whose instances are ``cls(..., qconfig=qconfig, **options)``.

        For constructor slots that must be classes: timm 1.0.x checks
        ``issubclass(attn_layer, ...)``, so ``functools.partial`` works for
        ``mlp_layer`` / ``embed_layer`` but not for ``attn_layer``. The objects
        built are plain ``cls`` instances (they pickle and compare as such).
        """
        if qconfig is not None and not isinstance(qconfig, (tuple, QuantizerConfig)):
            qconfig = _as_model_config(qconfig, f"{cls.__name__}.with_qconfig")
        unknown = set(options) - set(cls._OPTIONS)
        if unknown:
            raise TypeError(f"{cls.__name__}.with_qconfig got unknown options {sorted(unknown)}")
        base = cls

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("qconfig", qconfig)
            for k, v in options.items():
                kwargs.setdefault(k, v)
            base.__init__(self, *args, **kwargs)
            self.__class__ = base

        return type(cls.__name__, (cls,), {
            "__init__": __init__, "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}.with_qconfig(...)",
            "__doc__": f"{cls.__name__} with qconfig={qconfig!r} unless given."})
