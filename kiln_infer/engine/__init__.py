"""The inference engine: scheduler, paged KV cache, model runner, batched multi-LoRA, sampler."""
