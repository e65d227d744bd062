"""The selective scan against two oracles, and the Mamba block against mamba-ssm's layout and behaviour.

Oracles: ``selective_scan_ref`` (mamba-ssm's naive recurrence, autograd for gradients) and, for a tiny case,
``scalar_scan`` below (explicit Python loops over every index, so it shares no tensor code with either).
Tolerances are mamba-ssm's own (fp32 rtol 6e-4, atol 2e-3; bf16 rtol 3e-2, atol 5e-2) unless stated tighter.
"""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from retailsim_pipeline.model import Mamba, selective_scan, selective_scan_ref
from retailsim_pipeline.model.mamba import HAS_MAMBA_SSM

FP32 = {"rtol": 6e-4, "atol": 2e-3}
BF16 = {"rtol": 3e-2, "atol": 5e-2}


def scan_inputs(batch, d_inner, d_state, L, *, softplus, dtype=torch.float32, seed=0):
    """Random scan inputs shaped as in Mamba; delta is a pre-activation when softplus is applied."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, L, generator=g)
    if softplus:
        delta = torch.randn(batch, d_inner, L, generator=g)
    else:
        delta = 0.5 * torch.rand(batch, d_inner, L, generator=g)  # the recurrence needs delta >= 0
    # S4D-real A (-1 .. -d_state), jittered so channels differ
    jitter = 0.5 + torch.rand(d_inner, d_state, generator=g)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1) * jitter
    B = torch.randn(batch, d_state, L, generator=g)
    C = torch.randn(batch, d_state, L, generator=g)
    D = torch.randn(d_inner, generator=g)
    z = torch.randn(batch, d_inner, L, generator=g)
    delta_bias = torch.rand(d_inner, generator=g) - 4.0  # softplus(-4 .. -3): Mamba's dt range at init
    u, delta, B, C, z = (t.to(dtype) for t in (u, delta, B, C, z))
    return u, delta, A, B, C, D, z, delta_bias


OPTIONS = [
    pytest.param({}, id="bare"),
    pytest.param({"D": True}, id="D"),
    pytest.param({"z": True}, id="z"),
    pytest.param({"delta_bias": True, "delta_softplus": True}, id="bias-softplus"),
    pytest.param({"delta_softplus": True}, id="softplus"),
    pytest.param({"D": True, "z": True, "delta_bias": True, "delta_softplus": True}, id="mamba"),
]


def call_args(options, inputs):
    u, delta, A, B, C, D, z, delta_bias = inputs
    kwargs = {
        "D": D if options.get("D") else None,
        "z": z if options.get("z") else None,
        "delta_bias": delta_bias if options.get("delta_bias") else None,
        "delta_softplus": options.get("delta_softplus", False),
    }
    return (u, delta, A, B, C), kwargs


# --------------------------------------------------------------------------------------------------------
# selective_scan
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("L", [1, 2, 7, 50])
def test_selective_scan_matches_reference_fp32(options, L):
    inputs = scan_inputs(3, 24, 16, L, softplus=options.get("delta_softplus", False))
    args, kwargs = call_args(options, inputs)
    out = selective_scan(*args, **kwargs)
    expected = selective_scan_ref(*args, **kwargs)
    assert out.shape == (3, 24, L) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **FP32)
    # Only the summation order differs, so the agreement is far tighter than mamba's tolerance.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS)
def test_selective_scan_gradients_match_reference(options):
    """The hand-written backward against autograd through the reference, for every input."""
    inputs = scan_inputs(2, 8, 4, 13, softplus=options.get("delta_softplus", False), seed=1)
    args, kwargs = call_args(options, inputs)
    leaves = [t.double().requires_grad_() for t in args] + [
        v.double().requires_grad_() if isinstance(v, torch.Tensor) else v for v in kwargs.values()
    ]
    grad_out = torch.randn(2, 8, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        kw = dict(zip(kwargs, leaves[5:]))
        out = fn(*leaves[:5], **kw)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        return torch.autograd.grad(out, tensors, grad_out)

    for got, want in zip(grads(selective_scan), grads(selective_scan_ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_selective_scan_gradcheck():
    inputs = scan_inputs(2, 3, 4, 6, softplus=True, seed=3)
    leaves = [t.double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True), leaves)


def test_selective_scan_fp32_gradients_within_mamba_tolerance():
    inputs = scan_inputs(2, 32, 16, 50, softplus=True, seed=4)
    leaves_a = [t.clone().requires_grad_() for t in inputs]
    leaves_b = [t.clone().requires_grad_() for t in inputs]
    selective_scan(*leaves_a, delta_softplus=True).square().sum().backward()
    selective_scan_ref(*leaves_b, delta_softplus=True).square().sum().backward()
    for a, b in zip(leaves_a, leaves_b, strict=True):
        torch.testing.assert_close(a.grad, b.grad, **FP32)


def test_selective_scan_bf16_inputs():
    inputs = scan_inputs(2, 32, 16, 50, softplus=True, dtype=torch.bfloat16, seed=5)
    out = selective_scan(*inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, selective_scan_ref(*inputs, delta_softplus=True), **BF16)
    # and against the fp32 computation on the same (bf16-representable) values
    fp32 = selective_scan_ref(*(t.float() for t in inputs), delta_softplus=True)
    torch.testing.assert_close(out.float(), fp32, **BF16)


def test_selective_scan_returns_last_state():
    inputs = scan_inputs(2, 8, 4, 9, softplus=True, seed=6)
    out, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_ref(*inputs, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 8, 4)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)


def test_selective_scan_stable_for_large_steps():
    """Large delta·A (a trained model can reach it) must decay the state to zero, never overflow."""
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(2, 8, 16, 50, softplus=True, seed=7)
    delta = delta * 30.0  # softplus up to ~90 steps of A down to -24: exp(delta·A) underflows to 0
    out = selective_scan(u, delta, A, B, C, D, z, delta_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus=True), **FP32)


def scalar_scan(u, delta, A, B, C, D, z, delta_bias):
    """out[b, d, t] by explicit loops over every index, with math-module scalars only (delta_softplus=True)."""
    batch, d_inner, L = len(u), len(u[0]), len(u[0][0])
    d_state = len(A[0])
    out = [[[0.0] * L for _ in range(d_inner)] for _ in range(batch)]
    for b in range(batch):
        for d in range(d_inner):
            state = [0.0] * d_state
            for t in range(L):
                pre = delta[b][d][t] + delta_bias[d]
                dt = math.log1p(math.exp(pre))  # softplus
                y = 0.0
                for n in range(d_state):
                    state[n] = math.exp(dt * A[d][n]) * state[n] + dt * B[b][n][t] * u[b][d][t]
                    y += C[b][n][t] * state[n]
                y += D[d] * u[b][d][t]
                gate = z[b][d][t] / (1.0 + math.exp(-z[b][d][t]))  # silu
                out[b][d][t] = y * gate
    return torch.tensor(out, dtype=torch.float64)


def test_scan_and_reference_agree_with_scalar_loops():
    inputs = [t.double() for t in scan_inputs(2, 3, 4, 5, softplus=True, seed=8)]
    expected = scalar_scan(*(t.tolist() for t in inputs))
    u, delta, A, B, C, D, z, delta_bias = inputs
    kwargs = {"D": D, "z": z, "delta_bias": delta_bias, "delta_softplus": True}
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, **kwargs), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(selective_scan_ref(u, delta, A, B, C, **kwargs), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Mamba block
# --------------------------------------------------------------------------------------------------------


def expected_shapes(d_model, d_state=16, d_conv=4, expand=2):
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("d_model", [64, 512])
def test_mamba_state_dict_matches_mamba_ssm_layout(d_model):
    torch.manual_seed(0)
    block = Mamba(d_model)
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert shapes == expected_shapes(d_model)
    assert block.d_inner == 2 * d_model and block.dt_rank == math.ceil(d_model / 16)


def test_mamba_d512_sizes_spelled_out():
    block = Mamba(512)
    assert block.dt_rank == 32 and block.d_inner == 1024
    assert tuple(block.in_proj.weight.shape) == (2048, 512)
    assert tuple(block.conv1d.weight.shape) == (1024, 1, 4)
    assert tuple(block.x_proj.weight.shape) == (32 + 32, 1024)
    assert tuple(block.dt_proj.weight.shape) == (1024, 32)
    assert tuple(block.A_log.shape) == (1024, 16)
    assert tuple(block.D.shape) == (1024,)
    assert tuple(block.out_proj.weight.shape) == (512, 1024)


def test_mamba_bias_flags_add_projection_biases():
    shapes = {n: tuple(t.shape) for n, t in Mamba(64, bias=True).state_dict().items()}
    assert shapes == expected_shapes(64) | {"in_proj.bias": (256,), "out_proj.bias": (64,)}
    assert "conv1d.bias" not in Mamba(64, conv_bias=False).state_dict()
    assert tuple(Mamba(64, d_state=8, d_conv=3, expand=3, dt_rank=5).x_proj.weight.shape) == (5 + 16, 192)


def test_mamba_initialisation():
    torch.manual_seed(0)
    dt_min, dt_max = 0.001, 0.1
    block = Mamba(64, dt_min=dt_min, dt_max=dt_max)
    assert block.A_log.dtype == torch.float32 and block.D.dtype == torch.float32
    torch.testing.assert_close(block.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(128, 1))
    torch.testing.assert_close(block.D, torch.ones(128))
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    assert dt.max() / dt.min() > 10  # log-uniform over two decades, not a constant
    bound = block.dt_rank**-0.5
    assert block.dt_proj.weight.abs().max() <= bound and block.dt_proj.weight.abs().max() > 0.5 * bound
    assert block.dt_proj.bias._no_reinit is True
    assert block.A_log._no_weight_decay is True and block.D._no_weight_decay is True
    constant = Mamba(64, dt_init="constant", dt_scale=2.0)
    torch.testing.assert_close(constant.dt_proj.weight, torch.full((128, 4), 2.0 * 4**-0.5))
    with pytest.raises(NotImplementedError):
        Mamba(64, dt_init="xavier")


def reference_forward(block: Mamba, hidden_states):
    """The block's math written independently: batch-major linears, explicit causal padding, reference scan."""
    batch, L, _ = hidden_states.shape
    x, z = F.linear(hidden_states, block.in_proj.weight, block.in_proj.bias).transpose(1, 2).chunk(2, dim=1)
    x = F.pad(x, (block.d_conv - 1, 0))  # left-pad only: causal
    x = F.silu(F.conv1d(x, block.conv1d.weight, block.conv1d.bias, groups=block.d_inner))
    dt, B, C = block.x_proj(x.transpose(1, 2)).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    dt = F.linear(dt, block.dt_proj.weight).transpose(1, 2)
    y = selective_scan_ref(
        x, dt, -torch.exp(block.A_log), B.transpose(1, 2), C.transpose(1, 2), block.D,
        z=z, delta_bias=block.dt_proj.bias, delta_softplus=True,
    )
    return block.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_mamba_forward_matches_independent_formulation(bias):
    torch.manual_seed(0)
    block = Mamba(64, bias=bias)
    hidden_states = torch.randn(3, 20, 64)
    out = block(hidden_states)
    assert out.shape == (3, 20, 64)
    torch.testing.assert_close(out, reference_forward(block, hidden_states), rtol=1e-5, atol=1e-5)


