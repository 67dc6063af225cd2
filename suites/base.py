"""Declarations of paper tables: rows x metrics, the paper's printed values, the recipe at each scale, the baseline
row of each group and the tolerance for "reproduced". Suites are data: they import nothing from runners, results or
reports."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as fields_of

SCALES = ("smoke", "mini", "paper")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    label: str
    kind: str  # "accuracy", "cost", "size" (exact counts), "statistic" (a property of trained weights) or
    #            "quantization" (the INT8 column: runners/quant.py)
    higher_is_better: bool


METRICS = {m.name: m for m in (
    MetricSpec("top1", "%", "Top-1 acc", "accuracy", True),
    MetricSpec("map", "%", "mAP", "accuracy", True),
    MetricSpec("miou", "%", "mIoU", "accuracy", True),
    MetricSpec("train_memory", "GB", "Train memory", "cost", False),
    MetricSpec("time_per_batch", "s", "Time/batch", "cost", False),
    MetricSpec("time_per_50_steps", "min", "Time (min/50 steps)", "cost", False),
    # images per second of a training step at the cost batch: cost_batch / time_per_batch of the same probe
    MetricSpec("train_speed", "samples/s", "Train speed", "cost", True),
    # the largest batch that trains a step within the memory budget (RepOptimizers Table 2's "Train MaxBS")
    MetricSpec("max_batch_size", "images", "Train MaxBS", "cost", True),
    MetricSpec("throughput", "img/s", "Throughput", "cost", True),  # deployed forward, the inference probe
    # RepNeXt's deploy forms (its Tables 2-6): the training form, rRep (the plain names), rRep with Linear pointwise
    # layers, sRep; CPU and edge-device columns beside the GPU ones
    MetricSpec("latency", "s", "Latency", "cost", False),
    MetricSpec("latency_train", "s", "Latency (train form)", "cost", False),
    MetricSpec("latency_srep", "s", "Latency (sRep)", "cost", False),
    MetricSpec("throughput_train", "img/s", "Throughput (train form)", "cost", True),
    MetricSpec("throughput_linear", "img/s", "Throughput (rRep, Linear pointwise)", "cost", True),
    MetricSpec("throughput_srep", "img/s", "Throughput (sRep)", "cost", True),
    MetricSpec("latency_cpu", "s", "CPU latency", "cost", False),
    MetricSpec("throughput_cpu", "img/s", "CPU throughput", "cost", True),
    MetricSpec("latency_edge", "s", "Edge latency", "cost", False),
    MetricSpec("throughput_edge", "img/s", "Edge throughput", "cost", True),
    # the training run's own wall time x its devices (DyRep's "Cost (GPU hrs.)"), not a probe
    MetricSpec("train_hours", "h", "Cost (device hours)", "cost", False),
    MetricSpec("epoch_hours", "h", "Cost per epoch (device hours)", "cost", False),  # per epoch (step series)
    # averages over the training epochs of the training-form network (DyRep's structure changes while it trains)
    MetricSpec("params_avg", "", "Avg. params (training)", "size", False),
    MetricSpec("macs_avg", "", "Avg. FLOPs (training)", "size", False),
    # exact counts from the architecture (MACs of one 224x224 image: the papers' "FLOPs"); the report's size family
    MetricSpec("params_deploy", "", "Params (deploy)", "size", False),
    MetricSpec("macs_deploy", "", "MACs (deploy)", "size", False),
    MetricSpec("params_train", "", "Params (train)", "size", False),
    MetricSpec("macs_train", "", "MACs (train)", "size", False),
    MetricSpec("params_srep", "", "Params (sRep)", "size", False),
    MetricSpec("macs_srep", "", "MACs (sRep)", "size", False),
    # INT8 (RepOptimizers Tables 8, 10; measured by the quantization issue's protocol)
    MetricSpec("top1_ptq", "%", "PTQ INT8 top-1", "accuracy", True),
    MetricSpec("top1_qat", "%", "QAT INT8 top-1", "accuracy", True),
    # the quantization column (run_suite TABLE --quantize; runners/quant.py): the report's INT8 family
    MetricSpec("top1_ptq_drop", "points", "INT8 drop", "quantization", False),
    MetricSpec("latency_int8", "s", "INT8 latency", "quantization", False),
    # standard deviation of one 3x3 kernel's parameters: all, centre, the eight surrounding positions (Tables 8, 11)
    MetricSpec("kernel_std", "", "Std of parameters", "statistic", False),
    MetricSpec("kernel_std_central", "", "Std (central)", "statistic", False),
    MetricSpec("kernel_std_surrounding", "", "Std (surrounding)", "statistic", False),
)}


@dataclass(frozen=True)
class PaperValue:
    """A number exactly as printed (``text``, e.g. "4.2G", "0.086s", "NaN"), where it is printed, and whether it
    was read off a figure (then ``approximate``)."""

    text: str
    source: str
    approximate: bool = False

    @property
    def value(self) -> float | None:
        """The number, or None for "-" ; "NaN" is float('nan') (the paper's diverged runs)."""
        if self.text.strip().lower() == "nan":
            return float("nan")
        match = re.search(r"[-+]?\d+(?:\.\d+)?", self.text)
        return float(match.group(0)) if match else None


@dataclass(frozen=True)
class Claim:
    """A sentence a paper prints about its costs, judged by the report from the measured ratios (each row's ratio to
    its group's baseline, measured side by side), on every (row, other) pair of ``pairs`` (full row names).

    ``kind``: ``saving``: the share of ``other``'s extra ``metric`` over its baseline that ``row`` does not pay,
    1 - (r_row - 1) / (r_other - 1); ``speedup``: r_other / r_row; ``oom``: ``row`` did not fit (``other`` unused).
    It holds where the measured figure lies in [low, high] widened by ``tolerance`` (relative). The tolerance is a
    choice, recorded here: the papers print round figures ("~70%", "1.5x-2.3x", "4x") and their own rows scatter
    by about 10 % around them (OREPA Table 4: 69-75 % saving, 1.44-2.33x speed-up)."""

    text: str
    source: str
    kind: str
    metric: str
    pairs: tuple[tuple[str, str], ...]
    low: float = 0.0
    high: float = float("inf")
    tolerance: float = 0.1

    def figure(self, mine: float | None, other: float | None) -> float | None:
        """The claim's figure from two ratios to the baseline."""
        if mine is None or other is None:
            return None
        if self.kind == "saving":
            return None if other == 1 else 1 - (mine - 1) / (other - 1)
        return other / mine if mine else None

    def holds(self, value: float) -> bool:
        return self.low * (1 - self.tolerance) <= value <= self.high * (1 + self.tolerance)

    def format(self, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.0f}%" if self.kind == "saving" else f"{value:.2f}x"

    def expected(self) -> str:
        if self.kind == "oom":
            return "does not fit"
        low, high = (self.format(v) for v in (self.low, self.high))
        span = f"~{low}" if self.low == self.high else (f">= {low}" if math.isinf(self.high) else f"{low}–{high}")
        return f"{span} (±{100 * self.tolerance:.0f}% accepted)"


@dataclass(frozen=True)
class Ordering:
    """An order the paper's printed values put some cells in (e.g. RepNeXt's sRep < rRep < ConvNeXt < training form
    in A100 latency), checked on the measured means of the same cells. ``cells``: (row, metric) pairs, a form's metric
    (``latency_srep``) naming that form of the row. The paper's order is read from its printed values, not written
    here; the report says, for each neighbouring pair of it, whether the measured values kept it on the device that
    measured them (at any scale: an order on this machine is a fact about this machine, not a reproduction)."""

    text: str
    source: str
    metric: str  # the metric the cells share (latency); a cell's suffix after it names a form (latency_srep: sRep)
    cells: tuple[tuple[str, str], ...]


SCALE_SOURCES = ("searched", "channel_mean", "ones", "hs_init")


@dataclass(frozen=True)
class Scales:
    """Where a RepOpt row's constants come from, and which of the RepOptimizer's two rules it applies (RepOptimizers
    Table 4). ``how``: ``searched`` (the scales a Hyper-Search run learned: ``table`` / ``row``, its seed 0 at the same
    scale, planned and run first; the target run records the file it used, with its sha256), ``channel_mean`` (those
    scales averaged over each layer's channels), ``ones`` (every scale 1) or ``hs_init`` (the HS model's initial
    scales). ``identity``: the Rule of Initialization's identity term, ``searched`` (official code) or ``one``
    (Eq. 4)."""

    table: str | None = None
    row: str | None = None
    how: str = "searched"
    reinit: bool = True       # Rule of Initialization (Eq. 4)
    grad_mult: bool = True    # Rule of Iteration (Eq. 3): the RepOptimizer; False: the recipe's plain optimizer
    identity: str = "searched"

    def __post_init__(self):
        if self.how not in SCALE_SOURCES:
            raise ValueError(f"unknown scales source {self.how!r}; expected one of {SCALE_SOURCES}")
        if (self.how in ("searched", "channel_mean")) != bool(self.table and self.row):
            raise ValueError(f"scales {self.how!r} {'need' if self.how in ('searched', 'channel_mean') else 'take no'}"
                             " Hyper-Search table and row")

    @property
    def upstream(self) -> tuple[str, str] | None:
        return (self.table, self.row) if self.table else None

    def as_dict(self) -> dict:
        return asdict(self)


DYREP_METRICS = ("synflow", "snip", "grad_norm", "random", "grasp", "vote")
DYREP_OPS = ("dyrep", "dbb")  # the op space a conv grows into (DyRep Table 8): DyRep's 7 ops or DBB's 4
DYREP_HOSTS = ("dyrep", "repvgg")  # reps DyRep grows in: the plain network's convs, RepVGG blocks' 3x3 (Table 4)
DYREP_RULES = ("paper", "code")


@dataclass(frozen=True)
class DyRep:
    """How a ``dyrep`` row grows and cuts (runners/dyrep.py); the interval and last epoch are the recipe's
    (Recipe.dyrep_interval / dyrep_max_epoch: they scale with the schedule)."""

    metric: str = "synflow"      # saliency (DyRep Eq. 3-4; Table 10 compares the others)
    rule: str = "code"           # Dep: the official code's (std gate 0.02, cut below the mean and 0.1) or the paper's
    gamma: float = 0.01          # the new branches' last-BN scale (Sec. 4.1)
    recal_batches: int = 20      # BN recalibration of a grown block (the official code's 20)
    dep: bool = True             # Table 6: with / without Dep
    ops: str = "dyrep"           # Table 8: the op space of a growth (DyRep's 7 ops or DBB's 4)

    def __post_init__(self):
        if self.metric not in DYREP_METRICS:
            raise ValueError(f"unknown DyRep metric {self.metric!r}; expected one of {DYREP_METRICS}")
        if self.rule not in DYREP_RULES:
            raise ValueError(f"unknown DyRep rule {self.rule!r}; expected one of {DYREP_RULES}")
        if self.ops not in DYREP_OPS:
            raise ValueError(f"unknown DyRep op space {self.ops!r}; expected one of {DYREP_OPS}")

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["ops"] == "dyrep":  # the default op space keeps the run keys of rows recorded before ops existed
            del d["ops"]
        return d


@dataclass(frozen=True)
class Structure:
    """A network structure another run grew (DyRep Table 7's "DyRep-N"): the events of run ``table`` / ``row`` (its
    seed 0 at the same scale, planned and run first) up to ``epochs[scale]`` epochs, replayed on the plain network,
    which then trains as a fixed structure."""

    table: str
    row: str
    epochs: dict[str, int]  # per scale: the structure after this many epochs of the source run

    def as_dict(self, scale: str) -> dict:
        return {"table": self.table, "row": self.row, "epoch": self.epochs[scale]}


@dataclass(frozen=True)
class Row:
    name: str
    arch: str
    rep: str
    variant: str | dict | None = None
    group: str = ""
    paper: dict[str, PaperValue] = field(default_factory=dict)
    scales: Scales | None = None  # rep "repopt": where its constants come from
    optimizer: str | None = None  # one of OPTIMIZERS where a table compares optimizers (None: the recipe's SGD)
    # Where this row's recipe departs from its table's, per scale: {scale: {Recipe field: value}} (e.g. RepOptimizers
    # Table 5's Caltech256 target, Table 3's per-row resolutions). Table.recipe(scale, row) applies them.
    recipe: dict[str, dict] = field(default_factory=dict)
    dyrep: DyRep | None = None  # rep "dyrep" (or a host in DYREP_HOSTS): how its convs grow and are cut
    declared: str = ""  # why this row is shown with its printed values but not run (e.g. its model is not built)
    structure: Structure | None = None  # a fixed structure another (DyRep) run grew, replayed before training
    # other forms of the model whose size and inference the cost run measures beside the deployed one (RepNeXt):
    # "train" (the training form), "srep" (shortcut re-parameterized), "linear" (rRep with Linear pointwise layers)
    forms: tuple[str, ...] = ()
    # the form the row's deployed metrics (params_deploy, macs_deploy, latency, throughput) measure: "deploy" (the
    # regular deploy), or one of the forms above (RepNeXt Table 6 prints the train, rRep and sRep forms as rows)
    deployed: str = "deploy"
    # a dense table's row (runner="dense"): the mm config it finetunes, under configs/ (its backbone becomes the
    # row's arch / rep / variant), and the freezing reading (backbones/mm.py frozen_indices: "paper" or "fair")
    config: str | None = None
    freeze: str = "paper"
    # the paper's settings where they depart from the stock config, as MMEngine config overrides (dotted keys, as
    # tools/train.py's --cfg-options); each table writes down where each comes from
    cfg_options: dict = field(default_factory=dict)
    # the rep of the classification run a dense row's backbone starts from, where it is not the row's own (DyRep
    # Table 5's "D" rows: the plain ResNet-50's weights, grown during the finetuning)
    pretrained_rep: str | None = None
    # quantization tables (RepOptimizers Tables 8, 10, 11; runners/quant.py): the final weights of another run this
    # row measures instead of training its own ((table, row), its seed 0 at the same scale, planned first), and the
    # form of the sampled kernel its kernel_std metrics read (raw, bn_fused, deployed; None: deployed for RepVGG,
    # raw for a RepOpt-VGG target, as Table 8 reads them)
    measures: tuple[str, str] | None = None
    kernel_form: str | None = None
    # the row's QAT (its top1_qat): "train_form" finetunes the trained model in its training form with fake
    # quantization (RepOpt-VGG: conv + BN, as the paper; RepVGG: its branches, this suite's extra row); None: none
    qat: str | None = None

    def __post_init__(self):
        if self.qat not in (None, "train_form"):
            raise ValueError(f"{self.name}: qat {self.qat!r}: expected train_form or None")
        if self.kernel_form not in (None, "raw", "bn_fused", "deployed"):
            raise ValueError(f"{self.name}: kernel_form {self.kernel_form!r}: expected raw, bn_fused or deployed")
        if self.freeze not in ("paper", "fair"):
            raise ValueError(f"{self.name}: freeze {self.freeze!r}: expected paper or fair")
        if set(self.forms) - {"train", "srep", "linear"}:
            raise ValueError(f"{self.name}: forms {self.forms}: expected among train, srep, linear")
        if self.deployed not in ("deploy", "train", "srep", "linear"):
            raise ValueError(f"{self.name}: deployed {self.deployed!r}: expected deploy, train, srep or linear")
        if not self.declared and ((self.rep == "dyrep" and self.dyrep is None) or
                                  (self.dyrep is not None and self.rep not in DYREP_HOSTS)):
            raise ValueError(f"{self.name}: rep 'dyrep' rows say how they grow (Row.dyrep), and only rows of "
                             f"{', '.join(DYREP_HOSTS)} grow")
        if (self.rep == "repopt") != (self.scales is not None):
            raise ValueError(f"{self.name}: rep 'repopt' rows, and only they, say where their scales come from "
                             "(Row.scales)")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{self.name}: unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.optimizer not in (None, "sgd", "adamw") and self.scales is not None and self.scales.grad_mult:
            raise ValueError(f"{self.name}: the RepOptimizer is SGD or AdamW, not {self.optimizer}")
        unknown = ({k for fields in self.recipe.values() for k in fields}
                   - {f.name for f in fields_of(Recipe)} - {f.name for f in fields_of(DenseRecipe)})
        if unknown:
            raise ValueError(f"{self.name}: unknown recipe fields {sorted(unknown)}")


# Optimizers a row may name (RepOptimizers Table 4). The adaptive ones run with torch's defaults except the learning
# rate (Recipe.adaptive_lr, for the global batch, on the recipe's schedule) and the recipe's weight decay: the paper
# prints no hyper-parameters for them, so these are this suite's choice, recorded with every run.
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw", "adafactor")


@dataclass(frozen=True)
class Recipe:
    """How a table is measured at one scale. Accuracy: a training run through MMEngine's Runner (SGD, warm-up,
    cosine; the paper's recipe at paper scale). Cost: the probes of runners/probes.py at ``cost_batch`` x
    ``cost_resolution``.

    The batch is stated as the paper states it: ``batch`` images per device on ``devices`` devices, so the global
    batch is ``batch * devices`` and ``lr`` belongs to that global batch. A run on fewer devices keeps both (gradient
    accumulation); nothing changes the batch or the lr silently (runners/jobs.py).

    Where the official code and the paper's text disagree, the recipe follows the code (it produced the printed
    numbers) and ``paper_text`` holds the overrides that give the text's choice (``run_suite --follow paper``).
    """

    dataset: str                 # synthetic | digits | imagenet | cifar10 | cifar100
    resolution: int
    batch: int                   # per device
    devices: int = 1             # devices of the paper's recipe: global batch = batch * devices
    epochs: int = 1
    max_iters: int | None = None  # cap on optimizer steps (smoke)
    lr: float = 0.1              # for the global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0   # linear warm-up length in epochs ...
    warmup_iters: int = 0        # ... or in optimizer steps (OREPA's code: 5 iterations; its text: 5 epochs)
    bias_lr_mult: float = 2.0    # lr multiplier of every parameter whose name contains "bias" (BN biases included)
    bias_lr_mult_norm: bool = True  # False: mmengine's bias_lr_mult rule, which skips norm layers
    label_smoothing: float = 0.0
    clip_grad: float | None = None  # max global L2 norm of the gradient (None: no clipping)
    adaptive_lr: float = 1e-3    # lr of a row's adaptive optimizer (Row.optimizer: RMSprop, Adam, AdamW, Adafactor)
    decay_all: bool = False      # weight decay on every parameter, BN and biases too (DyRep's CIFAR recipe)
    decay_1d: bool = True        # weight decay on 1-D parameters other than biases and BN (OREPA's scaling vectors:
    #                              decayed; RepOptimizers' code decays no 1-D parameter: False)
    eval_crop: float = 0.875     # ImageNet evaluation: resize to resolution / eval_crop, centre-crop (224 of 256)
    eval_resolution: int | None = None  # ... at this resolution instead of the training one (RepOpt Table 3's 224/320)
    dyrep_interval: int = 1      # DyRep: grow / cut after every this many epochs ... (paper t: 15 CIFAR, 5 ImageNet)
    dyrep_max_epoch: int | None = None  # ... before this epoch (official: 500 of 600 CIFAR, 100 of 120 ImageNet)
    randaugment: int | None = None  # ImageFolder training: torchvision's RandAugment (2 ops) at this magnitude of 31
    #                                 bins after the crop and flip (None: none); RepOptimizers' target: 15
    checkpoints: bool = True     # a checkpoint per epoch and on SIGTERM/SIGUSR2 (smoke and cost-only runs: none)
    paper_text: tuple[tuple[str, object], ...] = ()  # overrides that follow the paper's text instead of the code
    follows: str = "code"        # "code" or "paper": which of the two this recipe is
    cost_batch: int = 2
    cost_resolution: int = 32
    cost_warmup: int = 1
    cost_steps: int = 2
    memory_cap_gb: float = 16.0   # CPU memory probes run under this cap; beyond it the result is "OOM"
    max_batch_cap_gb: float | None = None  # the MaxBS search's budget on CPU (None: memory_cap_gb) ...
    max_batch_high: int = 4096   # ... and its upper bound (smoke: a few tries, plumbing only)
    latency_batch: int = 1
    throughput_batch: int = 128
    train_accuracy: bool = True
    calibration_images: int = 256  # INT8 PTQ (runners/quant.py): training images that calibrate the observers
    qat_epochs: float = 10.0       # QAT finetuning (RepOptimizers Table 10; runners/quant.py QATSetting)
    seeds: int = 1               # run_suite's default --seeds at this scale
    seed_spread: float = 2.0     # top-1 points: a row whose seeds' std exceeds it is flagged in the report

    def __post_init__(self):
        if self.warmup_epochs and self.warmup_iters:
            raise ValueError("a recipe warms up in epochs or in iterations, not both")

    @property
    def global_batch(self) -> int:
        return self.batch * self.devices

    @property
    def test_resolution(self) -> int:
        return self.eval_resolution or self.resolution

    def following(self, source: str) -> "Recipe":
        """This recipe as the official code runs it (``code``) or as the paper's text describes it (``paper``)."""
        if source not in ("code", "paper"):
            raise ValueError(f"unknown recipe source {source!r} (code or paper)")
        if source == "code" or not self.paper_text:
            return self
        return replace(self, **dict(self.paper_text), paper_text=(), follows="paper")

    def switches(self) -> dict:
        """The fidelity switches in force, for the plan and the report."""
        warmup = (f"{self.warmup_iters} iterations" if self.warmup_iters
                  else f"{self.warmup_epochs:g} epochs" if self.warmup_epochs else "none")
        return {"follows": self.follows, "warmup": warmup,
                "bias lr": f"x{self.bias_lr_mult:g}" + (" (BN biases too)" if self.bias_lr_mult_norm else ""),
                "weight decay": f"{self.weight_decay:g} (every parameter)" if self.decay_all else
                                f"{self.weight_decay:g} (not on biases or BN; "
                                f"{'scaling vectors decayed' if self.decay_1d else 'no 1-D parameter decayed'})",
                "label smoothing": f"{self.label_smoothing:g}", "nesterov": self.nesterov,
                "grad clip": f"L2 norm {self.clip_grad:g}" if self.clip_grad else "none",
                "randaugment": f"torchvision, 2 ops, magnitude {self.randaugment}/30" if self.randaugment else "none",
                "eval": f"resize {round(self.test_resolution / self.eval_crop)} + centre crop {self.test_resolution}"
                        if self.dataset in ("imagenet", "caltech256", "imagewoof") else f"resize {self.test_resolution}",
                "checkpoints": "every epoch + on SIGTERM/SIGUSR2" if self.checkpoints else "none"}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["paper_text"] = [list(pair) for pair in self.paper_text]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(**{**d, "paper_text": tuple(tuple(pair) for pair in d.get("paper_text", ()))})


DENSE_DATA = ("tiny", "real")
PRETRAINED = ("none", "suite")


@dataclass(frozen=True)
class DenseRecipe:
    """How a dense table (detection, segmentation: ``runner="dense"``, runners/dense.py) is measured at one scale.
    A row finetunes its mm config (Row.config: a repbench example config inheriting the stock one) with its own
    backbone; what a scale changes is here, the rest is the stock config's (its lr, optimizer, losses, pipelines).

    The batch is the stock config's as the paper ran it: ``batch`` images per device on the config's devices (mmdet
    1x: 8 x 2 = 16, its ``auto_scale_lr.base_batch_size``; mmseg ``4xb2``: 4 x 2). A run on fewer devices keeps that
    global batch by gradient accumulation (MMEngine's ``accumulative_counts``) and the config's lr; a recipe that sets
    its own ``batch`` below the config's (smoke, mini) trains at that global batch with the lr scaled linearly to it
    (mmdet's auto_scale_lr rule), recorded with the run."""

    iters: int | None = None          # optimizer steps (None: the config's own schedule: mmdet 1x, mmseg 40k)
    batch: int | None = None          # images per device (None: the config's, at its global batch)
    image_scale: tuple[int, int] | None = None  # (w, h) of the pipelines' Resize / crop (None: the config's)
    constant_lr: bool = False         # no warm-up, no decay (smoke: a few steps)
    data: str = "real"                # "tiny": COCO / Cityscapes generated in their formats; "real": checked there
    tiny_images: int = 4              # per split, when generated
    pretrained: str = "suite"         # "suite": the classification run's final weights (PRETRAINED); "none": random
    pretrained_scale: str = "paper"   # the scale of that classification run
    cost_batch: int | None = None     # images per device of the cost probes' fixed batch (None: ``batch``)
    cost_warmup: int = 1
    cost_steps: int = 2
    memory_cap_gb: float = 16.0       # CPU memory probes run under this cap; beyond it the result is "OOM"
    seeds: int = 1
    seed_spread: float = 1.0          # points of mAP / mIoU: a row whose seeds' std exceeds it is flagged
    # DyRep growing during the finetuning (DyRep Table 5's "D" rows): after every ``dyrep_every`` of the run's
    # optimizer steps before ``dyrep_until`` of them (None: no growth). The paper gives no downstream schedule; the
    # default reading keeps its ImageNet proportions (t = 5 of 120 epochs, growth until epoch 100 of 120).
    dyrep_every: float | None = None
    dyrep_until: float = 100 / 120
    follows: str = "code"             # the stock configs are the official code's; a dense recipe has no text variant

    def __post_init__(self):
        if self.data not in DENSE_DATA:
            raise ValueError(f"unknown dense data {self.data!r}; expected one of {DENSE_DATA}")
        if self.pretrained not in PRETRAINED:
            raise ValueError(f"unknown pretrained {self.pretrained!r}; expected one of {PRETRAINED}")
        if self.pretrained_scale not in SCALES:
            raise ValueError(f"unknown pretrained scale {self.pretrained_scale!r}; expected one of {SCALES}")

    def following(self, source: str) -> "DenseRecipe":
        if source not in ("code", "paper"):
            raise ValueError(f"unknown recipe source {source!r} (code or paper)")
        return self

    def switches(self) -> dict:
        return {"schedule": f"{self.iters} iterations" + (", constant lr" if self.constant_lr else "")
                if self.iters else "the config's", "data": self.data,
                "image scale": f"{self.image_scale[0]}x{self.image_scale[1]}" if self.image_scale else "the config's",
                "pretrained": f"the {self.pretrained_scale}-scale classification run" if self.pretrained == "suite"
                else "none (random initialisation)"}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_scale"] = list(self.image_scale) if self.image_scale else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DenseRecipe":
        return cls(**{**d, "image_scale": tuple(d["image_scale"]) if d.get("image_scale") else None})


# Dense recipes (runners/dense.py), shared by every dense table. Smoke: one step of every row (2 images: PSPNet's
# pooled BN needs 2) on COCO / Cityscapes generated tiny, from random initialisation (no classification run needed);
# mini: 40 steps on a larger tiny set, still from scratch (the path at a size where the loss moves, not the paper's
# comparison); paper: the stock schedules on the real data, from the paper-scale ImageNet runs of the same backbones
# (e.g. OREPA Table 4's ResNet-50 rows), the paper's devices and batch.
DENSE_RECIPES = {
    "smoke": DenseRecipe(iters=1, batch=2, image_scale=(96, 64), constant_lr=True, data="tiny", pretrained="none",
                         cost_warmup=0, cost_steps=1),
    "mini": DenseRecipe(iters=40, batch=2, image_scale=(160, 128), data="tiny", tiny_images=16, pretrained="none",
                        cost_steps=5),
    "paper": DenseRecipe(data="real", pretrained="suite", pretrained_scale="paper", cost_warmup=2, cost_steps=10,
                         memory_cap_gb=64.0),
}


@dataclass(frozen=True)
class Resources:
    """What one run of a scale asks a cluster for, per device (runners/slurm.py). Not part of a run's identity: it
    changes where a run goes, not what it measures."""

    gpus: bool              # the scale trains on GPUs (one per process)
    cpus_per_device: int
    mem_gb_per_device: float
    time_min: int           # the job's time limit; a longer run checkpoints, requeues and resumes


RESOURCES = {"smoke": Resources(gpus=False, cpus_per_device=1, mem_gb_per_device=4, time_min=30),
             "mini": Resources(gpus=False, cpus_per_device=2, mem_gb_per_device=8, time_min=120),
             "paper": Resources(gpus=True, cpus_per_device=8, mem_gb_per_device=48, time_min=24 * 60)}


@dataclass(frozen=True)
class Table:
    paper: str
    name: str
    title: str
    source: str
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    recipes: dict[str, Recipe]
    baselines: dict[str, str] = field(default_factory=dict)  # group -> the row whose cost ratios are 1.0
    paper_regime: tuple[int, int] | None = (64, 224)          # per-device batch x resolution of the paper's costs
    accuracy_tolerance: float = 0.3                            # points of top-1 (DESIGN.md, Scales)
    runner: str = "classification"                            # classification | dense (recipes: DenseRecipe)
    claims: tuple[Claim, ...] = ()
    orderings: tuple[Ordering, ...] = ()
    chain: bool = False                                        # rows add components one by one (Figure 8)
    resources: dict[str, Resources] = field(default_factory=lambda: dict(RESOURCES))
    notes: tuple[str, ...] = ()  # what a reader must know about the printed values (the report prints them)
    num_classes: int | None = None  # a head of this size whatever the scale's data (tables that only count, e.g.
    #                                 RepOptimizers Table 1's ImageNet parameters); None: the dataset's classes

    def __post_init__(self):
        kind = DenseRecipe if self.runner == "dense" else Recipe
        if any(not isinstance(r, kind) for r in self.recipes.values()):
            raise ValueError(f"{self.paper}.{self.name}: a {self.runner} table's recipes are {kind.__name__}s")
        if self.runner == "dense" and self.recipes and any(not row.config for row in self.rows if not row.declared):
            raise ValueError(f"{self.paper}.{self.name}: every run row of a dense table names its mm config")
        if self.num_classes and any(getattr(r, "train_accuracy", False) for r in self.recipes.values()):
            raise ValueError(f"{self.paper}.{self.name}: a fixed head size is for tables that train nothing")
        for row in self.rows:
            if set(row.recipe) - set(self.recipes):
                raise ValueError(f"{self.paper}.{self.name} / {row.name}: recipe departures for scales the table "
                                 f"does not run: {sorted(set(row.recipe) - set(self.recipes))}")
        names = {row.name: row for row in self.rows}
        for ordering in self.orderings:
            for row, metric in ordering.cells:
                if row not in names or metric not in names[row].paper or metric not in self.metrics:
                    raise ValueError(f"{self.paper}.{self.name}: ordering {ordering.text!r} names {row} / {metric}, "
                                     "which is not a printed value of the table")

    @property
    def key(self) -> str:
        return f"{self.paper}.{self.name}"

    @property
    def scales(self) -> tuple[str, ...]:
        return tuple(s for s in SCALES if s in self.recipes)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.key} has no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def baseline_of(self, row: Row) -> str | None:
        return self.baselines.get(row.group)

    def recipe(self, scale: str, row: Row | None = None) -> Recipe:
        """The recipe ``row`` trains with at ``scale``: the table's, with the row's own departures (Row.recipe)."""
        recipe = self.recipes[scale]
        return replace(recipe, **row.recipe.get(scale, {})) if row is not None else recipe
