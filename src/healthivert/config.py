"""Typed parameters: ``params.yaml`` (one section per stage) validated by pydantic models.

Every section forbids unknown keys, so a misspelt setting fails before any stage runs, with the key
named and the closest valid key suggested. Several parameter files can be layered (later ones win)
and single keys overridden with ``section.key=value``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from healthivert.errors import ConfigError

#: the 2D slices a generator works on: ``sagittal`` (rows CC, columns AP) or ``coronal`` (rows CC, columns LR).
View = Literal["sagittal", "coronal"]


def _distinct_views(views: tuple[View, ...]) -> tuple[View, ...]:
    """Refuse an empty list of views or a view listed twice."""
    if not views:
        raise ValueError("list at least one view (sagittal, coronal)")
    repeated = sorted({view for view in views if views.count(view) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} listed more than once")
    return views


class Section(BaseModel):
    """Base of every parameter section: strict, immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Short stable hash of the section's values (checkpoints refuse to resume on a mismatch)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- data
class RealShapeSource(Section):
    """A real vertebra label map whose spine some phantom cases take instead of a drawn one.

    Each of its ``cases`` renders the real bodies (endplates, waist, size, tilt) with the phantom's
    tissue model, after a small affine jitter, with its own random fractures. All its cases belong to
    one patient, ``sub-<name>`` (so they share a split), ``split`` when given.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9]+$")
    mask: Path
    label_scheme: Literal["auto", "verse", "totalseg"] = "auto"
    cases: int = Field(1, ge=1)
    split: Literal["train", "val", "test"] | None = None


class PhantomParams(Section):
    """Synthetic spine CT generator (the default dataset): drawn spines, and real spines with drawn fractures."""

    cases: int = Field(24, ge=1)
    seed: int = 0
    vertebrae_per_case: tuple[int, int] = (8, 10)
    fracture_share: float = Field(0.35, ge=0.0, le=1.0)
    grade_weights: tuple[float, float, float] = (0.47, 0.37, 0.16)
    spacing_mm_range: tuple[float, float] = (0.8, 1.5)
    noise_hu: float = Field(20.0, ge=0.0)
    normal_deformity_share: float = Field(0.4, ge=0.0, le=1.0)
    fov_mm: tuple[float, float] = (170.0, 130.0)
    #: per drawn patient, the depth of the endplates' cup (share of the body height lost at the central
    #: column) is drawn from this range: the middle third is then 0.85-0.99 of the taller wall (median
    #: 0.91), as in the sample spines' healthy bodies (0.78-0.96); 0 gives flat endplates
    endplate_concavity_range: tuple[float, float] = (0.10, 0.28)
    orientations: tuple[str, ...] = Field(("RAS", "LPS", "PIR", "IPL", "LAS"), min_length=1)
    #: real label maps rendered as further cases, after the drawn ones
    real_shapes: tuple[RealShapeSource, ...] = ()
    #: per real-shape case: largest rotation about each axis (degrees) and the range of its isotropic scale
    real_rotation_deg: float = Field(4.0, ge=0.0, le=20.0)
    real_scale_range: tuple[float, float] = (0.95, 1.05)

    @field_validator("orientations")
    @classmethod
    def _axis_codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            pairs = sorted(next((n for n, pair in enumerate(("LR", "AP", "SI")) if c in pair), -1) for c in code.upper())
            if pairs != [0, 1, 2]:
                raise ValueError(f"'{code}' is not an orientation like RAS, LPS or IPL")
        return tuple(code.upper() for code in value)

    @model_validator(mode="after")
    def _ranges(self) -> "PhantomParams":
        if not 1 <= self.vertebrae_per_case[0] <= self.vertebrae_per_case[1] <= 12:
            raise ValueError("vertebrae_per_case must be (min, max) with 1 <= min <= max <= 12 (T6..L5)")
        if min(self.grade_weights) < 0 or sum(self.grade_weights) <= 0:
            raise ValueError("grade_weights must be non-negative with a positive sum")
        if not 0.0 < self.spacing_mm_range[0] <= self.spacing_mm_range[1]:
            raise ValueError("spacing_mm_range must be (min, max) with 0 < min <= max")
        if not 0.0 <= self.endplate_concavity_range[0] <= self.endplate_concavity_range[1] <= 0.4:
            raise ValueError("endplate_concavity_range must be (min, max) with 0 <= min <= max <= 0.4")
        if not 0.0 < self.real_scale_range[0] <= self.real_scale_range[1]:
            raise ValueError("real_scale_range must be (min, max) with 0 < min <= max")
        names = [source.name for source in self.real_shapes]
        if len(set(names)) != len(names):
            raise ValueError(f"real_shapes names must be distinct, got {names}")
        return self


#: ``data.source`` of the default dataset: the phantom written by ``datasets/phantom/dvc.yaml``.
PHANTOM_SOURCE = "data/phantom"


def _location(value: str) -> str:
    """Accept a local path or an ``s3://bucket/prefix`` URI; refuse other schemes and a bucket-less URI."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    scheme, separator, rest = value.partition("://")
    if separator and scheme != "s3":
        raise ValueError(f"'{scheme}://' is not supported: give a local path or an s3://bucket/prefix URI")
    if separator and not rest.split("/", 1)[0]:
        raise ValueError(f"'{value}' names no bucket: expected s3://bucket/prefix")
    return value


