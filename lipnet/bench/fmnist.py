"""``lipnet bench fmnist``: the Fashion-MNIST yardstick, lipnet against deel-torchlip and orthogonium.

Every contender is the same architecture (:func:`lipnet.models.fmnist.fmnist_layers`, one layout: width,
blocks per stage and hidden width) built from one library's layers:

* lipnet: :class:`~lipnet.models.fmnist.FashionConvNet` with each layer kind registered when the bench
  runs (:func:`lipnet.layers.kinds.list_layer_kinds`), its Björck weights computed in batched calls as
  ``lipnet train`` computes them (:func:`lipnet.layers.batching.batch_weights`), and the recipe's
  lipnet-only model options (a row-normalised head, ``model.head``; Householder activations,
  ``model.activation``);
* the anchors of :data:`lipnet.bench.anchors.ANCHORS` as their libraries ship them: deel-torchlip
  (``SpectralConv2d``, ``GroupSort2``, ``ScaledL2NormPool2d``, ``SpectralLinear``); orthogonium's AOC
  (``AdaptiveOrthoConv2d`` + ``OrthoLinear``), AOL (``AOLConv2D``; orthogonium has no AOL dense layer,
  so its dense layers are ``OrthoLinear``) and SLL (``SDPBasedLipschitzResBlock`` for the
  channel-preserving blocks, AOC for the channel-changing convolutions, ``OrthoLinear``; with
  ``blocks = 0`` it is the AOC network), all with orthogonium's ``MaxMin`` and lipnet's scaled L2-norm
  pooling (orthogonium has none);
* ``lipnet:auto``, lipnet's default front: at each τ the row of the network a training config with
  ``model.conv: auto`` builds (the kind of :func:`lipnet.layers.kinds.kind_for_tau` and, where the recipe
  sets none, the activation and head of :func:`lipnet.models.fmnist.auto_options`), named by that
  network (``bcop``, ``bcop+householder``, ``rko_bcop``, ``rko_bcop+rownorm``; one row when it is chosen
  as well).

Every contender gets the same *recipe*, a run config (:class:`~lipnet.training.config.Config`, the
``--config`` of the command): the same initialisation seed, the same data order (one
:class:`~lipnet.data.DeviceLoader` seed) and augmentation, the same loss (τ-CE with its offset and label
smoothing, τ multiplying the logits), optimiser, learning rate, schedule and warm-up, batch size, gradient
clipping, moving average of the weights (evaluated and certified when on) and number of epochs, through
the one fit loop (:func:`lipnet.training.loop.fit`), as :func:`lipnet.training.run.train` trains. Without
a config the recipe is :func:`default_recipe` (Adam with a per-step cosine learning rate). A list of τ
gives one row per τ and contender.

Each is then certified on the test set by :func:`certify.certify` with the bound
:func:`certify.bounds.lipschitz_bound` computes from its weights (never the library's own claim), and
attacked on the first ``attack_n`` test images.

Empirical robust accuracy at ε: a sample counts when it is correctly classified and either certified at
ε (a sound certificate proves that no attack exists, so it is not attacked) or still correctly
classified after AutoAttack (APGD-CE + APGD-T, through ``pyautoattack``) or L2 PGD: ``auto`` is
:func:`certify.attacks.resolve_attack`'s rule (AutoAttack on CUDA, PGD on a CPU). It is an upper bound
of the true robust accuracy, as the certified accuracy is a lower one.

Resuming: with an output folder, each finished row is written to ``rows/`` there (one JSON file per
contender and τ, atomically) next to ``setup.json``, what every row of the folder was trained under (the
recipe without τ, the time cap, the attack, the device type). A later call with the same setup reads the
finished rows back instead of training them again, so a killed multi-hour bench continues with its next
row; a different setup is refused. A row also records the network it trained (``network``: its
:func:`network_fingerprint`); a saved row is read back only when the contender the current code builds
has the same fingerprint, otherwise (the kind's layers changed, e.g. other Björck step counts, or an
anchor library was upgraded; or the row predates fingerprints) it is trained again and overwritten, with
one log line saying why. Processes that share a folder must be given disjoint ``taus`` or ``models``; a
final call with every τ and model then only assembles the table.

Step time (``time_rounds``): before training, every contender's training step (the recipe's optimiser,
clipping and averaging; batches of the training set) is timed in one process, ``time_rounds`` rounds of
``time_steps`` steps each, the contenders interleaved in a rotating order so that a change of machine
load hits them alike; the median per step and its ratio to the first contender are the cost comparison
(the seconds per epoch of rows trained one after the other, or in other processes, see different loads).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import certify
from certify.attacks import ATTACKS, autoattack_l2, pgd_l2, resolve_attack
from certify.bounds import lipschitz_bound
from certify.io import atomic_write_json
from certify.radius import format_eps
from lipnet import data
from lipnet.bench import cell, markdown_table
from lipnet.bench.anchors import ANCHORS
from lipnet.data.mnist import FASHION_MNIST
from lipnet.layers.batching import batch_weights
from lipnet.layers.kinds import AUTO, kind_for_tau, list_layer_kinds
from lipnet.losses import arguments as loss_arguments
from lipnet.models import create
from lipnet.models.fmnist import AUTO_TAUS, SIZES, auto_options, fmnist_layers
from lipnet.training.build import build_loss, build_optimizer
from lipnet.training.config import DATA_ARGS, Config, ConfigError, ModelConfig, apply_overrides
from lipnet.training.devices import resolve_device
from lipnet.training.ema import ExponentialMovingAverage
from lipnet.training.loop import Callback, GradientClipping, classification_step, fit, show_bars

__all__ = [
    "ATTACKS",
    "EPS",
    "LAYOUT_KEYS",
    "Contender",
    "bench_fmnist",
    "contenders",
    "default_recipe",
    "describe_setup",
    "layout_of",
    "network_fingerprint",
    "time_steps",
    "timing_markdown",
    "to_csv",
    "to_markdown",
    "zero_biases",
]

#: Radii of the table, on the [0, 1] pixel scale (1.58 is about 2 / sqrt(1.6), deel-lip's largest): the
#: radii at which deel-lip reports Fashion-MNIST, not certify.radius.DEFAULT_EPS (CIFAR-10's 36/255 ...).
EPS: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0, 1.58)

#: The model arguments that make the layout every library builds (:func:`fmnist_layers`); the recipe's
#: other model arguments (``head``, ``activation``) are lipnet-only options, given to lipnet's rows alone.
LAYOUT_KEYS: tuple[str, ...] = ("width", "blocks", "hidden")

#: Steps of one timing round (:func:`time_steps`).
TIME_STEPS = 5


@dataclass(frozen=True)
class Contender:
    """One network of the table: its library, its layer kind and how to build it (untrained).

    ``kind_at``: set on a contender that stands for another one chosen per τ (``lipnet:auto``): the name
    of the contender that trains at a loss of temperature τ (None: a loss without τ).
    """

    library: str
    kind: str
    build: Callable[[], nn.Module]
    kind_at: Callable[[float | None], str] | None = None

    @property
    def name(self) -> str:
        """``library:kind``, the name ``--models`` selects it by."""
        return f"{self.library}:{self.kind}"


def contenders(
    size: str = "s",
    num_classes: int = 10,
    *,
    layout: dict[str, int] | None = None,
    lipnet_options: dict[str, Any] | None = None,
) -> list[Contender]:
    """Every network of the table whose library is installed: lipnet's registered kinds first, then the
    other networks ``model.conv: auto`` trains at some τ (``lipnet:bcop+householder``,
    ``lipnet:rko_bcop+rownorm``: :func:`~lipnet.models.fmnist.auto_options`, for the options
    ``lipnet_options`` does not set), ``lipnet:auto`` (lipnet's default front: at each τ the network that
    ``model.conv: auto`` trains), then the anchors of :data:`~lipnet.bench.anchors.ANCHORS` as their
    libraries ship them.

    ``layout`` (keys of :data:`LAYOUT_KEYS`) replaces the sizes of ``fmnist_convnet_<size>``
    (:data:`~lipnet.models.fmnist.SIZES`) for every library; ``lipnet_options`` are further arguments of
    lipnet's model (``head``, ``activation``), for lipnet's rows only.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    unknown = sorted(set(layout or {}) - set(LAYOUT_KEYS))
    if unknown:
        raise ValueError(f"layout takes {', '.join(LAYOUT_KEYS)}, got {', '.join(unknown)}")
    arch = {**SIZES[size], **(layout or {}), "num_classes": num_classes}
    options = dict(lipnet_options or {})

    def lipnet_row(kind: str, **extra: Any) -> Contender:
        model = f"fmnist_convnet_{size}"
        name = ModelConfig(model, {"conv": kind, **extra}).label()  # as a training run names its network
        return Contender("lipnet", name, lambda: create(model, conv=kind, **arch, **options, **extra))

    def auto_at(tau: float | None) -> tuple[str, dict[str, str]]:
        """The kind and the further arguments that conv: auto picks at ``tau`` (as ModelConfig.for_loss)."""
        return kind_for_tau(tau), auto_options(tau, given=options)

    out = [lipnet_row(kind) for kind in list_layer_kinds()]
    # the rule is one network between two of AUTO_TAUS (and below the first, the one at tau None)
    for kind, extra in (auto_at(tau) for tau in AUTO_TAUS):
        row = lipnet_row(kind, **extra)
        if extra and row.name not in {c.name for c in out}:
            out.append(row)

    def kind_at(tau: float | None) -> str:
        kind, extra = auto_at(tau)
        return lipnet_row(kind, **extra).name

    out.append(
        Contender(
            "lipnet",
            AUTO,
            lambda: create(f"fmnist_convnet_{size}", conv=kind_for_tau(None), **arch, **options),
            kind_at=kind_at,
        )
    )
    for anchor in ANCHORS.values():
        try:
            layers = anchor.layers(as_lipnet=False)
        except ImportError:
            continue
        out.append(
            Contender(
                anchor.library,
                anchor.name,
                lambda layers=layers, anchor=anchor: nn.Sequential(
                    *fmnist_layers(
                        layers, activation=lambda _channels: anchor.activation(), pool=anchor.pool, **arch
                    )
                ),
            )
        )
    return out


