"""Global (unsharded) views of a sharded Megatron model, for comparing parallel layouts.

Megatron's `sharded_state_dict` describes where every local parameter shard sits in its global tensor
(TP splits, pipeline-stage layer offsets, expert offsets, SwiGLU's split fc1). These helpers use exactly that
description to (a) gather any per-parameter tensor (weights, gradients) into full global tensors on every
rank, and (b) load full global tensors into a model built at any layout. So a model at TP=2/PP=2/EP=2 can be
given the weights of a TP=PP=EP=1 model and its gradients compared key by key.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.utils import unwrap_model


def _entries(model_chunks) -> Iterator[Tuple[torch.nn.Parameter, Callable[[torch.Tensor], List[ShardedTensor]]]]:
    """(parameter, f) pairs: f(t) maps a tensor shaped like the parameter to its ShardedTensors."""
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for chunk in model_chunks:
        sharded = unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensorFactory) and isinstance(item.data, torch.nn.Parameter):
                # In a list: a build_fn may return one bare ShardedTensor (e.g. the non-GLU expert weights).
                yield item.data, (lambda t, f=item: [
                    st for st in nested_values([f.build_fn(f.key, t, f.replica_id, None)])
                    if isinstance(st, ShardedTensor)
                ])
            elif isinstance(item, ShardedTensor) and isinstance(item.data, torch.nn.Parameter):
                yield item.data, (lambda t, st=item: [dataclasses.replace(st, data=t)])


def gather_global(model_chunks: Sequence[torch.nn.Module],
                  tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.detach()
                  ) -> Dict[str, torch.Tensor]:
    """{key: full global float64 tensor} of `tensor_of(param)` over all parameters, on every rank.

    Only main replicas contribute, so replicated parameters (TP-replicated norms, DP copies) count once;
    the caller makes sure replicas agree (e.g. gradients after `finalize_model_grads`).
    """
    partial: Dict[str, torch.Tensor] = {}
    for param, shards_of in _entries(model_chunks):
        value = tensor_of(param)
        for st in shards_of(value):
            full = partial.setdefault(st.key, torch.zeros(st.global_shape, dtype=torch.float64))
            if is_main_replica(st.replica_id):
                full[st.global_slice()] += st.data.detach().double()
    keys = sorted(partial)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Keys present on some ranks only (other pipeline stages) must be summed too: agree on the union.
        all_keys: List[List[str]] = [None] * dist.get_world_size()
        shapes = {k: tuple(v.shape) for k, v in partial.items()}
        dist.all_gather_object(all_keys, sorted(shapes.items()))
        union = dict(kv for rank_keys in all_keys for kv in rank_keys)
        keys = sorted(union)
        for key in keys:
            full = partial.setdefault(key, torch.zeros(union[key], dtype=torch.float64))
            dist.all_reduce(full)
    return {key: partial[key] for key in keys}


def load_global(model_chunks: Sequence[torch.nn.Module], global_tensors: Dict[str, torch.Tensor]) -> None:
    """Copy each parameter's shard out of full global tensors (e.g. from `gather_global` at TP=1)."""
    with torch.no_grad():
        for param, shards_of in _entries(model_chunks):
            for st in shards_of(param.data):
                if st.key not in global_tensors:
                    raise KeyError(f"no global tensor for {st.key}")
                source = global_tensors[st.key]
                if tuple(source.shape) != tuple(st.global_shape):
                    raise ValueError(f"{st.key}: global shape {tuple(source.shape)} != {tuple(st.global_shape)}")
                st.data.copy_(source[st.global_slice()].to(st.data.dtype))
