"""AdamMini (and AdaPM, SGD-SaI) under FSDP2 and DDP (gloo, CPU, several processes) equals one process.

Two spawns cover everything (start-up dominates on a small CI machine): 3 ranks train both models
under FSDP2 and save checkpoints with DCP; 2 ranks train both models under FSDP2 and DDP and resume
the 3-rank checkpoints. The references run here, in one process, on the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from . import _worker
from .conftest import load, run_world, single_process

pytestmark = pytest.mark.distributed

SPLIT = 4  # checkpoint after this many steps, resume for the rest
SGD_SAI = ("sgd-sai", "sgd-sai-int8m")  # SGD-SaI, and with its momentum buffer in int8 codes
MODELS = ("gpt2", "llama")
# transformers' GPT-2 has a key bias, whose gradient is zero up to rounding: Adam turns that noise
# into steps of size ~lr, so its entries agree only to ~1e-12 between any two reduction orders.
TOLERANCE = {"gpt2": 1e-9, "llama": 1e-12}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    adapm = {"model_name": "llama", "optimizer": "adapm"}
    others = [("fsdp", {"model_name": "llama", "optimizer": o}) for o in ("adapm-bf16m", *SGD_SAI)]
    run_world(3, out, [("fsdp", {"model_name": m}) for m in MODELS]
              + [("checkpoint_save", {"model_name": m, "split": SPLIT}) for m in MODELS]
              + [("fsdp", adapm), ("checkpoint_save", {**adapm, "split": SPLIT})] + others)
    run_world(2, out, [("fsdp", {"model_name": m}) for m in MODELS] + [("ddp", {"model_name": "llama"})]
              + [("checkpoint_resume", {"model_name": m, "split": SPLIT, "saved_world": 3}) for m in MODELS]
              + [("fsdp", adapm), ("checkpoint_resume", {**adapm, "split": SPLIT, "saved_world": 3})] + others)
    return out


@pytest.fixture(scope="module")
def references():
    return {m: single_process(m) for m in MODELS}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", MODELS)
def test_fsdp_equals_one_process(runs, references, model, world):
    result = load(runs, f"fsdp_{model}_auto_w{world}")
    assert max_difference(result["params"], references[model]) <= TOLERANCE[model]
    # every rank ends with the same full parameters
    for rank in range(1, world):
        other = load(runs, f"fsdp_{model}_auto_w{world}", rank)
        assert max_difference(other["params"], result["params"]) == 0


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", MODELS)
def test_one_all_reduce_per_step(runs, model, world):
    """Cut blocks exist in both models at both world sizes; their sums travel in one collective."""
    for rank in range(world):
        result = load(runs, f"fsdp_{model}_auto_w{world}", rank)
        assert result["all_reduce_calls"] == 1
        assert result["collectives"] == ["gloo:all_reduce"]  # nothing else, from any API
        assert result["all_reduce_bytes"] > 0


def cut_blocks_brute_force(model_name: str, world: int) -> int:
    """Blocks whose entries fall in more than one of ``world`` torch.chunk row shards, counted
    from each parameter's full block index."""
    import blockopt

    plan = blockopt.partition(_worker.MODELS[model_name]())
    cut = 0
    for spec in plan.values():
        index = spec.block_index()
        owners = {}
        for rank, rows in enumerate(index.chunk(world, dim=0) if index.ndim else [index]):
            for block in rows.unique().tolist():
                owners.setdefault(block, set()).add(rank)
        cut += sum(len(ranks) > 1 for ranks in owners.values())
    return cut


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", MODELS)
def test_only_cut_blocks_travel(runs, model, world):
    """The all-reduce carries one value per block cut by the sharding, nothing for whole blocks.
    (GPT-2's Conv1D (in, out) weights are sharded over rows, so all their column blocks are cut;
    Llama's row blocks only where a shard boundary falls inside a head.)"""
    sent = load(runs, f"fsdp_{model}_auto_w{world}")["all_reduce_bytes"] // 8  # float64
    assert sent == cut_blocks_brute_force(model, world)


def test_ddp_equals_one_process(runs, references):
    result = load(runs, "ddp_llama_w2")
    assert max_difference(result["params"], references["llama"]) <= 1e-12


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_world3_resumes_at_world2(runs, references, model):
    result = load(runs, f"resume_{model}_auto_w3_to_w2")
    assert max_difference(result["params"], references[model]) <= TOLERANCE[model]


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_world3_resumes_in_one_process(runs, references, model):
    _worker.scenario_checkpoint_resume(0, 1, runs, model_name=model, split=SPLIT, saved_world=3)
    result = load(runs, f"resume_{model}_auto_w3_to_w1")
    assert max_difference(result["params"], references[model]) <= TOLERANCE[model]


