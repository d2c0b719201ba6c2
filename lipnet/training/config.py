"""Run configuration: nested dataclasses read from YAML, with ``--set section.key=value`` overrides.

A config file has the sections ``model``, ``data``, ``loss``, ``optim``, ``certify``, ``sweep`` and ``log``
plus a few top-level keys (``seed``, ``device``, ``amp``, ``channels_last``, ``compile``, ``compile_mode``,
``out``).
``model`` and ``loss`` hold a ``name`` and, flat beside it, the keyword arguments of the
constructor (``loss: {name: tau_ce, tau: 10}``; override with ``--set loss.tau=20``).

Temperature convention: ``tau`` multiplies the logits, ``tau_ce(f, y) = CE(tau * f, y) / tau``
(deel-torchlip, Béthune et al. 2022); it is not the T = 1/tau of softmax temperature scaling.

Every problem with a config (unknown key, wrong type, impossible value) raises
:class:`ConfigError`, whose message names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from certify.radius import DEFAULT_EPS, parse_eps
from lipnet import data, losses
from lipnet.layers.kinds import AUTO, kind_for_tau
from lipnet.models import fmnist, model_entrypoint
from lipnet.training.loop import SCHEDULES

__all__ = [
    "DATA_ARGS",
    "RESUME_IGNORES",
    "CertifyConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SweepConfig",
    "apply_overrides",
    "check_loss_argument",
    "config_diff",
    "dump_config",
    "load_config",
    "parse_override",
    "parse_yaml_scalar",
]

#: Top-level keys that do not change what is trained: a run may be resumed with other values.
RESUME_IGNORES: tuple[str, ...] = ("out", "sweep", "device", "log")

_OPTIMIZERS = ("adam", "adamw", "sgd")
_LR_SCALINGS = ("none", "linear", "sqrt")
_ATTACKS = ("auto", "pgd", "autoattack")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: ``torch.compile``'s modes; ``reduce-overhead`` also captures the compiled forward and backward in CUDA
#: graphs (on CUDA; elsewhere it compiles as ``default``).
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: torch.finfo(torch.float32).max: the optimisers apply lr to float32 weights as a float32 scalar.
_FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A configuration is malformed or asks for something impossible."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-3`` and ``5e4`` as floats (YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml_scalar(text: str) -> Any:
    """Parse one override value the way YAML would (``10`` -> int, ``1e-3`` -> float, ``[1, 2]`` -> list)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {text!r} as YAML: {err}") from None


def _parse_eps(value: object) -> float:
    # certify.radius.parse_eps is the one reader of "36/255": the eps of a run are parsed here, once.
    if isinstance(value, bool):
        raise ConfigError(f"certify.eps: {value!r} is not a number")
    try:
        return parse_eps(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"certify.eps: {err}") from None


@dataclass
class ModelConfig:
    """A model of the registry: ``lipnet.models.create(name, **kwargs)``.

    ``in_channels``, ``input_size`` and ``num_classes`` describe the data, not the architecture:
    training fills them in from the dataset (:meth:`for_data`) for each one the constructor names as
    a parameter and the config leaves out, so ``small_cnn`` trains on 1x28x28 Fashion-MNIST without
    extra keys. A value the config gives is kept as it is.
    """

    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming ``model.<key>`` unless the registry has ``name`` and its
        constructor takes every key of ``kwargs``, each value of its annotated type (int, float, str,
        bool, None, literals, sequences and unions of them; other annotations are left to the
        constructor), and every required argument other than the data arguments of :meth:`for_data`.

        Cheap (no model is built), so that a command rejects a bad ``--set model.key=value`` before it
        loads any data.
        """
        try:
            fn = model_entrypoint(self.name)
        except ValueError as err:
            raise ConfigError(f"model.name: {err}") from None
        params = inspect.signature(fn).parameters
        named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in self.kwargs:
            if key not in named and not takes_any:
                raise ConfigError(
                    f"model.{key}: {self.name} has no argument {key!r}; it takes {', '.join(named)}"
                )
        for key in named:
            required = params[key].default is inspect.Parameter.empty
            if required and key not in self.kwargs and key not in DATA_ARGS:
                raise ConfigError(f"model.{key}: {self.name} needs this argument (set model.{key}=...)")
        try:
            hints = typing.get_type_hints(fn)
        except (NameError, TypeError):  # an annotation that does not resolve: the constructor checks
            hints = {}
        for key, value in self.kwargs.items():
            if key in hints and not _matches(value, hints[key]):
                raise ConfigError(f"model.{key}: {self.name} expects {_type_name(hints[key])}, got {value!r}")

    def for_data(self, input_shape: Sequence[int], num_classes: int) -> ModelConfig:
        """A copy for a dataset of ``(C, H, W)`` images and ``num_classes`` classes: its kwargs gain
        ``in_channels = C``, ``input_size = H`` (square images only) and ``num_classes``, each only where
        the constructor names it as a parameter and ``kwargs`` does not set it."""
        try:
            params = inspect.signature(model_entrypoint(self.name)).parameters
        except ValueError as err:
            raise ConfigError(f"model.name: {err}") from None
        shape = [int(s) for s in input_shape]
        found: dict[str, int] = {"num_classes": int(num_classes)}
        if len(shape) == 3:
            found["in_channels"] = shape[0]
            if shape[1] == shape[2]:
                found["input_size"] = shape[1]
        kwargs = copy.deepcopy(self.kwargs)
        for key, value in found.items():
            if key in params and key not in kwargs:
                kwargs[key] = value
        return ModelConfig(self.name, kwargs)

    def for_loss(self, loss: LossConfig) -> ModelConfig:
        """A copy with ``conv: auto`` replaced by the layer kind for the loss's temperature
        (:func:`lipnet.layers.kinds.kind_for_tau` of ``loss.kwargs["tau"]``) and, for a Fashion-MNIST
        network (:mod:`lipnet.models.fmnist`), the activation and head for it too where the config sets
        none (:func:`lipnet.models.fmnist.auto_options`); ``self`` when ``conv`` is not ``auto``. The run
        builds, checkpoints and reports the resolved network."""
        if self.kwargs.get("conv") != AUTO:
            return self
        kwargs = {**self.kwargs, "conv": kind_for_tau(loss.tau)}
        if model_entrypoint(self.name).__module__ == fmnist.__name__:
            kwargs.update(fmnist.auto_options(loss.tau, given=kwargs))
        return ModelConfig(self.name, kwargs)

    def label(self) -> str:
        """The network's short name: ``conv``, then ``+activation`` and ``+head`` for those the config
        sets (but the kind's own head, ``kind``)."""
        extra = [str(v) for k in ("activation", "head") if (v := self.kwargs.get(k)) not in (None, "kind")]
        return "+".join([str(self.kwargs.get("conv")), *extra])


#: The model arguments that describe the data; :meth:`ModelConfig.for_data` fills them in.
DATA_ARGS: tuple[str, ...] = ("in_channels", "input_size", "num_classes")


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from YAML) has the annotated type ``hint``; True for annotations this
    cannot judge (classes YAML never produces are judged by ``isinstance``)."""
    if hint is Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


@dataclass
class DataConfig:
    """Which dataset, how much of it, and the training augmentation (random crop + flip).

    ``seed`` is the generator seed of procedural datasets (shapes10), separate from the training
    seed so that runs with different seeds see the same images; real datasets ignore it.
    ``difficulty`` is shapes10's difficulty setting in [0, 1] (the upper end of its per-image difficulty,
    :mod:`lipnet.data.shapes`); null, the default, is the data set's own default (1); real datasets
    have none, and a value for one is a config error.

    ``augment`` turns on, for training batches only (evaluation and certification never see it), a
    random shift by up to ``crop_padding`` pixels (zero padding, then a crop back to the input size) and,
    with ``flip``, a random horizontal flip. ``flip: null`` (the default) flips only where a mirrored
    image keeps its class and looks like the data (:data:`lipnet.data.FLIP_INVARIANT`: CIFAR-10 and
    shapes10; not digits, whose mirror images are other symbols or none, nor Fashion-MNIST, whose
    footwear all faces one way).
    """

    name: str = "shapes10"
    seed: int = 0
    difficulty: float | None = None
    data_dir: str | None = None
    download: bool = False
    n_train: int | None = None
    n_test: int | None = None
    augment: bool = False
    crop_padding: int = 4
    flip: bool | None = None

    def flips(self) -> bool:
        """Whether the training augmentation flips: ``flip``, or where it is null whether the dataset's
        classes are mirror-invariant (:func:`lipnet.data.flip_invariant`)."""
        return data.flip_invariant(self.name) if self.flip is None else self.flip


@dataclass
class LossConfig:
    """A loss of the catalogue: ``lipnet.losses.create(name, **kwargs)`` (tau, margin, alpha, ...).

    ``tau_ce`` takes ``tau``, ``offset`` (the Lipschitz-margin offset, logit units) and
    ``label_smoothing`` (see :class:`lipnet.losses.TauCrossEntropy`: with ``tau`` it caps the logit
    margin the loss asks for at ``log(1 + C (1 - s) / s) / tau``).

    A value of an argument the loss declares sweepable (:func:`lipnet.losses.parameter_rule`) is checked
    against the declared range when the config is validated; the rest is left to the constructor.
    """

    name: str = "tau_ce"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def tau(self) -> float | None:
        """``kwargs["tau"]`` as a float; None when the config gives no temperature."""
        tau = self.kwargs.get("tau")
        return None if tau is None else float(tau)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule; ``batch_size`` is the global batch over all processes.

    ``schedule``: ``cosine`` (per step, to 0), ``onecycle`` (cosine warm-up from lr/25 over the
    first 30% of steps, then cosine decay to lr/25e4, as torch's OneCycleLR without momentum
    cycling) or ``none``. ``warmup``: a fraction of all steps, in [0, 1), over which the learning rate
    first rises linearly to ``lr`` before ``cosine`` or ``none`` runs over the rest
    (:func:`lipnet.training.loop.lr_at`; onecycle has its own warm-up and refuses one).

    ``lr_scaling``: ``none``, or ``linear`` / ``sqrt``: the learning rate used is ``lr`` times
    ``batch_size / reference_batch_size`` (or its square root), so that a config tuned at one batch size
    keeps its step size per sample at another (:meth:`scaled_lr`).

    ``ema``: null, or the decay in (0, 1) of an exponential moving average of the weights
    (:class:`lipnet.training.ema.ExponentialMovingAverage`); the per-epoch evaluation and bound, the
    checkpoints' model weights, the final certification and the exported model are then the averaged
    model's. ``clip_grad_norm``: null, or the largest global L2 norm of the gradients
    (:class:`lipnet.training.loop.GradientClipping`). ``weight_decay``: L2 penalty of Adam and SGD,
    decoupled decay of AdamW.
    """

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    warmup: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    lr_scaling: str = "none"
    reference_batch_size: int = 128
    ema: float | None = None
    clip_grad_norm: float | None = None

    def scaled_lr(self) -> float:
        """The learning rate training uses: ``lr``, times ``batch_size / reference_batch_size`` with
        ``lr_scaling: linear`` or its square root with ``sqrt``."""
        ratio = self.batch_size / self.reference_batch_size
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        return self.lr


