"""The typed shape of every config node: one dataclass per node, registered in Hydra's ConfigStore as the schema the
options of each config group (conf/<group>/*.yaml) are validated against.

Values, and so every default, live in conf/ (the only home of defaults): each field here is MISSING, so a key that
conf/ forgets fails at composition, a misspelt key fails (the nodes are closed), and a value of the wrong type fails
with Hydra's message naming the key. Stage code then reads `cfg.key`, never `cfg.get(key, default)`.

Free-form nodes stay `Any`/`Dict`: data specs (a path, or {hub, split, columns}), the recipe, reward weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class RunConfig:
    retries: int = MISSING
    retry_delay_s: int = MISSING
    log_level: str = MISSING
    concurrent: bool = MISSING
    report_to: Any = MISSING         # a tracker name or a list of them
    image_max_width: int = MISSING
    image_max_kib: int = MISSING


@dataclass
class HardwareVllmConfig:
    tensor_parallel_size: Any = MISSING
    data_parallel_size: Any = MISSING  # int or auto
    gpu_memory_utilization: float = MISSING
    enforce_eager: bool = MISSING
    cpu_kvcache_space_gib: int = MISSING
    cpu_omp_threads_bind: Optional[str] = MISSING
    enable_sleep_mode: bool = MISSING
    auto_min_tokens: int = MISSING


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = MISSING
    bf16: bool = MISSING
    num_processes: Any = MISSING
    launcher: str = MISSING
    torch_threads: int = MISSING
    attn_implementation: str = MISSING
    gradient_checkpointing: bool = MISSING
    optim: str = MISSING
    vllm: HardwareVllmConfig = MISSING
    weights_dtype: str = MISSING
    master_weights: str = MISSING    # optimizer | model: where SFT keeps the fp32 master weights (precision.py)
    residual_dtype: str = MISSING    # bfloat16 | float32: SFT's residual stream under bf16 autocast on fp32 weights
    cudnn_attention: bool = MISSING
    varlen_kernel: str = MISSING     # auto | torch | fa_cute: the padding-free attention's kernel
    padding_free: bool = MISSING
    compile: Any = MISSING           # true | layers | backbone | false
    liger_kernels: bool = MISSING
    dataloader_workers: int = MISSING
    num_machines: int = MISSING
    node_launcher: Optional[str] = MISSING
    distributed_modules: Optional[List[str]] = MISSING
    distributed_timeout_s: int = MISSING
    fsdp: Optional[str] = MISSING
    fsdp_version: int = MISSING
    report_to: Any = MISSING         # ${run.report_to} (conf/config.yaml): trackers stay out of versions with hardware


@dataclass
class VerificationConfig:
    """conf/verification/: the bounded pool answer checks run in (stages/shared/rewards/verification.py)."""
    timeout_s: float = MISSING
    math_verify_timeout_s: int = MISSING
    retries: int = MISSING
    workers: Optional[int] = MISSING
    memory_mb: int = MISSING
    max_answer_chars: Optional[int] = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    language: str = MISSING
    code_language: str = MISSING
    code_share: Optional[float] = MISSING   # arith_code: share of code rows in the mixed files
    files: Dict[str, Any] = MISSING
    benchmarks: Dict[str, Any] = MISSING
    decontaminate_ngram: int = MISSING
    tokenizer_corpus: List[str] = MISSING


@dataclass
class SandboxConfig:
    python: str = MISSING
    cpu_s: float = MISSING
    wall_s: float = MISSING
    memory_mb: int = MISSING
    processes: int = MISSING
    file_mb: int = MISSING
    open_files: int = MISSING
    output_bytes: int = MISSING
    allow_without_namespaces: bool = MISSING


@dataclass
class ModelTokenizerConfig:
    corpus: List[str] = MISSING
    vocab_size: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING
    revision: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    tokenizer: Optional[ModelTokenizerConfig] = MISSING
    architecture: Optional[Dict[str, Any]] = MISSING


@dataclass
class StageNode:
    """What every verifying stage pulls in from the top of the config (conf/config.yaml) and from `data`."""
    seed: int = MISSING
    hardware: HardwareConfig = MISSING
    verification: VerificationConfig = MISSING
    sandbox: SandboxConfig = MISSING    # runs the tests of code rows
    code_language: str = MISSING        # data.code_language


@dataclass
class GrpoKnobs:
    """What both GRPO runs (reasoning_grpo and the alignment RL of merged_sft_alignment) set."""
    rewards: Dict[str, float] = MISSING
    num_generations: int = MISSING
    prompts_per_step: int = MISSING
    gradient_accumulation_steps: int = MISSING
    steps_per_rollout: int = MISSING
    max_steps: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_ratio: float = MISSING
    adam_epsilon: float = MISSING
    max_grad_norm: float = MISSING
    beta: float = MISSING
    epsilon: float = MISSING
    epsilon_high: Optional[float] = MISSING
    loss_type: str = MISSING
    scale_rewards: str = MISSING
    mask_truncated_completions: bool = MISSING
    top_entropy_quantile: float = MISSING
    sync_ref_model: bool = MISSING
    ref_model_sync_steps: int = MISSING
    ref_model_mixup_alpha: float = MISSING
    num_iterations: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_completion_length: int = MISSING
    use_vllm: bool = MISSING
    vllm_mode: str = MISSING
    logging_steps: int = MISSING
    save_steps: int = MISSING
    eval_steps: int = MISSING
    weight_decay: float = MISSING
    use_bias_correction_kl: bool = MISSING
    vllm_importance_sampling_correction: bool = MISSING
    vllm_importance_sampling_mode: str = MISSING
    vllm_importance_sampling_clip_max: Optional[float] = MISSING
    vllm_importance_sampling_clip_min: Optional[float] = MISSING
    delta: Optional[float] = MISSING
    importance_sampling_level: str = MISSING
    off_policy_mask_threshold: Optional[float] = MISSING
    shuffle_dataset: bool = MISSING


@dataclass
class SftKnobs:
    """What every chat SFT (cold_start_sft, the merged SFT, distill) sets."""
    max_samples: Optional[int] = MISSING
    num_train_epochs: int = MISSING
    max_steps: int = MISSING
    per_device_train_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_ratio: float = MISSING
    max_length: int = MISSING
    packing: bool = MISSING
    assistant_only_loss: bool = MISSING
    logging_steps: int = MISSING
    save_steps: int = MISSING


@dataclass
class BaseConfig(StageNode):
    model: ModelConfig = MISSING
    corpus: Any = MISSING
    eval_file: Any = MISSING
    max_steps: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    decay_ratio: float = MISSING
    warmup_ratio: float = MISSING
    weight_decay: float = MISSING
    max_length: int = MISSING
    packing: str = MISSING
    group_by_length: bool = MISSING
    logging_steps: int = MISSING
    save_steps: int = MISSING
    eval_samples: int = MISSING
    eval_max_new_tokens: int = MISSING
    eval_templates: List[str] = MISSING


@dataclass
class ColdStartSftLoraConfig:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: str = MISSING


@dataclass
class ColdStartSftConfig(SftKnobs, StageNode):
    train_file: Any = MISSING
    eval_file: Any = MISSING
    benchmarks: Dict[str, Any] = MISSING
    decontaminate_ngram: int = MISSING
    template: str = MISSING
    max_difficulty: Optional[int] = MISSING
    lora: ColdStartSftLoraConfig = MISSING
    eval_samples: int = MISSING
    eval_max_new_tokens: int = MISSING


@dataclass
class ReasoningGrpoConfig(GrpoKnobs, StageNode):
    train_file: Any = MISSING
    eval_file: Any = MISSING
    benchmarks: Dict[str, Any] = MISSING
    decontaminate_ngram: int = MISSING
    code_score: str = MISSING
    template: str = MISSING
    language: str = MISSING
    min_difficulty: Optional[int] = MISSING
    max_difficulty: Optional[int] = MISSING
    max_prompts: Optional[int] = MISSING
    eval_samples: int = MISSING
    eval_max_new_tokens: Optional[int] = MISSING


@dataclass
class RejectionSamplingFiltersConfig:
    correctness: bool = MISSING
    judge_model: Any = MISSING
    format: bool = MISSING
    language_consistency_min: Optional[float] = MISSING
    max_paragraph_chars: Optional[int] = MISSING
    code_blocks: bool = MISSING
    max_repeated_ngram_share: Optional[float] = MISSING
    truncation: bool = MISSING
    dedup: bool = MISSING
    max_accepted_per_prompt: Optional[int] = MISSING


@dataclass
class RejectionSamplingMergeConfig:
    reasoning_to_general_ratio: Optional[float] = MISSING
    max_general: Optional[int] = MISSING


@dataclass
class RejectionSamplingConfig(StageNode):
    prompts_file: Any = MISSING
    general_sft_file: Any = MISSING
    eval_file: Any = MISSING
    benchmarks: Dict[str, Any] = MISSING
    decontaminate_ngram: int = MISSING
    template: str = MISSING
    language: str = MISSING
    backend: str = MISSING
    max_prompts: Optional[int] = MISSING
    samples_per_prompt: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_tokens: int = MISSING
    max_model_len: Optional[int] = MISSING
    trust_remote_code: bool = MISSING
    shard_size: int = MISSING
    filters: RejectionSamplingFiltersConfig = MISSING
    merge: RejectionSamplingMergeConfig = MISSING


@dataclass
class RewardModelNodeConfig:
    seed: int = MISSING
    hardware: HardwareConfig = MISSING
    source: str = MISSING
    revision: Optional[str] = MISSING
    scope: str = MISSING
    pairs_file: Any = MISSING
    eval_pairs_file: Any = MISSING
    num_train_epochs: int = MISSING
    max_steps: int = MISSING
    per_device_train_batch_size: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_ratio: float = MISSING
    center_rewards_coefficient: float = MISSING
    max_length: int = MISSING
    logging_steps: int = MISSING
    save_steps: int = MISSING
    gradient_accumulation_steps: int = MISSING


@dataclass
class RewardModelConfig:
    helpfulness: RewardModelNodeConfig = MISSING
    harmlessness: RewardModelNodeConfig = MISSING


@dataclass
class MergedSftAlignmentSftConfig(SftKnobs):
    """The merged SFT of the base model: the chat SFT knobs only."""


@dataclass
class MergedSftAlignmentAlignmentConfig(GrpoKnobs):
    reasoning_prompts_file: Any = MISSING
    general_prompts_file: Any = MISSING
    eval_general_prompts: int = MISSING
    general_share: float = MISSING
    preference_rewards_from: float = MISSING
    rm_batch_size: int = MISSING
    code_score: str = MISSING


@dataclass
class MergedSftAlignmentConfig(StageNode):
    language: str = MISSING
    template: str = MISSING
    eval_file: Any = MISSING
    benchmarks: Dict[str, Any] = MISSING
    decontaminate_ngram: int = MISSING
    eval_samples: int = MISSING
    eval_max_new_tokens: int = MISSING
    eval_rm_samples: int = MISSING
    eval_rm_temperature: float = MISSING
    sft: MergedSftAlignmentSftConfig = MISSING
    alignment: MergedSftAlignmentAlignmentConfig = MISSING


@dataclass
class DistillConfig(SftKnobs, StageNode):
    student_base: BaseConfig = MISSING
    eval_file: Any = MISSING
    template: str = MISSING
    eval_samples: int = MISSING
    eval_max_new_tokens: int = MISSING


@dataclass
class EvaluateConfig(StageNode):
    eval_file: Any = MISSING
    benchmarks: Dict[str, Any] = MISSING
    template: str = MISSING
    think_prefilled: bool = MISSING
    language: str = MISSING
    backend: str = MISSING
    num_samples: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_tokens: int = MISSING
    max_model_len: Optional[int] = MISSING
    max_questions: Optional[int] = MISSING
    vote_equivalence: bool = MISSING
    shard_questions: int = MISSING
    keep_texts: int = MISSING
    trust_remote_code: bool = MISSING


@dataclass
class ReportConfig:
    title: str = MISSING
    recipe: str = MISSING


# config group -> the schema of its options (each option's defaults list names `schema` first)
GROUPS = {"base": BaseConfig, "cold_start_sft": ColdStartSftConfig, "reasoning_grpo": ReasoningGrpoConfig,
          "rejection_sampling": RejectionSamplingConfig, "reward_model": RewardModelConfig,
          "merged_sft_alignment": MergedSftAlignmentConfig, "distill": DistillConfig, "evaluate": EvaluateConfig,
          "report": ReportConfig, "hardware": HardwareConfig, "verification": VerificationConfig, "data": DataConfig,
          "model": ModelConfig, "sandbox": SandboxConfig}


def register() -> None:
    """Make each group's schema known to Hydra as `<group>/schema`."""
    from hydra.core.config_store import ConfigStore

    for group, node in GROUPS.items():
        ConfigStore.instance().store(group=group, name="schema", node=node)
