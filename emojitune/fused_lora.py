"""CPU speed path for PEFT's LoRA layers during training: same mathematics, same dropout masks, fewer and
larger matrix products.

PEFT computes each LoRA layer on its own: base(x) + lora_B(lora_A(dropout(x))) * scaling, each a separate
operation with its own autograd node. In a Gemma 3 decoder layer q/k/v read the same input, as do
gate/up, so here each such group runs as one autograd function: one matrix product for the group's frozen
base weights (their rows concatenated into one matrix; the model's weights become views of it, so the
concatenation adds no memory; the product runs through oneDNN, see matmul.py), the LoRA update added onto its output
in place (addmm_), and a backward pass written by hand that needs no elementwise scaling or summing passes
over the outputs. In small batches that backward reads transposed copies of the frozen weights, which oneDNN
reads faster (TRANSPOSED_BACKWARD_ROWS below): that copy is the only memory the path adds.

The dropout masks are the masks torch's dropout draws on CPU (`empty_like(x).bernoulli_(1-p)`; drawn by
dropout_masks.py, faster), in the same order as PEFT's layers draw them (q, k, v, then gate, up), so a run
gives the numbers of the plain PEFT layers up to float rounding (tests/test_training.py compares losses
and gradients). Dropout's 1/(1-p) is folded into the LoRA scaling (a number) instead of a pass over each
mask, and the masked input is kept for the backward pass instead of being formed again there. Only CPU:
CUDA's dropout draws its masks with another kernel.

The decoder calls q_proj, k_proj, v_proj (and gate_proj, up_proj) one after the other on the same tensor;
the group computes all of them at the first call and hands out the others when they are asked for with
that same tensor. Any other call falls back to PEFT's own forward.
"""

import functools

from . import dropout_masks
from .matmul import PackedWeight, intel_cpu, mkl_packing, mm_t, uses_onednn

# The input gradient's products (output gradient @ W) of up to this many rows read a transposed copy of each
# frozen weight, made at the first such backward pass: oneDNN reads a weight fastest in nn.Linear's layout, so
# for these products W.T stored contiguously (2-core AMD EPYC Zen 3, the decoder's 126 products with weights
# from memory: 11-14% faster at 55-440 rows, 5% at 880). It costs the decoder's weights once more in memory
# (0.4 GB for Gemma-3-270M), so only where the gain shows in whole steps: batch 1 (median ratio 1.032 over 100
# batches, old and new in turn) and batch 4 (1.035 over 30, ~220 rows), not batch 16 (1.005 over 9, ~880 rows).
# Only where oneDNN computes these products (matmul.uses_onednn): MKL's layouts were not measured.
TRANSPOSED_BACKWARD_ROWS = 256

# Training in batches of up to this many tweets, the frozen weights' products read MKL's packed copies of them
# (matmul.PackedWeight), made at the first product: the group's one product forward (x @ W.T) and each layer's
# input gradient (g @ W_i). Whole steps on the 2-core Intel Xeon (family 6 model 207), with and without in turn
# on the same batches: batch 1 1.097 and 1.101 (median ratio, 40 batches; the backward's copies 1.042 of it),
# batch 4 1.090 (16), batch 8 1.050 (12), batch 16 1.029 (8), `--multi-turn 4` 1.088 (24). The copies take the
# decoder's weights twice more in memory (0.8 GB for Gemma-3-270M), new memory that on that machine's VM cost
# ~2 s of page faults in a whole process: a whole `--batch-size 16` 03 over 48 tweets (3 steps) took 1.3 s
# longer with them, so larger batches go without. Only on Intel CPUs, where MKL computes these products (on AMD
# CPUs oneDNN does; packing was not measured there).
PACKED_BATCH_SIZE = 4
# Products of more rows than this take torch.mm even then (evaluation passes: 16 tweets a batch): in a batch-16
# step the copies were faster up to ~900 rows (848: the 4096-wide product 15.5 vs 16.4 ms) but not at 1,104
# (24.6 vs 18.5 ms).
PACKED_MAX_ROWS = 512


def install(model, batch_size: int = 1) -> int:
    """Route the LoRA layers of a PEFT model on CPU through the fused path; `batch_size`: how many tweets a
    training step reads (PACKED_BATCH_SIZE). Returns the number of LoRA layers routed (0 where it does not apply:
    not PEFT, not CPU, not plain LoRA). Idempotent: layers already routed keep their first settings."""
    groups = _groups(model)
    for group in groups:
        group.pack = batch_size <= PACKED_BATCH_SIZE
        group.install()
    return sum(len(g.layers) for g in groups)


