"""The YAML run config (`RunConfig`): one dataclass per section, each validated with a one-line error."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from mft_jax.config.errors import ConfigError, choice
from mft_jax.config.llama import _DTYPES, PROJECTIONS, LlamaConfig

# What `model.attention` and `model.remat` may say (mft_jax.attention.resolve, mft_jax.model's remat policies).
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "splash")
REMAT_CHOICES = ("none", "full", "dots", "dots_attention")

@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory (config.json + *.safetensors)
    dtype: str | None = None  # storage dtype of the frozen weights; None: the checkpoint's
    compute_dtype: str = "bfloat16"
    attention: str = "auto"  # auto | xla | cudnn | splash
    # none | full | dots | dots_attention: rematerialisation policy of each decoder layer (dots_attention also
    # keeps the attention kernel's output and softmax statistics, so the backward pass does not rerun it)
    remat: str = "none"
    # > 0: the loss computes the LM head and cross-entropy this many positions at a time, recomputing them in
    # the backward pass, so no [B, L, V] fp32 logits exist (for large vocabularies; costs one more head matmul)
    loss_chunk: int = 0

    def validate(self):
        choice("model.compute_dtype", self.compute_dtype, _DTYPES)
        if self.dtype is not None:
            choice("model.dtype", self.dtype, _DTYPES)
        choice("model.attention", self.attention, ATTENTION_CHOICES)
        choice("model.remat", self.remat, REMAT_CHOICES)
        if not (isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
            raise ConfigError(f"model.loss_chunk must be an integer >= 0 (0 = off), got {self.loss_chunk!r}")


@dataclass
class MaskConfig:
    """Which matrices MFT masks and how (docs/method.md)."""

    mode: str = "local"  # local: per-matrix top-k of |score|; global: score >= threshold
    modules: str = "both"  # attn | mlp | both
    masked_layers: list[int] = field(default_factory=list)  # YAML also takes "4-7" or "0-3,20"
    keep_attn: float = 0.9  # fraction of each attention matrix kept (1 - mask ratio)
    keep_mlp: float = 0.9
    init: str = "normal"  # normal: N(0, std) scores; magnitude: scores = |W|
    std: float = 0.02
    threshold_attn: float = 0.0  # global mode only
    threshold_mlp: float = 0.0

    # The reference code's names, accepted with a printed note of what they mean.
    ALIASES = {
        "sparsity_attn": "keep_attn", "sparsity_mlp": "keep_mlp", "subnet_mode": "modules",
        "subnet_type": "mode", "layers": "masked_layers", "keep": ("keep_attn", "keep_mlp"),
    }
    ALIAS_NOTES = {
        "sparsity_attn": "the reference's sparsity_attn is the fraction KEPT: sparsity_attn 0.9 = keep 90%",
        "sparsity_mlp": "the reference's sparsity_mlp is the fraction KEPT: sparsity_mlp 0.9 = keep 90%",
        "subnet_mode": "subnet_mode is the reference's name for mask.modules (attn | mlp | both)",
        "subnet_type": "subnet_type is the reference's name for mask.mode (local | global)",
    }

    def validate(self):
        choice("mask.mode", self.mode, ("local", "global"))
        choice("mask.modules", self.modules, ("attn", "mlp", "both"))
        choice("mask.init", self.init, ("normal", "magnitude"))
        for name in ("keep_attn", "keep_mlp"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ConfigError(f"mask.{name} must be in (0, 1] (the fraction of weights kept), got {value!r}")
        if not self.std > 0:
            raise ConfigError(f"mask.std must be > 0, got {self.std}")
        if len(set(self.masked_layers)) != len(self.masked_layers):
            raise ConfigError(f"mask.masked_layers has duplicates: {self.masked_layers}")
        if any(layer < 0 for layer in self.masked_layers):
            raise ConfigError(f"mask.masked_layers must be >= 0, got {self.masked_layers}")

    def check_against(self, cfg: LlamaConfig):
        bad = [layer for layer in self.masked_layers if layer >= cfg.num_hidden_layers]
        if bad:
            raise ConfigError(f"mask.masked_layers {bad} out of range: the model has {cfg.num_hidden_layers} "
                              f"decoder layers (0..{cfg.num_hidden_layers - 1})")


# A local data source is a file with one of these suffixes (mft_jax.data.sources).
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _unglued(source: str, rows):
    """(source, rows) with a row count that YAML glued onto its file name put back: in a flow map written without
    a space after the colon, `{train.jsonl:null}` is one key 'train.jsonl:null' with no value. Split only when
    what precedes the last colon is a data file (by suffix or on disk) and what follows is null or a count."""
    if rows is not None or ":" not in source:
        return source, rows
    path, _, value = source.rpartition(":")
    if not (path.endswith(DATA_FILE_SUFFIXES) or os.path.isfile(os.path.expanduser(path))):
        return source, rows
    value = value.strip()
    if value in ("", "null", "~"):
        return path, None
    return (path, int(value)) if value.isdigit() else (source, rows)


@dataclass
class DataConfig:
    """SFT data: sources, chat template, tokenization, batching (see mft_jax.data)."""

    # dataset_mixer: {source: rows}. A source is a local .jsonl / .json / .parquet path or a Hugging Face dataset
    # name (org/name: split train; org/name:split; org/name:config:split); rows is how many rows to take after
    # a seeded shuffle (null: all of them). Row schemas: see mft_jax.data.schemas.
    train: dict[str, int | None] = field(default_factory=dict)
    dev: dict[str, int | None] = field(default_factory=dict)  # held-out loss and checkpoint selection
    tokenizer: str | None = None  # a HF tokenizer directory; None: the model directory
    template: str = "tulu"  # tulu | chat_template | plain
    max_seq_length: int = 4096
    add_bos: bool = False
    packing: bool = False  # several examples per row (segment ids keep them apart)
    loss_reduction: str = "example"  # example: mean of per-example means (the reference); token
    shuffle: bool = True
    seed: int = 42
    cache_dir: str | None = None  # tokenized TFDS cache; None: ~/.cache/mft_jax/data
    num_workers: int = 0  # grain worker processes
    # Fail when a source drops more than this fraction of the rows taken from it (bad schema, no assistant
    # turn, too long for max_seq_length, ...). Not part of the cache key: checked on every build and cache hit.
    max_drop_fraction: float = 0.01
    # Fail when more than this fraction of a source's kept examples were cut at max_seq_length (1.0: never); a
    # source above TRUNCATION_WARNING gets a warning either way. Not part of the cache key, checked like drops.
    max_truncated_fraction: float = 1.0
    # Train on this fraction of each data.train source (dev untouched): round(fraction * rows) rows, the first of
    # the mixer's seeded permutation, so smaller fractions are subsets of larger ones. Part of the cache key.
    fraction: float = 1.0

    def validate(self):
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ConfigError(f"data.fraction must be a number in (0, 1] (the share of data.train rows used), "
                              f"got {self.fraction!r}")
        choice("data.template", self.template, ("tulu", "chat_template", "plain"))
        choice("data.loss_reduction", self.loss_reduction, ("example", "token"))
        if not (isinstance(self.max_seq_length, int) and self.max_seq_length >= 2):
            raise ConfigError(f"data.max_seq_length must be an integer >= 2, got {self.max_seq_length!r}")
        for split in ("train", "dev"):
            setattr(self, split, dict(_unglued(source, rows) for source, rows in getattr(self, split).items()))
            for source, rows in getattr(self, split).items():
                if rows is not None and (not isinstance(rows, int) or rows <= 0):
                    raise ConfigError(f"data.{split}[{source!r}]: rows must be a positive integer or null (all), "
                                      f"got {rows!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("max_drop_fraction", "max_truncated_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"data.{name} must be a number in [0, 1], got {value!r}")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # linear decay to 0 after warm-up | constant
    clip_grad_norm: float | None = None

    def validate(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        choice("optim.schedule", self.schedule, ("linear", "constant"))
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"optim.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclass
class LoraConfig:
    """The LoRA baseline (`train.mode: lora`) as the reference configures it (PEFT: scripts/finetune.py)."""

    rank: int = 64
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    dropout: float = 0.1  # on the adapter's input, in training
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))  # all seven projections

    def validate(self):
        if self.rank <= 0:
            raise ConfigError(f"lora.rank must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise ConfigError(f"lora.targets {self.targets!r}: choose a non-empty subset of {list(PROJECTIONS)}")


@dataclass
class TrainConfig:
    mode: str = "mft"  # mft: train mask scores; fft: train the weights; lora: train low-rank adapters
    batch_size: int = 128  # sequences per optimizer step (global)
    micro_batch_size: int | None = None  # sequences per forward/backward; None: batch_size
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs when set
    # false: an epoch's last, partial batch is trained on (its empty rows weigh 0), as the reference does
    drop_last: bool = False
    seed: int = 42
    log_every: int = 10
    eval_every: int | None = None  # dev-loss evaluation period in steps; None: only at the end
    # the dtype in which each micro-batch's gradient is summed across data-parallel devices where the trained
    # matrices are sharded over fsdp: compute | fp32 (mft_jax.step.train_step; docs/architecture.md)
    grad_reduce: str = "compute"

    def validate(self):
        from mft_jax import methods  # the registry of methods (imported here: it imports this module)

        choice("train.mode", self.mode, tuple(methods.METHODS))
        choice("train.grad_reduce", self.grad_reduce, ("compute", "fp32"))
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be > 0, got {self.batch_size}")
        micro = self.micro_batch_size or self.batch_size
        if micro <= 0 or self.batch_size % micro:
            raise ConfigError(f"train.micro_batch_size ({micro}) must divide train.batch_size ({self.batch_size})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be > 0 or null, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0 when train.max_steps is null, got {self.epochs}")
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every must be > 0, got {self.log_every}")


@dataclass
class MeshConfig:
    # Device-mesh axis sizes; one may be -1 (fills the remaining devices).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh: axis sizes must be positive, with at most one -1 (fill); got "
                              f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")


@dataclass
class CheckpointConfig:
    save_every: int = 500  # steps; a final checkpoint is always written
    keep: int = 3  # last K checkpoints kept
    async_save: bool = True

    def validate(self):
        if self.save_every <= 0 or self.keep <= 0:
            raise ConfigError(f"ckpt.save_every and ckpt.keep must be > 0, got {self.save_every}, {self.keep}")


@dataclass
class EvalConfig:
    """Benchmark settings; each task decodes with its own olmes settings unless max_new_tokens overrides them,
    in a context window of max_length tokens (olmes's model default, 2048)."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    max_new_tokens: int | None = None  # None: each task's own (gsm8k 512, humaneval 512, ifeval 1280, math 1024)
    max_length: int = 2048
    batch_size: int = 8

    def validate(self):
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit must be > 0 or null, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError(f"eval.max_new_tokens must be > 0 or null, got {self.max_new_tokens}")
        if self.max_length <= 0 or (self.max_new_tokens or 0) >= self.max_length:
            raise ConfigError(f"eval.max_length ({self.max_length}) must exceed eval.max_new_tokens "
                              f"({self.max_new_tokens}); raise max_length")


@dataclass
class WandbConfig:
    """Weights & Biases logging (mft_jax.tracking); on only when `project` is set and mode is not disabled."""

    project: str | None = None
    group: str | None = None  # e.g. a sweep's name, so its points are grouped
    mode: str = "online"  # online | offline (files only, `wandb sync` later) | disabled
    name: str | None = None  # None: the run directory's name
    entity: str | None = None  # None: the logged-in user's default entity
    dir: str | None = None  # None: the run directory (files under RUN/wandb)
    # seconds an online start may take before the run stops with an error (wandb's own default is 90, and it
    # retries an unreachable or refusing server all that time)
    init_timeout: float = 15.0

    def validate(self):
        choice("log.wandb.mode", self.mode, ("online", "offline", "disabled"))
        if not (isinstance(self.init_timeout, (int, float)) and self.init_timeout > 0):
            raise ConfigError(f"log.wandb.init_timeout must be a number of seconds > 0, got {self.init_timeout!r}")
        if self.project is not None and not self.project.strip():
            raise ConfigError("log.wandb.project is empty; name a project, or remove log.wandb to log nothing")
        if self.project is None and (self.group or self.name or self.entity):
            raise ConfigError("log.wandb has settings but no project; set log.wandb.project (wandb logging is "
                              "on only with a project)")


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self):
        self.wandb.validate()


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)  # experiment trackers (result-neutral)

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        if self.train.mode != "mft":
            return
        if self.mask.mode == "local" and not self.mask.masked_layers:
            raise ConfigError("mask.masked_layers is empty; list the decoder layers MFT masks, e.g. [4, 5, 6, 7] "
                              "or \"4-7\"")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