class DataParams(Section):
    """The dataset the pipeline runs on.

    Attributes:
        source: a dataset folder in any layout ``preprocess`` reads, or an ``s3://bucket/prefix``
            (downloaded into a local cache first); the default is the phantom.
        grades: its Genant grades: the paper's JSON (its split is kept) or a ``case,vertebra,grade``
            CSV, as a path or an ``s3://`` URI.
    """

    source: str = PHANTOM_SOURCE
    grades: str = f"{PHANTOM_SOURCE}/grades.csv"

    _locations = field_validator("source", "grades")(_location)

    @property
    def is_phantom(self) -> bool:
        """True when the pipeline runs on the default phantom dataset."""
        return self.source.rstrip("/") == PHANTOM_SOURCE


class SplitParams(Section):
    """Patient-wise train/val/test split."""

    train: float = Field(0.6, gt=0.0, lt=1.0)
    val: float = Field(0.2, ge=0.0, lt=1.0)
    test: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0


class PreprocessParams(Section):
    """Straightening, de-pedicling and per-vertebra crops.

    Attributes:
        centroids_from: ``file``: the dataset's centroid files where present (one that lists a label
            its mask lacks is an error); ``mask``: centres of mass of the labels, centroid files unread.
    """

    spacing_mm: float = Field(1.0, gt=0.0)
    crop_shape: tuple[int, int, int] = (128, 128, 48)
    max_height_mm: float = Field(40.0, gt=0.0)
    hu_window: tuple[float, float] = (-300.0, 1200.0)
    depedicle: bool = True
    curve_smoothing_mm: float = Field(0.5, ge=0.0)
    curve_through_bodies: bool = False
    centroids_from: Literal["file", "mask"] = "file"
    split: SplitParams = SplitParams()


# -------------------------------------------------------------------------------------------- model
class NetworkSize(Section):
    """Widths of one named configuration of the networks.

    Attributes:
        cnum: generator base width (the paper's network: 16).
        disc_channels: first-layer width of each PatchGAN discriminator (the paper: 64).
        disc_layers: stride-2 layers of each discriminator (3: 70x70 patches).
        classifier_channels: first-block width of the fracture classifier (HGAM).
    """

    cnum: int = Field(gt=0)
    disc_channels: int = Field(gt=0)
    disc_layers: int = Field(3, ge=1)
    classifier_channels: int = Field(16, gt=0)