def _groups(model) -> list:
    import torch

    from peft.tuners.lora import Linear as LoraLinear

    groups = []
    for module in model.modules():
        names = ([("q_proj", "k_proj", "v_proj"), ("o_proj",)] if hasattr(module, "q_proj") and hasattr(module, "o_proj")
                 else [("gate_proj", "up_proj"), ("down_proj",)] if hasattr(module, "gate_proj") else [])
        for group in names:
            layers = [getattr(module, n, None) for n in group]
            if not all(isinstance(layer, LoraLinear) and _plain(layer) for layer in layers):
                continue
            weights = [layer.base_layer.weight for layer in layers]
            if weights[0].device.type != "cpu" or len({(w.shape[1], w.dtype) for w in weights}) != 1:
                continue
            if getattr(layers[0], "_fused_group", None) is None:
                groups.append(_Group(layers, torch))
    return groups


def _plain(layer) -> bool:
    """Vanilla LoRA on a bias-free nn.Linear with one adapter: what the fused function computes."""
    import torch

    base = layer.base_layer
    return (type(base) is torch.nn.Linear and base.bias is None and not layer.fan_in_fan_out
            and list(layer.lora_A) == ["default"] and not layer.lora_variant
            and layer.lora_A["default"].weight.dtype == base.weight.dtype
            and getattr(layer.lora_A["default"], "bias", None) is None
            and getattr(layer.lora_B["default"], "bias", None) is None
            and isinstance(layer.lora_dropout["default"], (torch.nn.Dropout, torch.nn.Identity)))


class _Group:
    """LoRA layers that read the same input, computed together."""

    def __init__(self, layers, torch):
        self.layers = layers
        self.sizes = [layer.base_layer.out_features for layer in layers]
        # One matrix for the group's frozen base weights; each layer's weight becomes a view of its rows.
        weight = torch.cat([layer.base_layer.weight.detach() for layer in layers])
        start = 0
        for layer, size in zip(layers, self.sizes):
            layer.base_layer.weight.data = weight[start:start + size]
            start += size
        self.weight = weight
        self.pending = None  # (input, outputs, next index) between the group's calls
        self.transposed = None  # (weight version, each layer's weight transposed), made when first needed
        self.pack = False  # whether the frozen products read packed copies (install() decides)
        self.packed = None  # (weight version, the group's weight packed for x @ W.T, each layer's for g @ W_i)

    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            layer._fused_group = self
            layer.forward = functools.partial(self.forward, i)

    def transposed_weights(self) -> list:
        """Each layer's frozen weight as W.T, contiguous (see TRANSPOSED_BACKWARD_ROWS); made again if the
        weights were changed in place."""
        if self.transposed is None or self.transposed[0] != self.weight._version:
            self.transposed = (self.weight._version, [w.T.contiguous() for w in self.weight.split(self.sizes)])
        return self.transposed[1]

    def packed_weights(self) -> tuple:
        """MKL's packed copies of the frozen weights (see PACKED_BATCH_SIZE): one for the forward product, one per
        layer for the input gradient; made again if the weights were changed in place or a copy moved them."""
        if (self.packed is None or self.packed[0] != self.weight._version
                or not all(p.valid() for p in (self.packed[1], *self.packed[2]))):
            self.packed = (self.weight._version, PackedWeight(self.weight, True),
                           [PackedWeight(w, False) for w in self.weight.split(self.sizes)])
        return self.packed[1:]

    def uses_packed(self, x) -> bool:
        import torch

        return (self.pack and x.shape[0] <= PACKED_MAX_ROWS and x.dtype == self.weight.dtype == torch.float32
                and intel_cpu() and mkl_packing())

    def usable(self) -> bool:
        layer = self.layers[0]
        return not (any(l.disable_adapters or l.merged for l in self.layers)
                    or list(layer.active_adapters) != ["default"])

    def forward(self, i: int, x, *args, **kwargs):
        layer = self.layers[i]
        if args or kwargs or not self.usable():
            self.pending = None
            return type(layer).forward(layer, x, *args, **kwargs)
        if i > 0:
            pending, self.pending = self.pending, None
            if pending is not None and pending[0] is x and pending[2] == i:
                if i + 1 < len(self.layers):
                    self.pending = (x, pending[1], i + 1)
                return pending[1][i]
            # Not the call sequence the group expects: PEFT's own layer (draws its own mask).
            return type(layer).forward(layer, x)
        dropout = layer.lora_dropout["default"]
        p = dropout.p if getattr(dropout, "p", 0) and dropout.training else 0.0
        lora = [l.lora_A["default"].weight for l in self.layers] + [l.lora_B["default"].weight for l in self.layers]
        outputs = _fused_function().apply(x, self.weight, (tuple(self.sizes),
                                          tuple(l.scaling["default"] for l in self.layers), p, self), *lora)
        if len(self.layers) > 1:
            self.pending = (x, outputs, 1)
        return outputs[0]


