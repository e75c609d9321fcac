import assert from 'node:assert/strict';
import test from 'node:test';
import { slerp, variationNoise } from '../src/pipelines/variation-noise.js';
import { PhiloxGenerator, TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';

const f32 = (shape: number[], values: number[]) =>
  new Tensor('float32', shape, Float32Array.from(values));

test("A1111's slerp: the ends, an angle worked out by hand, and its parallel fallback", () => {
  const low = f32([1, 2, 1], [1, 0]);
  const high = f32([1, 2, 1], [0, 1]);
  assert.deepEqual([...slerp(0, low, high).data], [1, 0]);
  assert.deepEqual([...slerp(1, low, high).data], [0, 1]);
  // A right angle: halfway is (cos 45°, sin 45°).
  const half = slerp(0.5, low, high).data;
  assert.ok(Math.abs(half[0]! - Math.SQRT1_2) < 1e-7 && Math.abs(half[1]! - Math.SQRT1_2) < 1e-7);
  // Norms run along dimension 1 (rows), so each column has its own angle: here 0° and 90°,
  // whose mean dot product (0.5) keeps the spherical path.
  const a = f32([1, 2, 2], [1, 1, 0, 0]);
  const b = f32([1, 2, 2], [2, 0, 0, 3]);
  const mixed = slerp(0.5, a, b).data;
  // Column 0: parallel unit vectors, sin(ω)=0 gives NaN in A1111 as here.
  assert.ok(Number.isNaN(mixed[0]!));
  assert.ok(
    Math.abs(mixed[1]! - Math.SQRT1_2) < 1e-7 && Math.abs(mixed[3]! - 3 * Math.SQRT1_2) < 1e-6,
  );
  // Nearly parallel everywhere: low·val + high·(1 − val), A1111's weights the other way round.
  const near = slerp(0.25, f32([1, 2, 1], [1, 2]), f32([1, 2, 1], [2, 4])).data;
  assert.deepEqual([...near], [0.25 + 1.5, 0.5 + 3]);
});

test('variation noise: strength 0 is the seed, 1 the variation seed; the generator goes on from the seed', () => {
  const shape: [number, number, number] = [4, 8, 8];
  const own = new TorchGenerator(11);
  const ownNoise = own.randn([1, ...shape]);
  const none = variationNoise(11, shape, { subseed: 99, strength: 0 });
  assert.deepEqual(none.noise.data, ownNoise.data);
  assert.deepEqual(none.generator.randn([5]).data, own.randn([5]).data);
  const full = variationNoise(11, shape, { subseed: 99, strength: 1 });
  assert.deepEqual(full.noise.data, new TorchGenerator(99).randn([1, ...shape]).data);
  const some = variationNoise(11, shape, { subseed: 99, strength: 0.3 });
  assert.notDeepEqual(some.noise.data, ownNoise.data);
  // Interpolated on the sphere: each column keeps about the norm of its ends.
  let norm = 0;
  for (let y = 0; y < 8; y++) norm += some.noise.data[y * 8]! ** 2;
  assert.ok(Math.sqrt(norm) > 1 && Math.sqrt(norm) < 5);
});

test('resized seeds: drawn at the other size and centred (cropped when larger)', () => {
  const smaller = variationNoise(5, [2, 8, 8], { subseed: 0, strength: 0, resizeFrom: [4, 4] });
  const small = new TorchGenerator(5).randn([2, 4, 4]).data;
  const full = new TorchGenerator(5).randn([2, 8, 8]).data;
  for (let c = 0; c < 2; c++)
    for (let y = 0; y < 8; y++)
      for (let x = 0; x < 8; x++) {
        const inside = y >= 2 && y < 6 && x >= 2 && x < 6;
        const expected = inside ? small[(c * 4 + y - 2) * 4 + x - 2]! : full[(c * 8 + y) * 8 + x]!;
        assert.equal(smaller.noise.data[(c * 8 + y) * 8 + x], expected, `${c} ${y} ${x}`);
      }
  const larger = variationNoise(5, [1, 4, 4], { subseed: 0, strength: 0, resizeFrom: [8, 6] });
  const big = new TorchGenerator(5).randn([1, 8, 6]).data;
  for (let y = 0; y < 4; y++)
    for (let x = 0; x < 4; x++)
      assert.equal(larger.noise.data[y * 4 + x], big[(y + 2) * 6 + x + 1]);
});

test('variation noise from the NV source: both seeds drawn by Philox, the generator goes on from the seed', () => {
  const shape: [number, number, number] = [4, 8, 8];
  const own = new PhiloxGenerator(11);
  const ownNoise = own.randn(shape);
  const none = variationNoise(11, shape, { subseed: 99, strength: 0, rng: 'nv' });
  assert.deepEqual(none.noise.data, ownNoise.data);
  assert.deepEqual(none.generator.randn([5]).data, own.randn([5]).data);
  const full = variationNoise(11, shape, { subseed: 99, strength: 1, rng: 'nv' });
  assert.deepEqual(full.noise.data, new PhiloxGenerator(99).randn(shape).data);
});
