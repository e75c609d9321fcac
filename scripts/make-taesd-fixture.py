#!/usr/bin/env python3
"""A tiny random TAESD (diffusers' AutoencoderTiny layout) and its outputs, computed by PyTorch.

Run with Debian's python3-torch:
    /usr/bin/python3 scripts/make-taesd-fixture.py
The network is written here from TAESD's description (Ollin Boer Bohan's taesd.py; diffusers'
EncoderTiny / DecoderTiny): a plain nn.Sequential per half, so the state-dict keys are the ones
TAESD folders on the Hub use. Writes test/fixtures/taesd-tiny/ (config.json and weights) and
test/fixtures/taesd-io.safetensors (inputs and outputs of encode and decode).
"""
import json
import os

import torch
from torch import nn

from fixtures_io import save

torch.manual_seed(20261124)
OUT = os.path.join(os.path.dirname(__file__), '..', 'test', 'fixtures')
WIDTH = 8
ENCODER_BLOCKS = [1, 3, 3, 3]
DECODER_BLOCKS = [3, 3, 3, 1]


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for i, blocks in enumerate(ENCODER_BLOCKS):
            layers.append(nn.Conv2d(3, WIDTH, 3, padding=1) if i == 0 else nn.Conv2d(WIDTH, WIDTH, 3, padding=1, stride=2, bias=False))
            layers += [Block(WIDTH) for _ in range(blocks)]
        layers.append(nn.Conv2d(WIDTH, 4, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, image):  # image in [-1, 1]
        return self.layers((image + 1) / 2)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(4, WIDTH, 3, padding=1), nn.ReLU()]
        for i, blocks in enumerate(DECODER_BLOCKS):
            last = i == len(DECODER_BLOCKS) - 1
            layers += [Block(WIDTH) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode='nearest'))
            layers.append(nn.Conv2d(WIDTH, 3 if last else WIDTH, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents):
        return self.layers(torch.tanh(latents / 3) * 3) * 2 - 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()


model = Tiny().eval()
with torch.no_grad():
    # Larger than default initial weights, so the outputs are far from constant.
    for p in model.parameters():
        p.mul_(2.0)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = torch.randn(1, 4, 4, 4) * 2
    io = {
        'image': image,
        'encoded': model.encoder(image),
        'latents': latents,
        'decoded': model.decoder(latents),
    }
folder = os.path.join(OUT, 'taesd-tiny')
os.makedirs(folder, exist_ok=True)
save(os.path.join(folder, 'diffusion_pytorch_model.safetensors'), dict(model.state_dict()))
with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump({
        '_class_name': 'AutoencoderTiny',
        'in_channels': 3, 'out_channels': 3, 'latent_channels': 4,
        'encoder_block_out_channels': [WIDTH] * 4, 'decoder_block_out_channels': [WIDTH] * 4,
        'num_encoder_blocks': ENCODER_BLOCKS, 'num_decoder_blocks': DECODER_BLOCKS,
        'act_fn': 'relu', 'upsample_fn': 'nearest', 'upsampling_scaling_factor': 2,
        'latent_magnitude': 3, 'latent_shift': 0.5, 'scaling_factor': 1.0,
    }, f, indent=2)
    f.write('\n')
save(os.path.join(OUT, 'taesd-io.safetensors'), io)
print('wrote', folder, 'and taesd-io.safetensors')
