"""`torch.compile` captures the step of every blockwise optimizer whole (issue 28).

Dynamo's verdict comes from ``torch._dynamo.explain`` (tracing only, no code generation); the
numbers from ``aot_eager`` (dynamo + functionalization of the in-place step and of the C++ op,
the part that can go wrong, without inductor's code generation), and one training step through
inductor. Models are tiny and float64, so compiled and eager steps can be held to 1e-12.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import blockopt
from blockopt.kernels.adam_mini import cpu
from blockopt.optim.momentum import kept_as

from .conftest import batches, lm_loss, make_tiny

# (optimizer, implementation); "auto" is the fused kernel where it builds, batched elsewhere
CASES = [("AdamMini", "fused"), ("AdamMini", "batched"), ("AdamMini", "auto"), ("AdaPM", "auto"), ("AdaPM", "batched"),
         ("SGDSaI", None)]
IDS = [f"{name}-{impl}" if impl else name for name, impl in CASES]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _build(name, implementation, seed=0, **options):
    model = make_tiny(torch.float64, seed=seed)
    if implementation is not None:
        options["implementation"] = implementation
    return model, getattr(blockopt, name)(model, lr=1e-2, weight_decay=0.1, **options)


def _backward(model, idx) -> None:
    model.zero_grad()
    lm_loss(model, idx).backward()


def _fused_kernel_or_skip(implementation):
    if implementation in ("fused", "auto") and not cpu.available():
        pytest.skip("the fused CPU kernel can't be built here")


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
def test_dynamo_captures_the_step_in_one_graph(name, implementation):
    """After one eager step (state created), a step is one graph with no break. (AdamMini and
    SGDSaI also compile from the very first step, next test; AdaPM's first step draws its
    low-rank factors from a seeded generator, a graph break once.)"""
    _fused_kernel_or_skip(implementation)
    model, opt = _build(name, implementation)
    data = batches(2)
    _backward(model, data[0])
    opt.step()
    _backward(model, data[1])
    before = [p.detach().clone() for p in model.parameters()]
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_count >= 1
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it stepped


@pytest.mark.parametrize(("name", "implementation"), [("AdamMini", "auto"), ("SGDSaI", None)], ids=["AdamMini", "SGDSaI"])
def test_the_first_step_compiles_whole_too(name, implementation):
    _fused_kernel_or_skip(implementation)
    model, opt = _build(name, implementation)
    _backward(model, batches(1)[0])
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def _train(model, opt, data, step_fn):
    for idx in data:
        _backward(model, idx)
        step_fn()


# ("auto" is "fused" here, and AdaPM's full-momentum tensors run the same Adam-mini step: left out for time)
COMPARED = [("AdamMini", "fused"), ("AdamMini", "batched"), ("AdaPM", "auto"), ("SGDSaI", None)]


@pytest.mark.parametrize(("name", "implementation"), COMPARED, ids=[f"{n}-{i}" if i else n for n, i in COMPARED])
def test_a_compiled_step_computes_the_eager_step(name, implementation):
    """Compiled (aot_eager) against eager steps. The fused kernel is the same C++ call either way:
    bit for bit. The batched step's bias corrections become tensor math while compiling (float64,
    as Python's; kernels/adam_mini/batched.py Note [a compiled step]): equal to rounding, which
    one tensor amplifies: the attention key bias has a pure rounding-noise gradient (softmax
    ignores it), which Adam's normalisation lifts to a step of ~lr * 1e-9, so ulp differences
    in the weights reach it as differences of ~1e-12 (lr is 1e-2: 1e-8 of one step)."""
    _fused_kernel_or_skip(implementation)
    data = batches(3)
    eager_model, eager = _build(name, implementation)
    model, opt = _build(name, implementation)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter)
    _train(eager_model, eager, data, eager.step)
    _train(model, opt, data, compiled_step)
    assert counter.frame_count >= 1
    exact = implementation == "fused" and name == "AdamMini"
    for (param_name, a), b in zip(model.named_parameters(), eager_model.parameters()):
        if exact:
            assert torch.equal(a, b), param_name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=param_name)
        for key, value in opt.state[a].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, eager.state[b][key], rtol=1e-10, atol=1e-10, msg=f"{param_name} {key}")


def test_a_tensor_lr_follows_its_scheduler_without_recompiling():
    """torch.optim's recipe for compiled steps: a tensor lr, changed in place by the scheduler, is
    read by the graph at run time. Two compiles in all: the first step (state created) and the
    step every later one repeats."""
    _fused_kernel_or_skip("auto")
    data = batches(6)
    eager_model, eager = _build("AdamMini", "auto")
    model, opt = _build("AdamMini", "auto")
    for o in (eager, opt):
        o.param_groups[0]["lr"] = torch.tensor(1e-2)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (eager, opt)]
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter)
    for idx in data:
        for m, step, scheduler in ((eager_model, eager.step, schedulers[0]), (model, compiled_step, schedulers[1])):
            _backward(m, idx)
            step()
            scheduler.step()
    assert counter.frame_count == 2
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 2 ** len(data))
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)  # the fused kernel reads the same lr at every step


@pytest.mark.parametrize(("name", "implementation"), [("AdamMini", "batched"), ("SGDSaI", None)])
def test_a_compiled_step_checks_its_tensor_lr_when_the_graph_runs(name, implementation):
    """The graph reads a tensor lr at run time, so the eager step's check never ran: a nan lr
    (or a negative one, a LambdaLR past its horizon) trained on, to nan or uphill. The check runs
    in the graph, and the group's update waits for it."""
    model, opt = _build(name, implementation)
    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter)
    for idx in batches(2):
        _backward(model, idx)
        compiled_step()
    frames = counter.frame_count
    params = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), -1e-3):
        opt.param_groups[0]["lr"].fill_(bad)
        _backward(model, batches(1)[0])
        with pytest.raises(ValueError, match=r"a compiled step's tensor lr: lr must be a number >= 0, got tensor\("):
            compiled_step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert counter.frame_count == frames  # (the same graph: the value is checked at run time)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_warn_names_the_tensor_from_a_compiled_step(bad):
    model, opt = _build("AdamMini", "batched")
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    _backward(model, batches(1)[0])
    compiled_step()
    _backward(model, batches(1)[0])
    model.head.weight.grad[3, 0] = bad
    with pytest.warns(RuntimeWarning, match=r"'head.weight' is inf or nan"):
        compiled_step()
    _backward(model, batches(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        compiled_step()


@pytest.mark.slow
def test_a_compiled_training_step_matches_eager_with_no_break_in_the_optimizer():
    """forward, backward, step and zero_grad under torch.compile (inductor). ``loss.backward()``
    itself is a graph break in any compiled training step (without compiled autograd); the
    optimizer's part, from after backward to the end, is one graph. The forward and backward
    are inductor's code, so the weights agree to float64 rounding (amplified by the key bias, as
    above), not bit for bit."""
    _fused_kernel_or_skip("auto")
    data = batches(3)
    eager_model, eager = _build("AdamMini", "auto")
    model, opt = _build("AdamMini", "auto")

    def train_step(m, o, idx):
        loss = lm_loss(m, idx)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, backend=counter)
    for idx in data:
        train_step(eager_model, eager, idx)
        compiled(model, opt, idx)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the backward's break splits the function in two frames: the forward compiles once, the
    # optimizer's part twice (the first step creates the state, later steps repeat the second)
    assert counter.frame_count == 3
    _backward(model, data[0])
    explanation = torch._dynamo.explain(lambda: (opt.step(), opt.zero_grad()))()
    assert explanation.graph_break_count == 0


def test_a_compiled_int8_fused_step_is_the_eager_step():
    """The fused CPU kernel steps int8 codes inside the graph, the rounding key mixed from the step
    tensor in C++: compiled and eager steps write the same codes, scales and parameters, bit for
    bit (float32 parameters: float64 ones leave compressed momenta to the decoded path)."""
    _fused_kernel_or_skip("fused")
    data = batches(3)
    models = [make_tiny(torch.float32) for _ in range(2)]
    eager, opt = (blockopt.AdamMini(m, lr=1e-2, weight_decay=0.1, momentum_dtype="int8", implementation="fused")
                  for m in models)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter)
    _train(models[0], eager, data, eager.step)
    _train(models[1], opt, data, compiled_step)
    assert counter.frame_count >= 1
    kernel_calls = [node for graph in counter.graphs for node in graph.graph.nodes
                    if node.target is torch.ops.blockopt.adam_mini_step]
    assert kernel_calls  # the step ran the kernel inside a graph
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        assert torch.equal(a, b), name
        expected = {"exp_avg_codes", "exp_avg_scales"} if kept_as("int8", opt.plan[name]) == "int8" else {"exp_avg"}
        assert set(opt.state[a]) >= expected
        for key, value in opt.state[a].items():
            assert torch.equal(value, eager.state[b][key]), f"{name} {key}"
    # one graph (the rounding salts are read from a cache, not hashed while tracing); explain steps once more
    assert torch._dynamo.explain(opt.step)().graph_break_count == 0