def test_interrupted_reference_is_the_same_run(references):
    """The split itself changes nothing: one process, saved and restored mid-run, equals the run."""
    import blockopt

    model = _worker.llama()
    opt = blockopt.AdamMini(model, **_worker.HYPER)
    data = _worker.batches()
    _worker.train(model, opt, data[:SPLIT], 0, 1)
    state = opt.state_dict()
    fresh = blockopt.AdamMini(model, **_worker.HYPER)
    fresh.load_state_dict(state)
    _worker.train(model, fresh, data[SPLIT:], 0, 1)
    assert max_difference(_worker.full_params(model), references["llama"]) == 0
    assert torch.is_tensor(state["state"][0]["exp_avg_sq"])


# ---- AdaPM: the same machinery, plus its row-sharded low-rank factors ---------------------------
@pytest.fixture(scope="module")
def adapm_reference():
    return single_process("llama", optimizer="adapm")


@pytest.mark.parametrize("world", [2, 3])
def test_adapm_fsdp_equals_one_process(runs, adapm_reference, world):
    result = load(runs, f"fsdp_llama_adapm_w{world}")
    assert max_difference(result["params"], adapm_reference) <= 1e-10
    for rank in range(1, world):
        assert max_difference(load(runs, f"fsdp_llama_adapm_w{world}", rank)["params"], result["params"]) == 0


@pytest.fixture(scope="module")
def other_references():
    """One-process runs of the optimizers below, each computed once."""
    return {o: single_process("llama", optimizer=o) for o in ("adapm-bf16m", *SGD_SAI)}


@pytest.mark.parametrize("world", [2, 3])
def test_adapm_bf16_momenta_and_factors_round_as_one_process(runs, other_references, adapm_reference, world):
    """Full momenta and low-rank factors in bf16: a shard's rows of L draw the rounding bits of
    their place in the whole L, so the run is one process's (with local bits it ended 0.17-0.2 away)."""
    result = load(runs, f"fsdp_llama_adapm-bf16m_w{world}")
    assert max_difference(result["params"], other_references["adapm-bf16m"]) <= 1e-10
    assert max_difference(result["params"], adapm_reference) > 1e-6  # bf16 did round


@pytest.mark.parametrize("world", [2, 3])
def test_adapm_collectives_per_step(runs, world):
    """One all-reduce for the cut blocks' sums, and per low-rank tensor two per fit iteration
    (gathered QR, summed product) and two for the residual clip's norms; nothing else."""
    opt = _worker.OPTIMIZERS["adapm"](_worker.llama())
    lowrank = sum(policy == "lowrank" for policy in opt.policies.values())
    fit_iters = opt.param_groups[0]["fit_iters"]
    assert lowrank > 0
    for rank in range(world):
        result = load(runs, f"fsdp_llama_adapm_w{world}", rank)
        expected = 1 + lowrank * (2 * fit_iters + 2)
        assert result["all_reduce_calls"] == expected
        assert result["collectives"] == ["gloo:all_reduce"] * expected


def test_adapm_checkpoint_world3_resumes_at_world2_and_in_one_process(runs, adapm_reference):
    assert max_difference(load(runs, "resume_llama_adapm_w3_to_w2")["params"], adapm_reference) <= 1e-10
    _worker.scenario_checkpoint_resume(0, 1, runs, model_name="llama", split=SPLIT, saved_world=3, optimizer="adapm")
    assert max_difference(load(runs, "resume_llama_adapm_w3_to_w1")["params"], adapm_reference) <= 1e-10


# ---- SGD-SaI: its gsnr and its (compressed) momentum buffer, sharded ---------------------------
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("optimizer", SGD_SAI)
def test_sgd_sai_fsdp_equals_one_process(runs, other_references, optimizer, world):
    result = load(runs, f"fsdp_llama_{optimizer}_w{world}")
    assert max_difference(result["params"], other_references[optimizer]) <= 1e-12
    for rank in range(1, world):
        assert max_difference(load(runs, f"fsdp_llama_{optimizer}_w{world}", rank)["params"], result["params"]) == 0
