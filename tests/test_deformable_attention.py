"""MSDeformAttn: shapes, the paper's initialisation, reference point kinds and padding masks."""
import math

import pytest
import torch

from ddetr_minimal import MSDeformAttn
from ddetr_minimal.ops.checks import level_start_index_from_shapes

SHAPES = torch.tensor([[8, 10], [4, 5], [2, 3], [1, 1]])  # (L, 2)
LSI = level_start_index_from_shapes(SHAPES)
S = int(SHAPES.prod(1).sum())


def _inputs(N=2, Lq=6, C=32, L=4, ref_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, Lq, C, generator=g), torch.rand(N, Lq, L, ref_dim, generator=g),
            torch.randn(N, S, C, generator=g))


def test_output_shape_and_channel_count():
    m = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)
    q, ref, x = _inputs()
    assert m(q, ref, x, SHAPES, LSI).shape == (2, 6, 32)
    # 3MLK channels predicted from the query: 2MLK offsets plus MLK weights
    M, L, K = 4, 4, 3
    assert m.sampling_offsets.out_features + m.attention_weights.out_features == 3 * M * L * K


def test_init_offsets_form_a_ring_of_head_directions():
    M, L, K = 8, 4, 4
    m = MSDeformAttn(d_model=64, n_levels=L, n_heads=M, n_points=K)
    bias = m.sampling_offsets.bias.detach().view(M, L, K, 2)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    for h in range(M):
        angle = math.atan2(bias[h, 0, 0, 1], bias[h, 0, 0, 0])
        assert math.isclose((angle - 2 * math.pi * h / M) % (2 * math.pi), 0, abs_tol=1e-5) or \
            math.isclose((angle - 2 * math.pi * h / M) % (2 * math.pi), 2 * math.pi, abs_tol=1e-5)
        # the larger component of the first point is one pixel; point k is k+1 times further out
        assert bias[h, 0, 0].abs().max().item() == pytest.approx(1.0)
        for k in range(K):
            torch.testing.assert_close(bias[h, :, k], (k + 1) * bias[h, :, 0])


def test_init_samples_are_query_independent_and_uniformly_weighted():
    m = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2)
    q, ref, _ = _inputs()
    loc, w = m.sampling(q, ref, SHAPES)  # (N, Lq, M, L, K, 2), (N, Lq, M, L, K)
    torch.testing.assert_close(w, torch.full_like(w, 1 / (4 * 2)))
    # offset in pixels of each level = bias; location = reference + bias / (W_l, H_l)
    bias = m.sampling_offsets.bias.view(4, 4, 2, 2)
    expected = ref[:, :, None, :, None, :] + bias / SHAPES.flip(-1)[None, None, None, :, None, :]
    torch.testing.assert_close(loc, expected)


def test_box_reference_points_scale_offsets_by_box_size():
    m = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2)
    q, _, _ = _inputs()
    boxes = torch.tensor([0.5, 0.4, 0.2, 0.1]).expand(2, 6, 4, 4)  # (N, Lq, L, 4) cx, cy, w, h
    loc, _ = m.sampling(q, boxes, SHAPES)
    bias = m.sampling_offsets.bias.view(4, 4, 2, 2)
    expected = torch.tensor([0.5, 0.4]) + bias / 2 * torch.tensor([0.2, 0.1]) * 0.5
    torch.testing.assert_close(loc, expected.expand_as(loc))
    # every sample stays inside the box: |offset| <= K and it is scaled by half the size / K
    assert ((loc[..., 0] - 0.5).abs() <= 0.1 + 1e-6).all() and ((loc[..., 1] - 0.4).abs() <= 0.05 + 1e-6).all()


def test_padding_mask_zeroes_padded_values():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=4)
    with torch.no_grad():  # make offsets and weights query-dependent so samples hit everywhere
        m.sampling_offsets.weight.normal_(0, 0.5)
        m.attention_weights.weight.normal_(0, 0.5)
    q, ref, x = _inputs()
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[:, ::3] = True
    out = m(q, ref, x, SHAPES, LSI, mask)
    x2 = x.clone()
    x2[mask] = 1e3 * torch.randn_like(x2[mask])  # whatever sits under the padding is ignored
    torch.testing.assert_close(m(q, ref, x2, SHAPES, LSI, mask), out)
    assert not torch.allclose(m(q, ref, x2, SHAPES, LSI), m(q, ref, x, SHAPES, LSI))


def test_single_scale_is_n_levels_1():
    shapes = torch.tensor([[6, 7]])
    m = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=4)
    q, x = torch.randn(1, 5, 16), torch.randn(1, 42, 16)
    ref = torch.rand(1, 5, 1, 2)
    assert m(q, ref, x, shapes, level_start_index_from_shapes(shapes)).shape == (1, 5, 16)


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_module_backends_agree_and_gradients_flow(backend):
    torch.manual_seed(1)
    m = MSDeformAttn(d_model=16, n_levels=4, n_heads=2, n_points=2, backend=backend).double()
    ref_m = MSDeformAttn(d_model=16, n_levels=4, n_heads=2, n_points=2, backend="torch").double()
    ref_m.load_state_dict(m.state_dict())
    q = torch.randn(2, 3, 16, dtype=torch.float64)
    x = torch.randn(2, S, 16, dtype=torch.float64)
    ref = torch.rand(2, 3, 4, 2, dtype=torch.float64)
    out = m(q, ref, x, SHAPES, LSI)
    torch.testing.assert_close(out, ref_m(q, ref, x, SHAPES, LSI))
    out.square().sum().backward()
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        assert getattr(m, name).weight.grad.abs().sum() > 0, name
