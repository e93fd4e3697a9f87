"""DeepSpeed ZeRO (stages 1, 2 and 3): a blockopt optimizer stepping DeepSpeed's flat partitions.

Under ZeRO, DeepSpeed hands its client optimizer flat fp32 partitions instead of parameters: it
replaces each param group's ``params`` by one flat tensor ``F`` (stages 1 and 2: this rank's
``1/world`` slice of the whole group flattened, ``single_partition_of_fp32_groups``; stage 3: the
concatenated ``ds_tensor`` partitions of each parameter of a sub group,
``fp32_partitioned_groups_flat``), and calls ``optimizer.step()`` once per group (stages 1, 2) or
per sub group (stage 3) with ``F.grad`` set.

Note [ZeRO partitions as pieces]: ``F`` is a run of contiguous ranges of flattened parameters. A
range ``[a, b)`` of a parameter's flattened tensor is, in row-major order, at most ``2 * ndim - 1``
boxes (`flat_boxes`: a partial row, whole rows, a partial row, recursively), each a contiguous run
of ``F`` that can be viewed in its box shape. Each box is one *piece*: a tensor of the step, with
a `ShardView` of its parameter's `BlockSpec` (blocks whole in it need nothing; blocks met by
several boxes, on this rank or others, are cut) or the spec itself when the box is the whole
parameter. So row blocks, heads, and the strided column blocks of a ``Conv1D`` weight all get
exact ``block_sum``/``expand`` with the reshape paths of a spec, and the step's math is unchanged.
Which ranges every rank holds is known from DeepSpeed's partition sizes alone, so every rank lays
out the all-reduce buffer of cut blocks identically without communicating.

The state of ``F`` is ``{"pieces": [per-piece state]}``, each piece's dict naming its parameter
(``"param"``), box (``"box"``) and global block ids (``"blocks"``), so a ZeRO checkpoint converts
to a one-process state dict without DeepSpeed or the model (`blockopt.deepspeed`).

Note [finding the ZeRO optimizer]: a blockopt optimizer is passed to ``deepspeed.initialize`` (or
to the HF Trainer with ``deepspeed=``) like any torch optimizer. When its groups hold tensors it was
not built with, it is being stepped (or loaded) by DeepSpeed's ZeRO optimizer, which is found on
the call stack: the caller whose ``.optimizer`` is this optimizer. Its partition bookkeeping
(parameter order, offsets, partition sizes, process group) is read once.

Note [one all-reduce per client step]: DeepSpeed steps its client once per param group (stages 1,
2) or sub group (stage 3), and builds each group's gradient partition only just before stepping it
(holding all of them at once would undo ZeRO-2's memory saving), so the cut blocks of a group are
summed with one all-reduce per such call: one per optimizer step with one param group.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..partition import BlockSpec
from .collectives import Collectives
from .shard import Box, ShardView, as_segments, block_runs, global_block_sizes, id_ranges

PIECES = "pieces"  # the state key of a flat partition: one dict per piece
LABELS = ("param", "box", "blocks")  # what names a piece in its state dict (the rest is the optimizer's)

Range = tuple[int, int]  # [start, stop) of a flattened parameter


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Elements ``start .. stop-1`` of a tensor of ``shape`` (row-major) as boxes, in order; each
    box is a contiguous run of the flattened tensor. At most ``2 * len(shape) - 1`` boxes."""
    if start >= stop:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    first = start // inner
    if first == (stop - 1) // inner and (start % inner or stop - start < inner):  # inside one row
        return [((first, 1), *box) for box in flat_boxes(shape[1:], start - first * inner, stop - first * inner)]
    whole_from, whole_to = -(-start // inner), stop // inner
    boxes = []
    if start % inner:
        boxes += [((first, 1), *box) for box in flat_boxes(shape[1:], start % inner, inner)]
    if whole_to > whole_from:
        boxes.append(((whole_from, whole_to - whole_from), *((0, n) for n in shape[1:])))
    if stop % inner:
        boxes += [((whole_to, 1), *box) for box in flat_boxes(shape[1:], 0, stop % inner)]
    return boxes


@dataclass(frozen=True, eq=False)
class Piece:
    """One box of a parameter held in a flat partition (Note [ZeRO partitions as pieces])."""

    name: str  # the parameter
    offset: int  # where the box starts in the flat partition
    box: Box  # (start, size) per dim of the parameter
    layout: BlockSpec | ShardView  # the spec itself when the box is the whole parameter
    ndim: int  # the parameter's (its weight decay follows it)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.box)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def spec(self) -> BlockSpec:
        """The parameter's (global) layout."""
        return self.layout.spec if isinstance(self.layout, ShardView) else self.layout

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """Global block ids of the piece's blocks, as ``(start, stop)`` ranges."""
        return self.layout.ranges if isinstance(self.layout, ShardView) else ((0, self.layout.n_blocks),)

    def labels(self) -> dict[str, Any]:
        return {"param": self.name, "box": self.box, "blocks": self.blocks}


class FlatPartition:
    """The pieces this rank holds of one flat partition, and where their cut blocks go in the
    partition's all-reduce buffer (laid out by parameter, then global block id: the same on
    every rank).

    ``params``: every parameter of the partition's group, in DeepSpeed's order, as
    ``(name, spec, the range of its flattened tensor each rank holds, where this rank's range
    starts in the flat partition)``.
    """

    def __init__(self, params: list[tuple[str, BlockSpec, list[Range], int]], rank: int):
        self.pieces: list[Piece] = []
        self.slots: dict[int, tuple[Tensor, Tensor]] = {}  # id(layout) -> (cut local blocks, buffer slots)
        self.n_cut = 0
        self.holders = [0] * len(params[0][2]) if params else []  # pieces per rank
        for name, spec, ranges, offset in params:
            boxes = [flat_boxes(spec.shape, a, b) for a, b in ranges]
            if sum(b - a for a, b in ranges) != spec.numel:
                raise RuntimeError(f"{name}: the ZeRO partitions hold {sum(b - a for a, b in ranges)} of its {spec.numel} elements")
            for r, held in enumerate(boxes):
                self.holders[r] += len(held)
            runs = {(r, j): block_runs(spec, box) for r, held in enumerate(boxes) for j, box in enumerate(held)}
            met: dict[int, list[tuple[int, int]]] = {}
            for key, (ids, _) in runs.items():
                for i in ids:
                    met.setdefault(i, []).append(key)
            cut = sorted(i for i, keys in met.items() if len(keys) > 1)
            union, cut_set = torch.tensor(cut, dtype=torch.int64), set(cut)
            position = offset
            for j, box in enumerate(boxes[rank]):
                layout = spec if len(boxes[rank]) == 1 and box == tuple((0, n) for n in spec.shape) else \
                    _box_view(spec, box, runs[rank, j], union, cut_set, [met[i][0] == (rank, j) for i in runs[rank, j][0]])
                piece = Piece(name, position, box, layout, len(spec.shape))
                self.pieces.append(piece)
                position += piece.numel
                if isinstance(layout, ShardView) and len(layout.shared):
                    self.slots[id(layout)] = (layout.shared, self.n_cut + torch.searchsorted(union, layout.shared_ids))
            self.n_cut += len(cut)


def _box_view(spec: BlockSpec, box: Box, run: tuple[list[int], list[int]], cut: Tensor, cut_set: set[int],
              owned: list[bool]) -> ShardView:
    """The `ShardView` of ``spec`` over one box (as FSDP's; the process group is `ZeroCollectives`')."""
    ids, lengths = run
    sizes = global_block_sizes(spec)
    global_sizes = float(sizes[0]) if len(set(sizes)) == 1 else torch.tensor([float(sizes[i]) for i in ids], dtype=torch.float64)
    shared = [j for j, i in enumerate(ids) if i in cut_set]
    local = BlockSpec(
        name=spec.name, shape=tuple(size for _, size in box), rule=spec.rule, reason=spec.reason, role=spec.role,
        block_dims=spec.block_dims, segments=as_segments(lengths), n_heads=spec.n_heads,
    )
    return ShardView(
        spec=spec, local=local, ranges=id_ranges(ids), shared=torch.tensor(shared, dtype=torch.int64),
        shared_ids=torch.tensor([ids[j] for j in shared], dtype=torch.int64), shared_union=cut,
        owned=torch.tensor(owned, dtype=torch.bool), global_sizes=global_sizes, mesh=None, reduce_mesh_dims=(), box=box,
    )


class ZeroCollectives(Collectives):
    """The collectives of a step over flat partitions: the cut blocks of every partition the
    layouts belong to summed with one all-reduce over DeepSpeed's data-parallel group."""

    def __init__(self, partitions: list[FlatPartition], group):
        self.group = group
        self._partition_of = {id(piece.layout): k for k, part in enumerate(partitions) for piece in part.pieces}
        self._partitions = partitions

    def _buffer_offsets(self, layouts) -> dict[int, int]:
        # the same partitions (all pieces of them) are stepped together on every rank
        present = sorted({self._partition_of[id(layout)] for layout in layouts})
        offsets, size = {}, 0
        for k in present:
            offsets[k] = size
            size += self._partitions[k].n_cut
        offsets[-1] = size
        return offsets

    def cuts_blocks(self, layouts) -> bool:
        return self._buffer_offsets(layouts)[-1] > 0

    def sum_blocks(self, sums: list[Tensor], layouts) -> None:
        offsets = self._buffer_offsets(layouts)
        if offsets[-1] == 0:
            return
        like = sums[0]
        buffer = like.new_zeros((offsets[-1], *like.shape[1:]))
        entries = []
        for s, layout in zip(sums, layouts):
            k = self._partition_of[id(layout)]
            slot = self._partitions[k].slots.get(id(layout))
            if slot is not None:
                local, at = slot[0].to(s.device), (slot[1] + offsets[k]).to(s.device)
                buffer.index_add_(0, at, s[local])  # a block met twice here (a column's head and tail rows) adds up
                entries.append((s, local, at))
        dist.all_reduce(buffer, group=self.group)
        for s, local, at in entries:
            s[local] = buffer[at]

    def max_(self, values: Tensor, layouts) -> None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)

    def rows(self, layout):
        raise NotImplementedError(f"{layout.name}: row-sharded factors are not kept on ZeRO partitions")