# (optimizer, implementation, momentum_dtype): compressed momenta of float64 parameters, which the
# fused kernel leaves to the decoded path (Note [compressed momentum in a compiled step])
DECODED = [("AdamMini", "auto", "int8"), ("AdamMini", "batched", "int4"), ("AdamMini", "reference", "bfloat16"),
           ("AdaPM", "auto", "int8"), ("SGDSaI", None, "int8")]


@pytest.mark.parametrize(("name", "implementation", "momentum_dtype"), DECODED, ids=["-".join(map(str, c)) for c in DECODED])
def test_a_compiled_step_of_decoded_compressed_momenta_is_the_eager_step(name, implementation, momentum_dtype):
    """A compiled step used to leave such tensors untouched, without an error (a set difference
    dynamo traced wrongly in the fused dispatch): every parameter must move as it does eagerly."""
    _fused_kernel_or_skip(implementation)
    data = batches(3)
    eager_model, eager = _build(name, implementation, momentum_dtype=momentum_dtype)
    model, opt = _build(name, implementation, momentum_dtype=momentum_dtype)
    start = [p.detach().clone() for p in model.parameters()]
    compiled_step = torch.compile(opt.step, backend=CompileCounterWithBackend("aot_eager"))
    _train(eager_model, eager, data, eager.step)
    _train(model, opt, data, compiled_step)
    for (param_name, a), b, a0 in zip(model.named_parameters(), eager_model.parameters(), start):
        assert not torch.equal(a, a0), f"{param_name} did not move"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=param_name)
        assert float(opt.state[a]["step"]) == float(eager.state[b]["step"]) == len(data)


