"""`usage.output_dims`: which dim of a stacked weight is an output, read from the forward.

Each module below stores its weights one way and uses them one way; the expected dim is the one
its forward writes its outputs along (written by hand for each module).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockopt.partition.usage import output_dims

E, H, I = 4, 8, 8  # in == out on purpose: the shapes cannot tell the orientation


class Experts(nn.Module):
    """Two stacked weights; each subclass stores them its way (``shapes``) and uses them its way."""

    names, shapes = ("w1", "w2"), ((E, H, I), (E, I, H))

    def __init__(self):
        super().__init__()
        self.num_experts = E
        for name, shape in zip(self.names, self.shapes):
            setattr(self, name, nn.Parameter(torch.randn(shape)))


class LinearExperts(Experts):
    """(E, out, in), used by F.linear per expert, routed by data-dependent ops (nonzero, item)."""

    names, shapes = ("up", "down"), ((E, 2 * I, H), (E, H, I))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).nonzero():
            if e.item() >= self.num_experts:
                continue
            rows = (top_k_index == e).any(-1).nonzero().squeeze(-1)
            gate, up = F.linear(hidden_states[rows], self.up[e.item()]).chunk(2, dim=-1)
            out.index_add_(0, rows, F.linear(F.silu(gate) * up, self.down[e.item()]))
        return out


class MatmulExperts(Experts):
    """(E, in, out), used as ``x @ W[e]``."""

    names = ("w_in", "w_out")

    def forward(self, hidden_states, expert_ids, routing_weights):
        out = 0
        for e in range(self.num_experts):
            out = out + torch.relu(hidden_states @ self.w_in[e]) @ self.w_out[e]
        return out


class EinsumExperts(Experts):
    """(E, in, out) through einsum, which reaches the matmul through permutes and reshapes."""

    def forward(self, x):
        return torch.einsum("eti,eih->th", torch.relu(torch.einsum("th,ehi->eti", x, self.w1)), self.w2)


class LeftOperandExperts(Experts):
    """(E, out, in) as the *left* operand of a batched matmul: ``W @ x``."""

    shapes = ((E, I, H), (E, H, I))

    def forward(self, x):
        h = torch.bmm(self.w1, x.T.unsqueeze(0).expand(E, -1, -1))
        return torch.bmm(self.w2, h).sum(0).T


class Opaque(nn.Module):
    """A forward that needs an argument the probe cannot make up: no answer, not a guess."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, H, I))

    def forward(self, x, mystery_object):
        return x @ self.w[mystery_object.index]


@pytest.mark.parametrize("module, expected", [
    (LinearExperts(), {"up": 1, "down": 1}),
    (MatmulExperts(), {"w_in": 2, "w_out": 2}),
    (EinsumExperts(), {"w1": 2, "w2": 2}),
    (LeftOperandExperts(), {"w1": 1, "w2": 1}),
    (Opaque(), {}),
], ids=lambda x: type(x).__name__ if isinstance(x, nn.Module) else "")
def test_output_dim_from_use(module, expected):
    assert output_dims(module, list(expected) or ["w"]) == expected


def test_probe_leaves_the_module_as_it_was():
    module = LinearExperts()
    before = {n: (p.device, p.data_ptr()) for n, p in module.named_parameters()}
    output_dims(module, ["up", "down"])
    assert {n: (p.device, p.data_ptr()) for n, p in module.named_parameters()} == before


def test_parent_forward_used_when_the_module_cannot_be_called():
    """The experts' own forward needs an object the probe cannot build; its parent's forward
    (hidden states only) reaches the same weights."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Opaque()

        def forward(self, x):
            return x @ self.experts.w[0]

    block = Block()
    assert output_dims(block.experts, ["w"], parent=block, prefix="experts") == {"w": 2}


@pytest.mark.hf
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_hf_experts_every_implementation(implementation):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        experts = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp.experts
    assert output_dims(experts, ["gate_up_proj", "down_proj"]) == {"gate_up_proj": 1, "down_proj": 1}