class ZeroPartitions:
    """A blockopt optimizer's view of DeepSpeed's ZeRO optimizer: the pieces of each flat
    partition (keyed by the partition tensor) and the step's `ZeroCollectives`."""

    def __init__(self, partitions: list[tuple[Tensor, FlatPartition]], group, stage: int):
        self.stage = stage
        self._by_flat = {id(flat): (flat, part) for flat, part in partitions}
        self.collectives = ZeroCollectives([part for _, part in partitions], group)

    @property
    def partitions(self) -> list[FlatPartition]:
        """Every flat partition's pieces on this rank."""
        return [part for _, part in self._by_flat.values()]

    def partition(self, flat: Tensor) -> FlatPartition:
        kept = self._by_flat.get(id(flat))
        if kept is None or kept[0] is not flat:
            raise RuntimeError(
                f"a param group holds a tensor of shape {tuple(flat.shape)} that is none of DeepSpeed's ZeRO partitions "
                "of this optimizer: add parameters before deepspeed.initialize, not after"
            )
        return kept[1]

    def gather(self, optimizer, group: dict, skip=()):
        """The group's pieces as a step's batch (`BlockwiseOptimizer._gather` under ZeRO), their
        state created on first use by the optimizer's ``_gather_state``."""
        batch = optimizer._Batch(group)
        weight_decay, decay_1d = group["weight_decay"], group["decay_1d"]
        for flat in group["params"]:
            if flat.grad is None or id(flat) in skip:
                continue
            part = self.partition(flat)
            states = optimizer.state[flat].setdefault(PIECES, [p.labels() for p in part.pieces])
            values, grads = flat.detach(), flat.grad
            for piece, state in zip(part.pieces, states):
                at = slice(piece.offset, piece.offset + piece.numel)
                batch.names.append(piece.name)
                batch.params.append(values[at].view(piece.shape))
                batch.grads.append(grads[at].view(piece.shape))
                batch.layouts.append(piece.layout)
                batch.weight_decays.append(weight_decay if decay_1d or piece.ndim >= 2 else 0.0)
                new = len(state) == len(LABELS)
                optimizer._gather_state(batch, piece.name, batch.params[-1], piece.layout, state, True)
                if new:
                    _check_piece_state(optimizer, piece, state)
        return batch

    def loadable(self, optimizer, state_dict: dict) -> dict:
        """``state_dict`` as this rank loads it, or a refusal before anything is applied: its
        pieces must be this rank's, each holding what this optimizer keeps for it (Note [loading
        ZeRO state]). Returns it with the live ``implementation`` and ``param_rounding`` kept."""
        for flat, saved in _saved_entries(optimizer, state_dict):
            pieces = saved.get(PIECES) if isinstance(saved, dict) else None
            expected = [(p.name, p.box) for p in self.partition(flat).pieces]
            got = [(s.get("param"), tuple(tuple(d) for d in s.get("box", ()))) for s in pieces] if isinstance(pieces, list) else None
            if got != expected:
                raise ValueError(
                    "the optimizer state does not hold this rank's ZeRO partition (saved at another world size, "
                    "stage or model?): convert it with `blockopt zero-to-state` and load the one-process state "
                    "with blockopt.deepspeed.load_state(engine, state)"
                )
            for piece, piece_state in zip(self.partition(flat).pieces, pieces):
                _check_saved_piece(optimizer, piece, piece_state)
        groups = []
        for index, (saved, live) in enumerate(zip(state_dict["param_groups"], optimizer.param_groups)):
            if _storage(saved.get("momentum_dtype")) != _storage(live.get("momentum_dtype")):
                raise ValueError(
                    f"param group {index} of the state dict was saved with momentum_dtype={saved.get('momentum_dtype')!r}, "
                    f"this optimizer keeps {live.get('momentum_dtype')!r}: under ZeRO a checkpoint loads into the storage "
                    "it was saved with. Build the optimizer with the saved momentum_dtype, or convert the checkpoint "
                    "(`blockopt zero-to-state`) and load it into a one-process optimizer, which converts"
                )
            groups.append({**saved, **{k: live[k] for k in ("implementation", "param_rounding", "momentum_dtype") if k in live}})
        return {**state_dict, "param_groups": groups}

    def restore_loaded(self, optimizer, state_dict: dict) -> None:
        """After torch's load, which casts every floating tensor of the pieces to the flat
        partition's float32: the saved tensors back as they were saved (a bf16 momentum stays bf16)."""
        for flat, saved in _saved_entries(optimizer, state_dict):
            for live, piece_state in zip(optimizer.state[flat][PIECES], saved[PIECES]):
                for key, value in piece_state.items():
                    if isinstance(value, Tensor) and value.is_floating_point():
                        live[key] = value.to(device=flat.device, copy=True)


