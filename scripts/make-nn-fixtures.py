#!/usr/bin/env python3
"""Reference outputs of PyTorch modules for test/nn.test.ts, computed by PyTorch itself.

Run with Debian's python3-torch (`apt-get install python3-torch`):
    /usr/bin/python3 scripts/make-nn-fixtures.py
Writes test/fixtures/nn-weights.safetensors (every weight, under the state-dict key of a small
module tree), nn-weights-fp16/-bf16.safetensors, and nn-io.safetensors (inputs and outputs).
"""
import math
import os

import torch
import torch.nn.functional as F

from fixtures_io import save

torch.manual_seed(20261124)
OUT = os.path.join(os.path.dirname(__file__), '..', 'test', 'fixtures')

weights, io = {}, {}


def put(prefix, module):
    for k, v in module.state_dict().items():
        weights[f'{prefix}.{k}'] = v.detach().clone()


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


with torch.no_grad():
    # Linear, 2-D input (Gemm) and 3-D input without bias (MatMul).
    m = randomize(torch.nn.Linear(5, 7)); put('linear2d', m)
    x = torch.randn(3, 5); io['linear2d.x'] = x; io['linear2d.y'] = m(x)
    m = randomize(torch.nn.Linear(6, 4, bias=False)); put('linear3d', m)
    x = torch.randn(2, 3, 6); io['linear3d.x'] = x; io['linear3d.y'] = m(x)

    # Conv2d: padded, strided + grouped, dilated with a rectangular kernel.
    m = randomize(torch.nn.Conv2d(4, 6, 3, padding=1)); put('conv', m)
    x = torch.randn(2, 4, 5, 5); io['conv.x'] = x; io['conv.y'] = m(x)
    m = randomize(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)); put('conv_grouped', m)
    x = torch.randn(1, 4, 7, 7); io['conv_grouped.x'] = x; io['conv_grouped.y'] = m(x)
    m = randomize(torch.nn.Conv2d(3, 2, (3, 1), padding=(2, 0), dilation=2, bias=False)); put('conv_dilated', m)
    x = torch.randn(1, 3, 6, 4); io['conv_dilated.x'] = x; io['conv_dilated.y'] = m(x)

    # Norms, with non-trivial affine parameters and non-zero-mean inputs.
    m = randomize(torch.nn.GroupNorm(4, 8, eps=1e-6)); put('groupnorm', m)
    x = torch.randn(2, 8, 3, 5) * 3 + 1; io['groupnorm.x'] = x; io['groupnorm.y'] = m(x)
    m = torch.nn.GroupNorm(2, 6, affine=False)
    x = torch.randn(1, 6, 4, 4) * 2 - 1; io['groupnorm_plain.x'] = x; io['groupnorm_plain.y'] = m(x)
    m = randomize(torch.nn.LayerNorm(6)); put('layernorm', m)
    x = torch.randn(2, 3, 6) * 2 + 0.5; io['layernorm.x'] = x; io['layernorm.y'] = m(x)

    m = randomize(torch.nn.Embedding(11, 5)); put('embedding', m)
    ids = torch.tensor([[0, 3, 10], [7, 7, 1]]); io['embedding.ids'] = ids; io['embedding.y'] = m(ids)

    x = torch.linspace(-6, 6, 97)
    io['act.x'] = x
    io['act.silu'] = F.silu(x)
    io['act.gelu'] = F.gelu(x)
    io['act.gelu_tanh'] = F.gelu(x, approximate='tanh')
    io['act.quick_gelu'] = x * torch.sigmoid(1.702 * x)

    # diffusers' Attention, computed the way its AttnProcessor does (baddbmm with alpha = scale).
    def attention(prefix, query_dim, heads, dim_head, cross_dim=None, out_dim=None, qkv_bias=False, mask=None,
                  x=None, ctx=None):
        inner = heads * dim_head
        cross_dim = cross_dim or query_dim
        out_dim = out_dim or query_dim
        q = randomize(torch.nn.Linear(query_dim, inner, bias=qkv_bias))
        k = randomize(torch.nn.Linear(cross_dim, inner, bias=qkv_bias))
        v = randomize(torch.nn.Linear(cross_dim, inner, bias=qkv_bias))
        o = randomize(torch.nn.Linear(inner, out_dim))
        put(f'{prefix}.to_q', q); put(f'{prefix}.to_k', k); put(f'{prefix}.to_v', v); put(f'{prefix}.to_out.0', o)
        ctx_ = x if ctx is None else ctx
        b, s, _ = x.shape
        l = ctx_.shape[1]
        qh = q(x).reshape(b, s, heads, dim_head).permute(0, 2, 1, 3).reshape(b * heads, s, dim_head)
        kh = k(ctx_).reshape(b, l, heads, dim_head).permute(0, 2, 1, 3).reshape(b * heads, l, dim_head)
        vh = v(ctx_).reshape(b, l, heads, dim_head).permute(0, 2, 1, 3).reshape(b * heads, l, dim_head)
        scores = torch.baddbmm(torch.zeros(b * heads, s, l), qh, kh.transpose(-1, -2), beta=0, alpha=dim_head ** -0.5)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        out = torch.bmm(probs, vh).reshape(b, heads, s, dim_head).permute(0, 2, 1, 3).reshape(b, s, inner)
        io[f'{prefix}.x'] = x
        if ctx is not None:
            io[f'{prefix}.context'] = ctx
        io[f'{prefix}.y'] = o(out)

    attention('self_attn', 8, 2, 4, x=torch.randn(2, 5, 8))
    attention('cross_attn', 8, 2, 3, cross_dim=6, out_dim=8, qkv_bias=True, x=torch.randn(2, 4, 8), ctx=torch.randn(2, 7, 6))
    causal = torch.full((5, 5), float('-inf')).triu(1)
    io['masked_attn.mask'] = causal
    attention('masked_attn', 6, 3, 2, x=torch.randn(1, 5, 6), mask=causal)

    # diffusers' Upsample2D / Downsample2D.
    conv = randomize(torch.nn.Conv2d(4, 4, 3, padding=1)); put('upsample.conv', conv)
    x = torch.randn(1, 4, 3, 5); io['upsample.x'] = x
    io['upsample.y'] = conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))
    conv = randomize(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)); put('down_pad1.conv', conv)
    x = torch.randn(1, 4, 6, 6); io['down_pad1.x'] = x; io['down_pad1.y'] = conv(x)
    conv = randomize(torch.nn.Conv2d(4, 4, 3, stride=2, padding=0)); put('down_pad0.conv', conv)
    x = torch.randn(1, 4, 7, 7); io['down_pad0.x'] = x; io['down_pad0.y'] = conv(F.pad(x, (0, 1, 0, 1)))
    x = torch.randn(1, 4, 6, 6); io['down_pool.x'] = x; io['down_pool.y'] = F.avg_pool2d(x, 2, 2)

    # Half-precision weight files: the model computes in float32 on the exactly converted weights.
    half = {}
    for dtype, tag in [(torch.float16, 'fp16'), (torch.bfloat16, 'bf16')]:
        m = randomize(torch.nn.Linear(6, 5))
        store = {f'linear_{tag}.{k}': v.to(dtype) for k, v in m.state_dict().items()}
        half[tag] = store
        x = torch.randn(2, 6)
        io[f'linear_{tag}.x'] = x
        io[f'linear_{tag}.y'] = F.linear(x, m.weight.to(dtype).float(), m.bias.to(dtype).float())

save(os.path.join(OUT, 'nn-weights.safetensors'), weights)
save(os.path.join(OUT, 'nn-weights-fp16.safetensors'), half['fp16'])
save(os.path.join(OUT, 'nn-weights-bf16.safetensors'), half['bf16'])
save(os.path.join(OUT, 'nn-io.safetensors'), io)
print('wrote', len(weights), 'weights and', len(io), 'io tensors')