def _select(available: list[Contender], names: Sequence[str] | None) -> list[Contender]:
    if not names:
        return available
    by_name = {c.name: c for c in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)} for bench fmnist; available: {', '.join(by_name)}"
        )
    return [by_name[n] for n in dict.fromkeys(names)]


def _at_tau(
    chosen: Sequence[Contender], available: Sequence[Contender], tau: float | None
) -> list[Contender]:
    """``chosen`` for a loss of temperature ``tau``: a contender with ``kind_at`` replaced by the one it
    names, each network once (``lipnet:auto`` beside the kind it picks trains that kind once)."""
    by_name = {c.name: c for c in available}
    return list(dict.fromkeys(by_name[c.kind_at(tau)] if c.kind_at else c for c in chosen))


def default_recipe(
    size: str = "s",
    *,
    tau: float = 5.0,
    lr: float = 2e-3,
    batch_size: int = 128,
    epochs: int = 5,
    seed: int = 0,
) -> Config:
    """The recipe without ``--config``: ``fmnist_convnet_<size>`` at its sizes, τ-CE(τ), Adam ``lr`` with a
    per-step cosine decay to 0 and no warm-up, ``batch_size``, ``epochs``, no augmentation."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = Config()
    return apply_overrides(
        cfg,
        [
            f"model.name=fmnist_convnet_{size}",
            "data.name=fashion_mnist",
            "loss.name=tau_ce",
            f"loss.tau={tau!r}",
            "optim.name=adam",
            f"optim.lr={lr!r}",
            "optim.schedule=cosine",
            f"optim.batch_size={batch_size}",
            f"optim.epochs={epochs}",
            f"seed={seed}",
        ],
    )


def layout_of(recipe: Config) -> tuple[str, dict[str, int], dict[str, Any]]:
    """``(size, layout, lipnet_options)`` of a recipe's model; :class:`ConfigError` unless it is a
    Fashion-MNIST recipe of ``fmnist_convnet_s`` / ``_m``. The layout is the model's width, blocks and
    hidden width (the config's, else the size's defaults); the lipnet options are its other arguments
    but the layer kind (each lipnet row has its own) and the data's."""
    name = recipe.model.name
    size = name.removeprefix("fmnist_convnet_")
    if not name.startswith("fmnist_convnet_") or size not in SIZES:
        raise ConfigError(
            f"model.name: bench fmnist trains fmnist_convnet_s or fmnist_convnet_m (the layout every "
            f"library builds), got {name!r}"
        )
    if recipe.data.name != "fashion_mnist":
        raise ConfigError(f"data.name: bench fmnist trains on fashion_mnist, got {recipe.data.name!r}")
    kwargs = recipe.model.kwargs
    layout = {k: int(kwargs.get(k, SIZES[size][k])) for k in LAYOUT_KEYS}
    options = {k: v for k, v in kwargs.items() if k not in LAYOUT_KEYS and k != "conv" and k not in DATA_ARGS}
    return size, layout, options