def _saved_entries(optimizer, state_dict: dict):
    """``(flat partition, its saved entry)`` for every flat partition the state dict holds state of."""
    flats = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for saved_id, flat in zip(saved_ids, flats):
        saved = state_dict["state"].get(saved_id)
        if saved:
            yield flat, saved


# Note [loading ZeRO state]: one process checks a saved entry against the shapes its optimizer
# keeps for the parameter; under ZeRO an entry is a flat partition's pieces, so each piece is
# checked the same way: a tensor shaped like its box, or one value per block meeting it for a block
# statistic, and a stepped piece holds the block statistic. A checkpoint of another optimizer or of
# another plan (heads planned as rows) is refused here, not at the step after the load.
def _check_saved_piece(optimizer, piece: Piece, state: Any) -> None:
    where = f"the ZeRO state of {piece.name!r} (box {piece.box})"
    if not isinstance(state, dict):
        raise ValueError(f"{where} is a {type(state).__name__}, not a dict: it was not saved by a blockopt optimizer")
    held = {k: v for k, v in state.items() if k not in LABELS}
    if held and optimizer._STAT_KEYS and optimizer._STAT_KEYS[0] not in held:
        raise ValueError(f"{where} has no {optimizer._STAT_KEYS[0]!r} (it has {sorted(held)}): it was saved by another optimizer")
    n_blocks = piece.layout.n_blocks
    for key, value in held.items():
        if not isinstance(value, Tensor) or value.ndim == 0 or tuple(value.shape) == piece.shape:
            continue
        if key in optimizer._STAT_KEYS:
            if tuple(value.shape) == (n_blocks,):
                continue
            raise ValueError(
                f"state {key!r} of {where} has shape {tuple(value.shape)}, this optimizer expects ({n_blocks},) "
                f"({piece.spec.rule}): the saving optimizer partitioned it differently; build both the same way "
                "(the same model form, or plan=saved_optimizer.plan)"
            )
        raise ValueError(f"state {key!r} of {where} has shape {tuple(value.shape)}, this optimizer expects {piece.shape}: "
                         "it was saved with other settings or for another model")


