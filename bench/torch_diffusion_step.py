#!/usr/bin/env python3
"""PyTorch on CPU training gesso's shapes diffusion model, for BENCHMARKS.md.

The same architecture as gesso's default diffusion recipe, written out in plain PyTorch with
diffusers' and transformers' state-dict names: a bidirectional CLIP-style text encoder and a
UNet2DConditionModel (CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D / mirrored, GEGLU
transformer blocks, only_cross_attention on the first level). One training step is what gesso's
step graph does: forward, weighted MSE against the target, backward, gradient clipping to norm 1,
AdamW and an EMA of the weights.

    /usr/bin/python3 bench/torch_diffusion_step.py --threads 2 --steps 20
    /usr/bin/python3 bench/torch_diffusion_step.py --check FIXTURE.safetensors MODEL_DIR

--export-onnx writes the UNet alone (random weights, the given UNet config.json) with
torch.onnx.export, dynamic batch and size, as diffusers' own ONNX conversion does: the "ONNX Runtime
on a PyTorch export" line of the full-size benchmark runs it beside gesso's graph.

    /usr/bin/python3 bench/torch_diffusion_step.py --export-onnx OUT_DIR UNET_CONFIG.json

--check loads a gesso model folder's weights (strictly: every name and shape must match) and
compares the UNet and text-encoder outputs with gesso's, saved by `npm run bench -- torch-fixture`.
"""
import argparse
import json
import math
import os
import statistics
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {'F32': torch.float32, 'F16': torch.float16, 'I64': torch.int64}


def load_safetensors(path):
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        begin, end = info['data_offsets']
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=DTYPES[info['dtype']])
        out[name] = t.reshape(info['shape']).float() if info['dtype'] == 'F16' else t.reshape(info['shape'])
    return out


class Attention(nn.Module):
    def __init__(self, dim, context_dim, heads, bias=False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        h = self.heads
        split = lambda t: t.reshape(b, -1, h, d // h).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.to_out[0]((w @ v).transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, only_cross):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, context_dim if only_cross else None, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])

    def forward(self, x, context):
        x = self.attn1(self.norm1(x), context if self.only_cross else None) + x
        x = self.attn2(self.norm2(x), context) + x
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return h + x


class Transformer2D(nn.Module):
    def __init__(self, channels, heads, context_dim, groups, only_cross):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim, only_cross)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).reshape(b, c, hh * ww).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww)) + x


class Resnet(nn.Module):
    def __init__(self, cin, cout, temb, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Sampler(nn.Module):
    def __init__(self, channels, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=1)

    def forward(self, x):
        return self.conv(x if self.down else F.interpolate(x, scale_factor=2.0, mode='nearest'))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups, cross, heads, context_dim, only_cross, downsample, layers):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(cin if i == 0 else cout, cout, temb, groups) for i in range(layers)])
        if cross:
            self.attentions = nn.ModuleList(
                [Transformer2D(cout, heads, context_dim, groups, only_cross) for _ in range(layers)]
            )
        if downsample:
            self.downsamplers = nn.ModuleList([Sampler(cout, True)])

    def forward(self, h, temb, context):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if hasattr(self, 'attentions'):
                h = self.attentions[i](h, context)
            outputs.append(h)
        if hasattr(self, 'downsamplers'):
            h = self.downsamplers[0](h)
            outputs.append(h)
        return h, outputs