class ModelParams(Section):
    """Generator and discriminator architecture, shared by training and synthesis.

    Attributes:
        size: which entry of ``sizes`` to build (``full`` = the paper's widths, ``cpu`` = half).
        max_height_px: rows of the fixed-height gap; the SHRM predicts heights in ``(0, max_height_px)``.
        edge_module: Edge-Enhancing Module loss (EEM) on or off.
        height_module: SHRM height heads and re-assembly at the predicted height; off keeps the band.
        height_prior: the SHRM heads correct the mean height of the target's neighbours in the slice
            instead of predicting the height from nothing (off: the reference's head).
        height_correction: with ``height_prior``, the heads add a correction learnt from the features
            to the prior (off: the height is the prior, with the learnt one-sided step; the features
            predict it only where no neighbour is whole).
        attention_module: HGAM (``1 - Grad-CAM++``) input of the generator decoders.
        contextual_attention: the fine stage's contextual-attention branch (off: dilated branch only).
    """

    size: Literal["cpu", "full"] = "cpu"
    sizes: dict[str, NetworkSize] = {
        "cpu": NetworkSize(cnum=8, disc_channels=16, disc_layers=3, classifier_channels=8),
        "full": NetworkSize(cnum=16, disc_channels=64, disc_layers=3, classifier_channels=32),
    }
    max_height_px: int = Field(40, gt=0)
    edge_module: bool = True
    height_module: bool = True
    height_prior: bool = True
    height_correction: bool = True
    attention_module: bool = True
    contextual_attention: bool = True

    @model_validator(mode="after")
    def _size_is_defined(self) -> ModelParams:
        if self.size not in self.sizes:
            raise ValueError(f"size '{self.size}' is not among sizes {sorted(self.sizes)}")
        return self

    @property
    def network(self) -> NetworkSize:
        """The widths of the selected configuration."""
        return self.sizes[self.size]


class LossWeights(Section):
    """Weights of the generator's loss terms (0 switches a term off)."""

    gan: float = Field(1.0, ge=0.0)
    l1: float = Field(200.0, ge=0.0)
    dice_coarse: float = Field(10.0, ge=0.0)
    dice_fine: float = Field(15.0, ge=0.0)
    edge: float = Field(800.0, ge=0.0)
    height: float = Field(40.0, ge=0.0)
    #: not in the paper (0 restores it): pixel-wise BCE beside each Dice term. Soft Dice alone lets a
    #: segmentation head that is not yet discriminative saturate to all ones, where its gradient vanishes.
    seg_bce: float = Field(10.0, ge=0.0)