def test_an_inductor_compiled_int8_adapm_step_builds_and_matches_eager():
    """AdaPM with int8 momentum and bf16 low-rank factors, float32, through inductor: the codec's
    encode failed to build there (and miscompiled int8 codes); it now runs eagerly inside the step.
    (An MLP: the tiny transformer's attention key bias has a rounding-noise gradient, which Adam's
    normalisation turns into full steps that float32 roundings decide.)"""
    _fused_kernel_or_skip("auto")
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    data = [(torch.randn(32, 16), torch.randn(32, 8)) for _ in range(3)]
    eager, opt = (blockopt.AdaPM(m, lr=1e-2, momentum_dtype="int8", rank=4) for m in models)
    compiled_step = torch.compile(opt.step)
    for model, step in ((models[0], eager.step), (models[1], compiled_step)):
        for x, y in data:
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
    assert {"exp_avg_l", "exp_avg_r"} <= set(opt.state[models[1][0].weight])  # low-rank factors (bf16)
    for (param_name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=param_name)


def test_a_compiled_adapm_first_step_draws_its_factors_in_one_graph_break():
    """Each low-rank tensor's initial factor was drawn inside the per-tensor loop, a graph break
    each: a model of 12 low-rank Linears recompiled that frame past torch's limit of 8 (with
    torch's warning). Now they are drawn once, before the loop; the steps equal eager ones."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(12)])
        return model, blockopt.AdaPM(model, lr=1e-2)

    (eager_model, eager), (model, opt) = build(), build()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter)
    torch._dynamo.reset()
    for seed in range(3):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
        for m, step in ((eager_model, eager.step), (model, compiled_step)):
            m(x).square().mean().backward()
            step()
            m.zero_grad()
    assert set(opt.policies.values()) == {"lowrank", "full"}
    assert counter.frame_count <= 4  # (it was 14: a frame per tensor)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.SGDSaI, blockopt.AdaPM], ids=lambda c: c.__name__)
def test_a_compiled_step_with_no_gradient_anywhere_says_so_once_as_an_eager_one(make):
    """The warning for an optimizer left holding parameters nobody trains was skipped while
    compiling: a compiled training loop changed nothing, silently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = make(model, lr=1e-2)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter)
    for _ in range(2):
        model(torch.randn(3, 8)).square().sum().backward()
        step()
        opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"none of its 4 parameters has a gradient, though it holds state") as record:
        step()
        step()
    assert sum("none of its" in str(w.message) for w in record) == 1  # said once
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    model(torch.randn(3, 8)).square().sum().backward()
    step()  # with gradients again, it trains
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), before))