class UpBlock(nn.Module):
    def __init__(self, cin, cout, prev, temb, groups, cross, heads, context_dim, only_cross, upsample, layers):
        super().__init__()
        self.resnets = nn.ModuleList(
            [Resnet((prev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, temb, groups) for i in range(layers)]
        )
        if cross:
            self.attentions = nn.ModuleList(
                [Transformer2D(cout, heads, context_dim, groups, only_cross) for _ in range(layers)]
            )
        if upsample:
            self.upsamplers = nn.ModuleList([Sampler(cout, False)])

    def forward(self, h, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if hasattr(self, 'attentions'):
                h = self.attentions[i](h, context)
        if hasattr(self, 'upsamplers'):
            h = self.upsamplers[0](h)
        return h


class Mid(nn.Module):
    def __init__(self, channels, temb, groups, heads, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(channels, channels, temb, groups), Resnet(channels, channels, temb, groups)])
        self.attentions = nn.ModuleList([Transformer2D(channels, heads, context_dim, groups, False)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UNet(nn.Module):
    def __init__(self, c):
        super().__init__()
        out = c['block_out_channels']
        groups, heads, ctx = c['norm_num_groups'], c['attention_head_dim'], c['cross_attention_dim']
        only = c.get('only_cross_attention', [False] * len(out))
        temb = out[0] * 4
        self.first = out[0]
        self.conv_in = nn.Conv2d(c['in_channels'], out[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(out[0], temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)
        self.down_blocks = nn.ModuleList()
        prev = out[0]
        for i, kind in enumerate(c['down_block_types']):
            self.down_blocks.append(
                DownBlock(
                    prev, out[i], temb, groups, kind.startswith('CrossAttn'), heads, ctx, only[i], i < len(out) - 1,
                    c['layers_per_block'],
                )
            )
            prev = out[i]
        self.mid_block = Mid(out[-1], temb, groups, heads, ctx)
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(out))
        for i, kind in enumerate(c['up_block_types']):
            self.up_blocks.append(
                UpBlock(
                    rev[min(i + 1, len(rev) - 1)], rev[i], rev[max(i - 1, 0)], temb, groups,
                    kind.startswith('CrossAttn'), heads, ctx, only[len(out) - 1 - i], i < len(out) - 1,
                    c['layers_per_block'] + 1,
                )
            )
        self.conv_norm_out = nn.GroupNorm(groups, out[0], eps=1e-5)
        self.conv_out = nn.Conv2d(out[0], c['out_channels'], 3, padding=1)

    def forward(self, sample, timestep, context):
        half = self.first // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angles = timestep[:, None].float() * freqs[None]
        t = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # flip_sin_to_cos
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(t)))
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, temb, context)
            skips.extend(outputs)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class TextEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c['hidden_size']
        self.text_model = nn.Module()
        tm = self.text_model
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(c['vocab_size'], d)
        tm.embeddings.position_embedding = nn.Embedding(c['max_position_embeddings'], d)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList()
        for _ in range(c['num_hidden_layers']):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ['q_proj', 'k_proj', 'v_proj', 'out_proj']:
                setattr(layer.self_attn, name, nn.Linear(d, d))
            layer.layer_norm1 = nn.LayerNorm(d, eps=c.get('layer_norm_eps', 1e-5))
            layer.mlp = nn.Module()
            layer.mlp.fc1 = nn.Linear(d, c['intermediate_size'])
            layer.mlp.fc2 = nn.Linear(c['intermediate_size'], d)
            layer.layer_norm2 = nn.LayerNorm(d, eps=c.get('layer_norm_eps', 1e-5))
            tm.encoder.layers.append(layer)
        tm.final_layer_norm = nn.LayerNorm(d, eps=c.get('layer_norm_eps', 1e-5))
        self.heads = c['num_attention_heads']

    def forward(self, ids):
        tm = self.text_model
        b, n = ids.shape
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(torch.arange(n))[None]
        h = self.heads
        for layer in tm.encoder.layers:
            a = layer.self_attn
            y = layer.layer_norm1(x)
            split = lambda t: t.reshape(b, n, h, -1).transpose(1, 2)
            q, k, v = split(a.q_proj(y)), split(a.k_proj(y)), split(a.v_proj(y))
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # bidirectional
            x = x + a.out_proj((w @ v).transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layer_norm2(x))))
        return tm.final_layer_norm(x)


