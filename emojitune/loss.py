"""The training loss: cross-entropy on the answer tokens only, with the output layer applied only where
the loss is.

Gemma 3's output layer is its 262k-token embedding: projecting every prompt position, as the model's
own forward does (its `logits_to_keep` keeps the same positions in every row, and a right-padded batch
has its answers at different positions), is most of a training step's work. So we run the decoder,
keep the hidden states that carry loss, and project only those. The result equals the model's own
forward + masked cross-entropy (tests/test_model.py checks it against `model(..., labels=...).loss`).
"""

import functools

from . import dropout_masks, fused_attention, fused_lora, fused_norm, output_pass
from .chat import IGNORE
from .matmul import intel_cpu, mm_t, uses_onednn


def answer_token_losses(causal_lm, input_ids, attention_mask, labels, cache=None):
    """Cross-entropy and argmax correctness of each answer token, and the batch row it belongs to.
    `cache`: keys and values of earlier tokens that `input_ids` continue (attention_mask covers both)."""
    import torch.nn.functional as F

    hidden_rows, wanted, keep = answer_rows(causal_lm, input_ids, attention_mask, labels, cache)
    logits = output_logits(causal_lm, hidden_rows)
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits, wanted, reduction="none"), logits.argmax(-1) == wanted, rows


def answer_rows(causal_lm, input_ids, attention_mask, labels, cache=None, draws_masks=None):
    """The decoder's hidden states that predict an answer token, those tokens, and where they sit.

    The last position predicts no label, and no other position reads it (attention is causal), so where
    nothing is drawn at random the decoder runs without it: one position less of work, the same numbers.
    Dropout draws its masks for the shape it is given, so a shorter input would shift the random stream:
    with masks it keeps the whole batch. `draws_masks`: whether this forward draws dropout masks (default:
    in training mode; evaluation passes and 05/06's scores run in eval mode, which draws none)."""
    targets = labels[:, 1:]  # position t is scored against the label of t + 1
    keep = targets != IGNORE
    if draws_masks is None:
        draws_masks = causal_lm.training
    if not draws_masks and input_ids.shape[1] > 1:
        hidden = run_decoder(causal_lm, input_ids[:, :-1], attention_mask[:, :-1], cache)
    else:
        hidden = run_decoder(causal_lm, input_ids, attention_mask, cache)[:, :-1]
    return hidden[keep], targets[keep], keep


def run_decoder(causal_lm, input_ids, attention_mask, cache=None):
    """Last hidden states of the decoder; with `cache`, it continues the cached tokens and extends it."""
    decoder = causal_lm.get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None,
                   **cache_argument(decoder, cache)).last_hidden_state


def cache_argument(module, cache) -> dict:
    """The keyword that passes a KV cache to a model's forward: transformers 5.x renamed
    `past_key_values` to `cache` (the old name warns until it is removed)."""
    import inspect

    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return {name: cache}


def output_logits(causal_lm, hidden_rows):
    """The model's output layer on a few hidden states, in float32, as its forward applies it."""
    import torch

    head = causal_lm.get_output_embeddings()
    if is_cpu_frozen_head(head, hidden_rows):
        logits = cpu_frozen_output_layer(hidden_rows, head.weight)
    else:
        logits = head(hidden_rows)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 style soft-cap, which the model's forward applies after its head (None for Gemma 3)
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def is_cpu_frozen_head(head, hidden_rows) -> bool:
    """Do the CPU speed paths for a frozen output layer apply (no bias, no gradient for its weight)? The
    weight gets none when it is frozen (LoRA) or when autograd is off (evaluation, 06's label scores)."""
    import torch

    return (hidden_rows.device.type == "cpu" and head.bias is None
            and not (head.weight.requires_grad and torch.is_grad_enabled()))