def _with_tau(recipe: Config, tau: float | None) -> Config:
    return recipe if tau is None else apply_overrides(recipe, [f"loss.tau={tau!r}"])


def describe_setup(recipe: Config) -> dict[str, Any]:
    """What a row is trained under apart from its contender and τ: the recipe (model layout and
    lipnet-only options, data budget, loss without τ, optimiser, seed), in the config's file layout."""
    cfg = recipe.to_dict()
    size, layout, options = layout_of(recipe)
    loss = {k: v for k, v in cfg["loss"].items() if k != "tau"}
    d = {k: v for k, v in cfg["data"].items() if k not in ("data_dir", "download")}
    return {
        "model": {"size": size, **layout, "lipnet": options},
        "data": d,
        "loss": loss,
        "optim": cfg["optim"],
        "seed": cfg["seed"],
    }


def _robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: torch.Tensor,
    eps: Sequence[float],
    attack: str,
    steps: int,
    seed: int,
) -> list[float]:
    """Empirical robust accuracy at each ε (see the module docstring for what counts)."""
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).cpu()
    out = []
    for e in eps:
        certified = radii > e
        robust = certified & correct
        todo = correct & ~certified
        if todo.any():
            idx = todo.nonzero().squeeze(1)
            xs, ys = x[idx.to(x.device)], y[idx.to(y.device)]
            if attack == "autoattack":
                x_adv = autoattack_l2(model, xs, ys, e, seed=seed)
            else:
                x_adv = pgd_l2(model, xs, ys, e, steps=steps, restarts=1, seed=seed)
            with torch.no_grad():
                robust[idx] = (model(x_adv).argmax(dim=1) == ys).cpu()
        out.append(float(robust.double().mean()))
    return out


