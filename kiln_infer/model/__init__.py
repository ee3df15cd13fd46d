"""The Llama-family model: layer weights, the forward over the kernels it was built with, RoPE, attention."""
