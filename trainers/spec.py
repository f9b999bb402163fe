"""Experiment specs: one YAML file per experiment, validated by pydantic before anything starts.

    spec = load_spec("experiments/quick.yaml", ["model.type=mod", "training.max_steps=120"])

Unknown keys are refused with a did-you-mean, wrong types and out-of-range values name the file
and the key. The original project's names work: `model.type`, `model.size`,
`training.from_scratch`, `training.num_epochs`, `training.batch_size`, `training.optimizer.lr`,
and the routing knobs (`mod_capacity`, `dtf_capacity`, `beta_ce_init`, ...) under `model`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from dtlab.models.config import CONFIG_CLASSES, config_class, did_you_mean

# The largest whole number the code can hold (torch and numpy count steps, rows and seeds in int64).
INT64 = 2**63 - 1
SPEC_MAX_BYTES = 1_000_000  # a spec file is configuration: larger is refused before it is parsed
# A name becomes part of directory names (runs/NAME-...): letters, digits, '.', '_', '-', no path.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"

# Keys of the `model` section that are not model config fields.
MODEL_KEYS = ("type", "size", "pretrained")
ROUTED = ("mod", "dtf")
DENSE_CONTROL = "dense_control"  # in `variants`: Standard, shallower, at the routed variants' FLOPs


def base_variant(name: str) -> str:
    """The model variant an entry of `variants` trains (`dense_control` is a Standard model)."""
    return "standard" if name == DENSE_CONTROL else name


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


def model_section_for(model: dict[str, Any], variant: str) -> dict[str, Any]:
    """The `model` section as one variant sees it: its type, size and checkpoint, and only the
    config keys that variant has (another variant's routing knobs do not apply to it)."""
    fields = config_class(variant).field_names()
    return {**{k: v for k, v in model.items() if k in MODEL_KEYS or k in fields}, "type": variant}


class Strict(BaseModel):
    # no NaN or infinity anywhere: `lr: .inf` or a NaN weight is refused, never trained with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(BaseModel):
    """Which model: variant, shape preset, optional checkpoint, and config overrides.

    Any field of the variants' configs (`models.make_config` names: `mod_capacity`,
    `dtf_capacity`, `beta_ce_init`, `hidden_size`, ...) may be given here; a routing knob
    applies only to the variants that have it.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["standard", "mod", "dtf"] = "standard"
    size: str = "debug"
    pretrained: str | None = None  # hub name or local Qwen2/Qwen2.5 directory, for transfer

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def overrides_for(self, variant: str) -> dict[str, Any]:
        """The config overrides that apply to `variant`."""
        return {k: v for k, v in model_section_for(self.overrides(), variant).items() if k not in MODEL_KEYS}


class DataSpec(Strict):
    """Where text comes from, how it is tokenized and packed."""

    source: str = "builtin"  # "builtin", a hub dataset name, or local text/jsonl/parquet file(s) or directory
    name: str | None = None  # hub dataset config, e.g. "wikitext-2-raw-v1"
    split: str = "train"
    text_field: str = "text"
    # What one document of a local text file is (datasets' text builder): the whole file, a paragraph
    # (blank-line separated) or a line. Documents are joined by an end-of-text token.
    sample_by: Literal["document", "paragraph", "line"] = "document"
    # The rows are pieces of one running text (WikiText's lines): join them (no end-of-text token between
    # them) and split by position. A single local text file is one running text anyway.
    contiguous: bool = False
    tokenizer: str | None = None  # hub name or local directory; None: a byte-level BPE trained here
    vocab_size: int = Field(4096, ge=260, le=1_000_000)  # of the locally trained tokenizer
    block_size: int = Field(256, ge=8, le=2**20)
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    max_bytes: int = Field(4_000_000, ge=10_000, le=2**50)  # text budget, builtin or loaded
    # token budget: preparation stops after this many tokens (documents and end-of-text tokens, before the
    # split); whichever of max_bytes and max_tokens is reached first ends the corpus
    max_tokens: int | None = Field(None, ge=1_000, le=2**50)
    revision: str | None = None  # hub dataset: a branch, tag or commit (part of the data's cache key)
    num_proc: int = Field(1, ge=1, le=1024)  # processes that tokenize while preparing (the shards do not depend on it)
    cache_dir: str | None = None  # default $DTLAB_CACHE or ~/.cache/dtlab


class OptimizerSpec(Strict):
    lr: float = Field(3e-3, gt=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0.0)
    eps: float = Field(1e-8, gt=0.0)


class SchedulerSpec(Strict):
    warmup_steps: int = Field(20, ge=0, le=INT64)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class TrainingSpec(Strict):
    from_scratch: bool = True
    num_epochs: int = Field(1, ge=1, le=2**31 - 1)
    max_steps: int | None = Field(None, ge=1, le=INT64)  # overrides num_epochs when set
    batch_size: int = Field(8, ge=1, le=2**31 - 1)  # rows per worker per micro-step
    grad_accum_steps: int = Field(1, ge=1, le=2**31 - 1)
    grad_clip: float = Field(1.0, gt=0.0)
    optimizer: OptimizerSpec = OptimizerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    eval_every: int = Field(50, ge=1, le=INT64)
    eval_batches: int = Field(8, ge=1, le=2**31 - 1)
    eval_at_start: bool = True
    eval_causal: bool = True  # routed variants: also the validation loss in `causal` routing
    log_every: int = Field(10, ge=1, le=INT64)
    checkpoint: bool = True
    # torch.compile the model (fullgraph) for training and evaluation; auto: on CUDA only
    compile: Literal["auto", "on", "off"] = "auto"
    # recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute);
    # auto: on where the memory plan says the run does not fit without it
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_off(cls, data: Any) -> Any:
        """YAML reads a bare `on`/`off` as true/false."""
        for key in ("compile", "activation_checkpointing"):
            if isinstance(data, dict) and isinstance(data.get(key), bool):
                data = {**data, key: "on" if data[key] else "off"}
        return data


class ResourcesSpec(Strict):
    num_workers: int = Field(1, ge=1, le=65_536)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float | None = Field(None, ge=0.0)  # None: 1 when CUDA is used
    use_ray: bool = True
    # how a run's ranks hold the model: ddp (each rank a whole copy), fsdp (FSDP2: parameters, gradients
    # and optimizer state sharded over the ranks), auto (fsdp where the memory plan says ddp does not fit)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # Ray: how often a run's worker group (Train) and a sweep's trial (Tune) are restarted after a
    # failure, each time from the run's last checkpoint (node preemptions are always restarted)
    max_failures: int = Field(0, ge=0, le=1_000)
    # Ray's storage for the checkpoints of record (a URI pyarrow opens, s3://bucket/prefix, or a path all
    # nodes share); unset, the run directory is the record and Ray keeps no copy
    storage: str | None = None

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> ResourcesSpec:
        gpw = self.gpus_per_worker
        if self.num_workers > 1 and gpw is not None and 0 < gpw < 1:
            raise ValueError(f"resources.gpus_per_worker={gpw:g} with num_workers={self.num_workers}: two ranks of "
                             "one run could share a GPU (NCCL refuses that); give each rank a whole GPU "
                             "(gpus_per_worker: 1), or share GPUs between single-worker trials")
        return self


class Objective(Strict):
    metric: str
    mode: Literal["min", "max"] = "min"


class AshaSpec(Strict):
    enabled: bool = True
    grace_period: int = Field(1, ge=1, le=INT64)  # evaluations before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)
    # default: the number of evaluations + 1, so finished trials end normally
    max_t: int | None = Field(None, ge=1, le=INT64)


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


class Distribution(Strict):
    """One search dimension, written `{choice: [...]}`, `{uniform: [lo, hi]}`,
    `{loguniform: [lo, hi]}` or `{int: [lo, hi]}` (and dumped the same way)."""

    kind: Literal["choice", "uniform", "loguniform", "int"]
    args: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, raw: Any) -> Any:
        if isinstance(raw, Distribution):
            return raw
        if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
            raise ValueError("expected one of {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
                             f"{{int: [lo, hi]}}; got {raw!r}")
        kind, args = next(iter(raw.items()))
        return {"kind": kind, "args": args}

    @model_validator(mode="after")
    def _check_range(self) -> Distribution:
        kind, args = self.kind, self.args
        if kind == "choice":
            if not args:
                raise ValueError(f"choice needs a non-empty list of values, got {args!r}")
            return self
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                                     for a in args):
            raise ValueError(f"{kind} needs [lo, hi] finite numbers, got {args!r}")
        lo, hi = args
        if kind == "int" and (int(lo) != lo or int(hi) != hi or lo > hi):
            raise ValueError(f"empty range [{lo}, {hi}]: expected integers, lo <= hi")
        if kind != "int" and lo >= hi:
            raise ValueError(f"empty range [{lo}, {hi}]: expected lo < hi")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {lo}")
        return self

    @model_serializer
    def _as_written(self) -> dict[str, Any]:
        return {self.kind: list(self.args)}

    def corners(self) -> list[Any]:
        """Every value a check must try: each choice, or both ends of a range."""
        return list(self.args) if self.kind == "choice" else [int(a) if self.kind == "int" else a for a in self.args]


class SweepSpec(Strict):
    """Ray Tune + Optuna over any spec key: `search_space` maps a dotted key to a `Distribution`."""

    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    objectives: list[Objective] | None = None  # multi-objective, e.g. val_loss and train_flops (Pareto front)
    # configurations Optuna proposes: a trial each, training all the seeds
    num_samples: int = Field(4, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000)  # default: as many trials as the cluster fits
    search_space: dict[str, Distribution] = Field(default_factory=dict)
    asha: AshaSpec = AshaSpec()
    driver_cpus: float = Field(0.1, gt=0.0)  # the per-trial driver that builds the TorchTrainer
    # a trial that ASHA stopped keeps its `best` weights; its `last` checkpoint (with the optimizer's
    # state, for a resume that never comes) is dropped unless this says keep it
    keep_stopped_last: bool = False
    dashboard_host: str = "127.0.0.1"

    def objective_list(self) -> list[Objective]:
        return list(self.objectives or [Objective(metric=self.metric, mode=self.mode)])


class EvalSpec(Strict):
    """Downstream tasks (lm-evaluation-harness) that `dtlab run` scores each run on after training."""

    tasks: list[Annotated[str, Field(min_length=1)]] = Field(["dtlab_next_line", "dtlab_cloze"], min_length=1)
    limit: int | None = Field(None, ge=1, le=INT64)  # examples per task (None: all)
    batch_size: int = Field(8, ge=1, le=2**31 - 1)
    routing: str = "causal"

    @model_validator(mode="after")
    def _causal_only(self) -> EvalSpec:
        if self.routing != "causal":
            raise ValueError(f"eval.routing={self.routing!r}: downstream tasks are scored only in causal routing; "
                             "top-k routing chooses each token's blocks by looking at the whole row, answer "
                             "tokens included")
        return self


class TrackingSpec(Strict):
    """Experiment trackers that receive each run's records (`tracking.py`). In a spec either a list,
    `tracking: [tensorboard, mlflow]`, or this mapping. None by default."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    mlflow_uri: str | None = None  # default: sqlite:///OUT/mlflow.db (offline)
    mlflow_experiment: str | None = None  # default: the spec's name
    wandb_project: str = "dtlab"
    wandb_mode: Literal["offline", "online"] = "offline"

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            raw = [raw]
        raw = {"backends": raw} if isinstance(raw, list) else raw
        if isinstance(raw, dict) and isinstance(raw.get("backends"), list):  # each once
            raw = {**raw, "backends": list(dict.fromkeys(map(str, raw["backends"])))}
        return raw


ISOFLOP_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size")


class IsoflopSize(Strict):
    """One model size of an isoFLOP family: a preset (`size`, default `model.size`) with shape
    overrides; in a spec either a preset's name (`small`) or `{name, size, overrides}`."""

    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    size: str | None = None
    overrides: dict[Literal["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "intermediate_size"],
                    Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _preset_name(cls, raw: Any) -> Any:
        return {"name": raw, "size": raw} if isinstance(raw, str) else raw


class IsoflopSpec(Strict):
    """`dtlab isoflop`: every size x variant x seed trained to each budget of training FLOPs, its
    steps (and so its learning-rate schedule) set so that FLOPs per token x tokens equals the budget."""

    budgets: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=1)  # training FLOPs per run
    sizes: list[IsoflopSize] = Field(min_length=3)  # depth and width scaled together; 3 or more for a minimum

    @model_validator(mode="after")
    def _each_once(self) -> IsoflopSpec:
        names = [s.name for s in self.sizes]
        twice = sorted({n for n in names if names.count(n) > 1}) + sorted(
            {f"{b:g}" for b in self.budgets if self.budgets.count(b) > 1})
        if twice:
            raise ValueError(f"isoflop: {', '.join(twice)} listed more than once; each names runs, list it once")
        return self


class Spec(Strict):
    name: str = Field("experiment", min_length=1, max_length=200)  # part of directory names: see `_plain_name`
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and torch's seeds
    # replicates (experiments, sweeps)
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = None
    # compared by `dtlab run`; `dense_control` is Standard at the depth whose training FLOPs per token
    # match the routed variants' (a compute-matched dense baseline)
    variants: list[Literal["standard", "mod", "dtf", "dense_control"]] | None = None
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    sweep: SweepSpec | None = None
    isoflop: IsoflopSpec | None = None  # `dtlab isoflop`: sizes x variants x seeds at equal training FLOPs
    eval: EvalSpec | None = None  # downstream tasks after training (`dtlab run`)
    tracking: TrackingSpec = TrackingSpec()  # tensorboard, mlflow, wandb (none by default)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """A name, never a path: it becomes part of directory names (`runs/NAME-...`), so a '/', '..' or a
        leading '.' would write outside the output directory or hide the run."""
        if not re.match(NAME_PATTERN, name) or ".." in name:
            raise ValueError(f"{name!r} is not a plain name: expected letters, digits, '.', '_' and '-' (no '/', "
                             "no '..', not starting with '.'), since it becomes part of directory names")
        return name

    @field_validator("seeds", "variants")
    @classmethod
    def _each_once(cls, values: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        """Each seed and variant names a run (`VARIANT-seedS`): listed twice, two entries would be one run."""
        if values is not None and not values:
            what = "seed, e.g. [0, 1]" if info.field_name == "seeds" else "of standard, mod, dtf, dense_control"
            raise ValueError(f"an empty list: name at least one {what} (or leave the key out)")
        twice = sorted({str(v) for v in values or [] if values.count(v) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once; each entry names a run, list it once")
        return values

    @model_validator(mode="after")
    def _eval_not_in_sweeps(self) -> Spec:
        if self.eval is not None and self.sweep is not None:
            raise ValueError("eval: scores the runs of `dtlab run` without a sweep; for a sweep's trials run "
                             "`dtlab eval SWEEP_DIR` once it has finished")
        return self

    @model_validator(mode="after")
    def _check_isoflop(self) -> Spec:
        """An isoFLOP study: no sweep, no dense_control (the sizes are the dense family), the shapes from
        its sizes (not from `model`), each size a valid model of each variant."""
        if self.isoflop is None:
            return self
        from dtlab.models.config import PRESETS, make_config

        if self.sweep is not None:
            raise ValueError("isoflop: and sweep: in one spec; an isoFLOP study trains fixed sizes to fixed budgets "
                             "(no search, no early stopping): keep one of them")
        if DENSE_CONTROL in (self.variants or []):
            raise ValueError("isoflop: variants: dense_control is a shallower Standard at one shape; in an isoFLOP "
                             "study the sizes are the dense family: list standard instead")
        shape = [k for k in self.model.overrides() if k in ISOFLOP_SHAPE_KEYS]
        if shape:
            raise ValueError(f"isoflop: model.{shape[0]} is set for every run; the shapes come from isoflop.sizes "
                             "(give each size its own overrides)")
        if not self.training.from_scratch:
            raise ValueError("isoflop: trains each size from scratch (training.from_scratch=true)")
        for size in self.isoflop.sizes:
            preset = size.size or self.model.size
            if preset not in PRESETS:
                raise ValueError(f"isoflop.sizes: {size.name}: size={preset!r}: expected one of {list(PRESETS)}"
                                 f"{did_you_mean(preset, PRESETS)}")
            for variant in {base_variant(v) for v in self.variant_list()}:
                try:
                    make_config(variant, preset, **{**self.model.overrides_for(variant), **size.overrides})
                except ValueError as err:
                    raise ValueError(f"isoflop.sizes: {size.name}: {err}") from None
        return self

    @model_validator(mode="after")
    def _check_model_keys(self) -> Spec:
        from dtlab.models.config import PRESETS, make_config

        if self.model.size not in PRESETS:
            raise ValueError(f"model.size={self.model.size!r}: expected one of {list(PRESETS)}"
                             f"{did_you_mean(self.model.size, PRESETS)}")
        # the variants that run: the list when there is one (model.type then only gives the default)
        variants = {base_variant(v) for v in self.variants} if self.variants else {self.model.type}
        known = {k for v in variants for k in CONFIG_CLASSES[v].field_names()}
        every = {k for c in CONFIG_CLASSES.values() for k in c.field_names()}
        for key in self.model.overrides():
            if key not in known:
                owners = [v for v, c in CONFIG_CLASSES.items() if key in c.field_names()]
                hint = (f": it belongs to {owners}, not to the variants here ({sorted(variants)})" if owners
                        else did_you_mean(key, every | set(ModelSpec.model_fields)))
                raise ValueError(f"model.{key}: unknown key{hint}")
        for variant in sorted(variants):  # values are checked now, not when a worker builds the model
            try:
                make_config(variant, self.model.size, **self.model.overrides_for(variant))
            except ValueError as err:
                raise ValueError(f"model: {err}") from None
        if not self.training.from_scratch and not self.model.pretrained:
            raise ValueError("training.from_scratch=false (transfer) needs model.pretrained: a hub name such as "
                             "'Qwen/Qwen2.5-0.5B' or a local checkpoint directory")
        if DENSE_CONTROL in (self.variants or []):
            if not self.training.from_scratch:
                raise ValueError("variants: dense_control trains a shallower Standard from scratch; it does not "
                                 "apply to transfer (training.from_scratch=false)")
            if not [v for v in self.variants if v in ROUTED]:
                raise ValueError("variants: dense_control matches the training FLOPs of the routed variants; "
                                 "list mod or dtf too")
        return self

    def dense_control_depth(self) -> int:
        """The Standard depth whose training FLOPs per token are closest to the mean of the routed
        variants' (at the spec's shape and block size). The LM head costs every depth and variant the
        same, so the vocabulary (the tokenizer's, known only once the data are prepared) does not move
        the choice; the trained tokenizer's size stands in for it."""
        from dtlab.models.config import make_config
        from dtlab.models.flops import flops_per_token, matched_dense_depth

        vocab = {} if "vocab_size" in self.model.overrides() else {"vocab_size": self.data.vocab_size}
        routed = [make_config(v, self.model.size, **{**vocab, **self.model.overrides_for(v)})
                  for v in self.variant_list() if v in ROUTED]
        target = sum(flops_per_token(c, self.data.block_size) for c in routed) / len(routed)
        return matched_dense_depth(routed[0], target, self.data.block_size)

    def variant_list(self) -> list[str]:
        return list(self.variants or [self.model.type])

    def seed_list(self) -> list[int]:
        return list(self.seeds or [self.seed])

    def for_run(self, variant: str, seed: int, params: dict[str, Any] | None = None, source: str = "") -> Spec:
        """The spec of one run: one variant, one seed, no sweep; `params` (dotted keys) applied,
        model keys only where the variant has them."""
        raw = self.model_dump(mode="json", exclude={"sweep", "isoflop"})
        raw.update(seed=seed, variants=None, seeds=None)
        for key, value in (params or {}).items():
            set_key(raw, key.split("."), value, f"sweep.search_space.{key}")
        raw["model"] = model_section_for(raw["model"], base_variant(variant))
        if variant == DENSE_CONTROL:
            raw["model"]["num_hidden_layers"] = self.dense_control_depth()
        return spec_from_dict(raw, source or f"{self.name} ({variant}, seed {seed})")


def _section_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Valid keys at a dotted path of the schema, for did-you-mean."""
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    keys = list(model.model_fields)
    if model is ModelSpec:
        keys += [k for c in CONFIG_CLASSES.values() for k in c.field_names()]
    return keys


def _bounds(loc: list[str]) -> tuple[Any, Any]:
    """The (ge, le) bounds of the spec field at `loc` (None where there is none)."""
    model: Any = Spec
    field = None
    for part in loc:
        if part.isdigit() or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue  # an item of a list: the list's own field says the bounds of its items
        field = model.model_fields.get(part)
        if field is None:
            return None, None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), ann)
    metadata = list(getattr(field, "metadata", []))
    for arg in getattr(getattr(field, "annotation", None), "__args__", ()):  # list[Annotated[int, Field(...)]]
        for inner in getattr(arg, "__args__", ()):
            metadata += list(getattr(inner, "__metadata__", ()))
            metadata += [m for a in getattr(inner, "__metadata__", ()) for m in getattr(a, "metadata", [])]
    ge = next((m.ge for m in metadata if getattr(m, "ge", None) is not None), None)
    le = next((m.le for m in metadata if getattr(m, "le", None) is not None), None)
    return ge, le


def _whole_number_error(loc: list[str], key: str, value: Any) -> str | None:
    """For a whole-number key given something like `1e30` or `2.5`: what is wrong with it, in words."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    ge, le = _bounds(loc)
    span = f" from {ge:,} to {le:,}" if ge is not None and le is not None else ""
    if math.isfinite(number) and number == int(number) and ((le is not None and number > le) or
                                                            (ge is not None and number < ge)):
        return f"{key}: {value} is out of range (expected a whole number{span})"
    if math.isfinite(number) and number == int(number) and isinstance(value, str):
        return f"{key}: {value!r}: write it as a plain whole number ({int(number)}), expected{span or ' an integer'}"
    return f"{key}: {value!r} is not a whole number (expected one{span})"


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        said = _whole_number_error(loc, key, e.get("input")) if e["type"] in ("int_parsing", "int_from_float") \
            else None
        if said:
            lines.append(f"{source}: {said}")
        elif e["type"] == "extra_forbidden":
            hint = did_you_mean(loc[-1], _section_keys(Spec, loc[:-1]))
            lines.append(f"{source}: unknown key {key}{hint}")
        elif e["type"] == "value_error":
            where = f"{key}: " if loc else ""
            lines.append(f"{source}: {where}{str(e['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise SpecError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_key(raw: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """raw[a][b][c] = value for the path [a, b, c], making sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{what}: {part} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        set_key(raw, path, value, f"override {text!r}")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (plain YAML keeps the last one, so a
    second `training:` section would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(key, seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(Exception):
    """A key given twice in one mapping, at lines `first` and `second` (1-based)."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def _parents(text: str, line: int) -> list[str]:
    """The keys of the sections around line `line` (1-based) of a block-style YAML text, outermost first."""
    lines = text.splitlines()
    target = lines[line - 1]
    indent = len(target) - len(target.lstrip())
    path: list[str] = []
    for prev in reversed(lines[:line - 1]):
        stripped = prev.strip()
        if not stripped or stripped.startswith("#"):
            continue
        ind = len(prev) - len(prev.lstrip())
        if ind < indent and stripped.endswith(":") and not stripped.startswith("-"):
            path.insert(0, stripped[:-1].strip())
            indent = ind
    return path


def load_yaml_unique(text: str, source: str) -> Any:
    """YAML text as Python objects; a key given twice in one mapping is a SpecError naming `source`, the
    key (dotted, with its sections) and both lines."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKey as dup:
        dotted = ".".join([*_parents(text, dup.second), str(dup.key)])
        raise SpecError(f"{source}: key {dotted!r} is given twice (lines {dup.first} and {dup.second}); YAML would "
                        "keep only the last one: merge them into one") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Read, override (`key.path=value`, values parsed as YAML) and validate a spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size > SPEC_MAX_BYTES:
        raise SpecError(f"{path}: {size:,} bytes; a spec file is at most {SPEC_MAX_BYTES:,} bytes (it holds "
                        "settings, not data: point data.source at the data instead)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        raw = load_yaml_unique(text, str(path))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:
        raise SpecError(f"{path}: the spec file is empty: expected sections such as model, data, training "
                        "(see experiments/quick.yaml)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level")
    return spec_from_dict(apply_overrides(raw, list(overrides or [])), str(path))


def spec_from_dict(raw: dict[str, Any], source: str = "spec") -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(err, source)) from None


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
