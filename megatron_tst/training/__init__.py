"""Training-side helpers: tokenizers for Megatron-Core datasets and the data tools."""