def test_mamba_state_dict_round_trip():
    torch.manual_seed(0)
    block = Mamba(64)
    hidden_states = torch.randn(2, 12, 64)
    torch.manual_seed(1)  # a different init, so equality below comes from the loaded weights
    fresh = Mamba(64)
    assert not torch.equal(fresh.dt_proj.bias, block.dt_proj.bias)
    fresh.load_state_dict(block.state_dict())
    assert torch.equal(fresh(hidden_states), block(hidden_states))


def test_mamba_is_causal():
    torch.manual_seed(0)
    block = Mamba(32)
    hidden_states = torch.randn(2, 16, 32)
    changed = hidden_states.clone()
    changed[:, 9:] = torch.randn(2, 7, 32)
    out, out_changed = block(hidden_states), block(changed)
    torch.testing.assert_close(out_changed[:, :9], out[:, :9], rtol=0, atol=1e-6)
    assert (out_changed[:, 9:] - out[:, 9:]).abs().amin(dim=-1).gt(0).all()  # later positions do change


def test_mamba_right_padding_leaves_real_positions_unchanged():
    torch.manual_seed(0)
    block = Mamba(32)
    basket = torch.randn(1, 7, 32)
    padded = torch.cat([basket, torch.zeros(1, 5, 32)], dim=1)
    torch.testing.assert_close(block(padded)[:, :7], block(basket), rtol=0, atol=1e-6)


