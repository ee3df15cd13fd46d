"""The inference engine loop: scheduler, paged KV cache, model runner, decode graphs, sampler, outputs."""