def cpu_frozen_output_layer(h, weight):
    """CPU speed path: h @ weight.T for the few answer rows, with the output layer frozen (LoRA).

    With 2-3 rows (a batch-1 training step), F.linear's BLAS call streams the 262k x 640 matrix once per
    row; written as weight @ h.T it streams it once. The input gradient is weight.T @ grad.T, which there
    is only fast from a contiguous copy of weight.T (made once; oneDNN's product reads it fastest, where it
    runs). From 6 rows on (evaluation batches, conversations of several tweets) oneDNN's product
    (matmul.py) is faster both ways, 1.6-2.4x, and needs no copy; without oneDNN, BLAS is as fast without
    the copy from a dozen rows on. Those are the AMD EPYCs' figures. On an Intel Xeon (AVX-512) MKL's
    weight @ h.T is the slow one: 75 ms for 3 rows where oneDNN's product takes 34 ms, and oneDNN still
    reads the copy faster than the weight up to 48 rows (12 rows: 41 vs 82 ms), so there oneDNN computes the
    forward from one row on and the copy serves the backward below a dozen rows. Same products summed in
    another order: results agree to float32 rounding. README "Speed" has the measurements.
    """
    return _cpu_frozen_output_function().apply(h, weight)


@functools.cache
def _cpu_frozen_output_function():
    import torch

    small_batch_rows = 12  # below this many answer rows the transposed copy pays for itself (BLAS)
    # From this many rows oneDNN's product is faster than BLAS's weight @ h.T (forward) and than the copy's
    # (backward); on Intel CPUs from one row (forward) and a dozen (backward), as the docstring above says.
    onednn_forward_rows, onednn_backward_rows = (1, small_batch_rows) if intel_cpu() else (6, 6)
    transposed = {}

    class CpuFrozenOutputLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            if x.shape[0] >= onednn_forward_rows and uses_onednn(x, w):
                return mm_t(x, w)
            return (w @ x.T).T

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            onednn = uses_onednn(grad, w)
            if grad.shape[0] >= (onednn_backward_rows if onednn else small_batch_rows):
                return (mm_t(grad, w.T) if onednn else (w.T @ grad.T).T), None
            key = (w.data_ptr(), tuple(w.shape), w._version)
            if key not in transposed:
                transposed.clear()  # one model at a time: keep a single copy
                transposed[key] = transposed_copy(w)
            # oneDNN reads the copy as a linear layer's weight: 3 rows 29 ms vs BLAS's 43 (microbenchmark)
            return (mm_t(grad, transposed[key]) if onednn else (transposed[key] @ grad.T).T), None

    return CpuFrozenOutputLayer


def transposed_copy(w, block: int = 1024):
    """w.T as a contiguous matrix, copied a block of w's rows at a time: each block's transpose stays in
    the cache. For Gemma 3's 262k x 640 output layer 0.32-0.38 s instead of 0.53-0.60 s for
    w.T.contiguous() (on a 2-core CPU, in the first training step)."""
    out = w.new_empty(w.shape[1], w.shape[0])
    for start in range(0, w.shape[0], block):
        out[:, start:start + block].copy_(w[start:start + block].T)
    return out


def causal_lm_of(model):
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def start_kernel_builds(batch_size: int, dropout: bool) -> None:
    """Start compiling the C kernels CPU training will use (cbuild.start): the RMSNorm's; the output pass's where a
    batch can have fewer answer rows than ONE_PASS_MIN_ROWS (each tweet has at least one; a larger batch's smaller
    last one builds it when it comes); with LoRA dropout, the masks'. Each is checked where it is first used."""
    fused_norm.start_build()
    if batch_size < ONE_PASS_MIN_ROWS:
        output_pass.start_build()
    if dropout:
        dropout_masks.start_build()


def answer_loss_module(model, batch_size: int = 1):
    """The model as a module whose forward returns the summed answer-token loss of a batch. Training
    calls it, not the decoder directly, so that DDP sees the forward pass (its gradient sync needs it).
    On CPU its LoRA layers and Gemma 3's RMSNorms and attention run through the speed paths of fused_lora,
    fused_norm and fused_attention (same numbers up to float rounding). `batch_size`: tweets per training
    step, which fused_lora's choice of products depends on."""
    import torch

    fused_lora.install(model, batch_size)
    fused_norm.install(model)
    fused_attention.install(model)

    class AnswerLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            # The modules that draw masks in training (with --lora-dropout 0 there are none: PEFT then
            # puts an identity in their place), found once: walking the model takes milliseconds.
            self.dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]

        def forward(self, input_ids, attention_mask, labels):
            causal_lm = causal_lm_of(self.model)
            in_attention = getattr(causal_lm.config, "attention_dropout", 0.0) or 0.0  # eager attention's own
            draws_masks = causal_lm.training and (in_attention > 0 or any(m.training and m.p > 0
                                                                         for m in self.dropouts))
            return summed_answer_loss(causal_lm, input_ids, attention_mask, labels, draws_masks)

    return AnswerLoss(model)


