"""Platform adaptations. Only `cpu` exists: megatron-core on machines without CUDA."""