class TrainParams(Section):
    """One training stage (coarse or fine).

    Attributes:
        views: one generator is trained per view, each on its own slices (2.5D synthesis fuses them);
            the first view's validation metrics keep the plain keys (``val/model/dice``), the others
            carry their view (``val/coronal/model/dice``).
        target_max_grade: the generator learns from train-split vertebrae of Genant grade up to this
            (the method: 1, mild fractures taken as healthy shapes; 0: healthy vertebrae only).
        grad_clip_norm: the generator's and the discriminators' gradients are clipped to this total
            norm before each step (0: off, as the paper).
    """

    views: tuple[View, ...] = ("sagittal",)
    target_max_grade: int = Field(1, ge=0, le=3)
    epochs: int = Field(4, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    beta1: float = 0.5
    grad_clip_norm: float = Field(0.0, ge=0.0)
    lr_constant_epochs: int = Field(2, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpu_threads: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)
    val_slice_ratios: tuple[float, ...] = (0.0, 0.4)
    losses: LossWeights = LossWeights()

    _views = field_validator("views")(_distinct_views)


class ClassifierParams(Section):
    """Fracture classifier behind the HealthiVert-Guided Attention Module (Grad-CAM++ maps)."""

    epochs: int = Field(2, ge=1)
    steps_per_epoch: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    cam_slice_step: int = Field(4, ge=1)


class TrainCoarseParams(TrainParams):
    """Stage 2: fracture classifier (on the first view's slices) + attention maps, then a coarse generator per view."""

    classifier: ClassifierParams = ClassifierParams()


class TrainFineParams(TrainParams):
    """Stage 3: the whole generator per view, coarse part initialised from stage 2's generator of the same view."""


# ------------------------------------------------------------------------------------ later stages
class SynthesizeParams(Section):
    """Iterative 2.5D synthesis of pseudo-healthy vertebrae.

    ``height_from_prior``: the SHRM heads leave out their learnt correction where the neighbour prior
    is known (``model.height_correction`` off at synthesis only; a trained model is unchanged).
    """

    views: tuple[View, ...] = ("sagittal",)
    slice_fraction: float = Field(0.8, gt=0.0, le=1.0)
    iterative: bool = True
    fill_height: bool = True
    height_from_prior: bool = False
    neighbour_min_voxels: int = Field(200, ge=0)
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    _views = field_validator("views")(_distinct_views)


class RhlvParams(Section):
    """Relative Height Loss of Vertebrae."""

    central_fraction: float = Field(0.2, gt=0.0, le=0.5)
    column_threshold: float = Field(0.7, ge=0.0, lt=1.0)
    column_selection: Literal["healthy", "reference"] = "healthy"


class SvmFitParams(Section):
    """Genant grading from RHLV features.

    ``features`` are columns of ``rhlv.parquet``. The paper uses ``rhlv_ant, rhlv_mid, rhlv_post``;
    the default is ``rhlv_max`` (the worst third) alone: a Genant grade is a threshold on the largest
    loss, which a linear SVM cannot form from the three thirds, and given the thirds beside it the SVM
    learnt pattern boundaries that missed (patient-grouped 5-fold CV macro-F1 on train + val of four
    phantom runs: 0.908 for ``rhlv_max``, 0.888 with the thirds added, 0.884 for the thirds alone).

    ``fit_on`` (``holdout``): ``unseen`` fits the RHLV grader on the train and val vertebrae that were
    not the generator's training targets (train vertebrae of grade <= ``target_max_grade`` are), with
    ``C`` by patient-grouped CV (``folds``); ``train`` fits on the train split and chooses ``C`` on val.
    The mask-only baseline learns nothing upstream and always fits on train.
    """

    protocol: Literal["holdout", "reference_cv"] = "holdout"
    fit_on: Literal["unseen", "train"] = "unseen"
    features: tuple[str, ...] = Field(("rhlv_max",), min_length=1)
    c_grid: tuple[float, ...] = Field((0.1, 1.0, 10.0, 100.0), min_length=1)
    folds: int = Field(5, ge=2)
    seed: int = 0

    @field_validator("features")
    @classmethod
    def _distinct_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value

    @field_validator("c_grid")
    @classmethod
    def _positive_costs(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not c > 0 for c in value):  # also refuses NaN
            raise ValueError(f"every SVM cost C must be positive, got {list(value)}")
        return value


class CandidateGateParams(Section):
    """When evaluate sets the registry alias ``candidate`` on the grader of its pipeline run."""

    #: the GAN's macro-F1 on the evaluated split must reach this
    min_macro_f1: float = Field(0.8, ge=0.0, le=1.0)
    #: and be at least the mask-only baseline's
    beat_baseline: bool = True


class EvaluateParams(Section):
    """Metrics, plots and the clinician's report."""

    bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    report_vertebrae: int = Field(24, ge=0)
    candidate_gate: CandidateGateParams = CandidateGateParams()


class TrackingParams(Section):
    """MLflow tracking (the URI comes from ``MLFLOW_TRACKING_URI``, else a local SQLite store)."""

    enabled: bool = True
    experiment: str = Field("healthivert", min_length=1)
    register_models: bool = True
    #: the registry name svm-fit registers the grader under (the MLflow model ``mlflow.pyfunc`` loads).
    grader_model_name: str = Field("healthivert-grader", min_length=1)


class Params(Section):
    """All of ``params.yaml``."""

    data: DataParams = DataParams()
    phantom: PhantomParams = PhantomParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams = ModelParams()
    train_coarse: TrainCoarseParams = TrainCoarseParams()
    train_fine: TrainFineParams = TrainFineParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    rhlv: RhlvParams = RhlvParams()
    svm_fit: SvmFitParams = SvmFitParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()


# ------------------------------------------------------------------------------------------ loading
def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _override_source(assignment: str) -> str:
    """How an override is named in an error: the flag that gave it."""
    return f"--set {assignment}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, in a few words."""
    return str(getattr(error, "problem", None) or str(error).splitlines()[0])


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(_override_source(assignment), "override must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(_override_source(assignment), f"'{key}' is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(_override_source(assignment), "value is not valid YAML", _yaml_problem(exc)) from exc


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _unknown_key_hint(location: str) -> str:
    """Suggest the closest valid key of the same section, else list that section's keys."""
    section, _, name = location.rpartition(".")
    prefix = f"{section}." if section else ""
    siblings = [key.removeprefix(prefix) for key in _known_keys(Params)
                if key.startswith(prefix) and "." not in key.removeprefix(prefix)]
    close = [key for key in siblings if name.startswith(key) or key.startswith(name)]
    close = close or difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    if siblings:
        return f"valid keys{' of ' + section if section else ''}: {', '.join(siblings)}"
    return "see params.yaml for the valid keys"


def _error_source(location: str, files: str, overrides: list[str]) -> str:
    """The files, or the last ``--set`` whose key is, contains or lies in ``location``."""
    for assignment in reversed(overrides):
        dotted = assignment.split("=", 1)[0].strip()
        if location == dotted or location.startswith(dotted + ".") or dotted.startswith(location + "."):
            return _override_source(assignment)
    return files


def _explain(error: ValidationError, files: str, overrides: list[str]) -> ConfigError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    source = _error_source(location, files, overrides)
    if first["type"] == "extra_forbidden":
        return ConfigError(source, f"unknown key '{location}'", _unknown_key_hint(location))
    return ConfigError(source, f"invalid value for '{location}': {first['msg']}")


def _read_params_file(path: Path) -> dict[str, Any]:
    """One parameter file as a mapping of sections.

    Raises:
        ConfigError: missing, a folder, unreadable, not text, not YAML, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "parameter file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a folder, not a parameter file", "pass a YAML file to --params") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not a text file", "parameter files are YAML") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read the parameter file: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(path, "not valid YAML", _yaml_problem(exc)) from exc
    if not isinstance(loaded, dict):
        raise ConfigError(path, "expected a mapping of sections at the top level")
    return loaded


def load_params(paths: list[str | os.PathLike[str]] | str | os.PathLike[str] = "params.yaml",
                overrides: list[str] | None = None) -> Params:
    """Read and validate parameter files, later files and ``overrides`` winning.

    Args:
        paths: one YAML file or several (e.g. ``params.yaml`` then ``configs/full.yaml``).
        overrides: ``section.key=value`` assignments (``--set`` on the command line), values parsed as YAML.

    Raises:
        ConfigError: a file is missing, unreadable or not YAML, or a key is unknown or ill-typed; it
            names the override (``--set ...``) when one caused it, else the files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    overrides = list(overrides or [])
    tree: dict[str, Any] = {}
    for path in map(Path, paths):
        tree = _deep_merge(tree, _read_params_file(path))
    for assignment in overrides:
        _apply_override(tree, assignment)
    files = ", ".join(str(p) for p in paths) or "<defaults>"
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, files, overrides) from None


def dump_params(params: Params) -> str:
    """The resolved parameters as YAML (saved next to a stage's outputs)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