@dataclass
class CertifyConfig:
    """The certification pass at the end of training: radii at each eps (L2, [0, 1] pixel scale);
    by default :data:`certify.radius.DEFAULT_EPS`."""

    eps: list[float] = field(default_factory=lambda: list(DEFAULT_EPS))
    n: int | None = None
    batch_size: int = 500


@dataclass
class SweepConfig:
    """Defaults for ``lipnet sweep``: the loss parameter and its values, and the empirical attack.

    ``param`` is an argument some loss declares sweepable (:func:`lipnet.losses.declared_parameters`);
    with ``values`` given, each is checked against the configured loss's declared range.

    The empirical robust accuracy is measured on the first ``attack_n`` test samples (0 turns it
    off) with ``certify.attacks.empirical_robust_accuracy``.
    """

    param: str = "tau"
    values: list[float] = field(default_factory=list)
    attack: str = "auto"
    attack_n: int = 100
    attack_steps: int = 50


@dataclass
class LogConfig:
    """Logging beside ``metrics.jsonl``: with ``tensorboard``, TensorBoard event files in
    ``<run>/tensorboard`` (:mod:`lipnet.training.tensorboard`; the ``tensorboard`` extra): per-step loss
    and learning rate, per-epoch loss, accuracies, the sound bound and the certified accuracy at each
    ``certify.eps`` on the first ``certify_n`` test images (0: no certified-accuracy curves; it costs
    one certification pass per epoch). Not part of what is trained: a run resumes with other values."""

    tensorboard: bool = False
    certify_n: int = 1000


@dataclass
class Config:
    """Everything a run needs; ``out`` is the run folder (``lipnet train``) or the sweep folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the file layout (model and loss kwargs flat beside ``name``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (ModelConfig, LossConfig)):
                out[f.name] = {"name": value.name, **copy.deepcopy(value.kwargs)}
            elif dataclasses.is_dataclass(value):
                out[f.name] = copy.deepcopy(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate a config from the file layout; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
        cfg = cls()
        for key, value in data.items():
            _set_path(cfg, [str(key)], value, whole_section=True)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first impossible value."""
        _validate(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting only where no information is lost."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if key == "certify.eps":
            return _coerce_eps(value)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _coerce_eps(value: Any) -> list[float]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"certify.eps: expected a list such as [36/255, 72/255], got {value!r}")
    return [_parse_eps(v) for v in value]


def _set_path(cfg: Config, path: list[str], value: Any, *, whole_section: bool = False) -> None:
    """Set ``cfg.<path> = value``; a whole section given as a mapping is merged key by key."""
    top = path[0]
    names = {f.name for f in dataclasses.fields(Config)}
    if top not in names:
        raise ConfigError(f"unknown config key {top!r}; known: {', '.join(sorted(names))}")
    section = getattr(cfg, top)
    if not dataclasses.is_dataclass(section):
        if len(path) > 1:
            raise ConfigError(f"{top!r} is a value, not a section: cannot set {'.'.join(path)}")
        setattr(cfg, top, _coerce(value, _field_types(Config)[top], top))
        return
    if len(path) == 1:
        if value is None and whole_section:
            return
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {top!r} must be a mapping of keys, got {value!r}")
        for key, sub in value.items():
            _set_path(cfg, [top, str(key)], sub)
        return
    key = ".".join(path)
    if isinstance(section, (ModelConfig, LossConfig)):
        if path[1] == "name":
            section.name = _coerce(value, str, key)
        elif len(path) == 2:
            section.kwargs[path[1]] = copy.deepcopy(value)
        else:
            raise ConfigError(f"{key}: {top} arguments are flat (e.g. {top}.{path[1]}=...)")
        return
    hints = _field_types(type(section))
    if len(path) != 2 or path[1] not in hints:
        raise ConfigError(f"unknown config key {key!r}; {top} has: {', '.join(hints)}")
    setattr(section, path[1], _coerce(value, hints[path[1]], key))


