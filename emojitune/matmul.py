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

MKL rearranges ("packs") a weight into the order its kernel reads before every product; in a product of ~50
rows that costs about as much as the arithmetic. For a frozen weight MKL can pack it once and compute from the
packed copy (cblas_sgemm_pack / cblas_sgemm_compute, which PyTorch's own library exports): PackedWeight.
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


class PackedWeight:
    """A frozen float32 matrix packed once by MKL for products x @ w.T (`transposed`, a linear layer's weight
    w [out, in]) or x @ w (w [in, out]). On the 2-core Intel Xeon (family 6 model 207), Gemma-3-270M's decoder
    weights taken in turn as in a step: at 54 rows (batch 1) 1.1-1.8x the speed of torch.mm's products (which
    pack the weight anew each time), at 220 rows 1.1-1.4x, at 880 rows 1.02-1.07x. The copy takes the weight's
    size in memory (MKL reserves more address space than it writes). Made and used where mkl_packing() says so.

    `rows`: the row count MKL is told to pack for. One packed copy serves products of any row count, but its
    layout depends on that hint: packed for 256 rows the copies above were as fast as or faster than torch.mm's
    at 54-880 rows; packed for 1024, products of 54-220 rows through some of them ran at 0.6-0.8x torch.mm's speed.

    MKL's packed copy may not move (its layout depends on its address): a copy of this object carries none, and
    valid() tells its owner to pack the weight again."""

    def __init__(self, w, transposed: bool, rows: int = 256):
        import mmap

        import torch

        lib = _mkl()
        self.transposed = transposed
        self.n, self.k = w.shape if transposed else (w.shape[1], w.shape[0])
        w = w if w.stride(-1) == 1 else w.contiguous()
        size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, rows, self.n, self.k)
        # A mapping of its own, not malloc's heap: MKL asks for 2.7-4.4x the weight's size and writes about the
        # weight's size; pages it never writes are never given memory, and do not sit among the heap's blocks.
        self.memory = mmap.mmap(-1, size)
        self.buffer = torch.frombuffer(self.memory, dtype=torch.uint8)
        lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS if transposed else _NO_TRANS, rows, self.n, self.k,
                             1.0, w.data_ptr(), w.stride(0), self.buffer.data_ptr())
        self.address = self.buffer.data_ptr()

    def valid(self) -> bool:
        return self.buffer is not None and self.buffer.data_ptr() == self.address

    def __getstate__(self):
        # A copy of this object (copy.deepcopy of a model, pickle) carries no packed data: it is packed again.
        return {**self.__dict__, "memory": None, "buffer": None, "address": None}

    def mm(self, x, add=None):
        """x @ op(w) (x: rows x k, float32), plus `add` when given (rows x n, contiguous; overwritten with the
        result)."""
        import torch

        if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
            x = x.contiguous()
        out = torch.empty(x.shape[0], self.n, dtype=torch.float32) if add is None else add
        _mkl().cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, x.shape[0], self.n, self.k, x.data_ptr(),
                                   max(x.stride(0), self.k), self.buffer.data_ptr(), self.k,
                                   0.0 if add is None else 1.0, out.data_ptr(), self.n)
        return out


# CBLAS's constants (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162


@functools.cache
def _mkl():
    """MKL's packed-product functions, from the PyTorch library that links MKL in (Linux x86-64 wheels); None
    where they are not exported."""
    import ctypes
    import os

    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype = ctypes.c_size_t
    get_size.argtypes = [i, i, i, i]
    pack.restype = compute.restype = None
    pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
    compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
    return lib


@functools.cache
def mkl_packing() -> bool:
    """Can PackedWeight be used here: MKL's functions found, and their products equal to torch.mm's within
    float32 rounding on the layouts and row counts used (one packed copy serves every row count: the size MKL
    asks for does not depend on it), with and without an addition. Checked once per process."""
    import torch

    if not torch.backends.mkl.is_available() or _mkl() is None:
        return False
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=generator)
    for transposed in (True, False):
        packed = PackedWeight(w, transposed)
        weight = w.T if transposed else w
        for rows in (1, 7, 64, 300):
            x = torch.randn(rows, weight.shape[0], generator=generator)
            add = torch.randn(rows, weight.shape[1], generator=generator)
            expected = (x @ weight, x @ weight + add)
            if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-5)
                       for a, b in zip((packed.mm(x), packed.mm(x, add.clone())), expected)):
                return False
    return True
