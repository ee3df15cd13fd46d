"""Multi-LoRA: PEFT adapter loading, host LRU cache and device slots, batched LoRA math."""
