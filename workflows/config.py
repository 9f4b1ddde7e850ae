"""Pipeline configuration: one pydantic schema per stage, loaded from YAML, overridden with ``--set a.b=c``.

A pipeline file names its stages' settings; everything is validated (unknown keys list the valid ones) before
any work starts. Bundled pipelines live in ``workflows/pipelines/*.yaml``. Runtime state (where the workdir is,
which Ray cluster, which tracking server) is not configuration: it lives in :mod:`workflows.context`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clearair.losses import loss_weights
from clearair.models.vgg import check_taps
from synth.config import (
    ConfigError,
    SynthParams,
    added_field,
    config_digest,
    digest_dump,
    format_validation_error,
    set_dotted,
)
from workflows.free_form import problems

STAGES = ("synth", "crossval", "perceiver", "priors", "train", "evaluate")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """A restorer from the model factory: architecture, preset, and field overrides of its config."""

    arch: str = "restormer"
    preset: Literal["paper", "tiny"] = "paper"
    config: dict[str, Any] = {}


class Fit(Strict):
    """How one network is trained on Ray Train: sizes, schedule and resources."""

    steps: int = Field(1000, ge=1)
    global_batch: int = Field(8, ge=1, description="Per-worker batch x workers x accumulation; kept on any GPU count.")
    max_worker_batch: int = Field(8, ge=1, description="Largest batch one worker holds; more is accumulation.")
    crop: int = Field(128, ge=16)
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each with use_gpu).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    val_every: int = Field(200, ge=1, description="Steps between validations and checkpoints.")
    val_images: int = Field(16, ge=1, description="Validation images (whole, or centre crops of val_crop).")
    val_crop: int | None = 256
    max_failures: int = Field(
        2, ge=0, description="Worker failures Ray Train recovers from by restoring the checkpoint."
    )
    data_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker.")
    augment: Literal["hflip", "dihedral"] = added_field(
        "hflip", description="Per-crop augmentation: a random horizontal flip, or one of the 8 dihedral symmetries."
    )
    fresh_noise: bool = added_field(
        False, description="New noise for every draw of a synthetic noise sample (PromptIR); others as stored."
    )
    ema: float | None = added_field(
        None,
        gt=0,
        lt=1,
        description="Decay of an exponential moving average of the weights, updated every optimizer step (warmed up "
        "as min(ema, (1 + n) / (10 + n))); the average is validated, kept and exported. The authors' BasicSR "
        "configs: 0.999. null: none.",
    )


Factors = dict[str, Annotated[float, Field(ge=0)]]
RESAMPLE = "Per-task repeat factors of a data epoch, applied at read time ({derain: 120}); a task left out counts once."
PIXEL_LOSS = "The pixel term: l1 (the papers) or mse (learns sparse residuals such as rain in few steps)."


class CrossvalConfig(Strict):
    model: ModelSpec = ModelSpec()
    models: list[ModelSpec] = added_field(
        [],
        description="Further restorers trained per fold beside `model`, each a plain restorer (pixel_loss alone, no "
        "priors, the same fit and resample) whose held-out restorations make one more medium tier, as Perceive-IR "
        "takes several restorers' outputs; `model`'s stays the first medium.",
    )
    priors: dict[str, Any] = added_field(
        {"kind": "none"}, description="clearair.priors spec of a guided fold restorer (a plain Restormer needs none)."
    )
    allow_random_frozen: bool = added_field(False, description="Random-init frozen priors (tiny demo models only).")
    loss: Literal["l1", "perceive_ir"] = added_field(
        "l1", description="l1 (the paper's plain restorer), or perceive_ir's loss for a guided fold restorer."
    )
    loss_weights: dict[str, float] = added_field({}, description="Fields of LossWeights with loss: perceive_ir.")
    pixel_loss: Literal["l1", "mse"] = added_field("l1", description=PIXEL_LOSS)
    resample: Factors = added_field({}, description=RESAMPLE)
    fit: Fit = Fit(steps=20000, global_batch=4, crop=128)
    tile: int | None = Field(512, ge=32, description="Tile size for restoring held-out images (None: whole image).")
    overlap: int = Field(32, ge=0)
    parallel_folds: bool = True
    restore_splits: list[Literal["val", "test"]] = added_field(
        [], description="Splits also restored (by fold 0's restorer) into held-out tier shards for the perceiver."
    )
    min_margin: float = added_field(1.0, description="Warn when a task's medium tier is less dB above its low tier.")


class PerceiverStageConfig(Strict):
    perceiver: dict[str, Any] = Field(default_factory=dict, description="PerceiverConfig fields.")
    preset: Literal["paper", "tiny", "qclip"] = Field(
        "paper", description="ViT-B/32 (paper), a random tiny CLIP (tiny) or the bundled quality-aware tiny CLIP."
    )
    steps: int = Field(100000, ge=1)
    batch_per_tier: int = Field(8, ge=1, description="Images per tier in a batch (x3 per step).")
    lr: float = 4e-5
    min_lr: float = 1e-6
    use_gpu: bool = False
    allow_random_frozen: bool = Field(False, description="Random-init CLIP (tiny demo models only).")
    view: Literal["crop", "resize", "train_crop"] = Field(
        "crop",
        description="Random crops at CLIP's input size, whole images resized, or crops of train.fit.crop resized to "
        "CLIP's input (what the CLIP-aware loss sees; the quickstart uses it, and the training crop then enters "
        "this stage's cache key).",
    )
    wellposed_gain: float | None = added_field(
        None,
        description="Also report the held-out tiers whose medium tier is at least this many dB (PSNR) above its low "
        "tier (heldout_wellposed/...): a restoration no better than its input is no 'mediocre' image, so this "
        "separates the perceiver's errors from ill-posed tiers. None: no such report. The prompts do not change.",
    )


class PriorsConfig(Strict):
    """Frozen expensive parts computed once per whole image; parts computed on random crops stay on the fly."""

    enabled: bool = True
    batch_size: int = Field(8, ge=1, description="Images of one size per forward pass of the frozen models.")
    use_gpu: bool = False
    workers: int = added_field(
        1, ge=1, description="Ray actors, each loading the frozen models once (one GPU each with use_gpu)."
    )

    def inert_fields(self) -> set[str]:
        """How many workers share the shards changes no output, so it stays out of the cache key (a run resumes
        with another count)."""
        return {"workers"}


class PerceptualConfig(Strict):
    """Perceive-IR's difficulty-adaptive perceptual loss: its VGG16 layers and how difficulty is measured."""

    taps: list[str] = Field(
        ["relu1_2", "conv2_2", "relu3_1", "relu3_3"],  # = clearair.models.vgg.PERCEIVE_IR_TAPS (tested)
        description="VGG16 layers, shallow to deep: the authors' features[:16] at 3, 7, 11, 15.",
    )
    layer_weights: list[float] = Field([1 / 12, 1 / 6, 1 / 3, 1.0], description="One weight per tap.")
    probe_per_task: int = Field(
        24,
        ge=0,
        description="Crops per degradation family in the fixed difficulty probe, taken from the validation images and "
        "spread over input difficulty (the authors' 24; denoising's split over its noise levels); 0: each worker's "
        "first validation batch (clearair 0.1.0).",
    )
    negative_psnr: Literal["patch", "image"] = Field(
        "patch",
        description="A medium negative's PSNR for its difficulty weight: of its training crop (the authors'), or of "
        "the whole image, as stored in the tier shard (clearair 0.1.0).",
    )

    @model_validator(mode="after")
    def _taps(self) -> PerceptualConfig:
        check_taps(self.taps, self.layer_weights)
        return self


