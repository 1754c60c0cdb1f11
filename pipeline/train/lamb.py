"""LAMB (You et al., 2019), the one LAMB of this project: the same maths on every path.

Every path (ZeRO stage 0-3, fp32 / bf16 / fp16, CPU / GPU) runs this optimizer on DeepSpeed's fp32 master
weights. DeepSpeed's FusedLamb is not used: it applies the trust ratio to biases and LayerNorm too, clamps it
to [0.01, 10], and computes it from the uncorrected moments (folding bias correction into the step size:
early steps ~0.15-0.3x of this one's at BERT's warmup), so the same config would be another recipe on a GPU.

The update of a parameter ``w`` with gradient ``g`` at step ``t`` (Adam moments with bias correction,
decoupled weight decay, then the layer-wise trust ratio)::

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
    r = min(||w|| / ||u||, max_trust_ratio)   (1 when either norm is 0)     if the group adapts, else r = 1
    w = w - lr * r * u

Layer adaptation is a property of the parameter group (``layer_adaptation``), independent of its weight
decay: ``weight_decay: 0`` does not turn LAMB into Adam. The project's default (``optim.layer_adaptation:
weights``) adapts every weight matrix and embedding but not biases and LayerNorm, as Google's BERT LAMB
(``exclude_from_layer_adaptation``) and NVIDIA's recipe do.

ZeRO hands the optimizer flat fp32 partitions rather than parameters: stages 1-2 one flat tensor per group
(this rank's slice of all its parameters laid end to end), stage 3 one per sub-group (this rank's slice of
every parameter). A plain LAMB would compute one ratio over a slice of many parameters, cut at arbitrary
places (DeepSpeed issues 88, 490, 4187). A flat tensor may therefore carry a *partition layout*: the segments
that belong to each parameter. Partial squared norms are computed per segment, summed over the data-parallel
group (a parameter may straddle ranks), and each parameter's ratio applied to its segments.

Everything runs as multi-tensor (``torch._foreach_*``) kernels and nothing is read back to the host: the
trust ratios stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    tensor_id: int  # which original parameter (index within the layout)
    start: int  # offset in this rank's flat partition
    length: int


@dataclass
class PartitionLayout:
    segments: list[Segment]
    num_tensors: int
    process_group: object | None  # the data-parallel group to sum partial norms over (None: one rank)
    _ids: dict = field(default_factory=dict, repr=False)  # device -> the segments' tensor ids, built once

    def ids(self, device: torch.device) -> Tensor:
        if device not in self._ids:
            self._ids[device] = torch.tensor([s.tensor_id for s in self.segments], dtype=torch.long, device=device)
        return self._ids[device]


class Lamb(torch.optim.Optimizer):
    """LAMB with per-parameter trust ratios, also across ZeRO's flat partitions (``set_partition_layout``).

    Group options: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled; 0 = none) and
    ``layer_adaptation`` (apply the trust ratio; default ``True``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_trust_ratio: float = 10.0,
        layer_adaptation: bool = True,
    ):
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "layer_adaptation": layer_adaptation,
        }
        super().__init__(params, defaults)
        self.max_trust_ratio = max_trust_ratio
        self.layouts: dict[int, PartitionLayout] = {}  # id(flat tensor) -> its layout

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # Checkpoints written before the option: the old rule (adapt exactly the decayed groups).
            group.setdefault("layer_adaptation", group.get("weight_decay", 0) != 0)

    def set_partition_layout(self, flat: Tensor, layout: PartitionLayout) -> None:
        """Declare ``flat`` (a tensor this optimizer steps) to be a ZeRO partition laid out as ``layout``."""
        self.layouts[id(flat)] = layout

    def _trust_ratio(self, w_sq: Tensor, u_sq: Tensor) -> Tensor:
        w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        return ratio.clamp(max=self.max_trust_ratio)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype) for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1  # a host int: bias corrections are host scalars, not device reads
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        steps = [s["step"] for s in states]
        denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
        torch._foreach_div_(updates, denom)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["layer_adaptation"]:
            by_tensor = [(p, u) for p, u in zip(params, updates, strict=True) if id(p) not in self.layouts]
            if by_tensor:
                self._adapt_per_tensor([p for p, _ in by_tensor], [u for _, u in by_tensor])
            for p, u in zip(params, updates, strict=True):
                if id(p) in self.layouts:
                    self._adapt_partitioned(p, u, self.layouts[id(p)])
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _adapt_per_tensor(self, params: list[Tensor], updates: list[Tensor]) -> None:
        w_norms = torch.stack(torch._foreach_norm(params)).float()
        u_norms = torch.stack(torch._foreach_norm(updates)).float()
        ratios = self._trust_ratio(w_norms.pow(2), u_norms.pow(2))  # (num_tensors,), stays on the device
        torch._foreach_mul_(updates, list(ratios.to(updates[0].dtype).unbind()))

    def _adapt_partitioned(self, flat: Tensor, update: Tensor, layout: PartitionLayout) -> None:
        flat_1d, update_1d = flat.view(-1), update.view(-1)
        weights = [flat_1d.narrow(0, s.start, s.length) for s in layout.segments]
        updates = [update_1d.narrow(0, s.start, s.length) for s in layout.segments]
        sq = torch.zeros(2, layout.num_tensors, dtype=torch.float32, device=flat.device)
        if weights:
            ids = layout.ids(flat.device)
            sq[0].index_add_(0, ids, torch.stack(torch._foreach_norm(weights)).float().pow(2))
            sq[1].index_add_(0, ids, torch.stack(torch._foreach_norm(updates)).float().pow(2))
        if layout.process_group is not None and dist.is_initialized():
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=layout.process_group)
        if weights:
            ratios = self._trust_ratio(sq[0], sq[1])[layout.ids(flat.device)]  # (num_segments,)
            torch._foreach_mul_(updates, list(ratios.to(update.dtype).unbind()))


