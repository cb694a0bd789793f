"""The training loss for a few answer rows (batch 1) on CPU in one read of the frozen output layer, by a small C
kernel of ours (output_pass.c), split over PyTorch's threads.

Below a dozen answer rows, the loss path of loss.py reads Gemma 3's 262,144 x 640 output layer twice per
step: once for the logits, once (from a transposed copy, 671 MB more memory) for the input gradient. Both are
bound by memory bandwidth, not arithmetic. The kernel reads each block of the layer once and computes, per
row, the largest logit, the sum of exponentials and the softmax-weighted sum of the layer's rows (the online
softmax of loss.cpu_frozen_output_loss); the cross-entropy and its gradient follow from those. Each thread
passes over its own part of the vocabulary (ctypes lets go of the GIL during the call), and the parts are
merged. The same quantities as log_softmax + nll, summed in another order: float32 rounding.

Built by cbuild.py (03 starts the build while it imports the libraries) and used only after a check against
F.cross_entropy's loss and gradient; without a compiler, or where the check fails, loss.py keeps its two passes.
"""

import functools
import threading
from pathlib import Path

from .cbuild import build, start

SOURCE = Path(__file__).with_name("output_pass.c")
FLAGS = ("-fopenmp-simd",)  # the dot products' vector reduction (no OpenMP runtime)
MAX_ROWS = 16  # output_pass.c's MAX_ROWS
# The online softmax sums of the output-layer losses (this kernel's and loss.cpu_frozen_output_loss's) take no
# exponent below this: such terms (under 1e-30) cannot change a sum that holds exp(0) = 1, but exp of a logit more
# than ~87 below the row's largest is a subnormal float (under 1.2e-38), as are its products with the layer's
# weights from ~83 below, and Intel CPUs compute those slowly. On a 2-core Xeon, before the cut-off: this kernel
# with 3 rows whose logits spanned 140-330 108-242 ms per pass instead of 41-45; the torch pass with 48 rows
# spanning hundreds 1.4-2.7 s instead of 0.17-0.22 (a 2048-row chunk's exp 0.02 -> 0.5-1.1 ms, its product with
# the weights 0.4 -> 7-12 ms). The kernel drops such terms; the torch pass raises their exponent to the cut-off
# (clamping costs ~1 ms per batch-16 pass, a mask to exact zero ~13). The same results, bit for bit, in every case
# measured (spans of 5 to thousands).
EXP_CUTOFF = -69.0


def available() -> bool:
    """Whether the kernel is built and checked in this process (builds it on first call)."""
    return _kernel() is not None


def one_pass_loss(h, weight, targets):
    """Per-row cross-entropy of h @ weight.T against targets, with the gradient for h computed in the same pass:
    for a frozen, float32, contiguous weight on CPU and at most MAX_ROWS rows (check available() first)."""
    return _function().apply(h, weight, targets)


@functools.cache
def _function():
    import torch

    class OnePassLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, targets):
            loss, grad_h = _loss_and_gradient(_kernel(), h.detach().contiguous(), w, targets)
            ctx.save_for_backward(grad_h)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_loss[:, None], None, None

    return OnePassLoss


def _loss_and_gradient(kernel, h, w, targets):
    """Per-row cross-entropy (largest logit + log of the sum of exponentials - the target's logit) and its
    gradient for h (the softmax-weighted average of w's rows - the target's row), from one _pass."""
    import torch

    top, total, weighted = _pass(kernel, h, w)
    target_rows = w[targets]
    loss = top + torch.log(total) - (h * target_rows).sum(1)
    return loss, weighted.div_(total[:, None]).sub_(target_rows)


def _pass(kernel, h, w, parts: int | None = None):
    """The largest logit, the sum of exp(logit - largest) and the exp-weighted sum of w's rows, per row of h,
    over the whole vocabulary: one kernel call per part (default: a part per PyTorch thread, each of at least
    4,096 rows of w), each on its own thread, merged."""
    import torch

    n, d = h.shape
    vocab = w.shape[0]
    parts = parts or max(1, min(torch.get_num_threads(), vocab // 4096))
    bounds = [vocab * i // parts for i in range(parts + 1)]
    top = torch.empty(parts, n)
    total = torch.empty(parts, n, dtype=torch.float64)
    weighted = torch.empty(parts, n, d)

    def run(i):
        kernel(w.data_ptr(), h.data_ptr(), n, d, bounds[i], bounds[i + 1], EXP_CUTOFF, top[i].data_ptr(),
               total[i].data_ptr(), weighted[i].data_ptr())

    # Daemon threads, started per call (~0.1 ms against the pass's tens): a pool's idle non-daemon workers
    # would keep console.exit_without_teardown from ending a finished script at once.
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, parts)]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    overall = top.max(0).values
    scale = torch.exp(top - overall)  # each part's sums against the overall maximum
    total = (total * scale.double()).sum(0)
    weighted = (weighted * scale[:, :, None]).sum(0)
    return overall, total.float(), weighted


def start_build() -> None:
    """Start compiling the kernel in the background (cbuild.start), unless this process has it already."""
    if not _kernel.cache_info().currsize:
        start(SOURCE, FLAGS)


@functools.cache
def _kernel():
    """The compiled kernel's function, or None where it cannot be built or does not give torch's numbers."""
    import ctypes

    import torch
    import torch.nn.functional as F

    lib = build(SOURCE, FLAGS)
    if lib is None:
        return None
    function = lib.output_pass
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    function.restype = None
    # A vocabulary of several blocks with a partial last one, logits large enough that the maximum moves.
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(9001, 96, generator=generator) * 3
    h = torch.randn(MAX_ROWS, 96, generator=generator)
    targets = torch.randint(0, 9001, (MAX_ROWS,), generator=generator)
    loss, grad = _loss_and_gradient(function, h, w, targets)
    hg = h.clone().requires_grad_(True)
    expected = F.cross_entropy(hg @ w.T, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), hg)
    same = torch.allclose(loss, expected, rtol=1e-4, atol=1e-4) and torch.allclose(grad, expected_grad, atol=1e-4)
    return function if same else None
