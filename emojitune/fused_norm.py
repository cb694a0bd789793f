"""CPU speed path for Gemma 3's RMSNorm layers: one pass of a small C kernel of ours (rms_norm.c) forward and
one backward, instead of PyTorch's elementwise operations.

A Gemma 3 decoder layer has six RMSNorms: before and after attention and the MLP, and on each head's queries
and keys. Each is seven elementwise operations forward and about as many backward, each an autograd node and a
pass over the tensor; at batch 1 (~50 positions) their cost is mostly the operations' overhead, at batch 16
the passes. Here a layer is one autograd function. Alone, on a 2-core Intel Xeon: 54 x 640 (a batch-1 norm)
forward and backward 162 -> 65 us, 16 x 55 x 640 2.5 -> 0.6 ms. The frozen weight's (1 + w) is computed once,
not per call. Same mathematics, sums in another order: float32 rounding.

Built by cbuild.py (03 starts the build while it imports the libraries) and used only after a check against
transformers' own layer, forward and backward; without a compiler, or where the check fails, the layers run as
they are. Only for float32 tensors on CPU with the norm's weight frozen (LoRA trains none); other calls take the
layer's own forward.
"""

import functools
from pathlib import Path

from .cbuild import build, start
from .modeling import route_cpu_layers

SOURCE = Path(__file__).with_name("rms_norm.c")
FLAGS = ("-fopenmp-simd",)  # the sums' vector reduction (no OpenMP runtime)


def install(model) -> int:
    """Route the Gemma 3 RMSNorm layers of a model on CPU through the kernel. Returns the number of layers
    routed (0 where it does not apply: another model, not CPU, no kernel). Idempotent."""
    return route_cpu_layers(model, _gemma3_norm_class(), _forward, lambda: _kernel() is not None)


def _forward(norm, x):
    import torch

    layout = _row_layout(x)
    if (x.dtype != torch.float32 or x.device.type != "cpu" or norm.weight.requires_grad
            or norm.weight.dtype != torch.float32 or layout is None):
        return type(norm).forward(norm, x)
    scale = getattr(norm, "_fused_scale", None)
    if scale is None or scale[0] != norm.weight._version:
        # (1 + w) as transformers computes it, once: made again if the weight is changed in place
        scale = norm._fused_scale = (norm.weight._version, (1.0 + norm.weight.detach()).contiguous())
    return _function().apply(x, scale[1], norm.eps, layout)


def _row_layout(x):
    """Where x's rows (of its last dimension, each contiguous) lie: ((outer, outer stride), (inner, inner stride),
    strides of a dense tensor of x's shape holding the rows in that order), or None where it takes more than two
    levels. A contiguous x is one level; the attention's queries, viewed [batch, heads, positions, head_dim] in
    the fused q/k/v product's [positions, 1,536] output (fused_lora.py), are positions at a stride of 1,536 and
    heads at 256 within each."""
    if x.dim() == 0 or x.shape[-1] < 2 or x.stride(-1) != 1:
        return None
    dims = sorted((i for i in range(x.dim() - 1) if x.shape[i] != 1), key=lambda i: -x.stride(i))
    levels = []
    for i in dims:  # dimensions whose strides nest, as [positions, heads x head_dim]'s do, make one level
        if levels and levels[-1][1] == x.stride(i) * x.shape[i]:
            levels[-1] = (levels[-1][0] * x.shape[i], x.stride(i))
        else:
            levels.append((x.shape[i], x.stride(i)))
    if len(levels) > 2:
        return None
    levels += [(1, 0)] * (2 - len(levels))
    strides, running = [1] * x.dim(), x.shape[-1]
    for i in reversed(dims):
        strides[i] = running
        running *= x.shape[i]
    for i in range(x.dim() - 1):
        if x.shape[i] == 1:
            strides[i] = running
    return levels[0], levels[1], tuple(strides)


def _normalize(forward_kernel, x, scale, eps, layout):
    """(y, r): the norm of x's rows laid out as _row_layout says, and each row's 1 / rms for the backward."""
    import torch

    (outer, outer_stride), (inner, inner_stride), strides = layout
    y = torch.empty_strided(x.shape, strides)
    r = x.new_empty(outer * inner)
    forward_kernel(x.data_ptr(), outer, outer_stride, inner, inner_stride, x.shape[-1], scale.data_ptr(), eps,
                   y.data_ptr(), r.data_ptr())
    return y, r


def _input_gradient(backward_kernel, x, scale, r, grad_y, layout):
    """x's gradient for the output gradient grad_y (any layout), from _normalize's r."""
    import torch

    (outer, outer_stride), (inner, inner_stride), strides = layout
    if grad_y.stride() != strides:
        grad_y = torch.empty_strided(x.shape, strides).copy_(grad_y)  # the kernel reads rows in y's order
    grad_x = torch.empty_strided(x.shape, strides)
    backward_kernel(x.data_ptr(), outer, outer_stride, inner, inner_stride, x.shape[-1], scale.data_ptr(),
                    r.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr())
    return grad_x


@functools.cache
def _function():
    import torch
    from torch.autograd.function import once_differentiable

    class FusedRmsNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, eps, layout):
            y, r = _normalize(_kernel()[0], x, scale, eps, layout)
            ctx.save_for_backward(x, scale, r)
            ctx.layout = layout
            return y

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_y):
            x, scale, r = ctx.saved_tensors
            return _input_gradient(_kernel()[1], x, scale, r, grad_y, ctx.layout), None, None, None

    return FusedRmsNorm


@functools.cache
def _gemma3_norm_class():
    try:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    except ImportError:
        return None
    return Gemma3RMSNorm


def start_build() -> None:
    """Start compiling the kernel in the background (cbuild.start), unless this process has it already."""
    if not _kernel.cache_info().currsize:
        start(SOURCE, FLAGS)


@functools.cache
def _kernel():
    """The compiled kernel's (forward, backward) functions, or None where they cannot be built or do not give
    transformers' numbers."""
    import ctypes

    import torch

    norm_class = _gemma3_norm_class()
    lib = build(SOURCE, FLAGS)
    if norm_class is None or lib is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    forward, backward = lib.rms_norm_forward, lib.rms_norm_backward
    forward.argtypes = [pointer, size, size, size, size, size, pointer, ctypes.c_float, pointer, pointer]
    backward.argtypes = [pointer, size, size, size, size, size, pointer, pointer, pointer, pointer]
    forward.restype = backward.restype = None
    # A contiguous input, and queries viewed [batch, heads, positions, head_dim] in a wider product's output.
    generator = torch.Generator().manual_seed(0)
    norm = norm_class(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
    norm.weight.requires_grad_(False)
    scale = 1.0 + norm.weight
    same = True
    for x in (torch.randn(3, 5, 96, generator=generator) * 4,
              torch.randn(2, 7, 5 * 96, generator=generator)[..., :3 * 96].view(2, 7, 3, 96).transpose(1, 2)):
        grad_y = torch.randn(x.shape, generator=generator)
        x.requires_grad_(True)
        expected = norm_class.forward(norm, x)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_y)
        x, layout = x.detach(), _row_layout(x)
        y, r = _normalize(forward, x, scale, norm.eps, layout)
        grad_x = _input_gradient(backward, x, scale, r, grad_y, layout)
        same = same and torch.allclose(y, expected, atol=1e-5) and torch.allclose(grad_x, expected_grad, atol=1e-5)
    return (forward, backward) if same else None
