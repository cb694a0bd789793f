"""Matrix products of the CPU speed paths (fused LoRA layers, output layer, one-pass loss, answering) through
oneDNN.

torch.mm on CPU calls MKL, which on this project's 2-core AMD machine reaches 80-120 GFLOP/s on the ~50-row
products of a batch-1 step, 125-180 on the ~850-row products of batch 16 and 45-75 on the one-pass loss's
12-48-row products. oneDNN's matmul, which PyTorch ships and runs through `mkldnn::_linear_pointwise` (the
operator torch.compile uses for linear layers on CPU), reaches 180-210 on the same products: about the
machine's large-matrix peak. It reads the weight as it is, a transposed view included, so no copy of any
weight is made. Same products summed in another order: results agree to float32 rounding. README "Speed"
has the measurements.

On an Intel Xeon (AVX-512) it is the other way round for weights that fit in the caches: MKL computes the
decoder's and LoRA's products faster (training steps 4-6% faster, generation's one-row products 1.3-3x),
while oneDNN still streams the 262k-row output layer about twice as fast. So on Intel CPUs only products
with a weight larger than the caches (STREAMED_WEIGHT) go through oneDNN.
"""

import functools

# Machines whose CPUs were measured faster with oneDNN's products (x86-64, as Linux and Windows name it)
ONEDNN_MACHINES = ("x86_64", "amd64")
# A weight of at least this many elements (64 MB in float32) is streamed from memory, not read from a cache:
# on Intel CPUs only such products (Gemma's output layer) go through oneDNN.
STREAMED_WEIGHT = 1 << 24


def mm_t(x, w, add=None):
    """x @ w.T, plus `add` when given (which may be overwritten with the result). x: rows x k, w: n x k,
    any strides."""
    if uses_onednn(x, w):
        import torch

        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, None, "add")
    return x @ w.T if add is None else add.addmm_(x, w.T)


def speed_up_cpu_inference(model) -> None:
    """With autograd off on CPU (05 and 06 answering, 07's checks), the model's linear layers, its output
    layer included, run their products through oneDNN. Generation runs one position per new token, where
    MKL reads a weight at ~12 GB/s for one row and oneDNN at ~23 (the 262k x 640 output layer: 55 vs 29 ms
    per token). On the benchmark's model, old and new in turn: one answer (prompt + 3 new tokens) with an
    adapter 0.403 -> 0.291 s, without 0.370 -> 0.254 s; the same answers. LoRA's own small matrices are left
    to nn.Linear: through oneDNN too, an answer took 0.349 s instead of 0.319. With autograd on (training),
    or where oneDNN is not used (on Intel CPUs: every layer but the output layer, see above), a layer runs
    nn.Linear's own forward as before."""
    import types

    import torch

    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and ".lora_" not in name:
            # A method bound to the layer, not a closure over it: a deep copy of the model (07 rounds one
            # to bfloat16) then gets a forward that reads the copy's own weight.
            module.forward = types.MethodType(_inference_linear_forward, module)


def _inference_linear_forward(layer, x):
    import torch

    if (torch.is_grad_enabled() or x.device.type != "cpu" or layer.bias is not None
            or not uses_onednn(x, layer.weight)):
        return type(layer).forward(layer, x)
    return mm_t(x.reshape(-1, x.shape[-1]), layer.weight).view(*x.shape[:-1], layer.weight.shape[0])


def uses_onednn(x, w) -> bool:
    """Does mm_t(x, w) run through oneDNN (float32 on x86-64; on Intel CPUs only for a streamed weight)?"""
    import torch

    return (x.dtype == w.dtype == torch.float32 and onednn()
            and (not intel_cpu() or w.numel() >= STREAMED_WEIGHT))


@functools.cache
def onednn() -> bool:
    """oneDNN's matmul on x86-64, where it was measured faster; elsewhere (ARM: Apple's or Arm's BLAS) and
    on a PyTorch whose operator is missing or reads these layouts differently, torch.mm."""
    import platform

    import torch

    if platform.machine().lower() not in ONEDNN_MACHINES or not torch.backends.mkldnn.is_available():
        return False
    try:  # the operator is internal to PyTorch: check it on the layouts used before relying on it
        x, w, add = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4).T, torch.ones(2, 4)
        lp = torch.ops.mkldnn._linear_pointwise
        return (torch.equal(lp(x, w, None, "none", [], ""), x @ w.T)
                and torch.equal(lp.binary(x, add, w, None, "add"), x @ w.T + 1))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def intel_cpu() -> bool:
    """An Intel CPU (vendor GenuineIntel: /proc/cpuinfo on Linux, the processor string on Windows), where
    some products are chosen otherwise than on AMD's (loss.py: the output layer's few-row products)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((("GenuineIntel" in line) for line in f if line.startswith("vendor_id")), False)
    except OSError:
        return "GenuineIntel" in platform.processor()