@functools.cache
def _fused_function():
    import torch

    class FusedLora(torch.autograd.Function):
        """y_i = x W_i^T + s_i (dropout_i(x) A_i^T) B_i^T for the layers i of a group."""

        @staticmethod
        def forward(ctx, x, weight, spec, *lora):
            sizes, scalings, p, group = spec
            ctx.group = group
            k = len(sizes)
            a, b = lora[:k], lora[k:]
            # dropout(x) = x * mask / (1-p) with a 0/1 mask: the 1/(1-p) goes into each layer's scale
            scales = [s / (1 - p) for s in scalings]
            x2 = x.reshape(-1, x.shape[-1])
            out = group.packed_weights()[0].mm(x2) if group.uses_packed(x2) else mm_t(x2, weight)
            masks, masked, hs, start = [], [], [], 0
            if p == 0:  # one product for all A matrices
                h_all = x2 @ torch.cat(a).T
                hs = list(h_all.split([ai.shape[0] for ai in a], dim=1))
            for i in range(k):
                if p:
                    # torch's CPU dropout mask for x's shape, in PEFT's order: the same draws
                    xm, mask = dropout_masks.masked_input(x, 1 - p)
                    masks.append(mask.reshape(x2.shape))
                    masked.append(xm.reshape(x2.shape))
                    hs.append(masked[i] @ a[i].T)
                out[:, start:start + sizes[i]].addmm_(hs[i], b[i].T, alpha=scales[i])
                start += sizes[i]
            ctx.scales = scales
            ctx.x_shape = x.shape
            # With dropout the backward reads the masked inputs, never x itself: keeping x would hold each
            # group's input alive until the backward for nothing (with dropout, nothing else keeps the input of
            # o_proj and down_proj or the norms' outputs: 15 MB a layer at batch 16).
            ctx.save_for_backward(None if masks else x2, weight, *a, *b, *hs, *masks, *masked)
            outputs, start = [], 0
            for size in sizes:
                outputs.append(out[:, start:start + size].view(*x.shape[:-1], size))
                start += size
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            scales = ctx.scales
            k = len(scales)
            x2, weight, *rest = ctx.saved_tensors
            a, b, hs = rest[:k], rest[k:2 * k], rest[2 * k:3 * k]
            masks, masked = rest[3 * k:4 * k], rest[4 * k:]
            rows = ctx.x_shape.numel() // ctx.x_shape[-1]
            sizes = [bi.shape[0] for bi in b]
            g = [gi.reshape(rows, size) if gi is not None else weight.new_zeros(rows, size)
                 for gi, size in zip(grads, sizes)]
            # The first layer's q/k/v read the embeddings, which are frozen: no input gradient there.
            # The input gradient sums each layer's product into one tensor (addmm) rather than
            # concatenating the output gradients for one product: the copy cost more than it saved.
            grad_x = None
            if ctx.needs_input_grad[0]:
                if ctx.group.uses_packed(g[0]):
                    for gi, packed in zip(g, ctx.group.packed_weights()[1]):
                        grad_x = packed.mm(gi, grad_x)
                elif rows <= TRANSPOSED_BACKWARD_ROWS and uses_onednn(g[0], weight):
                    for gi, wi_t in zip(g, ctx.group.transposed_weights()):
                        grad_x = mm_t(gi, wi_t, grad_x)
                else:
                    for gi, wi in zip(g, weight.split(sizes)):
                        grad_x = mm_t(gi, wi.T, grad_x)
            grad_a, grad_b, grad_h = [], [], []
            for i in range(k):
                grad_b.append(torch.mm(g[i].T, hs[i]).mul_(scales[i]))
                grad_h.append(torch.mm(g[i], b[i]).mul_(scales[i]))
            if not masks:
                gh_all = torch.cat(grad_h, dim=1)
                grad_a = list(torch.mm(gh_all.T, x2).split([ai.shape[0] for ai in a]))
                if grad_x is not None:
                    grad_x.addmm_(gh_all, torch.cat(a))
            else:
                for i in range(k):
                    grad_a.append(torch.mm(grad_h[i].T, masked[i]))
                    if grad_x is not None:
                        grad_x.addcmul_(grad_h[i] @ a[i], masks[i])
            return (None if grad_x is None else grad_x.view(ctx.x_shape), None, None, *grad_a, *grad_b)

    return FusedLora
