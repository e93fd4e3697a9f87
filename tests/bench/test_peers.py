"""The optimizer registry: every installed peer steps; names, overrides and missing packages fail clearly."""

import math

import pytest
import torch

from blockopt.bench import peers
from blockopt.bench.models import build_model
from blockopt.bench.modelspec import ModelSpecError, parse_overrides
from blockopt.bench.peers import (
    PeerError,
    PeerUnavailableError,
    build_optimizer,
    format_spec,
    get_peer,
    parse_optimizer_spec,
    register_optimizer,
    registered_optimizers,
    unregister_optimizer,
)

SHARED = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
# Every registered name, plus one optimizer reached through the pytorch-optimizer family.
ALL_PEERS = [*registered_optimizers(), "po:adan"]


def _steps(model, optimizer, n=2):
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(n):
        idx = torch.randint(model.config.vocab_size, (2, 16), generator=generator)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("name", ALL_PEERS)
def test_every_installed_peer_steps(name, model_name):
    peer = get_peer(name)
    if not peer.available:
        pytest.skip(f"{name} needs {', '.join(peer.requires)}")
    model = build_model(model_name, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(name, model, SHARED)
    losses = _steps(model, optimizer)
    assert all(math.isfinite(loss) for loss in losses)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) >= len(changed) // 2, f"{name} left most tensors unchanged"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.state  # it keeps state (the figure the benchmark reports)


def test_registry_names_the_peers_the_issue_asks_for():
    names = set(registered_optimizers())
    assert {"adamw", "adam-mini", "adam-mini-official", "adafactor", "sgd-sai", "lion"} <= names
    assert "foreach" in get_peer("adamw").accepted_keys and "momentum" in get_peer("sgd-sai").accepted_keys


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(PeerError, match=r"unknown optimizer 'adamx'; registered: adamw, adam-mini"):
        get_peer("adamx")
    with pytest.raises(PeerError, match="unknown optimizer"):
        parse_optimizer_spec("adamx:lr=1e-3")
    with pytest.raises(PeerError, match="pytorch-optimizer has no optimizer 'nope'"):
        get_peer("po:nope")


def test_bad_override_names_what_the_peer_takes():
    spec = parse_optimizer_spec("sgd-sai:lr=1e-2,betas=0.9,0.99")
    with pytest.raises(PeerError, match=r"'sgd-sai' takes no hyperparameter 'betas'; it takes: lr, eps, weight_decay, momentum"):
        spec.resolve(SHARED)
    with pytest.raises(PeerError, match="bad override 'lr' .*key=value"):
        parse_optimizer_spec("adamw:lr,eps=1e-8")
    with pytest.raises(PeerError, match="given twice"):
        parse_optimizer_spec("adamw:lr=1e-3,lr=2e-3")
    with pytest.raises(PeerError, match="write NAME:key=value"):
        parse_optimizer_spec("lr=1e-3")
    # a value the optimizer rejects is reported with the peer's name
    with pytest.raises(PeerError, match=r"optimizer 'adamw' could not be built .*Invalid learning rate"):
        build_optimizer("adamw:lr=-1", build_model("llama-tiny"), SHARED)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("adamw:lr=abc", "bad override in 'adamw:lr=abc': lr must be a number, got 'abc' (str)"),
        ("adamw:eps=1e-8,weight_decay=lots", "weight_decay must be a number, got 'lots' (str)"),
        ("adamw:betas=0.9", "betas must be a pair, each a number, got 0.9"),
        ("lion:betas=(0.9,)", "betas must be a pair, each a number, got (0.9,)"),  # from lion's default (0.9, 0.99)
        ("sgd-sai:momentum=fast", "momentum must be a number, got 'fast' (str)"),  # from sgd-sai's default 0.9
        ("adam-mini:decay_1d=1", "decay_1d must be True or False, got 1"),  # AdamMini's own table
        ("adam-mini:lr=-1", "lr must be a number >= 0, got -1"),
        ("adapm:rank=0", "rank must be an int >= 1, got 0"),
        ("adamw:lr", "bad override 'lr' in 'adamw:lr': write key=value"),
        ("po:adan:lr", "bad override 'lr' in 'po:adan:lr': write key=value"),
        ("adamw:", "bad optimizer spec 'adamw:': nothing follows ':'"),
    ],
)
def test_a_bad_override_is_refused_when_parsed_in_the_validators_words(spec, message):
    with pytest.raises(PeerError) as refused:
        parse_optimizer_spec(spec)
    assert message in str(refused.value)


