"""Kronecker factors of grouped and depthwise (transposed) convolutions, per group.

Layout (``curvopt/rules/conv.py``): ``[G, A]`` with a leading group dimension,
``G: [g, C_out/g, C_out/g]``, ``A: [g, (C_in/g)·k…, (C_in/g)·k…]``; one group keeps
the 2-D factors.  Checked against

* the definitions, computed independently in float64 by the oracle (brute-force
  Jacobians): ``A_j = Σ_n U_n,j U_n,jᵀ / N`` over group ``j``'s rows of the unfolded
  input (``oracle.unfold_conv`` / ``unfold_conv_transpose``), ``G_j`` = group ``j``'s
  diagonal block of the output-side factor (square root summed over positions,
  ``oracle.kron_G(..., "sum")``);
* the exact GGN block of group ``j``'s weight slice, at N = 1 with one output
  position, where the Kronecker form is exact (the check also makes sure that the
  swapped order or a rescaled factor would fail).
"""

from __future__ import annotations

import math

import oracle
import pytest
import torch
from cases import conv_net
from torch import nn
from util import assert_close, field_of, run

from curvopt import rules
from curvopt.errors import UnsupportedModuleError
from curvopt.extensions import KFAC, KFLR, KFRA
from curvopt.factors import BATCH, LOSS

DT = torch.float64
_T = nn.modules.conv._ConvTransposeNd

#: (id, conv factory, input shape per sample); groups > 1, depthwise included.
GROUPED = [
    ("conv1d_g2", lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1), (4, 5)),
    ("conv2d_g2_stride", lambda: nn.Conv2d(4, 4, 2, groups=2, stride=2, padding=1), (4, 4, 4)),
    ("conv2d_depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1), (3, 3, 3)),
    ("conv2d_depthwise_mult", lambda: nn.Conv2d(2, 4, 2, groups=2, bias=False), (2, 3, 3)),
    ("conv3d_g2", lambda: nn.Conv3d(2, 4, 2, groups=2), (2, 2, 3, 3)),
    ("convT1d_g2", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, stride=2), (4, 3)),
    ("convT2d_depthwise", lambda: nn.ConvTranspose2d(3, 3, 2, groups=3, stride=2, padding=1,
                                                     output_padding=1), (3, 2, 2)),
    ("convT3d_g2", lambda: nn.ConvTranspose3d(4, 2, 2, groups=2, bias=False), (4, 1, 2, 2)),
]


def _setup(make, shape, N, seed=0):
    torch.manual_seed(seed)
    model = conv_net(make, shape, act=nn.Tanh)().to(DT).eval()
    X = torch.randn(N, *shape, dtype=DT)
    y = torch.randint(0, 3, (N,))
    return model, nn.CrossEntropyLoss(), X, y


def _unfold(conv, x):
    return oracle.unfold_conv_transpose(conv, x) if isinstance(conv, _T) else oracle.unfold_conv(conv, x)


def expected_group_factors(model, loss_fn, X, y, conv):
    """``[G, A]`` per group from the definitions: ``[g, Co, Co]``, ``[g, Di, Di]``."""
    g, C_out = conv.groups, conv.out_channels
    x, _ = oracle.capture_io(model, conv, X)
    U = _unfold(conv, x)  # [N, C_in·K, L], rows channel-major
    Di = U.shape[1] // g
    A = torch.stack([torch.einsum("nil,njl->ij", U[:, j * Di:(j + 1) * Di],
                                  U[:, j * Di:(j + 1) * Di]) / X.shape[0] for j in range(g)])
    G_full = oracle.kron_G(model, loss_fn, X, y, conv, 1, "sum")
    Co = C_out // g
    G = torch.stack([G_full[j * Co:(j + 1) * Co, j * Co:(j + 1) * Co] for j in range(g)])
    return G, A


def group_slices(conv) -> list[torch.Tensor]:
    """Flat indices of group ``j``'s weight, in the row-major order its factors act on."""
    W = conv.weight
    idx = torch.arange(W.numel()).reshape(W.shape)
    g = conv.groups
    if isinstance(conv, _T):  # [C_in, C_out/g, k…]: the slice transposed (BackPACK's [G, Ω])
        c = W.shape[0] // g
        return [idx[j * c:(j + 1) * c].transpose(0, 1).reshape(-1) for j in range(g)]
    c = W.shape[0] // g
    return [idx[j * c:(j + 1) * c].reshape(-1) for j in range(g)]


