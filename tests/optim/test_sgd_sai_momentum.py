"""SGDSaI's momentum_dtype: its buffer stored as AdamMini's first moment is (optim/momentum.py).

Against a float64 loop of SGD-SaI whose m is passed through the codec after every step;
checkpoints that load across storages; true state bytes. (Resume bit-identical: tests/optim/test_momentum.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import blockopt
from blockopt.kernels.codecs import codec, rounding_key
from blockopt.optim import momentum

from .conftest import batches, lm_loss, make_tiny, train

pytestmark = pytest.mark.usefixtures("one_thread")

COMPRESSED = ["bfloat16", "int8", "int4"]
ALL = [None, "float32", *COMPRESSED]
KEYS = momentum.keys("momentum_buffer")


def stored_as(dtype, m: torch.Tensor, t: int, name: str):
    """``m`` as ``dtype`` keeps it after step ``t``, and back (float64)."""
    if dtype is None:
        return m
    if dtype == "float32":
        return m.float().double()
    kept = codec(dtype).encode(m, rounding_key(momentum.ROUNDING_SEED, t, momentum.salt(name)))
    return codec(dtype).decode(kept, tuple(m.shape)).double()


def reference_run(model, data, *, dtype, normalize=False, lr=1e-3, mu=0.9, eps=1e-8, weight_decay=1e-2):
    """SGD-SaI (one block per tensor) written out in float64, m stored through the codec."""
    params = dict(model.named_parameters())
    m, gsnr = {}, {}
    for t, idx in enumerate(data, start=1):
        model.zero_grad()
        lm_loss(model, idx).backward()
        with torch.no_grad():
            for name, p in params.items():
                g = p.grad.double()
                if name not in gsnr:
                    measured = g.numel() > 1 and bool(g.any())
                    gsnr[name] = (g.norm() / (g.std() + eps)).item() if measured else math.sqrt(g.numel())
            scale = lr / max(gsnr.values()) if normalize else lr
            for name, p in params.items():
                g = p.grad.double()
                new_m = g if t == 1 else mu * m[name] + (1 - mu) * g
                p.mul_(1 - lr * weight_decay).sub_(scale * gsnr[name] * new_m)  # the step takes m before it is stored
                m[name] = stored_as(dtype, new_m, t, name)


@pytest.mark.parametrize(("dtype", "normalize"), [(dtype, False) for dtype in ALL] + [("int8", True)])
def test_each_storage_matches_a_float64_loop(dtype, normalize):
    data = batches(6)
    ours_model, ref_model = make_tiny(bias=False), make_tiny(bias=False)
    opt = blockopt.SGDSaI(ours_model, lr=1e-3, momentum_dtype=dtype, normalize=normalize)
    train(ours_model, opt, data)
    reference_run(ref_model, data, dtype=dtype, normalize=normalize)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if dtype in COMPRESSED:  # the codec is in the loop: the run is not the uncompressed one
        plain_model = make_tiny(bias=False)
        train(plain_model, blockopt.SGDSaI(plain_model, lr=1e-3, normalize=normalize), data)
        assert max((a - b).abs().max() for a, b in zip(ours_model.parameters(), plain_model.parameters())) > 1e-8


@pytest.mark.parametrize("dtype", ALL)
def test_storage_and_true_state_bytes(dtype):
    model = make_tiny(torch.float32)
    opt = blockopt.SGDSaI(model, momentum_dtype=dtype)
    train(model, opt, batches(2))
    total = 0
    for name, p in model.named_parameters():
        state = opt.state[p]
        r, n = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (1, p.numel())  # rows of n elements
        n_chunks = r * -(-n // 256)  # chunks never cross a row
        expected = {
            None: {"momentum_buffer": (torch.float32, 4 * p.numel())},
            "float32": {"momentum_buffer": (torch.float32, 4 * p.numel())},
            "bfloat16": {"momentum_buffer": (torch.bfloat16, 2 * p.numel())},
            "int8": {"momentum_buffer_codes": (torch.int8, p.numel()), "momentum_buffer_scales": (torch.float32, 4 * n_chunks)},
            "int4": {"momentum_buffer_codes": (torch.uint8, r * -(-n // 2)), "momentum_buffer_scales": (torch.float32, 4 * n_chunks)},
        }[dtype]
        for key, (tensor_dtype, nbytes) in expected.items():
            assert state[key].dtype == tensor_dtype and state[key].numel() * state[key].element_size() == nbytes
        counted = dtype in COMPRESSED  # rounding keys need the step count
        assert set(state) == {"gsnr", *expected, *(["step"] if counted else [])}
        total += 4 * opt.block_spec(name).n_blocks + sum(nbytes for _, nbytes in expected.values()) + 4 * counted
    assert blockopt.state_bytes(opt) == total


@pytest.mark.parametrize("source", ALL)
@pytest.mark.parametrize("target", ALL)
def test_checkpoints_load_across_storages(source, target):
    model = make_tiny(torch.float32)
    saver = blockopt.SGDSaI(model, momentum_dtype=source)
    train(model, saver, batches(3))
    saved = saver.state_dict()
    before = copy.deepcopy(saved)
    loader = blockopt.SGDSaI(model, momentum_dtype=target)
    loader.load_state_dict(saved)
    assert loader.param_groups[0]["momentum_dtype"] == target  # the live storage stays
    for p in model.parameters():
        src, dst = saver.state[p], loader.state[p]
        shape = tuple(p.shape)
        assert set(momentum.state_shapes(target, shape, "momentum_buffer")) <= set(dst) <= {"gsnr", "step", *KEYS}
        m_src = momentum.read(source, src, shape, "momentum_buffer")
        m_dst = momentum.read(target, dst, shape, "momentum_buffer")
        # what the target can hold of the source's m: within the target codec's rounding
        scale = m_src.abs().max().clamp_min(1e-30)
        tolerance = {None: 0, "float32": 0, "bfloat16": 2**-7, "int8": 2 / 127, "int4": 2 / 7 * 2}[target]
        assert float((m_dst - m_src).abs().max() / scale) <= tolerance + 1e-7
        assert torch.equal(dst["gsnr"], src["gsnr"])
    assert before["param_groups"] == saved["param_groups"]  # the caller's dict is untouched
    for k, v in before["state"].items():
        assert all(torch.equal(v[key], saved["state"][k][key]) for key in v)
    train(model, loader, batches(2, seed=1))  # and it steps on
    if target in COMPRESSED:
        assert all(float(loader.state[p]["step"]) >= 2 for p in model.parameters())


def test_a_package_checkpoint_loads_into_compressed_storage():
    sgd_sai = pytest.importorskip("sgd_sai")
    model = make_tiny(torch.float32)
    theirs = sgd_sai.SGD_sai(model.parameters(), lr=1e-3)
    train(model, theirs, batches(2))
    ours = blockopt.SGDSaI(model, lr=1e-3, momentum_dtype="int8")
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for p in model.parameters():
        m = momentum.read("int8", ours.state[p], tuple(p.shape), "momentum_buffer")
        buffer = theirs.state[p]["momentum_buffer"]
        assert (m - buffer).abs().max() <= buffer.abs().max() * 2 / 127 + 1e-12
    train(model, ours, batches(1, seed=1))


def test_no_momentum_keeps_no_buffer_whatever_its_dtype_and_groups_choose_their_own():
    model = make_tiny(torch.float32)
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    vectors = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    opt = blockopt.SGDSaI([{"params": matrices, "momentum_dtype": "int4"}, {"params": vectors, "momentum": 0.0}],
                          momentum_dtype="int8")
    train(model, opt, batches(2))
    assert all("momentum_buffer_codes" in opt.state[p] and opt.state[p]["momentum_buffer_codes"].dtype == torch.uint8
               for _, p in matrices)
    assert all(set(opt.state[p]) == {"gsnr"} for _, p in vectors)
    with pytest.raises(ValueError, match="momentum_dtype must be one of .*'int8'.*, got 'fp8'"):
        blockopt.SGDSaI(model, momentum_dtype="fp8")


def test_a_buffer_of_another_shape_is_refused_naming_it():
    model = make_tiny(torch.float32)
    opt = blockopt.SGDSaI(model, momentum_dtype="int8")
    train(model, opt, batches(1))
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["momentum_buffer_scales"] = torch.zeros(7)
    with pytest.raises(ValueError, match="'momentum_buffer_scales' of 'embed.weight' has shape \\(7,\\), expected"):
        blockopt.SGDSaI(model, momentum_dtype="int8").load_state_dict(saved)