def _storage(momentum_dtype: str | None) -> str:
    """What a ZeRO flat partition's momentum is kept in (its parameters are float32)."""
    return "float32" if momentum_dtype is None else momentum_dtype


def _check_piece_state(optimizer, piece: Piece, state: dict) -> None:
    """A piece's state must be what a flat partition can hold exactly: scalars, tensors shaped
    like the piece, or one value per block for block statistics."""
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.ndim == 0 or tuple(value.shape) == piece.shape:
            continue
        if key in optimizer._STAT_KEYS and tuple(value.shape) == (piece.layout.n_blocks,):
            continue
        raise NotImplementedError(
            f"{type(optimizer).__name__} keeps state {key!r} of {piece.name} in shape {tuple(value.shape)}, which needs "
            f"whole rows and columns of the matrix; DeepSpeed ZeRO cuts {piece.name} into flat ranges. "
            "For AdaPM give that role 'full' or 'none' momentum under ZeRO (momentum={'<role>': 'full'}), "
            "or shard with FSDP2 (docs/deepspeed.md)"
        )


# ---- finding DeepSpeed's ZeRO optimizer and reading its partitions -------------------------
def _is_zero_optimizer(owner) -> bool:
    return hasattr(owner, "round_robin_bit16_groups") or hasattr(owner, "fp32_partitioned_groups_flat")


