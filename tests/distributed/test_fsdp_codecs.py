"""Compressed momentum (``momentum_dtype`` bfloat16/int8/int4) under FSDP2, and DCP checkpoints
that reshard it (Note [compressed momentum of sharded parameters] in `blockopt.optim.momentum`).

Every state tensor of a sharded parameter's momentum is, globally, the one-process tensor, and a
shard's elements draw the rounding bits of their place in the whole: so FSDP2 writes the same
codes as one process (the gradients agree to rounding, far below a rounding threshold here), and
a DCP checkpoint loads at another world size with the very same codes, or, through an optimizer
with its own setting, converts to another ``momentum_dtype`` as one process converts it. bf16
parameters with ``param_rounding="stochastic"`` draw their bits the same way (Note [seeded
parameter rounding]). Two spawns (2 ranks, then 3); the one-process references, the 2 -> 1
resume and the one-process conversions run here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import blockopt
from blockopt.distributed.shard import _shard_view
from blockopt.distributed.zero import read_partitions
from blockopt.kernels.codecs import StoredMomentum, codec, rounding_key
from blockopt.optim import momentum, param_rounding
from blockopt.partition import make_spec

from . import _codecs_worker as worker
from .conftest import load, run_world

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

CODECS = ("bfloat16", "int8", "int4")
TOLERANCE = 1e-12  # parameters: gradients summed in another order


# DCP checkpoints resumed with another momentum_dtype: (saved, live, saved at world, resumed at world)
CONVERSIONS = [("int8", "bfloat16", 2, 2), ("float32", "int8", 1, 2), ("float32", "int8", 1, 3)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("codecs")
    references = {dt: worker.one_process(out, dt) for dt in (*CODECS, "float32")}  # (also their checkpoints, at 1 process)
    converts = {w: [("convert", {**dict(zip(("saved_dtype", "live_dtype", "saved_world"), c[:3])), "planner": planner})
                    for c in CONVERSIONS if c[3] == w for planner in (False, True)]
                for w in (2, 3)}
    run_world(2, out, [("train", {"momentum_dtype": dt}) for dt in CODECS]
              + [("resume", {"momentum_dtype": dt, "saved_world": 1}) for dt in CODECS]
              + [("resume", {"momentum_dtype": "int8", "saved_world": 2})]
              + [("load_whole", {"momentum_dtype": dt}) for dt in ("int8", "int4")]
              + [("stochastic", {}), ("stochastic", {"local_bits": True})] + converts[2]
              + [("compiled", {"momentum_dtype": "int8"})]
              + [("unlike", {"setting": s}) for s in ("momentum_dtype", "seed")], entry=worker.main)
    run_world(3, out, [("resume", {"momentum_dtype": dt, "saved_world": 2}) for dt in ("int8", "int4")]
              + [("stochastic", {})] + converts[3], entry=worker.main)
    return out, references


def assert_same_state(a: dict, b: dict) -> None:
    """Every momentum tensor (codes, scales, bf16 exp_avg) and step count, bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype, (name, key)
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def assert_close_params(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= tolerance, name


@pytest.mark.parametrize(("setting", "said"), [("momentum_dtype", "momentum_dtype is 'int8' on rank 0 and 'bfloat16' on rank 1"),
                                               ("seed", "seed is 0 on rank 0 and 1 on rank 1")])
def test_optimizers_built_otherwise_on_the_ranks_are_refused_at_the_first_step(runs, setting, said):
    # (a momentum_dtype from the rank hung until the timeout; a seed from it diverged silently)
    out, _ = runs
    for rank in (0, 1):
        result = load(out, f"unlike_{setting}_w2", rank)
        assert result["refused"] is not None and "Build the optimizer alike on every rank" in result["refused"]
        assert result["state"] == 0  # nothing half-applied
    assert said in load(out, f"unlike_{setting}_w2", 0)["refused"]


def test_a_compiled_step_of_sharded_parameters_is_the_eager_step(runs):
    # dynamo cannot trace a DTensor step (it failed inside dynamo, or with suppress_errors left the
    # int8 codes of the vectors kept whole unwritten): the compiled step runs it eagerly
    out, _ = runs
    eager, compiled = load(out, "train_int8_w2")["end"], load(out, "compiled_int8_w2")["end"]
    assert_close_params(compiled["params"], eager["params"], 0.0)
    assert_same_state(compiled["state"], eager["state"])


@pytest.mark.parametrize("momentum_dtype", CODECS)
def test_fsdp_steps_like_one_process(runs, momentum_dtype):
    out, references = runs
    reference = references[momentum_dtype]
    result = load(out, f"train_{momentum_dtype}_w2")
    for at in ("split", "end"):
        assert_close_params(result[at]["params"], reference[at]["params"])
        assert_same_state(result[at]["state"], reference[at]["state"])
    other = load(out, f"train_{momentum_dtype}_w2", 1)
    assert_close_params(other["end"]["params"], result["end"]["params"], 0.0)
    assert_same_state(other["end"]["state"], result["end"]["state"])
    # the cut blocks' sums, and (int8/int4) the vectors' momenta gathered whole: one all-reduce each
    assert result["all_reduce_calls"] == (1 if momentum_dtype == "bfloat16" else 2)


def test_dcp_resume_at_the_same_world_size_is_bit_identical(runs):
    out, _ = runs
    uninterrupted = load(out, "train_int8_w2")
    resumed = load(out, "resume_int8_w2_to_w2")
    assert_same_state(resumed["loaded"]["state"], uninterrupted["split"]["state"])
    assert_close_params(resumed["end"]["params"], uninterrupted["end"]["params"], 0.0)
    assert_same_state(resumed["end"]["state"], uninterrupted["end"]["state"])


@pytest.mark.parametrize("momentum_dtype", CODECS)
def test_dcp_one_process_checkpoint_resumes_at_world2(runs, momentum_dtype):
    out, references = runs
    reference = references[momentum_dtype]
    resumed = load(out, f"resume_{momentum_dtype}_w1_to_w2")
    assert_same_state(resumed["loaded"]["state"], reference["split"]["state"])
    assert_close_params(resumed["end"]["params"], reference["end"]["params"])
    assert_same_state(resumed["end"]["state"], reference["end"]["state"])


@pytest.mark.parametrize("momentum_dtype", ["int8", "int4"])
def test_one_process_state_dict_loads_at_world2(runs, momentum_dtype):
    """``opt.load_state_dict`` of whole codes and scales (no DCP) places them as a step keeps them."""
    out, references = runs
    reference = references[momentum_dtype]
    resumed = load(out, f"load_whole_{momentum_dtype}_w2")
    assert_same_state(resumed["loaded"]["state"], reference["split"]["state"])
    assert_close_params(resumed["end"]["params"], reference["end"]["params"])
    assert_same_state(resumed["end"]["state"], reference["end"]["state"])


@pytest.mark.parametrize("momentum_dtype", CODECS)
def test_dcp_world2_checkpoint_resumes_in_one_process(runs, momentum_dtype):
    out, references = runs
    worker.scenario_resume(0, 1, out, momentum_dtype=momentum_dtype, saved_world=2)
    resumed = load(out, f"resume_{momentum_dtype}_w2_to_w1")
    assert_same_state(resumed["loaded"]["state"], load(out, f"train_{momentum_dtype}_w2")["split"]["state"])
    assert_close_params(resumed["end"]["params"], references[momentum_dtype]["end"]["params"])
    assert_same_state(resumed["end"]["state"], references[momentum_dtype]["end"]["state"])


@pytest.mark.parametrize("momentum_dtype", ["int8", "int4"])
def test_dcp_world2_checkpoint_resumes_at_world3(runs, momentum_dtype):
    """Other shard boundaries (rows 2/2/1, the vector in thirds, empty shards): the same codes."""
    out, references = runs
    resumed = load(out, f"resume_{momentum_dtype}_w2_to_w3")
    assert_same_state(resumed["loaded"]["state"], load(out, f"train_{momentum_dtype}_w2")["split"]["state"])
    assert_close_params(resumed["end"]["params"], references[momentum_dtype]["end"]["params"])
    assert_same_state(resumed["end"]["state"], references[momentum_dtype]["end"]["state"])


@pytest.mark.parametrize("planner", [False, True], ids=["through-reader", "ConvertingLoadPlanner"])
@pytest.mark.parametrize("saved_dtype, live_dtype, saved_world, world", CONVERSIONS)
def test_dcp_checkpoint_converts_to_another_momentum_dtype(runs, saved_dtype, live_dtype, saved_world, world, planner):
    """A DCP checkpoint loaded straight into the live optimizer through `ConvertingLoadPlanner`, or
    into an optimizer with its own momentum_dtype whose state_dict() the live one loads: the same
    state as one process's conversion of the same checkpoint (its DCP load, and
    opt.load_state_dict of its torch.save'd state dict), and the same run after."""
    out, _ = runs
    worker.scenario_convert(0, 1, out, saved_dtype, live_dtype, saved_world)
    reference = load(out, f"convert_{saved_dtype}_w{saved_world}_to_{live_dtype}_w1")
    whole = torch.load(out / f"whole_{saved_dtype}.pt", weights_only=False)
    model = worker.Odd()
    opt = worker.optimizer(model, live_dtype)
    opt.load_state_dict(whole["optim"])
    assert_same_state(reference["loaded"]["state"], worker.snapshot(model, opt)["state"])
    if planner:
        worker.scenario_convert(0, 1, out, saved_dtype, live_dtype, saved_world, planner=True)
        one = load(out, f"convert_{saved_dtype}_w{saved_world}_to_{live_dtype}_w1_planner")
        assert_same_state(one["loaded"]["state"], reference["loaded"]["state"])
    result = load(out, f"convert_{saved_dtype}_w{saved_world}_to_{live_dtype}_w{world}" + ("_planner" if planner else ""))
    assert_same_state(result["loaded"]["state"], reference["loaded"]["state"])
    assert_close_params(result["end"]["params"], reference["end"]["params"])
    assert_same_state(result["end"]["state"], reference["end"]["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_stochastic_parameter_rounding_writes_one_process_bits(runs, world):
    """bf16 parameters with param_rounding="stochastic" and the same gradients at every world size
    (uneven rows, a vector cut inside, empty shards at 3 ranks): the gathered parameters are one
    process's, bit for bit. Had each shard drawn the bits of its local indices, they would not be."""
    out, _ = runs
    reference = worker.rounding_run(worker.Odd().bfloat16())
    result = load(out, f"stochastic_w{world}")
    assert all(torch.equal(result[name], reference[name]) for name in reference)
    local_bits = load(out, "stochastic_local_bits_w2")
    assert not all(torch.equal(local_bits[name], reference[name]) for name in reference)


# ---- in this process ------------------------------------------------------------------------
def _dcp_load(model, opt, checkpoint_id) -> None:
    """The get/load/set path of docs/distributed.md."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


@pytest.mark.parametrize("momentum_dtype", ["int8", "bfloat16"])
def test_the_converting_planner_loads_a_checkpoint_of_the_same_setting_in_place(runs, momentum_dtype):
    """Entries stored as the live ones are loaded into the live tensors, as DCP's own planner loads them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out, _ = runs
    plain_model, planned_model = worker.Odd(), worker.Odd()
    plain, planned = worker.optimizer(plain_model, momentum_dtype), worker.optimizer(planned_model, momentum_dtype)
    _dcp_load(plain_model, plain, worker.checkpoint(out, momentum_dtype, 1))
    model_sd, optim_sd = get_state_dict(planned_model, planned)
    live = [t for entry in optim_sd["state"].values() for t in entry.values()]
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=worker.checkpoint(out, momentum_dtype, 1), planner=blockopt.distributed.ConvertingLoadPlanner())
    assert all(a is b for a, b in zip(live, (t for entry in state["optim"]["state"].values() for t in entry.values())))
    set_state_dict(planned_model, planned, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_same_state(worker.snapshot(planned_model, planned)["state"], worker.snapshot(plain_model, plain)["state"])


def test_dcp_load_into_another_momentum_storage_is_refused(runs):
    """DCP fills the live optimizer's tensors: float32 m loaded into "bfloat16" storage arrives
    rounded to nearest, not converted. Refused, naming the tensor, both settings and the fix; the
    live setting stays."""
    out, _ = runs
    model = worker.Odd()
    opt = worker.optimizer(model, "bfloat16")
    with pytest.raises(ValueError, match=r"w: its checkpoint was saved with momentum_dtype='float32', but the momentum "
                                         r"arrived in this optimizer's momentum_dtype='bfloat16' storage \(torch.bfloat16 "
                                         r"exp_avg\).*build the optimizer again and pass planner=blockopt.distributed.ConvertingLoadPlanner\(\)"):
        _dcp_load(model, opt, worker.checkpoint(out, "float32", 1))
    assert [g["momentum_dtype"] for g in opt.param_groups] == ["bfloat16"]


def test_rows_of_one_element_keep_bf16_so_dcp_never_casts_int8_codes_into_int4_bytes(tmp_path):
    """Rows of one element had int8 codes and int4 bytes of one shape, so DCP could cast the one
    into the other without a word (the bytes would decode as garbage; a check refused it). Such rows
    now keep bf16 m under int8 and int4 (codes and a scale per row cost more than bf16), so a DCP
    checkpoint loads across the two as a one-process state dict does, with or without
    `ConvertingLoadPlanner`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def column():
        torch.manual_seed(0)
        return torch.nn.ParameterDict({"weight": torch.nn.Parameter(torch.randn(4, 1)), "bias": torch.nn.Parameter(torch.randn(1))})

    model = column()
    opt = blockopt.AdamMini(model, lr=1e-2, momentum_dtype="int8")
    for _ in range(2):
        opt.zero_grad()
        (model["weight"].sum() * model["bias"]).square().backward()
        opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 and "exp_avg_codes" not in opt.state[p] for p in model.parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "int8"))

    model = column()
    expected = blockopt.AdamMini(model, lr=1e-2, momentum_dtype="int4")
    expected.load_state_dict(opt.state_dict())
    for planner in (None, blockopt.distributed.ConvertingLoadPlanner()):
        live = blockopt.AdamMini(model, lr=1e-2, momentum_dtype="int4")
        model_sd, optim_sd = get_state_dict(model, live)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(tmp_path / "int8"), planner=planner)
        set_state_dict(model, live, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for p in model.parameters():
            assert live.state[p].keys() == expected.state[p].keys()
            assert all(torch.equal(live.state[p][k], expected.state[p][k]) for k in expected.state[p]), live.state[p]


def test_stochastic_parameter_rounding_refuses_a_sharding_that_cuts_rows():
    """Shard(1) of a matrix: a shard is not one run of the flattened parameter, whose bits it draws."""
    from torch.distributed.tensor import Shard

    view = _shard_view(make_spec("w", (4, 6), "rows", "test"), (Shard(1),), (0,), (2,), None, (4, 3))
    with pytest.raises(NotImplementedError, match=r"w: param_rounding='stochastic' needs a sharding along dim 0 only.*"
                                                  r"split dim 1 of \(4, 6\).*or use param_rounding='kahan'"):
        param_rounding._rounding_offset(view, "w")


@pytest.mark.parametrize("name", CODECS)
def test_a_shard_draws_the_bits_of_its_place_in_the_whole(name):
    """Rows 3..6 of a (7, 301) tensor, encoded as a shard with its offset, are the whole
    tensor's encoding cut at those rows; without the offset they are not."""
    x = torch.randn(7, 301, generator=torch.Generator().manual_seed(0))
    key = rounding_key(0, 5, 123)
    whole = codec(name).encode(x, key)
    rows = slice(3, 7)
    for offset, same in ((3 * 301, True), (0, False)):
        shard = StoredMomentum(name, tuple(torch.zeros_like(t[rows]) for t in whole), salt=123, offset=offset)
        shard.encode_(x[rows], 5)
        assert all(torch.equal(s, w[rows]) for s, w in zip(shard.stored, whole)) == same


def test_unsharded_bits_are_unchanged():
    stored = StoredMomentum("int8", (), salt=7, seed=3)
    assert stored.key(11) == rounding_key(3, 11, 7)


def test_a_sharding_that_cuts_rows_is_refused():
    """Shard(1) of a matrix cuts its rows (int8/int4 chunks, bf16 bits along the flattened tensor)."""
    from torch.distributed.tensor import Shard

    spec = make_spec("w", (4, 6), "rows", "test")
    view = _shard_view(spec, (Shard(1),), (0,), (2,), None, (4, 3))
    for momentum_dtype in CODECS:
        with pytest.raises(NotImplementedError, match=rf"w: momentum_dtype='{momentum_dtype}' needs a sharding along dim 0"):
            momentum.create_sharded(momentum_dtype, torch.zeros(4, 6), view, "w")


@pytest.mark.parametrize("momentum_dtype", ["int8", "int4"])
def test_zero_refuses_quantized_momentum(momentum_dtype):
    opt = blockopt.AdamMini(worker.Odd(), rules=worker.RULES, momentum_dtype=momentum_dtype)
    stage2 = SimpleNamespace(round_robin_bit16_groups=[])  # what DeepSpeed's ZeRO 1/2 optimizer is known by
    with pytest.raises(NotImplementedError, match=rf"momentum_dtype='{momentum_dtype}' under DeepSpeed ZeRO"):
        read_partitions(stage2, opt)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_zero_pieces_refuse_parameter_rounding(mode):
    """A bf16 ZeRO piece (not a parameter of the group: DeepSpeed's flat partitions) is refused."""
    opt = blockopt.AdamMini(worker.Odd().bfloat16(), rules=worker.RULES, param_rounding=mode)
    piece = opt._Batch(opt.param_groups[0], names=["w"], params=[torch.zeros(3, dtype=torch.bfloat16)])
    piece.group = {**piece.group, "param_names": []}
    with pytest.raises(NotImplementedError, match=rf"w: param_rounding='{mode}' under DeepSpeed ZeRO with torch.bfloat16"):
        param_rounding._writes(opt, piece, [0], mode)
