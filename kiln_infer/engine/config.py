"""Engine configuration: one frozen dataclass built at the entry point and validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and switches of the inference engine."""

    max_num_seqs: int = 64  # sequences decoded together in one step
    # background requests (kiln-train's answers) running at once: a burst of them can't swell users' steps;
    # None = no cap beyond max_num_seqs
    max_background_seqs: int | None = None
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None = derive from kv_memory_fraction (CUDA) or max_model_len (CPU)
    kv_memory_fraction: float = (
        0.5  # share of free device memory given to the KV cache when num_kv_blocks is None
    )
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    max_lora_slots: int = 4  # adapters resident on the device at once
    max_lora_rank: int = 64
    max_cpu_loras: int = 32  # adapters kept in the host LRU cache behind the slots
    max_waiting: int = 1024  # queued requests before submit() raises EngineOverloadedError
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    use_cuda_graphs: bool = True  # decode steps replay captured graphs on CUDA
    overlap_steps: bool = True  # with static decode: launch the next decode before streaming the last one
    static_decode: bool | None = None  # padded fixed-shape decode steps; None = on CUDA only (graphs need it)
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # with static decode: steps that carry prefill chunks, up to this many tokens in all, run on static
    # buffers too (CUDA graphs per token bucket); () = such steps always run eagerly
    cuda_graph_token_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    seed: int = 0  # generator for requests without their own seed
    max_queue_time_s: float | None = (
        None  # a request still waiting to start after this long ends QUEUE_TIMEOUT
    )

    def __post_init__(self) -> None:
        """Reject impossible combinations with a message naming the field."""
        positive = (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_model_len",
            "max_lora_slots",
            "max_lora_rank",
            "max_cpu_loras",
            "max_waiting",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < self.blocks_per_seq:
            raise ValueError(
                f"EngineConfig.num_kv_blocks={self.num_kv_blocks} cannot hold one sequence of max_model_len="
                f"{self.max_model_len} ({self.blocks_per_seq} blocks of {self.block_size})"
            )
        if not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(
                f"EngineConfig.kv_memory_fraction must be in (0, 1), got {self.kv_memory_fraction}"
            )
        if self.max_background_seqs is not None and self.max_background_seqs <= 0:
            raise ValueError(f"EngineConfig.max_background_seqs must be > 0, got {self.max_background_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "EngineConfig.max_num_batched_tokens must be >= max_num_seqs (one token per decode)"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "EngineConfig.max_num_batched_tokens must be >= max_model_len without chunked prefill"
            )
        if self.max_cpu_loras < self.max_lora_slots:
            raise ValueError("EngineConfig.max_cpu_loras must be >= max_lora_slots")
        if any(b <= 0 for b in self.cuda_graph_batch_sizes):
            raise ValueError("EngineConfig.cuda_graph_batch_sizes must be positive")
        if any(t <= 0 for t in self.cuda_graph_token_sizes):
            raise ValueError("EngineConfig.cuda_graph_token_sizes must be positive")

    @property
    def blocks_per_seq(self) -> int:
        """KV blocks one sequence of max_model_len needs."""
        return -(-self.max_model_len // self.block_size)
