import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { fmaf, PhiloxGenerator, TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertBitEqual, fixtures, golden, needsGolden } from './helpers.js';

// Exact equality throughout: the generator must reproduce PyTorch bit for bit.

test(
  'golden rng.safetensors: every tensor, drawn in sequence from one generator per seed',
  needsGolden(),
  async () => {
    await SafetensorsFile.with(golden('sd1-tiny', 'rng.safetensors'), async (file) => {
      const seeds = new Set(
        file.names.map((n) => /_seed(\d+)_/.exec(n)?.[1]).filter((s) => s !== undefined),
      );
      assert.equal(seeds.size, 5);
      const sequence: [string, number[]][] = [
        ['5', [5]],
        ['15', [15]],
        ['16', [16]],
        ['17', [17]],
        ['1x4x8x8', [1, 4, 8, 8]],
        ['1x4x64x64', [1, 4, 64, 64]],
        ['3x7', [3, 7]],
      ];
      let checked = 0;
      for (const seed of seeds) {
        // One generator makes the sized draws, then 100 uniforms, in this order.
        const g = new TorchGenerator(BigInt(seed));
        for (const [name, shape] of sequence) {
          const expected = (await file.read(`randn_seed${seed}_${name}`)) as Tensor<'float32'>;
          assert.deepEqual([...expected.shape], shape);
          assertBitEqual(g.randn(shape), expected, `randn seed ${seed} ${name}`);
          checked++;
        }
        assertBitEqual(
          g.rand([100]),
          (await file.read(`rand_seed${seed}_100`)) as Tensor<'float32'>,
          `rand seed ${seed}`,
        );
        // A fresh generator: two latents-sized draws in a row.
        const h = new TorchGenerator(BigInt(seed));
        for (const part of ['a', 'b']) {
          assertBitEqual(
            h.randn([1, 4, 32, 32]),
            (await file.read(`randn_seed${seed}_seq_${part}`)) as Tensor<'float32'>,
            `seq ${part}`,
          );
        }
        checked += 3;
      }
      assert.equal(checked, file.names.length, 'every tensor in the file was compared');
    });
  },
);

test('PyTorch references beyond the golden file: negative and 64-bit seeds, ragged sizes, mixed draws', async () => {
  await SafetensorsFile.with(join(fixtures, 'rng-extra.safetensors'), async (file) => {
    const plans = Object.entries(file.metadata);
    assert.ok(plans.length >= 5);
    for (const [name, text] of plans) {
      const plan = JSON.parse(text) as { seed: string; draws: ['rand' | 'randn', number[]][] };
      const g = new TorchGenerator(BigInt(plan.seed));
      for (const [i, [kind, shape]] of plan.draws.entries()) {
        const actual = kind === 'rand' ? g.rand(shape) : g.randn(shape);
        assertBitEqual(
          actual,
          (await file.read(`${name}.${i}`)) as Tensor<'float32'>,
          `${name} draw ${i} (${kind} ${shape.join('x')})`,
        );
      }
    }
  });
});

test('well-known PyTorch values for seed 0', () => {
  // torch.manual_seed(0); torch.rand(3) -> 0.4963, 0.7682, 0.0885; torch.randn(2) -> 1.5410, -0.2934
  assert.deepEqual(
    new TorchGenerator(0)
      .rand([3])
      .toArray()
      .map((v) => v.toFixed(4)),
    ['0.4963', '0.7682', '0.0885'],
  );
  assert.deepEqual(
    new TorchGenerator(0)
      .randn([2])
      .toArray()
      .map((v) => v.toFixed(4)),
    ['1.5410', '-0.2934'],
  );
});

test('saved state resumes the exact sequence, including the cached second normal', () => {
  const g = new TorchGenerator(99);
  g.randn([3]); // leaves one cached normal
  const state = g.getState();
  const next = [g.randn([1]), g.randn([20]), g.rand([4])];
  const h = new TorchGenerator(0);
  h.setState(state);
  for (const t of next) {
    const again = t.size === 4 ? h.rand([4]) : h.randn(t.shape);
    assertBitEqual(again, t as Tensor<'float32'>);
  }
  assert.equal(h.initialSeed(), 99n);
});

test('manualSeed resets the sequence and the cached normal', () => {
  const g = new TorchGenerator(5);
  const first = g.randn([3]);
  g.manualSeed(5);
  assertBitEqual(g.randn([3]), first);
});

test('fmaf rounds once, where a double-rounded a*b+c would not', () => {
  // a*a = 1 + 2^-11 + 2^-24 exactly: the midpoint between two float32 values. A tiny c decides
  // the direction; a double sum loses c and then ties to even.
  const a = 1 + 2 ** -12;
  const tiny = 2 ** -80;
  assert.equal(Math.fround(a * a + tiny), 1 + 2 ** -11, 'the naive double-rounded result');
  assert.equal(fmaf(a, a, tiny), 1 + 2 ** -11 + 2 ** -23);
  assert.equal(fmaf(a, a, -tiny), 1 + 2 ** -11);
  assert.equal(fmaf(3, 5, 7), 22);
  const tenth = Math.fround(0.1);
  assert.equal(fmaf(tenth, 10, -1), Math.fround(tenth * 10 - 1));
  assert.ok(Number.isNaN(fmaf(NaN, 1, 1)));
});

test('A1111 NV source (CUDA randn re-derived with Philox 4x32-10): its published values and its Python', () => {
  // modules/rng_philox.py's docstring: Generator(seed=0).randn(shape=(3, 4)), printed from CUDA's
  // float32 transform; A1111's NumPy code, which gesso follows, computes it in float64, so the two
  // agree to about 3e-7.
  const published = [
    -0.92466259, -0.42534415, -2.6438457, 0.14518388, -0.12086647, -0.57972564, -0.62285122,
    -0.32838709, -1.07454231, -0.36314407, -1.67105067, 2.26550497,
  ];
  const drawn = new PhiloxGenerator(0).randn([3, 4]);
  assert.deepEqual(drawn.shape, [3, 4]);
  drawn.data.forEach((v, i) => assert.ok(Math.abs(v - published[i]!) < 5e-7, `${i}: ${v}`));
  // rng_philox.py run under NumPy 2.4 (float32 results, exact): a seed past 2^32 (both key
  // words), a second draw (the counter's offset), and far into a latent-sized draw.
  const g = new PhiloxGenerator(123456789012);
  assert.deepEqual(
    [...g.randn([2, 3]).data],
    [
      1.8181378841400146, 0.7406977415084839, -0.884077787399292, 2.38407039642334,
      0.44872260093688965, 0.019693367183208466,
    ],
  );
  assert.deepEqual(
    [...g.randn([5]).data],
    [
      -1.6049665212631226, -1.2986793518066406, -0.9118446111679077, 0.5917513370513916,
      0.7420607805252075,
    ],
  );
  const latent = new PhiloxGenerator(7).randn([4, 64, 64]).data;
  assert.deepEqual(
    [0, 1, 4095, 16383].map((i) => latent[i]),
    [-0.30484697222709656, 1.0453333854675293, -0.7625521421432495, 0.5809571146965027],
  );
});