def find_zero_optimizer(optimizer, depth: int = 24):
    """The wrapper on the call stack whose ``.optimizer`` is ``optimizer`` (DeepSpeed's ZeRO
    optimizer: Note [finding the ZeRO optimizer]), or ``None``."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not optimizer and getattr(owner, "optimizer", None) is optimizer:
            return owner
        frame = frame.f_back
    return None


def zero_partitions(optimizer) -> ZeroPartitions | None:
    """The `ZeroPartitions` of ``optimizer`` when DeepSpeed ZeRO has replaced its groups' tensors
    by flat partitions (read once, then kept), else ``None``."""
    zero = optimizer.__dict__.get("_zero")
    if zero is not None:
        return zero
    names = optimizer.__dict__.get("_names_by_id", {})
    if all(not g["params"] or (len(g["params"]) == len(g["param_names"]) and id(g["params"][0]) in names)
           for g in optimizer.param_groups):
        return None
    owner = find_zero_optimizer(optimizer)
    if owner is None:  # (an optimizer wrapped by DeepSpeed is always called from its wrapper)
        raise RuntimeError(
            f"{type(optimizer).__name__}'s param groups hold tensors it was not built with, and no DeepSpeed ZeRO "
            "optimizer is stepping it: change parameters with add_param_group, not by editing param_groups"
        )
    zero = optimizer._zero = read_partitions(owner, optimizer)
    return zero


def _named(param, names: dict[int, str], optimizer) -> tuple[str, BlockSpec]:
    name = names.get(id(param))
    if name is None:
        raise RuntimeError(f"DeepSpeed steps a parameter of shape {tuple(param.shape)} that {type(optimizer).__name__} was not built with")
    spec = optimizer.block_spec(name)
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if shape != tuple(spec.shape):
        raise RuntimeError(f"{name}: the plan says shape {tuple(spec.shape)}, DeepSpeed holds {shape}")
    return name, spec


def read_partitions(zero, optimizer) -> ZeroPartitions:
    """What each rank holds of every parameter, from DeepSpeed's ZeRO optimizer ``zero`` (stage 1
    or 2: ``DeepSpeedZeroOptimizer``; stage 3: ``DeepSpeedZeroOptimizer_Stage3``)."""
    if not _is_zero_optimizer(zero):
        raise NotImplementedError(
            f"{type(optimizer).__name__} is stepped by DeepSpeed's {type(zero).__name__}, which hands it copies of the "
            "parameters that blockopt cannot name (DeepSpeed steps through such a wrapper for bf16 at ZeRO stage 0, "
            "and for bf16 with fp32 gradient accumulation at stage 1): use ZeRO stage 2 or 3, or stage 1 with the "
            "default gradient accumulation dtype"
        )
    if any(g.get("normalize") for g in optimizer.param_groups):
        raise NotImplementedError(
            "SGDSaI(normalize=True) under DeepSpeed ZeRO: stage 3 steps sub groups one by one, so a group's largest "
            "gsnr is not known when its first sub group steps; use normalize=False"
        )
    quantized = next((g["momentum_dtype"] for g in optimizer.param_groups if g.get("momentum_dtype") in ("int8", "int4")), None)
    if quantized:
        raise NotImplementedError(
            f"momentum_dtype={quantized!r} under DeepSpeed ZeRO: ZeRO cuts parameters into flat ranges, which cut the "
            f"{quantized} codes' chunks (one scale per 256 elements of a row); use momentum_dtype='bfloat16' (exact "
            "under ZeRO), or shard with FSDP2, where int8/int4 momentum works (docs/compressed-state.md)"
        )
    names = optimizer.__dict__.get("_names_by_id", {})
    partitions = []
    if hasattr(zero, "round_robin_bit16_groups"):  # stages 1 and 2: the whole group flattened, cut in world equal parts
        stage, groups = 2 if zero.partition_gradients else 1, set(map(id, zero.real_dp_process_group))
        group = zero.real_dp_process_group[0]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        for i, params in enumerate(zero.round_robin_bit16_groups):
            size, entries = zero.partition_size[i], []
            for param, start in zip(params, zero.round_robin_bit16_offsets[i]):
                name, spec = _named(param, names, optimizer)
                n = spec.numel
                ranges = [(min(max(r * size - start, 0), n), min(max((r + 1) * size - start, 0), n)) for r in range(world)]
                entries.append((name, spec, ranges, max(start - rank * size, 0)))
            partitions.append((zero.single_partition_of_fp32_groups[i], FlatPartition(entries, rank)))
    else:  # stage 3: every parameter cut in world equal parts (ds_tensor), a sub group's parts concatenated
        stage, group = 3, zero.dp_process_group
        groups = {id(group)}
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups):
            entries, offset = [], 0
            for param in params:
                name, spec = _named(param, names, optimizer)
                n, part = spec.numel, param.partition_numel()
                entries.append((name, spec, [(min(r * part, n), min((r + 1) * part, n)) for r in range(world)], offset))
                offset += part
            partitions.append((flat, FlatPartition(entries, rank)))
    if len(groups) > 1:
        raise NotImplementedError("param groups on different DeepSpeed data-parallel groups (MoE experts) are not supported")
    for k, (_, part) in enumerate(partitions):
        if part.n_cut and 0 in part.holders:
            raise RuntimeError(
                f"ZeRO gives rank {part.holders.index(0)} no element of param group {k} while others share its blocks: "
                "the group is too small for this world size"
            )
    return ZeroPartitions(partitions, group, stage)
