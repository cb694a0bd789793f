"""CPU speed path for Gemma 3's attention in training: the rotary position embedding and the attention of the
query and key heads as one autograd function with a backward pass written by hand.

transformers computes them as some thirty small operations forward (rotating each half of the queries and
keys, repeating the one key/value head for every query head, scores, mask, softmax, weighted sum, transposes),
each an autograd node with its own backward. At batch 1 (~50 positions) they cost mostly the operations'
overhead; at batch 16 also passes over tensors that the repetition copies. Here the query heads that share a
key/value head are one matrix of rows (no copies of keys and values), the rotation is a multiply and a
multiply-add with the second half's sine negated once, and the backward pass is the few products and the
softmax's own backward it needs. The same mathematics, rounded in places in another order: float32 rounding.

The decoder's own layer computes everything else as before (projections, through fused_lora; the per-head
RMSNorms, through fused_norm; the output projection). Only where the layer would run eager attention in float32
on CPU without a cache, attention dropout, logit soft-capping or attention weights to return; other calls take
its own forward. install() first checks the function against transformers' layer on a small random one,
forward and backward, and routes nothing where they differ (a transformers whose layer computes otherwise).
"""

import functools

from .modeling import route_cpu_layers


def install(model) -> int:
    """Route the Gemma 3 attention layers of a model on CPU through the fused function. Returns the number of
    layers routed (0 where it does not apply: another model, not CPU, a transformers that computes otherwise)."""
    return route_cpu_layers(model, _gemma3_attention_class(), _forward, _checked)


def _forward(attn, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    import torch

    b, s = hidden_states.shape[:2]
    usable = (cache is None and kwargs.get("past_key_values") is None and not kwargs.get("output_attentions")
              and attn.config._attn_implementation == "eager" and attn.attn_logit_softcapping is None
              and not (attn.training and attn.attention_dropout) and hidden_states.dtype == torch.float32
              and hidden_states.device.type == "cpu" and position_embeddings is not None
              and (attention_mask is None or (attention_mask.dtype == torch.float32
                                              and attention_mask.shape[-2:] == (s, s))))
    if not usable:
        return type(attn).forward(attn, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    shape = (b, s, -1, attn.head_dim)
    # As the layer's own forward: the projections (the q/k/v LoRA group reads them in this order) and the norms.
    q = attn.q_norm(attn.q_proj(hidden_states).view(shape).transpose(1, 2))
    k = attn.k_norm(attn.k_proj(hidden_states).view(shape).transpose(1, 2))
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    out = _function().apply(q, k, v, cos, sin, attention_mask, attn.scaling)
    return attn.o_proj(out.view(b, s, -1)), None


def _rotate(x, cos, signed_sin, out):
    """x * cos + rotate_half(x) * sin into out: rotate_half(x) * sin is x rolled by half its width times
    the sine with its first half negated."""
    import torch

    torch.mul(x, cos, out=out)
    return out.addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)


@functools.cache
def _function():
    import torch
    from torch.autograd.function import once_differentiable

    class FusedAttention(torch.autograd.Function):
        """softmax(rope(q) rope(k)^T * scaling + mask) v, heads [batch, heads, positions, head_dim] in, the
        result [batch, positions, heads, head_dim] out (as the layer's reshape wants it)."""

        @staticmethod
        def forward(ctx, q, k, v, cos, sin, mask, scaling):
            b, heads, s, d = q.shape
            kv_heads = k.shape[1]
            half = d // 2
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
            # The query heads of one key/value head, one after another: one matrix of their rows.
            qr = _rotate(q, cos, signed_sin, q.new_empty(b, heads, s, d)).view(b, kv_heads, -1, d)
            kr = _rotate(k, cos, signed_sin, k.new_empty(b, kv_heads, s, d))
            scores = torch.matmul(qr, kr.transpose(-1, -2)).mul_(scaling)
            if mask is not None:
                scores.view(b, heads, s, s).add_(mask)
            p = torch.softmax(scores, -1)
            out = torch.matmul(p, v)  # v: [b, kv_heads, s, d], a view of the projection's output
            ctx.save_for_backward(qr, kr, v, p, cos, signed_sin)
            ctx.scaling = scaling
            return out.view(b, heads, s, d).transpose(1, 2).contiguous()

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            qr, kr, v, p, cos, signed_sin = ctx.saved_tensors
            b, kv_heads, rows, d = qr.shape
            heads = rows * kv_heads // kr.shape[2]
            s = kr.shape[2]
            g = grad_out.transpose(1, 2).reshape(b, kv_heads, rows, d)
            grad_v = torch.matmul(p.transpose(-1, -2), g)
            grad_scores = torch._softmax_backward_data(torch.matmul(g, v.transpose(-1, -2)), p, -1, p.dtype)
            grad_scores.mul_(ctx.scaling)
            grad_qr = torch.matmul(grad_scores, kr).view(b, heads, s, d)
            grad_kr = torch.matmul(grad_scores.transpose(-1, -2), qr)
            # rope's backward: x * cos + roll(x) * signed_sin has the gradient g * cos + roll(g * signed_sin)
            # (rolling by half the width is its own inverse)
            grads = []
            for grad in (grad_qr, grad_kr):
                grads.append((grad * signed_sin).roll(d // 2, -1).addcmul_(grad, cos))
            return grads[0], grads[1], grad_v, None, None, None, None

    return FusedAttention


@functools.cache
def _gemma3_attention_class():
    try:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
    except ImportError:
        return None
    return Gemma3Attention


@functools.cache
def _checked() -> bool:
    """Whether the fused function gives the output and gradients of transformers' own layer: a random layer
    with two query heads per key/value head, a causal mask with padding, positions of a batch of two."""
    import types

    import torch
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = AutoConfig.for_model("gemma3_text", vocab_size=32, hidden_size=48, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16, layer_types=["full_attention"])
    config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    attention = _gemma3_attention_class()(config, 0)
    torch.set_rng_state(state)  # the layer's initialization draws from torch's generator: the run's stream stays
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    b, s = 2, 7
    x = torch.randn(b, s, 48, generator=generator, requires_grad=True)
    positions = torch.arange(s).expand(b, s)
    position_embeddings = Gemma3RotaryEmbedding(config)(x, positions, "full_attention")
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1).expand(b, 1, s, s).clone()
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # padding on the left of the first row
    mask[0, :, :2, :] = 0.0  # (its padded positions see everything, as transformers' masks let them)
    grad_y = torch.randn(b, s, 48, generator=generator)
    results = []
    for forward in (type(attention).forward, _forward):
        y, _ = types.MethodType(forward, attention)(x, position_embeddings=position_embeddings,
                                                     attention_mask=mask)
        results.append((y, *torch.autograd.grad(y, [x, *attention.parameters()], grad_y)))
    return all(torch.allclose(a, c, atol=1e-5, rtol=1e-4) for a, c in zip(*results))