def summed_answer_loss(causal_lm, input_ids, attention_mask, labels, draws_masks=None):
    """The training loss: answer_token_losses summed, without the argmax it also computes. On CPU with a
    frozen float32 output layer the cross-entropy and its gradient come from one pass over the output layer
    instead of logits, log-softmax and a second pass for the backward: from a dozen answer rows (batch 4 and
    up) cpu_frozen_output_loss, below that output_pass's C kernel where it is built."""
    import torch

    rows, wanted, _ = answer_rows(causal_lm, input_ids, attention_mask, labels, draws_masks=draws_masks)
    head = causal_lm.get_output_embeddings()
    frozen = (is_cpu_frozen_head(head, rows) and rows.dtype == head.weight.dtype
              and not getattr(causal_lm.config, "final_logit_softcapping", None))
    if frozen and rows.shape[0] >= ONE_PASS_MIN_ROWS:
        return cpu_frozen_output_loss(rows, head.weight, wanted).sum()
    if (frozen and rows.dtype == torch.float32 and rows.shape[0] <= output_pass.MAX_ROWS
            and head.weight.is_contiguous() and output_pass.available()):
        return output_pass.one_pass_loss(rows, head.weight, wanted).sum()
    import torch.nn.functional as F

    return F.cross_entropy(output_logits(causal_lm, rows), wanted, reduction="sum")


# From about this many rows the one-pass loss is faster; below it the two BLAS products of the plain
# path are (with 3 rows: 60 ms vs 130 ms on the 262k x 640 Gemma 3 output layer, 2-core CPU).
ONE_PASS_MIN_ROWS = 12


def cpu_frozen_output_loss(h, weight, targets, chunk: int = 2048):
    """Per-row cross-entropy of the logits h @ weight.T against targets, for a frozen weight, with the
    gradient for h computed in the same pass: the vocabulary is walked in chunks with a running maximum,
    sum of exponentials and softmax-weighted sum of weight rows (the online softmax of flash attention),
    so grad_h = softmax @ weight - weight[target] needs no second pass over the 262k x 640 matrix and no
    logits are kept. The same quantities as log_softmax + nll, summed in another order."""
    return _cpu_frozen_output_loss_function().apply(h, weight, targets, chunk)


def _exp_clamped(x):
    """exp of x (<= 0) in place, with x first raised to output_pass.EXP_CUTOFF where it is below (why: there)."""
    return x.clamp_min_(output_pass.EXP_CUTOFF).exp_()


@functools.cache
def _cpu_frozen_output_loss_function():
    import torch

    class CpuFrozenOutputLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, targets, chunk):
            rows = h.shape[0]
            top = torch.full((1, rows), -float("inf"), dtype=h.dtype)
            total = torch.zeros(1, rows, dtype=h.dtype)
            weighted = torch.zeros(rows, w.shape[1], dtype=h.dtype)
            for start in range(0, w.shape[0], chunk):
                w_chunk = w[start:start + chunk]
                z = mm_t(w_chunk, h)  # chunk x rows
                new_top = torch.maximum(top, z.amax(0, keepdim=True))
                rescale = _exp_clamped(top - new_top)
                _exp_clamped(z.sub_(new_top))
                total = total * rescale + z.sum(0, keepdim=True)
                weighted = mm_t(z.T, w_chunk.T, weighted.mul_(rescale.T))
                top = new_top
            target_rows = w[targets]
            loss = (top + torch.log(total)).squeeze(0) - (h * target_rows).sum(1)
            ctx.save_for_backward(weighted.div_(total.T).sub_(target_rows))
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_loss[:, None], None, None, None

    return CpuFrozenOutputLoss