class TrainConfig(Strict):
    model: ModelSpec = ModelSpec(arch="perceive_ir")
    loss: Literal["l1", "perceive_ir", "clearair"] = "perceive_ir"
    pixel_loss: Literal["l1", "mse"] = added_field("l1", description=PIXEL_LOSS)
    resample: Factors = added_field({}, description=RESAMPLE)
    loss_weights: dict[str, float] = {}
    priors: dict[str, Any] = Field(default_factory=lambda: {"kind": "none"}, description="clearair.priors spec.")
    vgg: str | dict[str, Any] | None = "torchvision"
    allow_random_frozen: bool = Field(False, description="Random-init frozen parts (tiny demo models only).")
    fit: Fit = Fit(steps=500000, global_batch=8, crop=256)
    clip_temperature: float | None = added_field(
        1.0,
        neutral=None,
        gt=0,
        description="Softmax temperature of the CLIP-aware loss: 1 takes the raw cosines (the Perceive-IR authors' "
        "code); null the CLIP's own learned one (x logit_scale, clearair 0.1.0).",
    )

    select_by: Literal["task_mean", "image_mean"] = added_field(
        "task_mean",
        neutral="image_mean",
        description="The validation PSNR the best checkpoint is chosen by: the mean of per-task means (the Perceive-IR "
        "authors') or the mean over images (clearair 0.1.0; ~80% haze in the 3-task mix).",
    )

    con_labels: Literal["family", "task"] = added_field(
        "family",
        neutral="task",
        description="InfoNCE labels: degradation families (denoise_15/25/50 one label, the authors') or tasks "
        "(clearair 0.1.0: noise levels repel each other).",
    )
    con_gather: bool = added_field(
        True,
        neutral=False,
        description="InfoNCE negatives gathered from every training worker (all_gather, gradients through the "
        "local part), as the authors; false: each worker's own batch (clearair 0.1.0).",
    )

    perceptual: PerceptualConfig = added_field(
        PerceptualConfig(),
        neutral=PerceptualConfig(
            taps=["relu1_2", "relu2_2", "relu3_3", "relu4_3"], probe_per_task=0, negative_psnr="image"
        ),
        description="The difficulty-adaptive perceptual loss (Perceive-IR, loss_weights.dpl); clearair 0.1.0 tapped "
        "VGG16 deeper, probed with the first validation batch and weighed negatives by their whole image's PSNR.",
    )

    def inert_fields(self) -> set[str]:
        """Fields with no effect on this config's training (kept out of its cache key)."""
        weights = loss_weights(self.loss, dict(self.loss_weights)) if self.loss == "perceive_ir" else None
        inert = set() if weights is not None and weights.clip != 0 else {"clip_temperature"}
        if weights is None or weights.dpl == 0:
            inert.add("perceptual")
        if weights is None or weights.con == 0:
            inert |= {"con_labels", "con_gather"}
        elif self.fit.workers == 1:
            inert.add("con_gather")  # one worker's batch is the whole batch
        return inert