def test_values_of_kinds_the_peer_does_not_know_pass_through():
    assert parse_optimizer_spec("adamw:lr=-1").overrides["lr"] == -1  # its range is torch's to check
    assert parse_optimizer_spec("adafactor:eps=1e-3,1e-3").overrides["eps"] == (1e-3, 1e-3)  # its own pair
    assert parse_optimizer_spec("po:adan:betas=0.98,0.92,0.99").overrides["betas"] == (0.98, 0.92, 0.99)
    # overrides given as a dict are checked when resolved
    with pytest.raises(PeerError, match="lr must be a number, got 'abc'"):
        get_peer("adamw").resolve(SHARED, {"lr": "abc"})


def test_a_missing_package_is_named_with_its_install_command():
    register_optimizer("needs-missing", lambda m, hp: None, requires="blockopt-no-such-package==1.0", shared=())
    try:
        peer = get_peer("needs-missing")
        assert not peer.available and peer.missing() == ["blockopt-no-such-package==1.0"]
        assert peer.versions() == {"blockopt-no-such-package": None}
        with pytest.raises(PeerUnavailableError, match=r"pip install 'blockopt-no-such-package==1.0'"):
            build_optimizer("needs-missing", build_model("llama-tiny"))
    finally:
        unregister_optimizer("needs-missing")


def test_spec_parsing_values_and_labels():
    spec = parse_optimizer_spec("lion:betas=0.9,0.99, lr=1e-4,weight_decay=0")
    assert spec.name == "lion" and spec.label == "lion:betas=0.9,0.99, lr=1e-4,weight_decay=0"
    assert dict(spec.overrides) == {"betas": (0.9, 0.99), "lr": 1e-4, "weight_decay": 0}
    assert parse_optimizer_spec("adam-mini:implementation=reference").overrides["implementation"] == "reference"
    assert parse_optimizer_spec("adamw:fused=true").overrides["fused"] is True
    assert parse_optimizer_spec("po:adan:lr=1e-3").name == "po:adan"
    assert parse_optimizer_spec(" adamw ").label == "adamw"


@pytest.mark.parametrize("written", ["none", "NONE", " none "])
def test_a_lowercase_none_is_refused_not_read_as_python_none(written):
    # AdaPM's momentum="none" is a policy, its momentum=None the defaults: reading one as the other
    # ran AdaPM with the default policies under a label that said none
    with pytest.raises(PeerError, match=r"ambiguous: write None .* or 'none'"):
        parse_optimizer_spec(f"adapm:momentum={written}")
    with pytest.raises(ModelSpecError, match="ambiguous"):
        parse_overrides("n_layers=none")


def test_none_and_the_text_none_are_both_writable_and_labelled_to_read_back():
    assert parse_optimizer_spec("adapm:residual_clip=None").overrides["residual_clip"] is None
    spec = parse_optimizer_spec("adapm:momentum='none',momentum_dtype=int8")
    assert dict(spec.overrides) == {"momentum": "none", "momentum_dtype": "int8"}
    for overrides in ({"momentum": "none"}, {"momentum": {"value": "none"}}, {"implementation": "fused"}):
        label = format_spec("adapm", overrides)
        assert dict(parse_optimizer_spec(label).overrides) == overrides, label


def test_resolution_order_shared_then_defaults_then_overrides():
    lion = get_peer("lion")
    assert lion.resolve(SHARED) == {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.99)}  # its own LR default
    assert get_peer("lion").resolve({**SHARED, "lr": 5e-3})["lr"] == 1e-3
    assert lion.resolve(SHARED, {"lr": 5e-5})["lr"] == 5e-5
    assert get_peer("adamw").resolve(SHARED)["lr"] == 1e-3
    assert "betas" not in get_peer("sgd-sai").resolve(SHARED)  # takes only the shared keys it names


