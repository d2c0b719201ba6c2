"""Export files of a trained model: torch, ONNX, TorchScript and ``torch.export`` programs, each verified.

:func:`export_file` writes ``model`` to ``path`` in one of :data:`FORMATS`, built from
:func:`portable`, the model in plain operations that every format carries:

* :func:`lipnet.export` first (each layer's own frozen form: plain ``nn.Conv2d`` / ``nn.Linear``,
  SLL / CPL steps, FFT convolutions), then the one frozen form that is not portable, Cayley's
  :class:`~lipnet.layers.FourierConv2d` (complex FFTs, which ONNX opset 17 through torch's
  exporter and certify's graph analysis do not carry), replaced by the same map as a circular
  ``nn.Conv2d`` (:func:`circular_conv_of`): its kernel is the layer's impulse response, computed
  in float64, so it is exact up to float32 rounding, and its norm is what certify bounds. Its
  kernel covers the whole input (``H x W`` taps, one more on an even side), so it is slower
  at inference than the FFT for large inputs;
* GroupSort(2) and the L2-norm poolings are already portable in eval mode
  (:func:`lipnet.activations.sort_pairs`, :func:`lipnet.pooling.window_sums`).

Every file is verified before it is written (:class:`ExportReport`): the bytes are loaded back with
the format's own runtime (``torch.load`` with ``weights_only=True`` and exactly the classes of the
model allowed; ``torch.jit.load``; ``torch.export.load``; ``onnxruntime``, the optional ``onnx``
extra), its outputs on the given real inputs are compared with ``model``'s (a difference above
``tolerance`` refuses the file), and certify recomputes the certified radii from the loaded
artefact itself (its graph, for the three graph formats; ONNX through
:func:`certify.onnx.onnx_to_graph`). Only then is the file written, atomically: a refused export
leaves nothing behind.

The ONNX file uses torch's TorchScript-based exporter (``dynamo=False``, opset 17): it needs no
package beyond ``onnx`` and gives the same bytes for the same model.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from certify.contract import UnboundableModuleError
from certify.graph import analyze
from certify.io import atomic_write_bytes
from certify.onnx import onnx_to_graph
from certify.radius import (
    SMALL_EPS,
    certified_accuracy,
    certified_radius,
    certify,
    format_eps,
    parse_eps,
)
from lipnet.export import export
from lipnet.layers.cayley import FourierConv2d, fourier_conv2d

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "TOLERANCE",
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "circular_conv_of",
    "export_file",
    "load_exported",
    "portable",
]

#: The export formats, in the order ``lipnet export --format`` lists them.
FORMATS: tuple[str, ...] = ("torch", "onnx", "torchscript", "pt2")
#: The ONNX opset of exported files (the first with every operation the portable forms use).
ONNX_OPSET = 17
#: Default refusal threshold of ``max |exported(x) - model(x)|`` on the verification inputs.
TOLERANCE = 1e-5


class ExportError(ValueError):
    """An export that cannot be written: bad verification data, or a format that cannot carry the model."""


class ExportMismatchError(ExportError):
    """A written artefact that failed its verification: it does not compute the model's outputs, or
    certify cannot bound it. Nothing is written."""


def circular_conv_of(layer: FourierConv2d) -> nn.Module:
    """The map of ``layer`` (an FFT circular convolution on its fixed grid) as a circular ``nn.Conv2d``.

    A circular convolution on an ``n_h x n_w`` grid is ``y[p] = sum_m k[m] x[p - m]`` (indices mod
    ``n``) for its impulse response ``k``; ``nn.Conv2d`` with circular padding ``q`` computes
    ``y[p] = sum_a w[a] x[p + a - q]``, so ``w[a] = k[q - a]``. The kernel has ``n`` taps on an odd
    side (``q = (n - 1) / 2``) and ``n + 1`` on an even side (``q = n / 2``, the two end taps read
    the same pixel, so one of them is zero): circular padding of ``K - 1`` in total, the exact
    circular convolution. ``k`` is computed in float64 from the layer's own forward (one impulse
    per input channel), so the result is the layer's map up to float32 rounding. A layer with
    stride ``s`` becomes ``PixelUnshuffle(s)`` followed by the convolution, as its forward.
    """
    h, w = (n // layer.stride for n in layer.input_size)
    c_in = layer.in_channels * layer.stride * layer.stride
    symbol = torch.view_as_complex(layer.symbol.detach().to(device="cpu", dtype=torch.float64))
    impulses = torch.zeros((c_in, c_in, h, w), dtype=torch.float64)
    impulses[torch.arange(c_in), torch.arange(c_in), 0, 0] = 1.0
    with torch.no_grad():
        # the convolution the layer applies after its space-to-depth step, on one impulse per channel
        response = fourier_conv2d(impulses, symbol)  # (c_in, c_out, h, w): k[:, :, m] of each channel
    sizes = (h if h % 2 else h + 1, w if w % 2 else w + 1)
    pads = ((sizes[0] - 1) // 2, (sizes[1] - 1) // 2)
    rows = (pads[0] - torch.arange(sizes[0])) % h
    cols = (pads[1] - torch.arange(sizes[1])) % w
    kernel = response[:, :, rows][:, :, :, cols].transpose(0, 1).contiguous()  # (c_out, c_in, K_h, K_w)
    if h % 2 == 0:
        kernel[:, :, -1] = 0.0  # taps 0 and K - 1 read the same row
    if w % 2 == 0:
        kernel[:, :, :, -1] = 0.0
    ref = layer.symbol
    conv = nn.Conv2d(
        c_in,
        layer.out_channels,
        sizes,
        padding=pads,
        padding_mode="circular",
        bias=layer.bias is not None,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(kernel.to(ref.dtype))
        if layer.bias is not None and conv.bias is not None:
            conv.bias.copy_(layer.bias.detach())
    conv.requires_grad_(False)
    return conv if layer.stride == 1 else nn.Sequential(nn.PixelUnshuffle(layer.stride), conv)


def _replace_fourier(module: nn.Module) -> nn.Module:
    if isinstance(module, FourierConv2d):
        return circular_conv_of(module)
    for name, child in module.named_children():
        setattr(module, name, _replace_fourier(child))
    return module


def portable(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``model`` in plain operations that torch, TorchScript, ``torch.export`` and ONNX all carry (eval mode).

    :func:`lipnet.export` (``input_shape`` is passed on), then every :class:`FourierConv2d` as its
    circular convolution (:func:`circular_conv_of`). ``model`` is not modified.
    """
    return _replace_fourier(export(model, input_shape)).eval()