def build(model_dir):
    te_config = json.load(open(os.path.join(model_dir, 'text_encoder', 'config.json')))
    unet_config = json.load(open(os.path.join(model_dir, 'unet', 'config.json')))
    return TextEncoder(te_config), UNet(unet_config)


def check(fixture, model_dir):
    te, unet = build(model_dir)
    for module, part, file in [(te, 'text_encoder', 'model.safetensors'), (unet, 'unet', 'diffusion_pytorch_model.safetensors')]:
        weights = {k: v for k, v in load_safetensors(os.path.join(model_dir, part, file)).items() if k != 'text_model.embeddings.position_ids'}
        module.load_state_dict(weights, strict=True)
    f = load_safetensors(fixture)
    with torch.no_grad():
        hidden = te(f['input_ids'])
        pred = unet(f['noisy'], f['timestep'], hidden)
    for name, ours, theirs in [('text hidden', hidden, f['hidden']), ('unet output', pred, f['prediction'])]:
        err = (ours - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        print(f'{name}: max |torch - gesso| = {err:.3e} (values up to {scale:.3f})')
        assert err <= 1e-4 * max(1.0, scale), f'{name} differs'
    print('same architecture: weights load strictly and outputs agree')


def bench(model_dir, batch, threads, steps, warmup):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    te, unet = build(model_dir)
    params = list(te.parameters()) + list(unet.parameters())
    count = sum(p.numel() for p in params)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    c = unet.conv_in.in_channels
    vocab = te.text_model.embeddings.token_embedding.num_embeddings
    length = te.text_model.embeddings.position_embedding.num_embeddings
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, length))
        noisy = torch.randn(batch, c, 16, 16)
        target = torch.randn(batch, c, 16, 16)
        t = torch.randint(0, 1000, (batch,)).float()
        weight = torch.rand(batch, 1, 1, 1) * 4 + 1
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (weight * (unet(noisy, t, te(ids)) - target) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(0.999).add_(p, alpha=0.001)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        'engine': f'pytorch {torch.__version__}', 'parameters': count, 'batch': batch, 'threads': threads,
        'steps_timed': steps, 'median_seconds_per_step': median, 'steps_per_second': 1 / median,
        'min_seconds': min(times), 'max_seconds': max(times), 'seconds': times,
    }))


def export_onnx(out_dir, unet_config):
    config = json.load(open(unet_config))
    torch.manual_seed(0)
    unet = UNet(config).eval()
    os.makedirs(out_dir, exist_ok=True)
    side = config.get('sample_size', 64)
    inputs = (
        torch.randn(1, config['in_channels'], side, side),
        torch.tensor([500.0]),
        torch.randn(1, 77, config['cross_attention_dim']),
    )
    path = os.path.join(out_dir, 'model.onnx')
    with torch.no_grad():
        torch.onnx.export(
            unet, inputs, path, opset_version=17, do_constant_folding=True,
            input_names=['sample', 'timestep', 'encoder_hidden_states'], output_names=['out_sample'],
            dynamic_axes={'sample': {0: 'batch', 2: 'height', 3: 'width'}, 'timestep': {0: 'batch'},
                          'encoder_hidden_states': {0: 'batch'}},
        )
    print(json.dumps({'onnx': path, 'parameters': sum(p.numel() for p in unet.parameters()), 'torch': torch.__version__}))


if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='runs/shapes-diffusion/model', help='a gesso diffusion model folder (for its configs)')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--check', nargs=2, metavar=('FIXTURE', 'MODEL_DIR'))
    parser.add_argument('--export-onnx', nargs=2, metavar=('OUT_DIR', 'UNET_CONFIG'))
    args = parser.parse_args()
    if args.export_onnx:
        export_onnx(*args.export_onnx)
    elif args.check:
        check(*args.check)
    else:
        bench(args.model, args.batch, args.threads, args.steps, args.warmup)