@pytest.mark.parametrize("name,make,shape", GROUPED, ids=[c[0] for c in GROUPED])
def test_grouped_kflr_matches_definition(name, make, shape):
    model, loss_fn, X, y = _setup(make, shape, N=3)
    conv = model[0]
    assert "weight" in rules.lookup(conv).kronecker(conv)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    got = field_of(results, "0.weight", "kflr")
    G, A = expected_group_factors(model, loss_fn, X, y, conv)
    g = conv.groups
    assert len(got) == 2 and got.scaling == (LOSS, BATCH)  # [G, A]
    assert got[0].shape == (g, conv.out_channels // g, conv.out_channels // g)
    assert got[1].shape == (g, A.shape[1], A.shape[1])
    assert_close(got[0], G, f"{name}: G per group")
    assert_close(got[1], A, f"{name}: A per group")


@pytest.mark.parametrize("name,make,shape", GROUPED, ids=[c[0] for c in GROUPED])
def test_grouped_kfac_shapes_and_A(name, make, shape):
    """KFAC (MC): same layout; A is deterministic and equals KFLR's."""
    model, loss_fn, X, y = _setup(make, shape, N=2)
    torch.manual_seed(0)
    results, _ = run(model, loss_fn, X, y, [KFAC(), KFLR()])
    kfac = field_of(results, "0.weight", "kfac")
    kflr = field_of(results, "0.weight", "kflr")
    assert [t.shape for t in kfac] == [t.shape for t in kflr]
    assert_close(kfac[1], kflr[1], f"{name}: kfac A == kflr A")


#: one sample, exactly one output position: the Kronecker form of each group is exact.
EXACT = [
    ("conv1d_g2", lambda: nn.Conv1d(4, 6, 3, groups=2), (4, 3)),
    ("conv2d_depthwise", lambda: nn.Conv2d(3, 3, 2, groups=3), (3, 2, 2)),
    ("conv2d_depthwise_mult", lambda: nn.Conv2d(2, 6, (2, 3), groups=2), (2, 2, 3)),
    ("conv3d_g2", lambda: nn.Conv3d(4, 2, 2, groups=2), (4, 2, 2, 2)),
    ("convT1d_g2", lambda: nn.ConvTranspose1d(4, 6, 1, groups=2), (4, 1)),
    ("convT2d_depthwise", lambda: nn.ConvTranspose2d(3, 6, 1, groups=3), (3, 1, 1)),
]


@pytest.mark.parametrize("name,make,shape", EXACT, ids=[c[0] for c in EXACT])
def test_grouped_kflr_one_sample_one_position_is_exact_block(name, make, shape):
    model, loss_fn, X, y = _setup(make, shape, N=1)
    conv = model[0]
    with torch.no_grad():
        assert math.prod(conv(X).shape[2:]) == 1, "the case must have one output position"
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    B = oracle.block(full, model, "0.weight")
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    G, A = field_of(results, "0.weight", "kflr")
    for j, sl in enumerate(group_slices(conv)):
        exact = B[sl][:, sl]
        assert_close(torch.kron(G[j], A[j]), exact, f"{name}: kron(G[{j}], A[{j}])")
        # the check has teeth: a rescaled factor or the other order would not pass
        assert not torch.allclose(torch.kron(2 * G[j], A[j]), exact)
        if G.shape[1] > 1 and A.shape[1] > 1:
            assert not torch.allclose(torch.kron(A[j], G[j]), exact)
    # blocks between groups are zero in the exact GGN only by accident; the layout
    # ignores them (documented): nothing to compare there.


def test_groups_one_keeps_2d_factors():
    model, loss_fn, X, y = _setup(lambda: nn.Conv2d(2, 3, 2), (2, 3, 3), N=2)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    G, A = field_of(results, "0.weight", "kflr")
    assert G.shape == (3, 3) and A.shape == (8, 8)


def test_grouped_convT_applied_twice_refuses_kronecker():
    """Weight sharing of a ConvTranspose: refused with a curvopt error, as for groups == 1."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose1d(2, 2, 1, groups=2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.ct, self.fc = ct, nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.ct(torch.tanh(self.ct(x))).flatten(1))

    model = Twice().to(DT)
    X = torch.randn(2, 2, 2, dtype=DT)
    with pytest.raises(UnsupportedModuleError, match="more than once"):
        run(model, nn.CrossEntropyLoss(), X, torch.tensor([0, 2]), [KFLR()])


KFRA_GROUPED = [
    ("conv1d_g2", lambda: nn.Conv1d(4, 4, 2, groups=2), (4, 3)),
    ("conv2d_depthwise", lambda: nn.Conv2d(3, 3, 2, groups=3), (3, 3, 3)),
    ("convT1d_g2", lambda: nn.ConvTranspose1d(4, 6, 2, groups=2), (4, 2)),
]


@pytest.mark.parametrize("name,make,shape", KFRA_GROUPED, ids=[c[0] for c in KFRA_GROUPED])
def test_grouped_kfra_per_group(name, make, shape):
    """KFRA: ``G`` per group is the diagonal block of the recursion's ``G`` (the oracle's
    recursive definition), ``A`` per group as KFLR's."""
    model, loss_fn, X, y = _setup(make, shape, N=3)
    full = oracle.kfra_factors(model, loss_fn, X, y, "sum")["0.weight"]
    results, _ = run(model, loss_fn, X, y, [KFRA()])
    got = field_of(results, "0.weight", "kfra")
    conv = model[0]
    g = conv.groups
    Co = conv.out_channels // g
    G = torch.stack([full[0][j * Co:(j + 1) * Co, j * Co:(j + 1) * Co] for j in range(g)])
    x, _ = oracle.capture_io(model, conv, X)
    U = _unfold(conv, x)
    Di = U.shape[1] // g
    A = torch.stack([torch.einsum("nil,njl->ij", U[:, j * Di:(j + 1) * Di],
                                  U[:, j * Di:(j + 1) * Di]) / X.shape[0] for j in range(g)])
    assert_close(got[0], G, "kfra G per group")
    assert_close(got[1], A, "kfra A per group")
