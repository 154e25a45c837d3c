"""The run configuration: a YAML file plus ``--set section.key=value`` overrides, checked on load.

Every field has a default; ``configs/lits_atlas.yaml`` is the paper's recipe as best we know it, and
``configs/demo.yaml`` the synthetic demo. Unknown keys and wrongly typed values are errors naming
the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.options import MODES as AQCFNET_MODES
from ..models.options import AQCFNetOptions, ArchitectureOptions

MODES = (*AQCFNET_MODES, "dynunet")


@dataclass
class DataConfig:
    ct_root: str | None = None  # folder searched recursively for CT cases (LiTS, MSD, nnU-Net layouts)
    mri_root: str | None = None  # MRI cases (ATLAS, nnU-Net layouts)
    ct_layout: str | None = None  # None: detected
    mri_layout: str | None = None
    cache_dir: str = "cache"  # preprocessed arrays (memory-mapped), keyed by file + settings
    hu_window: tuple[float, float] = (-200.0, 250.0)
    target_spacing: tuple[float, float, float] | None = None  # mm (x, y, z) in RAS axes; None keeps native
    split_seed: int = 0
    val_fraction: float = 0.15  # unused with a fold: the fold is the validation set
    test_fraction: float = 0.15
    # Cross-validation (nnU-Net's convention): None = one seeded train/val/test split by the fractions;
    # k in 0..folds-1 = the test set held out, the other patients cut into `folds` parts, validate on
    # part k; "all" = train on every non-test patient, validate on none (best.pt is then the last epoch).
    fold: int | str | None = None
    folds: int = 5
    slice_size: tuple[int, int] = (256, 256)  # 2D training crops (and sliding-window ROI)
    patch_size: tuple[int, int, int] = (32, 128, 128)  # 3D training patches (z, x, y)
    tumour_prob: float = 0.5  # tumour oversampling: share of draws forced to contain tumour
    num_workers: int = 0


#: The ``model`` section: the A-QCF-Net architecture options, declared once in :mod:`aqcf_kernels.models.options`
#: (``AQCFNet``'s other options, its input/output channels and mode, come from the data and ``train.mode``).
ModelConfig = ArchitectureOptions


@dataclass
class TrainConfig:
    mode: str = "joint"
    epochs: int = 100
    steps_per_epoch: int = 250
    batch_size: int = 8  # per modality and process
    lr: float = 3e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N; torchrun: each rank its own GPU
    seed: int = 0
    val_every: int = 1  # epochs
    val_cases: int | None = None  # validate on at most this many cases per modality (None: all)
    augment: bool = True
    # Share of joint steps that run each modality alone (no fusion), as inference does: test cases
    # come one modality at a time, so the streams must also work without the other.
    solo_prob: float = 0.5


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
        cfg = RunConfig()
        if data is not None and not isinstance(data, dict):
            # a YAML file of one word ("hello") or a list: it was an AttributeError traceback
            raise ValueError(
                f"{source}: must be a mapping of sections (data:, model:, train:), got {type(data).__name__} "
                f"{_short(data)}"
            )
        for section, values in (data or {}).items():
            if section not in ("data", "model", "train"):
                raise ValueError(f"{source}: unknown section {section!r} (expected data, model, train)")
            if not isinstance(values, dict):
                raise ValueError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
            for key, value in values.items():
                apply_override(cfg, f"{section}.{key}", value, source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every value in range, or a ValueError naming its dotted key; called on load and after overrides,
        so that a bad value is refused before a run folder is written, not deep inside training."""
        if self.train.mode not in MODES:
            raise ValueError(f"train.mode must be one of {MODES}, got {self.train.mode!r}")
        if not 0.0 <= self.train.solo_prob <= 1.0:
            raise ValueError(f"train.solo_prob must be in [0, 1], got {self.train.solo_prob}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "val_every"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self.train, name)}")
        self._validate_numbers()
        if self.data.fold is not None:
            from ..data.split import check_fold

            try:
                check_fold(self.data.fold, self.data.folds)
            except ValueError as e:
                raise ValueError(f"data.fold / data.folds: {e}") from None
        elif isinstance(self.data.folds, bool) or self.data.folds < 2:
            raise ValueError(f"data.folds must be >= 2, got {self.data.folds}")
        self.model_options().validated(prefix="model.")

    def _validate_numbers(self) -> None:
        d, t = self.data, self.train
        # NaN fails every comparison, so each check is written as "not (valid)".
        _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", "must be a positive number", t.lr)
        _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "must be >= 0",
               t.weight_decay)  # fmt: skip
        _check(math.isfinite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0: no clipping)",
               t.grad_clip)  # fmt: skip
        _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", t.warmup_steps)
        # numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1 only
        _check(0 <= t.seed < 2**32, "train.seed", "must be in 0 .. 2**32 - 1", t.seed)
        _check(t.val_cases is None or t.val_cases >= 1, "train.val_cases", "must be >= 1 or null (all)", t.val_cases)
        _check(all(math.isfinite(v) for v in d.hu_window) and d.hu_window[0] < d.hu_window[1], "data.hu_window",
               "must be [low, high] with low < high", list(d.hu_window))  # fmt: skip
        if d.target_spacing is not None:
            _check(all(math.isfinite(v) and v > 0 for v in d.target_spacing), "data.target_spacing",
                   "must be 3 positive sizes in mm (or null)", list(d.target_spacing))  # fmt: skip
        _check(d.split_seed >= 0, "data.split_seed", "must be >= 0", d.split_seed)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(d, name)
            _check(0.0 <= value < 1.0, f"data.{name}", "must be in [0, 1)", value)
        if d.fold is None:  # with a fold, the fold is the validation set and val_fraction is unused
            _check(d.val_fraction + d.test_fraction < 1.0, "data.val_fraction + data.test_fraction",
                   "must be < 1 (the rest is the training share)", d.val_fraction + d.test_fraction)  # fmt: skip
        _check(all(n >= 1 for n in d.slice_size), "data.slice_size", "must hold sizes >= 1", list(d.slice_size))
        _check(all(n >= 1 for n in d.patch_size), "data.patch_size", "must hold sizes >= 1", list(d.patch_size))
        _check(0.0 <= d.tumour_prob <= 1.0, "data.tumour_prob", "must be in [0, 1]", d.tumour_prob)
        _check(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)

    def model_options(self) -> AQCFNetOptions:
        """The A-QCF-Net of this run: the ``model`` section, one input channel, three classes, ``train.mode``.

        The ``dynunet`` baseline uses only the section's widths, but they are checked as a joint
        A-QCF-Net's, so the baseline always has the widths of a network it is compared with.
        """
        mode = self.train.mode if self.train.mode in AQCFNET_MODES else "joint"
        return AQCFNetOptions(**dataclasses.asdict(self.model), in_channels=1, out_channels=3, mode=mode)

    def check_data_roots(self) -> None:
        """Training and evaluation need the roots of the modalities of the mode, as existing folders, and a
        ``data.cache_dir`` that is a folder or can be made one (checked, not created: an OutputError, a
        ValueError, naming the key)."""
        from ..data.outputs import check_folder

        check_folder(self.data.cache_dir, f"data.cache_dir={self.data.cache_dir}")
        for modality in self.modalities:
            root = getattr(self.data, f"{modality}_root")
            if not root:
                raise ValueError(
                    f"train.mode={self.train.mode!r} needs data.{modality}_root (set it in the YAML or with --set)"
                )
            if not Path(root).is_dir():
                raise FileNotFoundError(f"data.{modality}_root = {root!r} is not a folder")

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose data folders are absolute, so a run's saved config works from any directory."""
        out = RunConfig.from_dict(self.to_dict())
        for key in ("ct_root", "mri_root", "cache_dir"):
            value = getattr(out.data, key)
            if value:
                setattr(out.data, key, str(Path(value).resolve()))
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        return {"joint": ("ct", "mri"), "ct": ("ct",), "mri": ("mri",), "dynunet": ("ct", "mri")}[self.train.mode]


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: what went wrong and where (PyYAML's own text spans 5 lines, with a caret
    drawing)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{where}{problem}" + (f", {context}" if context else "")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} {rule}, got {json.dumps(value)}")