def _positive_int(value: int | None, key: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _finite(value: float, key: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")


def check_loss_argument(loss: str, key: str, value: object) -> None:
    """Check the value of argument ``key`` of loss ``loss`` against the range the losses declare for it
    (:func:`lipnet.losses.parameter_rule`): ``loss.tau must be > 0 (it multiplies the logits), got 0``.

    An argument no loss declares (or one the loss takes without declaring it, such as focal's per-class
    ``alpha``) is left to the loss constructor, which raises ``ValueError`` for a bad value.
    """
    rule = losses.parameter_rule(loss, key)
    if rule is None:
        return
    try:
        rule.check(value, f"loss.{key}")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate(cfg: Config) -> None:
    for section in (cfg.model, cfg.loss):
        kind = "model" if section is cfg.model else "loss"
        if not section.name:
            raise ConfigError(f"{kind}.name must not be empty")
        for key in section.kwargs:
            if not re.match(r"^[A-Za-z_]\w*$", key):
                raise ConfigError(f"{kind}.{key}: not a valid argument name")
    for key, value in cfg.loss.kwargs.items():
        check_loss_argument(cfg.loss.name, key, value)

    d = cfg.data
    if not d.name:
        raise ConfigError("data.name must not be empty")
    _positive_int(d.n_train, "data.n_train", allow_none=True)
    _positive_int(d.n_test, "data.n_test", allow_none=True)
    _positive_int(d.crop_padding, "data.crop_padding", minimum=0)
    _positive_int(d.seed, "data.seed", minimum=0)
    if d.difficulty is not None:
        _finite(d.difficulty, "data.difficulty")
        if not 0 <= d.difficulty <= 1:
            raise ConfigError(f"data.difficulty must be in [0, 1], got {d.difficulty!r}")
        try:
            takes_difficulty = data.has_difficulty(d.name)
        except ValueError as e:  # an unknown dataset name: say so here rather than as a traceback
            raise ConfigError(f"data.name: {e}") from None
        if not takes_difficulty:
            raise ConfigError(f"data.difficulty: dataset {d.name!r} has no difficulty setting (shapes10 has)")

    o = cfg.optim
    if o.name not in _OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {', '.join(_OPTIMIZERS)}, got {o.name!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    for key in ("lr", "weight_decay", "momentum"):
        _finite(getattr(o, key), f"optim.{key}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr!r}")
    _positive_int(o.batch_size, "optim.batch_size")
    _positive_int(o.reference_batch_size, "optim.reference_batch_size")
    if o.lr_scaling not in _LR_SCALINGS:
        raise ConfigError(f"optim.lr_scaling must be one of {', '.join(_LR_SCALINGS)}, got {o.lr_scaling!r}")
    if 10.0 * o.scaled_lr() > _FLOAT32_MAX:
        # Adam's first step is lr / (1 - 0.9) = 10 lr; above float32's range torch fails mid-step.
        raise ConfigError(
            f"optim.lr must be <= {_FLOAT32_MAX / 10:.3g} (10 lr must fit in float32, after "
            f"optim.lr_scaling), got {o.lr!r}"
        )
    _finite(o.warmup, "optim.warmup")
    if not 0.0 <= o.warmup < 1.0:
        raise ConfigError(f"optim.warmup is a fraction of the training steps in [0, 1), got {o.warmup!r}")
    if o.warmup and o.schedule == "onecycle":
        raise ConfigError("optim.warmup: the onecycle schedule has its own warm-up; set optim.warmup=0")
    if o.ema is not None and not (math.isfinite(o.ema) and 0.0 < o.ema < 1.0):
        raise ConfigError(f"optim.ema must be null or a decay in (0, 1) such as 0.999, got {o.ema!r}")
    if o.clip_grad_norm is not None and not (math.isfinite(o.clip_grad_norm) and o.clip_grad_norm > 0):
        raise ConfigError(f"optim.clip_grad_norm must be null or a number > 0, got {o.clip_grad_norm!r}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay!r}")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optim.momentum must lie in [0, 1), got {o.momentum!r}")
    if o.nesterov and (o.name != "sgd" or o.momentum == 0):
        raise ConfigError("optim.nesterov needs optim.name: sgd and optim.momentum > 0")
    _positive_int(o.epochs, "optim.epochs")

    c = cfg.certify
    if not c.eps:
        raise ConfigError("certify.eps must list at least one epsilon")
    if any(b <= a for a, b in zip(c.eps, c.eps[1:], strict=False)):
        raise ConfigError(f"certify.eps must be strictly increasing, got {c.eps}")
    _positive_int(c.n, "certify.n", allow_none=True)
    _positive_int(c.batch_size, "certify.batch_size")

    s = cfg.sweep
    declared = losses.declared_parameters()
    if s.param not in declared:
        raise ConfigError(
            f"sweep.param must be a loss argument that a loss declares sweepable ({', '.join(declared)}), "
            f"got {s.param!r}"
        )
    for v in s.values:
        check_loss_argument(cfg.loss.name, s.param, v)
    if len(set(s.values)) != len(s.values):
        raise ConfigError(f"sweep.values has duplicates: {s.values}")
    if s.attack not in _ATTACKS:
        raise ConfigError(f"sweep.attack must be one of {', '.join(_ATTACKS)}, got {s.attack!r}")
    _positive_int(s.attack_n, "sweep.attack_n", minimum=0)
    _positive_int(s.attack_steps, "sweep.attack_steps")

    _positive_int(cfg.log.certify_n, "log.certify_n", minimum=0)

    _positive_int(cfg.seed, "seed", minimum=0)
    if not _DEVICE_RE.match(cfg.device):
        raise ConfigError(f"device must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    if cfg.compile_mode not in _COMPILE_MODES:
        modes = ", ".join(_COMPILE_MODES)
        raise ConfigError(f"compile_mode must be one of {modes}, got {cfg.compile_mode!r}")
    if cfg.out is not None and not cfg.out.strip():
        raise ConfigError("out must be a folder path, got an empty string")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its key path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. loss.tau=10)")
    path = key.split(".")
    if any(not p for p in path):
        raise ConfigError(f"override {text!r}: empty part in key {key!r}")
    return path, parse_yaml_scalar(raw)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a validated copy of ``cfg`` with each ``section.key=value`` override applied in order."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(out, path, value)
    out.validate()
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist") from None
        except OSError as err:
            raise ConfigError(f"cannot read config file {str(p)!r}: {err.strerror}") from None
        try:
            data = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        try:
            cfg = Config.from_dict(data or {})
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
    return apply_overrides(cfg, overrides)


def dump_config(cfg: Config) -> str:
    """The config as YAML text, in the file layout, readable back by :func:`load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def config_diff(a: Config, b: Config, *, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (top-level names in ``ignore`` skipped)."""
    skip = set(ignore)
    diffs: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            diffs.append(prefix)

    da, db = a.to_dict(), b.to_dict()
    for key in skip:
        da.pop(key, None)
        db.pop(key, None)
    walk(da, db, "")
    return diffs