class Benchmark(Strict):
    name: str
    path: str
    layout: str = "auto"
    noise_sigma: int | None = Field(None, description="Add seeded PromptIR noise to clean images (CBSD68).")


class EvaluateConfig(Strict):
    splits: list[Literal["val", "test"]] = ["test"]
    benchmarks: list[Benchmark] = []
    tile: int | None = Field(
        512, gt=0, description="Tile side for images beyond the memory budget (null: the largest side that fits)."
    )
    overlap: int = Field(32, ge=0)
    memory_budget_mb: float | None = added_field(
        16384.0,
        neutral=None,
        gt=0,
        description="Restore an image whole when its estimated activation memory fits, in tiles beyond (every "
        "paper benchmark image fits whole; GoPro's 1280x720 frames need ~7.5 GB for perceive_ir); null: always "
        "tiles of `tile` (clearair 0.1.0).",
    )
    round_uint8: bool = added_field(
        False,
        neutral=True,
        description="Round the output to uint8 before the metrics (what a saved PNG holds; clearair 0.1.0); false "
        "measures the float output clipped to [0, 1], as PromptIR's evaluation does.",
    )
    protocol: Literal["clearair", "promptir"] = added_field(
        "clearair",
        description="promptir: PromptIR's test-time centre crop of input and target to multiples of 16 (also SwinIR's "
        "and Restormer's), before restoring and measuring; clearair: the images as they are.",
    )
    max_images: int | None = Field(None, ge=1)
    figure_crop: int = 96
    device: Literal["auto", "cpu", "cuda"] = added_field(
        "auto", description="Where the restorer runs (auto: CUDA when the driver has it); metrics in float32."
    )


class TrackingConfig(Strict):
    experiment: str = "clearair"
    registered_model: str = "clearair-restorer"
    alias: str = "champion"


class PipelineConfig(Strict):
    name: str
    description: str = ""
    seed: int = 0
    synth: SynthParams
    crossval: CrossvalConfig = CrossvalConfig()
    perceiver: PerceiverStageConfig = PerceiverStageConfig()
    priors: PriorsConfig = PriorsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.synth.splits.folds < 2:
            raise ValueError("synth.splits.folds must be >= 2: the medium tier comes from held-out folds")
        if not self.evaluate.splits and not self.evaluate.benchmarks:
            raise ValueError("evaluate has nothing to evaluate: give evaluate.splits or evaluate.benchmarks")
        for name, section in (("crossval", self.crossval), ("train", self.train)):
            if section.loss == "perceive_ir" and section.model.arch not in ("perceive_ir", "nafnet_guided"):
                raise ValueError(f"{name}.loss perceive_ir needs a guided model, not {section.model.arch!r}")
        return self

    @model_validator(mode="after")
    def _free_form_sections(self) -> PipelineConfig:
        """The sections pydantic sees only as dicts or names, checked against their real schemas before any stage
        runs (:func:`workflows.free_form.problems`); every problem is listed at once."""
        found = problems(self)
        if found:
            raise ValueError("\n  ".join(found))
        return self

    def section_digest(self, stage: str) -> str:
        """sha256 of one stage's settings (plus the pipeline seed): part of that stage's cache key."""
        return config_digest({"seed": self.seed, stage: digest_dump(getattr(self, stage))})


def bundled_pipelines() -> list[str]:
    folder = resources.files("workflows") / "pipelines"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _unshared(value: Any) -> Any:
    """``value`` with every dict and list rebuilt, so no two places share one object (deepcopy would keep them
    shared)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def load_pipeline(name_or_path: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A bundled pipeline by name or a YAML file, with dotted ``overrides`` applied before validation."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read pipeline {path}: {err.strerror}") from None
        origin = str(path)
    elif name_or_path in bundled_pipelines():
        text = (resources.files("workflows") / "pipelines" / f"{name_or_path}.yaml").read_text()
        origin = f"pipeline {name_or_path}"
    else:
        raise ConfigError(
            f"unknown pipeline {name_or_path!r}; bundled: {', '.join(bundled_pipelines())} (or a YAML path)"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML: {err}") from None
    # A YAML alias (*resample) is the anchored object itself: copied, so that `--set train.resample.x=1` changes
    # the train section only, not every section sharing the anchor (and their cache keys with it).
    data = _unshared(data)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, PipelineConfig, origin)) from None
