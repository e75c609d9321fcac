#!/usr/bin/env python3
"""Reference values for test/rng.test.ts and test/half.test.ts, made by PyTorch and NumPy.

Run with Debian's python3-torch: /usr/bin/python3 scripts/make-tensor-fixtures.py
Writes test/fixtures/rng-extra.safetensors and test/fixtures/half.safetensors. The golden
rng.safetensors covers five seeds; these add other seeds (negative, past 32 bits), sizes on both
sides of 16, and interleaved rand/randn draws from one generator.
"""
import json
import os

import numpy as np
import torch

from fixtures_io import save

OUT = os.path.join(os.path.dirname(__file__), '..', 'test', 'fixtures')


# Each entry: a seed and a list of draws made in order from one generator.
plans = {
    'neg1': (-1, [('randn', [4, 4]), ('randn', [3]), ('rand', [7]), ('randn', [33])]),
    'big': (2**32 + 5, [('randn', [31]), ('randn', [1]), ('randn', [2]), ('randn', [32])]),
    'max': (2**63 - 1, [('rand', [3]), ('randn', [1, 4, 16, 16])]),
    's7': (7, [('randn', [1]), ('randn', [1]), ('randn', [1]), ('randn', [48]), ('rand', [5]), ('randn', [9, 2])]),
    's1234': (1234, [('randn', [2, 4, 24, 20]), ('randn', [1, 4, 24, 20]), ('rand', [1000])]),
}
tensors, meta = {}, {}
for name, (seed, draws) in plans.items():
    g = torch.Generator().manual_seed(seed)
    for i, (kind, shape) in enumerate(draws):
        t = (torch.randn if kind == 'randn' else torch.rand)(shape, generator=g)
        tensors[f'{name}.{i}'] = t.numpy()
    meta[name] = json.dumps({'seed': str(seed), 'draws': draws})
save(os.path.join(OUT, 'rng-extra.safetensors'), tensors, meta)

rng = np.random.default_rng(5)
bits = np.concatenate([
    rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32),          # any float32, NaN included
    (rng.integers(0x30000000, 0x38800000, 3000, dtype=np.uint64)).astype(np.uint32),  # half subnormal range
    (rng.integers(0x477f0000, 0x47800000, 500, dtype=np.uint64)).astype(np.uint32),   # near half max
    np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x33000000, 0x33000001, 0x337fffff, 0x477fe000,
              0x477fefff, 0x477ff000, 0x3f801000, 0x3f803000, 0x00000001, 0x7f7fffff, 0x3f80_8000, 0x3f81_8000],
             dtype=np.uint32),
])
f32 = bits.view(np.float32)
with np.errstate(all='ignore'):
    f16 = f32.astype(np.float16).view(np.uint16)
bf16 = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
all_f16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
save(os.path.join(OUT, 'half.safetensors'), {
    'f32_bits': bits,
    'f16_bits': f16,
    'bf16_bits': bf16,
    'f16_all_as_f32_bits': all_f16.view(np.float16).astype(np.float32).view(np.uint32)[::7].copy(),
})
print('wrote', len(tensors), 'rng tensors')
