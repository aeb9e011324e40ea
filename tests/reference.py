"""Independent float64 references, written with explicit loops (no code shared with megatron_tst)."""

import math

import torch


def slot_weight(j: int, weighting: str) -> float:
    """g(i) for the 0-based slot j (i = j + 1)."""
    i = j + 1
    return {"uniform": 1.0, "power": 1.0 / i, "exp": math.exp(-i), "first": 1.0 if i == 1 else 0.0}[weighting]


def mce_reference(logits_full, targets, ignore_index=-100, weighting="uniform"):
    """Per-position MCE [L, b] in float64 from full-vocab logits [L, b, V] and targets [L, b, s].

    'first' takes the earliest valid target (the documented rule when slot 1 is masked).
    """
    log_probs = torch.log_softmax(logits_full.double(), dim=-1)
    length, batch, bag = targets.shape
    rows = []
    for p in range(length):
        row = []
        for b in range(batch):
            valid = [j for j in range(bag) if int(targets[p, b, j]) != ignore_index]
            if weighting == "first":
                valid = valid[:1]
                weights = {j: 1.0 for j in valid}
            else:
                weights = {j: slot_weight(j, weighting) for j in valid}
            norm = sum(weights.values())
            total = log_probs.new_zeros(())
            for j in valid:
                total = total - weights[j] / norm * log_probs[p, b, int(targets[p, b, j])]
            row.append(total)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def superposed_reference(weight_full, tokens_bt, bag_size):
    """Bag-mean embeddings [L, b, h] in float64 from a full embedding table [V, h]."""
    batch, length = tokens_bt.shape
    out = torch.zeros(length // bag_size, batch, weight_full.shape[1], dtype=torch.float64)
    for b in range(batch):
        for p in range(length // bag_size):
            for j in range(bag_size):
                out[p, b] += weight_full[int(tokens_bt[b, p * bag_size + j])].double()
            out[p, b] /= bag_size
    return out


def random_targets(length, batch, bag, vocab, *, ignore_index=-100, p_ignore=0.2, p_dup=0.3, seed=0):
    """Targets [L, b, s] with ignored slots, duplicates within bags, and a few fully ignored positions."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (length, batch, bag), generator=g)
    dup = torch.rand(length, batch, bag, generator=g) < p_dup
    targets = torch.where(dup, targets[..., :1].expand_as(targets), targets)
    ignored = torch.rand(length, batch, bag, generator=g) < p_ignore
    targets = torch.where(ignored, torch.full_like(targets, ignore_index), targets)
    targets[0, 0, :] = ignore_index  # a position with no target at all
    if bag > 1:
        targets[1, 0, 0] = ignore_index  # slot 1 masked, later slots valid
        targets[1, 0, 1] = 3
    return targets
