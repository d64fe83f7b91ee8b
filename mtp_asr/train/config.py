"""Training configurations (YAML sections map to these dataclasses; see egs/*/asr/conf/)."""
from dataclasses import dataclass, field

from mtp_asr.config import ConfigError
from mtp_asr.data.augment import SpecAugmentConfig
from mtp_asr.model.heads import HeadsConfig
from mtp_asr.model.llama import LlamaConfig
from mtp_asr.model.speech_llama import ModelConfig

FREEZABLE = ("encoder", "adapter", "decoder", "heads")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 500
    schedule: str = "cosine"  # cosine | linear | constant (after the warm-up)
    min_lr_ratio: float = 0.05  # final LR of cosine/linear decay, relative to lr
    grad_clip: float = 5.0  # max gradient norm; 0 disables clipping
    accum_grad: int = 1  # batches per optimizer step

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0 (got {self.lr})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant (got {self.schedule!r})")
        if self.accum_grad < 1:
            raise ConfigError(f"optim.accum_grad must be >= 1 (got {self.accum_grad})")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclass
class LoopConfig:
    """What every training run shares: optimisation, length, logging, checkpoints, faults."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    num_epochs: int = 10
    max_steps: int = 0  # optimizer steps; 0: no limit beyond num_epochs
    seed: int = 42
    log_interval: int = 20  # optimizer steps between progress lines and TensorBoard points
    save_every_n: int = 0  # optimizer steps between checkpoint-<step>.pt files; 0: only epoch-<n>.pt
    keep_last_k: int = 3  # checkpoint-<step>.pt files kept (epoch files are all kept for averaging)
    amp: bool = True  # bf16 autocast when training on a GPU
    device: str = "auto"  # auto | cpu | cuda
    max_bad_batches: int = 10  # consecutive non-finite-loss batches before the run stops
    freeze: list = field(default_factory=list)  # any of encoder, adapter, decoder, heads
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self):
        bad = [f for f in self.freeze if f not in FREEZABLE]
        if bad:
            raise ConfigError(f"freeze: unknown part(s) {bad}; choose from {', '.join(FREEZABLE)}")
        if self.num_epochs < 1 or self.max_steps < 0:
            raise ConfigError(f"num_epochs must be >= 1 and max_steps >= 0 (max_steps caps the epochs' steps; got "
                              f"num_epochs {self.num_epochs}, max_steps {self.max_steps})")
        if self.log_interval < 1:
            raise ConfigError(f"log_interval must be >= 1 (got {self.log_interval})")


@dataclass
class SpeechDataConfig:
    train_cuts: list = field(default_factory=list)  # Lhotse manifests with features
    valid_cuts: list = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece model; ignored when the decoder comes from a Hugging Face directory
    # The CTC head's own sentencepiece model (e.g. characters under an LLM's 32k BPE); "": the decoder's tokenizer.
    ctc_tokenizer: str = ""
    max_duration: float = 200.0  # seconds of audio per batch
    max_utt_duration: float = 30.0  # longer training cuts are left out
    num_buckets: int = 10

    def __post_init__(self):
        if self.max_duration <= 0 or self.max_utt_duration <= 0:
            raise ConfigError("data.max_duration and data.max_utt_duration must be > 0")


@dataclass
class SpeechTrainConfig(LoopConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    ctc_weight: float = 0.0  # weight of the encoder's CTC loss (needs model.encoder.ctc)
    init_lm: str = ""  # decoder (+ heads) from a pretrain-lm checkpoint or a Hugging Face LLaMA directory
    init_encoder: str = ""  # encoder (and CTC head) from a checkpoint, e.g. a CTC-pretrained one

    def __post_init__(self):
        super().__post_init__()
        if self.ctc_weight < 0:
            raise ConfigError(f"ctc_weight must be >= 0 (got {self.ctc_weight})")


@dataclass
class TextDataConfig:
    # Text files (one sentence per line, normalised on reading) or cut manifests (their transcripts).
    train_text: list = field(default_factory=list)
    valid_text: list = field(default_factory=list)
    tokenizer: str = ""
    max_tokens: int = 4096  # tokens per batch, padding included

    def __post_init__(self):
        if self.max_tokens < 8:
            raise ConfigError(f"data.max_tokens must be >= 8 (got {self.max_tokens})")


@dataclass
class LMTrainConfig(LoopConfig):
    decoder: LlamaConfig = field(default_factory=LlamaConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
