"""Vanilla attention written out equals PyTorch's, and the cost counters follow the formulas."""
import pytest
import torch

from ddetr_minimal.models.attention import MultiHeadAttention
from ddetr_minimal.measure.cost import attention_flops, deformable_attention_flops
from ddetr_minimal.measure.memory import attention_memory, deformable_attention_memory


def test_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(d_model=32, n_heads=4)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    q, k = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, -3:] = True
    out, attn = ours(q, k, k, key_padding_mask=mask)
    ref_out, ref_attn = ref(q, k, k, key_padding_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)
    assert attn[1, :, :, -3:].abs().max() == 0  # padded keys get no attention
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 5))


def test_vanilla_cost_is_quadratic_and_deformable_linear_in_hw():
    """Second differences at equally spaced sizes: constant for a quadratic, zero for a line."""
    C = 256
    for hw in (100, 1000, 10000):
        f = [attention_flops(n, n, C) for n in (hw, 2 * hw, 3 * hw)]
        # self-attention: N_q = N_k = HW, the N_q N_k C terms (scores, mix) give 4 C HW^2
        assert f[2] - 2 * f[1] + f[0] == 2 * (4 * C) * hw ** 2
        d = [deformable_attention_flops(n, n, C, 8, 4, 4) for n in (hw, 2 * hw, 3 * hw)]
        assert d[2] - 2 * d[1] + d[0] == 0  # exactly linear in HW
        assert d[0] < f[0]
    assert attention_memory(100, 100, 8) == 8 * 100 * 100 * 4
    assert deformable_attention_memory(100, 8, 4, 4) == 3 * 100 * 8 * 4 * 4 * 4


def test_decoder_cross_attention_cost_terms():
    """O(HW C^2 + N HW C): doubling HW doubles the cost at fixed N (linear in HW for cross-attention)."""
    C, N = 256, 100
    f = [attention_flops(N, hw, C) for hw in (1000, 2000, 3000)]
    assert f[2] - 2 * f[1] + f[0] == 0
    assert f[0] == pytest.approx(4 * N * C * C + 4 * 1000 * C * C + 4 * N * 1000 * C)
