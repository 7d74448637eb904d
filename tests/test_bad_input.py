"""Every bad input raises a clear error naming the argument, what it got and what was expected."""
import pytest
import torch

from ddetr_minimal import MSDeformAttn, ms_deform_attn
from ddetr_minimal.models.attention import MultiHeadAttention
from conftest import make_op_inputs

SHAPES = [(4, 5), (2, 3)]  # S = 26


def good():
    return list(make_op_inputs(SHAPES, N=2, Lq=3, M=2, D=4, P=2, dtype=torch.float32))


def call(args, backend="torch"):
    return ms_deform_attn(*args, backend=backend)


def test_good_inputs_pass():
    assert call(good()).shape == (2, 3, 8)


@pytest.mark.parametrize(
    "index,new,pattern",
    [
        (0, torch.zeros(2, 26, 8), r"value must have 4 dimensions \(N, S, M, D\), got 3 with shape \(2, 26, 8\)"),
        (1, torch.tensor([4, 5, 2, 3]), r"spatial_shapes must have 2 dimensions \(L, 2\), got 1"),
        (2, torch.tensor([[0, 20]]), r"level_start_index must have 1 dimensions \(L,\), got 2"),
        (3, torch.zeros(2, 3, 2, 2, 4), r"sampling_locations must have 6 dimensions \(N, Lq, M, L, P, 2\), got 5"),
        (4, torch.zeros(2, 3, 2, 4), r"attention_weights must have 5 dimensions \(N, Lq, M, L, P\), got 4"),
    ],
)
def test_wrong_rank(index, new, pattern):
    args = good()
    args[index] = new
    with pytest.raises(ValueError, match=pattern):
        call(args)


# (what is wrong, {argument index: new value from the good arguments}, error, message)
BAD = [
    ("non-positive level", {1: lambda a: torch.tensor([[4, 5], [0, 3]]), 2: lambda a: torch.tensor([0, 20]),
                            0: lambda a: torch.zeros(2, 20, 2, 4)},
     ValueError, r"spatial_shapes must hold positive \(H_l, W_l\), got \[\[4, 5\], \[0, 3\]\]"),
    ("S not the sum of H*W", {0: lambda a: torch.zeros(2, 25, 2, 4)},
     ValueError, r"value has S=25 positions .*sum\(H\*W\)=26; expected them to be equal"),
    ("level starts", {2: lambda a: torch.tensor([0, 19])},
     ValueError, r"level_start_index is \[0, 19\], but spatial_shapes \[\[4, 5\], \[2, 3\]\] give the level starts "
                 r"\[0, 20\]"),
    ("level starts' length", {2: lambda a: torch.tensor([0, 20, 26])},
     ValueError, r"level_start_index has shape \(3\) .* \(levels L\) is 3; expected 2"),
    ("levels", {3: lambda a: a[3][:, :, :, :1]},  # one level in the locations, two in spatial_shapes
     ValueError, r"sampling_locations .* dimension 3 \(levels L, from spatial_shapes\) is 1; expected 2"),
    ("heads", {4: lambda a: torch.rand(2, 3, 3, 2, 2)},
     ValueError, r"attention_weights has shape \(2, 3, 3, 2, 2\) .* expected \(2, 3, 2, 2, 2\)"),
    ("heads of the locations", {3: lambda a: torch.rand(2, 3, 1, 2, 2, 2)},
     ValueError, r"dimension 2 \(heads M, from value\) is 1; expected 2"),
    ("points", {4: lambda a: torch.rand(2, 3, 2, 2, 1)},  # P=1 would broadcast against P=2 if unchecked
     ValueError, r"attention_weights has shape \(2, 3, 2, 2, 1\)"),
    ("batch", {3: lambda a: a[3][:1]},
     ValueError, r"dimension 0 \(batch N, from value\) is 1; expected 2"),
    ("dtypes", {3: lambda a: a[3].double()},
     TypeError, r"sampling_locations has dtype torch.float64 but value has dtype torch.float32"),
    ("integer value", {0: lambda a: a[0].long()},
     TypeError, r"value must be a floating-point tensor, got dtype torch.int64"),
    ("float shapes", {1: lambda a: a[1].float()},
     TypeError, r"spatial_shapes must be an integer tensor"),
    ("devices", {3: lambda a: a[3].to("meta")},
     ValueError, r"sampling_locations is on device meta but value is on device cpu"),
    ("not a tensor", {0: lambda a: a[0].numpy()},
     TypeError, r"value must be a torch.Tensor of shape \(N, S, M, D\), got ndarray"),
]


@pytest.mark.parametrize("what,changes,error,pattern", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_named(what, changes, error, pattern):
    args = good()
    new = {i: change(args) for i, change in changes.items()}
    for i, value in new.items():
        args[i] = value
    with pytest.raises(error, match=pattern):
        call(args)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_float32_locations_are_accepted_only_for_16_bit_values(value_dtype):
    args = good()
    args[0] = args[0].to(value_dtype)
    assert call(args).dtype == value_dtype  # float32 locations and weights with 16-bit values
    args[4] = args[4].to(value_dtype)
    with pytest.raises(TypeError, match=rf"attention_weights has dtype {value_dtype} but sampling_locations has "
                                        r"dtype torch.float32; expected one dtype for both"):
        call(args)
    args = good()
    args[3], args[4] = args[3].to(torch.float16), args[4].to(torch.float16)  # float32 value, 16-bit locations
    with pytest.raises(TypeError, match=r"sampling_locations has dtype torch.float16 but value has dtype "
                                        r"torch.float32; expected torch.float32"):
        call(args)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'loop', 'torch', 'cupy'\), got 'cuda'"):
        call(good(), backend="cuda")


def test_not_a_tensor():
    args = good()
    args[0] = args[0].numpy()
    with pytest.raises(TypeError, match=r"value must be a torch.Tensor of shape \(N, S, M, D\), got ndarray"):
        call(args)


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads, got d_model=100 and n_heads=8"):
        MSDeformAttn(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads, got d_model=30 and n_heads=4"):
        MultiHeadAttention(d_model=30, n_heads=4)


def test_module_reference_points_wrong_shape():
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    v, ss, lsi, _, _ = good()
    q = torch.randn(2, 3, 16)
    x = torch.randn(2, 26, 16)
    with pytest.raises(ValueError, match=r"reference_points must have shape \(2, 3, 2, 2\) .* got \(2, 3, 2, 3\)"):
        m(q, torch.rand(2, 3, 2, 3), x, ss, lsi)
    with pytest.raises(ValueError, match=r"query must have shape \(N, Lq, 16\), got \(2, 3, 8\)"):
        m(torch.randn(2, 3, 8), torch.rand(2, 3, 2, 2), x, ss, lsi)
    with pytest.raises(ValueError, match=r"input_padding_mask must be a bool tensor of shape \(2, 26\)"):
        m(q, torch.rand(2, 3, 2, 2), x, ss, lsi, torch.zeros(2, 26))