# -- writing and loading ------------------------------------------------------------------------


def _classes(model: nn.Module) -> list[type]:
    return sorted({type(m) for m in model.modules()}, key=lambda t: (t.__module__, t.__qualname__))


def _safe_globals(classes: Sequence[type]) -> list[Any]:
    # what unpickling an nn.Module needs besides its classes: its ordered dicts and the set of its
    # non-persistent buffer names (torch's weights-only reader allows nothing it is not told)
    from collections import OrderedDict

    return [*classes, OrderedDict, set]


def _serialise(model: nn.Module, fmt: str, example: Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for jit and the legacy ONNX exporter
        if fmt == "torch":
            torch.save(model, buf)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.script(model), buf)
        elif fmt == "pt2":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, buf)
        elif fmt == "onnx":
            try:
                import onnx  # noqa: F401  (the exporter's own dependency)
            except ImportError:
                raise ExportError(
                    "the onnx format needs the onnx extra: pip install 'lipnet[onnx]'"
                ) from None
            torch.onnx.export(
                model,
                (example,),
                cast(Any, buf),  # a file object is accepted, though the signature names paths only
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        else:
            raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return buf.getvalue()


class _OnnxRuntime(nn.Module):
    """An ONNX file run by onnxruntime (CPU), as a callable module: the runtime the file is verified with."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ExportError(
                "verifying an ONNX file needs onnxruntime: pip install 'lipnet[onnx]'"
            ) from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(out)


def load_exported(data: bytes | str | Path, fmt: str, classes: Sequence[type] | None = None) -> nn.Module:
    """An exported file loaded with its format's own runtime, as a callable module in eval mode.

    ``torch``: ``torch.load(weights_only=True)`` allowing exactly ``classes`` (default: every module
    class of lipnet's portable forms and of ``torch.nn`` that the file names, see
    :func:`torch.serialization.get_unsafe_globals_in_checkpoint`; any other class is refused);
    ``torchscript``: ``torch.jit.load``; ``pt2``: ``torch.export.load(...).module()`` as a plain
    ``fx.GraphModule``; ``onnx``: an onnxruntime session.
    """
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torch":
            allowed = list(classes) if classes is not None else _allowed_classes(raw)
            with torch.serialization.safe_globals(_safe_globals(allowed)):
                loaded = torch.load(io.BytesIO(raw), weights_only=True)
            if not isinstance(loaded, nn.Module):
                raise ExportError(f"the torch export holds {type(loaded).__name__}, not a model")
            return loaded.eval()
        if fmt == "torchscript":
            return torch.jit.load(io.BytesIO(raw), map_location="cpu").eval()
        if fmt == "pt2":
            program = torch.export.load(io.BytesIO(raw))
            module = program.module()
            return fx.GraphModule(module, module.graph)  # ExportedProgram modules refuse .eval()
        if fmt == "onnx":
            return _OnnxRuntime(raw)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _allowed_classes(raw: bytes) -> list[type]:
    """The classes a torch export names, if each is a torch.nn or lipnet module class (else refused)."""
    import importlib

    names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    found: list[type] = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if not (module_name.startswith("torch.nn.") or module_name.startswith("lipnet.")):
            raise ExportError(f"the torch export names {name}, which is not a torch.nn or lipnet class")
        cls = getattr(importlib.import_module(module_name), attr, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ExportError(f"the torch export names {name}, which is not a module class")
        found.append(cls)
    return found


# -- verification --------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What :func:`export_file` checked. Radii are certify's (L2, pixel scale); accuracies fractions.

    ``max_difference`` is ``max |exported(x) - model(x)|`` over the verification inputs (float64);
    ``model_*`` are certify's results for ``model`` itself, ``export_*`` for the loaded artefact
    (bounded from its own graph, or from its modules for the torch format);
    ``radius_ratio`` is the smallest ``export radius / model radius`` over the samples certified by
    the model (1 when the export certifies as much, below 1 when its bound is looser).
    """

    format: str
    path: str
    bytes: int
    n: int
    max_difference: float
    tolerance: float
    model_bound: float
    model_rule: str
    export_bound: float
    export_rule: str
    eps: list[float]
    model_certified: dict[float, float]
    export_certified: dict[float, float]
    radius_ratio: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def acc(values: dict[float, float]) -> str:
            return ", ".join(f"{format_eps(e)}: {100 * a:.2f}%" for e, a in values.items())

        return "\n".join(
            [
                f"exported {self.format} to {self.path} ({self.bytes} bytes), verified on {self.n} inputs: "
                f"max |exported - model| = {self.max_difference:.3g} (tolerance {self.tolerance:.3g})",
                f"model: Lipschitz bound {self.model_bound:.6g} ({self.model_rule} rule), "
                f"certified {acc(self.model_certified)}",
                f"export: Lipschitz bound {self.export_bound:.6g} ({self.export_rule} rule, certify from the "
                f"exported graph), certified {acc(self.export_certified)}; "
                f"smallest radius ratio {self.radius_ratio:.4g}",
                *self.notes,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": self.path,
            "bytes": self.bytes,
            "n": self.n,
            "max_difference": self.max_difference,
            "tolerance": self.tolerance,
            "model": {"bound": self.model_bound, "rule": self.model_rule,
                      "certified": {format_eps(e): a for e, a in self.model_certified.items()}},
            "export": {"bound": self.export_bound, "rule": self.export_rule,
                       "certified": {format_eps(e): a for e, a in self.export_certified.items()}},
            "radius_ratio": self.radius_ratio,
            "notes": self.notes,
        }  # fmt: skip


def _graph_radii(module: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> tuple[Tensor, float, str]:
    """Certified radii of a graph artefact: certify's analysis of its own graph (last-layer rule when its
    graph ends in a linear layer), on the logits the artefact computed."""
    analysis = analyze(module, tuple(x.shape[1:]), example=x[:2])
    norms = x.flatten(1).double().norm(dim=1)
    if analysis.head_weight is not None and analysis.body_bound is not None:
        radii = certified_radius(
            logits, y, analysis.body_bound, last_layer_weight=analysis.head_weight, input_norms=norms
        )
        return radii, analysis.body_bound, "last-layer"
    return certified_radius(logits, y, analysis.bound, input_norms=norms), analysis.bound, "global"


def export_file(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    inputs: Tensor,
    labels: Tensor,
    *,
    eps: Sequence[float | str] = SMALL_EPS,
    tolerance: float = TOLERANCE,
    input_shape: tuple[int, ...] | None = None,
) -> ExportReport:
    """Write ``model`` to ``path`` in format ``fmt`` (one of :data:`FORMATS`) after verifying the file.

    ``inputs`` (a float batch of real samples, on the pixel scale the model was trained on) and
    ``labels`` are the verification data: the artefact, loaded back from its bytes with its own
    runtime, must compute ``model``'s outputs on them within ``tolerance`` (max absolute difference),
    and certify computes both certified radii on them (see :class:`ExportReport`). On any failure
    :class:`ExportError` (a ``ValueError``) is raised and nothing is written; the file itself is
    written atomically (a temporary file, then a rename).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not (isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.ndim >= 2 and len(inputs)):
        raise ExportError("the verification inputs must be a non-empty float batch (N, ...)")
    if not bool(torch.isfinite(inputs).all()):
        raise ExportError("the verification inputs contain NaN or Inf")
    if labels.shape != inputs.shape[:1]:
        raise ExportError(f"labels must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ExportError(f"tolerance must be a finite number > 0, got {tolerance}")
    eps_values = sorted({parse_eps(e) for e in eps})
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        x = inputs.to(device=device, dtype=torch.float32)
        y = labels.to(device=device, dtype=torch.long)
        shape = input_shape if input_shape is not None else tuple(x.shape[1:])
        own = certify(model, [(x, y)], eps_values, progress=False)  # an unboundable model is refused first
        plain = portable(model, shape).to(device)
        try:
            data = _serialise(plain, fmt, x[:2])
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"torch cannot write {type(model).__name__} as {fmt}: {' '.join(str(err).split())[:300]}"
            ) from None
        loaded = load_exported(data, fmt, _classes(plain) if fmt == "torch" else None)
        with torch.no_grad():
            want = model(x).double()
            got = loaded(x.cpu() if fmt == "onnx" else x).to(want.device).double()
        if got.shape != want.shape:
            raise ExportError(
                f"the exported {fmt} model returns shape {tuple(got.shape)}, the model {tuple(want.shape)}"
            )
        difference = float((got - want).abs().max())
        if not difference <= tolerance:
            raise ExportMismatchError(
                f"the exported {fmt} model differs from the model by up to {difference:.3g} on the "
                f"verification inputs (tolerance {tolerance:.3g}): refused, nothing written"
            )
        try:
            if fmt == "torch":
                theirs = certify(loaded, [(x, y)], eps_values, progress=False)
                export_radii, export_bound, export_rule = theirs.radii, theirs.lipschitz, theirs.rule
            else:
                graph_module = onnx_to_graph(data, x[:2].cpu()) if fmt == "onnx" else loaded
                export_radii, export_bound, export_rule = _graph_radii(
                    graph_module, x.cpu(), y.cpu(), got.float().cpu()
                )
        except (UnboundableModuleError, ValueError) as err:
            raise ExportMismatchError(
                f"certify cannot bound the exported {fmt} model ({' '.join(str(err).split())[:300]}): "
                "refused, nothing written"
            ) from None
        certified = own.radii > 0
        ratio = 1.0
        if bool(certified.any()):
            ratio = float((export_radii[certified] / own.radii[certified]).min())
        report = ExportReport(
            format=fmt,
            path=str(path),
            bytes=len(data),
            n=int(x.shape[0]),
            max_difference=difference,
            tolerance=tolerance,
            model_bound=own.lipschitz,
            model_rule=own.rule,
            export_bound=export_bound,
            export_rule=export_rule,
            eps=eps_values,
            model_certified=dict(own.certified_accuracy),
            export_certified={e: certified_accuracy(export_radii, e) for e in eps_values},
            radius_ratio=ratio,
        )
        atomic_write_bytes(path, data)
        return report
    finally:  # the model's modes as they were
        for m, mode in modes:
            m.training = mode