def test_mamba_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = Mamba(32, bias=True)
    block(torch.randn(2, 10, 32)).square().mean().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_mamba_bf16_runs_with_fp32_ssm_parameters():
    torch.manual_seed(0)
    block = Mamba(32, dtype=torch.bfloat16)
    assert block.in_proj.weight.dtype == torch.bfloat16 and block.A_log.dtype == torch.float32
    hidden_states = torch.randn(2, 10, 32)
    out = block(hidden_states.bfloat16())
    assert out.dtype == torch.bfloat16
    fp32 = Mamba(32)
    fp32.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    torch.testing.assert_close(out.float(), fp32(hidden_states.bfloat16().float()), **BF16)


def test_mamba_rejects_inference_cache():
    with pytest.raises(NotImplementedError, match="inference_params"):
        Mamba(16)(torch.randn(1, 3, 16), inference_params=object())


def test_model_package_imports_torch_only():
    code = (
        "import sys, retailsim_pipeline.model; "
        "print(sorted(m for m in ('polars', 'dagster', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------
# Parity with mamba-ssm (needs CUDA and mamba-ssm)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="needs mamba-ssm (pip install '.[gpu]')")
@pytest.mark.parametrize("use_fast_path", [True, False])
def test_mamba_matches_mamba_ssm_on_cuda(use_fast_path):
    from mamba_ssm import Mamba as MambaSSM

    torch.manual_seed(0)
    ours = Mamba(64, use_fast_path=use_fast_path).cuda()
    theirs = MambaSSM(64).cuda()
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys and shapes
    hidden_states = torch.randn(4, 50, 64, device="cuda")
    ours_out, theirs_out = ours(hidden_states), theirs(hidden_states)
    torch.testing.assert_close(ours_out, theirs_out, **FP32)
    ours_out.square().sum().backward()
    theirs_out.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **FP32, msg=lambda m, name=name: f"{name}: {m}")