def test_weight_decay_skips_1d_tensors_for_torch_style_peers():
    model = build_model("gpt2-tiny")
    for name in ("adamw", "lion", "adafactor"):
        if not get_peer(name).available:
            continue
        optimizer = build_optimizer(name, model, SHARED)
        for group in optimizer.param_groups:
            dims = {p.ndim >= 2 for p in group["params"]}
            assert len(dims) == 1
            assert group["weight_decay"] == (0.1 if dims == {True} else 0.0), name


def test_register_validates_names_and_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("adamw", peers.catalogue._adamw)
    with pytest.raises(ValueError, match="lowercase"):
        register_optimizer("My Opt", peers.catalogue._adamw)
    with pytest.raises(ValueError, match="shared keys must be among"):
        register_optimizer("my-opt", peers.catalogue._adamw, shared=("momentum",))
    assert "my-opt" not in registered_optimizers()


def test_a_registered_peer_is_usable_by_name():
    register_optimizer(
        "test-sgd", lambda model, hp: torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"]),
        shared=("lr",), defaults={"momentum": 0.5}, description="plain SGD",
    )
    try:
        optimizer = build_optimizer("test-sgd:momentum=0.7", build_model("llama-tiny"), SHARED)
        assert optimizer.param_groups[0]["momentum"] == 0.7 and optimizer.param_groups[0]["lr"] == 1e-3
    finally:
        unregister_optimizer("test-sgd")


@pytest.mark.parametrize("name", ["adam-mini-blockwise-lr", "adapm-blockwise-lr"])
def test_blockwise_lr_peers_take_their_optimizers_options(name):
    """The blockwise-LR peers are their optimizer on `blockwise_lr` groups: each tensor's LR is its
    block type's, and the optimizer's own options (compressed momentum, seed, partition) apply."""
    from blockopt.param_groups import blockwise_lr

    model = build_model("llama-tiny", seed=0)
    ratios = {"embedding": 10, "qk": 2}
    spec = f"{name}:ratios={ratios},momentum_dtype=int8,seed=5,rules={{'*.up_proj.weight': 'whole'}}"
    optimizer = build_optimizer(spec, model, SHARED)
    assert optimizer.seed == 5
    assert {group["momentum_dtype"] for group in optimizer.param_groups} == {"int8"}
    # the partition option reached the plan
    assert all(optimizer.plan[n].n_blocks == 1 for n, _ in model.named_parameters() if n.endswith("up_proj.weight"))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p): group["lr"] for group in blockwise_lr(optimizer.plan, 1e-3, ratios, params=model) for p in group["params"]}
    assert lr_of == expected and len(set(expected.values())) > 1
    assert all(torch.isfinite(torch.tensor(loss)) for loss in _steps(model, optimizer))


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd-sai", "adamw-8bit-bnb", "adamw-4bit-torchao"])
def test_torch_style_peers_take_a_blockwise_lr_table(name):
    """``ratios`` gives any torch-style peer `blockwise_lr`'s groups (LR per block type, decay
    split by dims); without it the peer keeps `decay_groups`."""
    from blockopt.param_groups import blockwise_lr

    if not get_peer(name).available:
        pytest.skip(f"{name} needs {', '.join(get_peer(name).requires)}")
    model = build_model("llama-tiny", seed=0)
    ratios = {"embedding": 10, "qk": 2}
    plain = build_optimizer(name, model, SHARED)
    table = build_optimizer(f"{name}:ratios={ratios}", model, SHARED)
    lr = float(plain.param_groups[0]["lr"])  # the peer's own LR where it keeps one (adafactor, lion, sgd-sai)
    assert len({float(group["lr"]) for group in plain.param_groups}) == 1
    expected = {id(p): (group["lr"], group["weight_decay"])
                for group in blockwise_lr(model, lr=lr, ratios=ratios, weight_decay=0.1) for p in group["params"]}
    got = {id(p): (float(group["lr"]), group["weight_decay"]) for group in table.param_groups for p in group["params"]}
    assert got.keys() == expected.keys() and len({round(v[0], 9) for v in got.values()}) > 2
    for key, (lr_got, decay) in got.items():  # (torchao keeps its LRs as float32 tensors)
        assert lr_got == pytest.approx(expected[key][0], rel=1e-6) and decay == expected[key][1]