def _segments(sizes: list[int], paddings: list[int], lo: int, hi: int) -> list[Segment]:
    """Segments of ``[lo, hi)`` of a flat buffer holding tensors of ``sizes``, each followed by its padding."""
    segments, offset = [], 0
    for tensor_id, (size, padding) in enumerate(zip(sizes, paddings, strict=True)):
        a, b = max(offset, lo), min(offset + size, hi)
        if a < b:
            segments.append(Segment(tensor_id, a - lo, b - a))
        offset += size + padding
    return segments


def zero_partition_layouts(zero_optimizer) -> list[tuple[Tensor, PartitionLayout]]:
    """(flat fp32 partition, its layout) of a DeepSpeed ZeRO stage 1/2 or 3 optimizer, for this rank.

    Stages 1-2: the flat buffer of group ``i`` is ``round_robin_bit16_groups[i]`` laid end to end, each tensor
    followed by ``round_robin_bit16_padding[i]`` elements; rank ``r`` owns ``[r * partition_size, (r + 1) *
    partition_size)`` of it (``single_partition_of_fp32_groups[i]``). Stage 3: sub-group ``i``'s flat fp32
    partition (``fp32_partitioned_groups_flat[i]``) holds this rank's slice (``ds_tensor``) of each of its
    parameters, one after the other; a slice's zero padding (last rank) adds nothing to any norm.
    """
    out = []
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # stage 3
        for i, params in enumerate(zero_optimizer.fp16_groups):
            group = zero_optimizer.sub_group_process_groups[i]
            world = dist.get_world_size(group=group) if dist.is_initialized() else 1
            sizes = [p.partition_numel() for p in params]
            flat = zero_optimizer.fp32_partitioned_groups_flat[i]
            segments = _segments(sizes, [0] * len(sizes), 0, sum(sizes))
            out.append((flat, PartitionLayout(segments, len(params), group if world > 1 else None)))
        return out
    for i, tensors in enumerate(zero_optimizer.round_robin_bit16_groups):
        group = zero_optimizer.real_dp_process_group[i]
        rank = dist.get_rank(group=group) if dist.is_initialized() else 0
        world = dist.get_world_size(group=group) if dist.is_initialized() else 1
        size = zero_optimizer.partition_size[i]
        sizes = [t.numel() for t in tensors]
        segments = _segments(sizes, zero_optimizer.round_robin_bit16_padding[i], rank * size, (rank + 1) * size)
        flat = zero_optimizer.single_partition_of_fp32_groups[i]
        out.append((flat, PartitionLayout(segments, len(tensors), group if world > 1 else None)))
    return out