def zero_biases(model: nn.Module) -> int:
    """Set every bias of ``model`` to 0 in place and return how many tensors were zeroed.

    Zero biases are part of the recipe every contender trains under: lipnet's layers and deel-torchlip's
    are built with them, orthogonium's layers draw them from PyTorch's U(±1/sqrt(fan_in)) (±0.32 on the
    1->16 stem, as large as the stem's response to an image patch), which costs about 3 points of clean
    accuracy at the bench's budgets (the issue-13 research notes, section 1b). Every parameter named
    ``bias`` counts; the weights are left as each library initialises them.
    """
    zeroed = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                parameter.zero_()
                zeroed += 1
    return zeroed


#: Packages whose version does not enter :func:`network_fingerprint`: lipnet's version does not move with
#: its code (its layers are told apart by their repr alone), torch is the environment every contender
#: shares, not a network's definition.
_UNVERSIONED = frozenset({"lipnet", "torch"})


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Import name -> installed distributions providing it (scans every installed distribution: once)."""
    return {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}


def _libraries(model: nn.Module) -> list[str]:
    """``name==version`` of each installed distribution (but lipnet and torch) that defines a class of one
    of ``model``'s modules or of its bases (a parametrized layer's class derives from the library's)."""
    packages = {
        cls.__module__.partition(".")[0] for module in model.modules() for cls in type(module).__mro__
    }
    found = {
        f"{dist}=={importlib.metadata.version(dist)}"
        for package in packages - _UNVERSIONED
        for dist in _distributions().get(package, ())
    }
    return sorted(found)