#: Keys a resumed run may change (``--resume`` with another value): where it runs, not what it computes.
RESUME_MAY_CHANGE = ("train.device",)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_diff(old: RunConfig, new: RunConfig, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs, keys in config order."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if k not in ignore and a.get(k) != b.get(k)]


def format_diff(diff: Sequence[tuple[str, Any, Any]]) -> str:
    """``key: old → new`` items of :func:`config_diff`, joined on one line."""
    return "; ".join(f"{key}: {json.dumps(a)} → {json.dumps(b)}" for key, a, b in diff)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """``value`` as the field's type (YAML lists to tuples, ints to floats), or a clear error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key} must be a list, got {value!r}")
        item_types = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(item_types) != len(value):
            raise ValueError(f"{source}: {key} must have {len(item_types)} entries, got {value!r}")
        return tuple(_coerce(v, t, key, source) for v, t in zip(value, item_types, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{source}: {key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{source}: {key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {annotation} for {key}")


def apply_override(cfg: RunConfig, dotted: str, value: Any, source: str = "override") -> None:
    """Set ``section.key`` of ``cfg`` to ``value`` (coerced to the field's type), or a clear error."""
    section_name, _, key = dotted.partition(".")
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ValueError(f"{source}: unknown section {section_name!r} in {dotted!r} (expected data, model, train)")
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ValueError(f"{source}: unknown key {dotted!r}; {section_name} has {', '.join(hints)}")
    setattr(section, key, _coerce(value, hints[key], dotted, source))


def apply_overrides(cfg: RunConfig, items: Sequence[str], sections: Sequence[str] | None = None) -> None:
    """Apply ``--set section.key=value`` items (values parsed as YAML); ``sections`` limits what may change."""
    import yaml

    for item in items:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        if sections is not None and dotted.partition(".")[0] not in sections:
            raise ValueError(
                f"--set {item!r}: expected {'|'.join(sections)}.KEY=VALUE (only the {', '.join(sections)} "
                f"section{'s' if len(sections) > 1 else ''} can be changed)"
            )
        apply_override(cfg, dotted, yaml.safe_load(text), f"--set {item}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The YAML file at ``path`` (or the defaults) with ``section.key=value`` overrides applied."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    cfg = RunConfig.from_dict(data, str(path) if path else "defaults")
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg
