"""Dropout masks for the fused LoRA layers (fused_lora.py): the masks torch's CPU dropout would draw, drawn by
a small C kernel of ours (dropout_mask.c) about 5x faster.

torch's dropout on CPU fills a mask with `bernoulli_(1 - p)`, one element at a time from its Mersenne
Twister: ~5.1 ns per element here, plus a pass for x * mask. LoRA dropout draws a
mask for each LoRA layer's input (7 per decoder layer), so at --batch-size 16 the masks were 0.04-0.05 s of
the ~0.21 s a sample took. The kernel reads torch's generator state (torch.get_rng_state), draws the same
numbers, writes x * mask in the same pass, and hands the advanced state back (torch.set_rng_state): the run
is the run torch's own draws would give, bit for bit, and the next random numbers drawn are the same too.

It is compiled by cbuild.py (03 starts the build while it imports the libraries) with the machine's C compiler
($CC, else cc, gcc or clang; 0.13-0.15 s here, into a temporary folder that is removed), and used only after a
test draw has given torch's mask and left torch's generator in the same state as torch's own draw. Where there
is no compiler, or the check fails (a PyTorch that draws these masks another way, as builds that use MKL's
generator on Intel CPUs do; one whose generator state is laid out otherwise), torch draws the masks as before:
the same numbers, at the old speed. (The PyTorch 2.15 wheel on an Intel Xeon draws them one by one, and the
kernel runs there.)
"""

import functools
from pathlib import Path

from .cbuild import build, start

SOURCE = Path(__file__).with_name("dropout_mask.c")

# Where the kernel's inputs sit in the bytes of torch.get_rng_state() (PyTorch's CPUGeneratorImplState): the
# engine's count of words left (int32) at 8, the index of the next word (uint64) at 16, its 624 words of state
# (each a uint64 holding a 32-bit value) at 24. The check in _kernel() fails if a PyTorch lays it out otherwise.
STATE_BYTES, LEFT_AT, NEXT_AT, WORDS_AT = 5056, 8, 16, 24


def masked_input(x, keep: float):
    """(x * mask, mask) for a mask drawn as `torch.empty_like(x).bernoulli_(keep)` draws it from torch's
    default generator. The mask is uint8 from the kernel, x's dtype from torch's own draw: multiply by it,
    do not count on its type."""
    import torch

    kernel = _kernel() if (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()) else None
    if kernel is None:
        mask = torch.empty_like(x).bernoulli_(keep)
        return x * mask, mask
    return _draw(kernel, x, keep)


def uses_kernel() -> bool:
    """Whether masks come from the C kernel in this process (compiles it and runs the check on first call)."""
    return _kernel() is not None


def _draw(kernel, x, keep: float):
    import math

    import torch

    state = torch.get_rng_state()
    xm = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.uint8)
    at = state.data_ptr()
    # u < keep exactly when the 53-bit integer u * 2^53 is below ceil(keep * 2^53) (both sides exact in a double)
    kernel(at + WORDS_AT, at + LEFT_AT, at + NEXT_AT, x.numel(), math.ceil(keep * 2.0 ** 53),
           x.data_ptr(), xm.data_ptr(), mask.data_ptr())
    torch.set_rng_state(state)
    return xm, mask


def start_build() -> None:
    """Start compiling the kernel in the background (cbuild.start), unless this process has it already."""
    if not _kernel.cache_info().currsize:
        start(SOURCE)


@functools.cache
def _kernel():
    """The compiled kernel's function, or None where it cannot be built or does not draw torch's numbers."""
    import ctypes

    import torch

    if torch.get_rng_state().numel() != STATE_BYTES:
        return None
    lib = build(SOURCE)
    if lib is None:
        return None
    function = lib.draw_dropout_mask
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_uint64] + [ctypes.c_void_p] * 3
    function.restype = None
    # 2,100 elements: 4,200 words, so the state is refilled several times during the test draw.
    x = torch.linspace(-1.0, 1.0, 2100).reshape(3, 700)
    before = torch.get_rng_state()
    try:
        torch_mask = torch.empty_like(x).bernoulli_(0.9)
        after_torch = torch.get_rng_state()
        torch.set_rng_state(before)
        xm, mask = _draw(function, x, 0.9)
        same = (torch.equal(mask.float(), torch_mask) and torch.equal(xm, x * torch_mask)
                and torch.equal(torch.get_rng_state(), after_torch))
    finally:
        torch.set_rng_state(before)  # the check draws nothing from the run's random stream
    return function if same else None