def network_fingerprint(model: nn.Module) -> str:
    """A short stable name of a network's definition: the first 16 hex digits of the SHA-256 of
    ``repr(model)`` and, one per line after it, ``name==version`` of every installed distribution other
    than lipnet and torch that defines the class (or a base class) of one of its modules (deel-torchlip,
    orthogonium: their code can change under the same repr). Give it the freshly built, untrained network.

    It tells apart networks whose reprs differ: another layer, layout or width, and every setting a
    module shows in its repr (lipnet's Björck steps, order and tolerances, e.g. ``train_iterations=3``
    against ``8``), and an anchor library's release. It does not see a change of code that leaves the repr
    as it was (an edited formula in a layer's forward or parametrisation, another initialisation, a
    setting a module keeps out of its repr), nor a library whose functions are called by a module of
    another package (only module classes are traced to their distribution), nor an edit to an installed
    library that keeps its version; rows trained before such a change are read back as if current.
    """
    text = "\n".join([repr(model), *_libraries(model)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _network_of(contender: Contender, seed: int) -> str:
    """:func:`network_fingerprint` of ``contender`` built as :class:`_Trainee` builds it (seed ``seed``,
    on the CPU), leaving the global random state as it was: the build draws the initial weights, and a
    fingerprint must not move the random stream of what runs after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return network_fingerprint(contender.build())


class _Trainee:
    """A contender built for ``recipe``: the module the optimiser trains, the one evaluated (the moving
    average when the recipe keeps one), the optimiser, the callbacks of the recipe and ``network``, the
    :func:`network_fingerprint` of the model as built (before its biases are zeroed and its weights
    batched)."""

    def __init__(self, contender: Contender, recipe: Config, device: torch.device) -> None:
        torch.manual_seed(recipe.seed)
        built = contender.build()
        self.network = network_fingerprint(built)
        model = built.to(device)
        zero_biases(model)
        if contender.library == "lipnet":
            model = batch_weights(model)  # as lipnet train computes a lipnet model's Björck weights
        self.model = model
        self.optimizer = build_optimizer(model.parameters(), recipe)
        self.callbacks: list[Callback] = []
        if recipe.optim.clip_grad_norm is not None:
            self.callbacks.append(GradientClipping(recipe.optim.clip_grad_norm))
        self.evaluated: nn.Module = model
        if recipe.optim.ema is not None:
            ema = ExponentialMovingAverage(model, recipe.optim.ema)
            self.callbacks.append(ema)
            self.evaluated = ema.average


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _row_path(folder: Path, contender: Contender, tau: float | None) -> Path:
    tail = "" if tau is None else f"_tau{tau:g}"
    return folder / "rows" / f"{_slug(contender.library)}_{_slug(contender.kind)}{tail}.json"


def _check_setup(folder: Path, setup: dict[str, Any]) -> bool:
    """Whether ``folder/setup.json`` exists; ``ValueError`` when it describes another setup."""
    path = folder / "setup.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); give another --out or delete it") from None
    if saved != setup:
        differ = [k for k in sorted(set(saved) | set(setup)) if saved.get(k) != setup.get(k)]
        raise ValueError(
            f"{folder} holds rows of another setup (differs in {', '.join(differ)}: "
            f"{', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); give another --out or delete it"
        )
    return True


def time_steps(
    chosen: Sequence[Contender],
    recipe: Config,
    train_ds: Any,
    device: torch.device,
    *,
    rounds: int,
    steps: int = TIME_STEPS,
    steps_per_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """Median seconds of one training step of each contender, measured interleaved in this process.

    Each contender is built for ``recipe`` (:class:`_Trainee`) and trained through
    :func:`~lipnet.training.loop.fit` for ``rounds + 1`` segments of ``steps`` steps: one warm-up segment,
    then ``rounds`` rounds in which every contender runs its next segment, the order rotated by one each
    round. Segment ``r`` is the same ``steps`` batches of ``train_ds`` (the recipe's batch size, data order
    and seed) for every contender, and steps ``r steps ..`` of the recipe's own learning-rate schedule for a
    run of ``recipe.optim.epochs`` epochs of ``steps_per_epoch`` steps (warm-up included): the timed steps
    are the first steps of the real training, so no contender is timed at a learning rate its training
    never sees (a constant 8e-3 without warm-up, repeated on a few batches, drives some to NaN). A step is
    what ``fit`` times (learning rate, forward, loss, backward, callbacks, optimiser step). Returns per
    contender: name, ``ms_per_step`` (median over the rounds), ``ratio`` (to the first contender's
    median), ``rounds`` (each round's milliseconds per step) and ``sec_per_epoch``: the median step times
    ``steps_per_epoch`` (the training loader's length; None when not given, and the schedule is then that
    of ``(rounds + 1) steps`` steps), the cost of an epoch of training steps under the load of the timing.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got {rounds} and {steps}")
    loader = data.DeviceLoader(
        train_ds, recipe.optim.batch_size, shuffle=True, seed=recipe.seed, device=device
    )
    need = (rounds + 1) * steps
    batches: list[Any] = []
    epoch = 0
    while len(batches) < need:  # the run's first batches; a small training set again in its next order
        loader.set_epoch(epoch)
        batches.extend(batch for _, batch in zip(range(need - len(batches)), loader, strict=False))
        epoch += 1
    total = max(need, recipe.optim.epochs * steps_per_epoch if steps_per_epoch else need)
    segments = -(-total // steps)  # the schedule's steps, counted in segments of ``steps``
    step_fn = classification_step(build_loss(recipe))
    trainees = [_Trainee(c, recipe, device) for c in chosen]

    def once(t: _Trainee, segment: int) -> float:
        fitted = fit(
            t.model,
            t.optimizer,
            batches[segment * steps : (segment + 1) * steps],
            step_fn,
            epochs=segments,
            lr=recipe.optim.scaled_lr(),
            schedule=recipe.optim.schedule,
            warmup=recipe.optim.warmup,
            start_epoch=segment,
            start_step=segment * steps,
            stop_after_epoch=segment + 1,
            callbacks=t.callbacks,
        )
        return 1e3 * fitted.seconds / (fitted.step - segment * steps)

    for t in trainees:
        once(t, 0)
    per_round: list[list[float]] = [[] for _ in trainees]
    n = len(trainees)
    for r in range(rounds):
        for i in range(n):
            k = (r + i) % n
            per_round[k].append(once(trainees[k], r + 1))
    medians = [statistics.median(ms) for ms in per_round]
    return [
        {
            "name": c.name,
            "ms_per_step": m,
            "ratio": m / medians[0],
            "rounds": ms,
            "sec_per_epoch": None if steps_per_epoch is None else m * steps_per_epoch / 1e3,
        }
        for c, m, ms in zip(chosen, medians, per_round, strict=True)
    ]


def bench_fmnist(
    recipe: Config | None = None,
    *,
    taus: Sequence[float] | None = None,
    models: Sequence[str] | None = None,
    time_cap: float | None = None,
    attack_n: int = 1000,
    attack: str = "auto",
    attack_steps: int = 50,
    data_dir: str | Path | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    time_rounds: int = 0,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    on_timing: Callable[[list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = lambda _line: None,
    extra: Sequence[Contender] = (),
) -> list[dict[str, Any]]:
    """Train, certify and attack every selected contender under one recipe, for each τ of ``taus``; one
    dict per network and τ, in the order τ, then contender.

    ``recipe``: the run config every library trains under (module docstring; :func:`default_recipe` when
    None): its model (``fmnist_convnet_s`` / ``_m``, layout and lipnet-only options), data budget
    (``data.n_train``, ``data.n_test``), loss, optimiser, schedule, batch, epochs, seed and device; its
    ``certify`` section is not used (the radii are :data:`EPS`). ``taus``: each replaces ``loss.tau``
    (None: the recipe's loss as it is). ``time_cap``: training seconds per network, no cap when None.
    ``out``: the folder of ``setup.json`` and ``rows/`` (module docstring: finished rows are read back,
    not trained again); None keeps nothing. ``time_rounds`` > 0 first times every contender's step
    (:func:`time_steps`, passed to ``on_timing``).

    Keys of a row: tau, library, kind, params, epochs (done; fractional when the time cap stopped
    training), sec_per_epoch, train_acc (the last epoch's), clean, cert (list, one per :data:`EPS`),
    mean_radius (misclassified count 0), robust (list per :data:`EPS`, or None when ``attack_n`` is 0),
    attack, bound (the whole network's sound L2 bound), rule (the certificate: last-layer or global),
    network (:func:`network_fingerprint` of the contender as built; a saved row of another is trained again).
    ``extra``: networks an experiment builds itself (variants of a contender), offered after the built-in
    ones and selected by ``models`` as they are; a name that is already taken is refused.
    ``attack``: ``auto`` (:func:`certify.attacks.resolve_attack`: AutoAttack on CUDA, else PGD),
    ``autoattack`` or ``pgd`` (with ``attack_steps`` steps). ``on_row`` receives the rows so far after each
    network (to write partial results). A network whose training diverges raises
    :class:`~lipnet.training.loop.TrainingDivergedError` (the rows written before it are kept).
    """
    recipe = default_recipe() if recipe is None else recipe
    recipe.validate()
    if time_cap is not None and not time_cap > 0:  # NaN too
        raise ValueError(f"time cap must be positive seconds, got {time_cap}")
    if attack_n < 0:
        raise ValueError(f"attack_n must be >= 0, got {attack_n}")
    if time_rounds < 0:
        raise ValueError(f"time_rounds must be >= 0, got {time_rounds}")
    size, layout, options = layout_of(recipe)
    if taus is not None:
        if not taus or any(not t > 0 or t == float("inf") for t in taus):
            raise ValueError(f"taus must be finite numbers > 0, got {list(taus)}")
        if "tau" not in loss_arguments(recipe.loss.name):
            raise ConfigError(f"loss {recipe.loss.name!r} takes no tau: drop --taus or use tau_ce")
        if len(set(taus)) != len(taus):
            raise ValueError(f"taus repeat: {', '.join(f'{t:g}' for t in taus)}")
    plan_taus: list[float | None] = list(taus) if taus is not None else [None]
    dev = resolve_device(recipe.device)
    attack = resolve_attack(attack, dev).name
    attack_label = f"pgd ({attack_steps} steps)" if attack == "pgd" else "autoattack (apgd-ce, apgd-t)"
    # Unknown model names, a bad layout and a loss that cannot be built fail before any data is read.
    num_classes = len(FASHION_MNIST.classes)
    available = contenders(size, num_classes, layout=layout, lipnet_options=options)
    taken = {c.name for c in available}
    for contender in extra:
        if contender.name in taken:
            raise ValueError(f"extra contender {contender.name} is already a contender of bench fmnist")
        taken.add(contender.name)
    chosen = _select([*available, *extra], models)
    for tau in plan_taus:
        build_loss(_with_tau(recipe, tau))
    setup = {
        **describe_setup(recipe),
        "time_cap": time_cap,
        "attack": {"name": attack, "n": attack_n, "steps": attack_steps},
        "device": dev.type,
    }
    folder = Path(out) if out is not None else None
    if folder is not None:
        _check_setup(folder, setup)
    train_ds = data.load("fashion_mnist", "train", data_dir=data_dir, n=recipe.data.n_train)
    test_ds = data.load("fashion_mnist", "test", data_dir=data_dir, n=recipe.data.n_test)
    augment = (
        data.Augment(crop_padding=recipe.data.crop_padding, flip=recipe.data.flips())
        if recipe.data.augment
        else None
    )
    train_loader = data.DeviceLoader(
        train_ds, recipe.optim.batch_size, shuffle=True, augment=augment, seed=recipe.seed, device=dev
    )
    shape = tuple(int(s) for s in test_ds.images.shape[1:])
    n_attack = min(attack_n, len(test_ds))
    x_att, y_att = test_ds.images[:n_attack].to(dev), test_ds.labels[:n_attack].to(dev)

    if time_rounds:
        first = _with_tau(recipe, plan_taus[0])
        timing = time_steps(
            _at_tau(chosen, available, first.loss.tau),
            first,
            train_ds,
            dev,
            rounds=time_rounds,
            steps_per_epoch=len(train_loader),
        )
        for timed in timing:
            log(f"{timed['name']}: {timed['ms_per_step']:.1f} ms/step ({timed['ratio']:.2f}x)")
        if on_timing is not None:
            on_timing(timing)

    rows: list[dict[str, Any]] = []
    for tau in plan_taus:
        cfg = _with_tau(recipe, tau)
        loss_fn = build_loss(cfg)
        for c in _at_tau(chosen, available, cfg.loss.tau):
            label = c.name if tau is None else f"{c.name} tau={tau:g}"
            saved = _row_path(folder, c, tau) if folder is not None else None
            if saved is not None and saved.is_file():
                previous = json.loads(saved.read_text(encoding="utf-8"))
                now = _network_of(c, cfg.seed)
                if previous.get("network") == now:
                    rows.append(previous)
                    log(f"{label}: finished before ({saved})")
                    if on_row is not None:
                        on_row(rows)
                    continue
                if "network" in previous:
                    log(
                        f"{label}: row in {saved} was trained by another network definition "
                        f"(fingerprint {previous['network']}, now {now}): training again"
                    )
                else:
                    log(f"{label}: row in {saved} has no network fingerprint (now {now}): training again")
            log(f"{label}: training")
            t = _Trainee(c, cfg, dev)
            t0 = time.perf_counter()
            fitted = fit(
                t.model,
                t.optimizer,
                train_loader,
                classification_step(loss_fn),
                epochs=cfg.optim.epochs,
                lr=cfg.optim.scaled_lr(),
                schedule=cfg.optim.schedule,
                warmup=cfg.optim.warmup,
                time_cap=time_cap,
                callbacks=t.callbacks,
                advice=lambda _epoch: "lower the learning rate",
                label=label,
                progress=progress,
            )
            done, seconds = fitted.epochs, fitted.seconds
            last = fitted.history[-1] if fitted.history else None
            model = t.evaluated.eval()
            result = certify.certify(
                model,
                data.DeviceLoader(test_ds, 500, device=dev),
                eps=list(EPS),
                progress=show_bars(progress),
            )
            robust = (
                _robust(model, x_att, y_att, result.radii[:n_attack], EPS, attack, attack_steps, cfg.seed)
                if n_attack
                else None
            )
            row: dict[str, Any] = {
                "tau": cfg.loss.kwargs.get("tau"),
                "library": c.library,
                "kind": c.kind,
                "params": sum(p.numel() for p in model.parameters()),
                "epochs": done,
                "sec_per_epoch": seconds / done if done else float("nan"),
                "train_acc": last.stats["correct"] / last.samples if last is not None else None,
                "clean": result.clean_accuracy,
                "cert": [result.certified_accuracy[e] for e in EPS],
                "mean_radius": result.mean_radius,
                "robust": robust,
                "attack": f"{attack_label} on {n_attack}" if n_attack else "none",
                "bound": lipschitz_bound(model, shape),
                "rule": result.rule,
                "network": t.network,
            }
            rows.append(row)
            if folder is not None and saved is not None:
                # setup.json first (checked again: another process may have written it meanwhile), then
                # the row, each atomically: a row file always belongs to the folder's setup
                folder.mkdir(parents=True, exist_ok=True)
                if not _check_setup(folder, setup):
                    atomic_write_json(folder / "setup.json", setup)
                saved.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(saved, row)
            log(
                f"{label}: clean {100 * row['clean']:.2f}%, certified "
                + " / ".join(f"{100 * a:.1f}" for a in row["cert"])
                + f", radius {row['mean_radius']:.3f}, {row['sec_per_epoch']:.1f} s/epoch "
                f"({time.perf_counter() - t0:.0f} s with certification)"
            )
            if on_row is not None:
                on_row(rows)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (fractions, not percentages; empty robust cells when nothing was attacked)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["tau", "library", "kind", "params", "epochs", "sec_per_epoch", "train_acc", "clean"]
        + [f"cert_{format_eps(e)}" for e in EPS]
        + ["mean_radius"]
        + [f"robust_{format_eps(e)}" for e in EPS]
        + ["attack", "bound", "rule"]
    )
    for r in rows:
        robust = r["robust"] if r["robust"] is not None else [""] * len(EPS)
        train_acc = "" if r.get("train_acc") is None else f"{r['train_acc']:.4f}"
        writer.writerow(
            [cell(r.get("tau"), "g", ""), r["library"], r["kind"], r["params"], f"{r['epochs']:.6g}"]
            + [f"{r['sec_per_epoch']:.4g}", train_acc, f"{r['clean']:.4f}"]
            + [f"{a:.4f}" for a in r["cert"]]
            + [f"{r['mean_radius']:.4f}"]
            + [a if a == "" else f"{a:.4f}" for a in robust]
            + [r["attack"], f"{r['bound']:.8g}", r["rule"]]
        )
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table (percentages), under ``header``; the empirical column only when some
    row was attacked."""
    eps = " / ".join(format_eps(e) for e in EPS)
    attacked = any(r["robust"] is not None for r in rows)
    columns = [
        "τ", "library", "kind", "params", "epochs", "s/epoch", "train", "clean", f"certified at ε = {eps}",
        "mean radius", *([f"empirical robust at ε = {eps}"] if attacked else []), "sound bound",
    ]  # fmt: skip

    def cells(r: dict[str, Any]) -> list[str]:
        robust = " / ".join(f"{100 * a:.1f}" for a in r["robust"]) if r["robust"] is not None else "—"
        train = "—" if r.get("train_acc") is None else f"{100 * r['train_acc']:.2f}"
        return [
            cell(r.get("tau"), "g", "—"), str(r["library"]), str(r["kind"]), f"{r['params']:,}",
            f"{r['epochs']:.2f}", f"{r['sec_per_epoch']:.1f}", train, f"{100 * r['clean']:.2f}",
            " / ".join(f"{100 * a:.1f}" for a in r["cert"]), f"{r['mean_radius']:.3f}",
            *([robust] if attacked else []), f"{r['bound']:.6f}",
        ]  # fmt: skip

    return markdown_table(header, columns, (cells(r) for r in rows)) + "\n"


def timing_markdown(timing: list[dict[str, Any]], header: str) -> str:
    """The step times of :func:`time_steps` as a Markdown table under ``header`` (the s/epoch column:
    the median step times the steps of an epoch, ``—`` when unknown)."""
    columns = [
        "model", "ms/step (median)", f"× {timing[0]['name']}", "s/epoch (median step)", "ms/step per round",
    ]  # fmt: skip
    return (
        markdown_table(
            header,
            columns,
            (
                [
                    t["name"],
                    f"{t['ms_per_step']:.1f}",
                    f"{t['ratio']:.2f}",
                    "—" if t.get("sec_per_epoch") is None else f"{t['sec_per_epoch']:.1f}",
                    ", ".join(f"{ms:.0f}" for ms in t["rounds"]),
                ]
                for t in timing
            ),
        )
        + "\n"
    )
