import assert from 'node:assert/strict';
import test from 'node:test';
import { chunk, clamp, combine, concat, permute, scale, slice, stats } from '../src/tensor/ops.js';
import { Tensor } from '../src/tensor/tensor.js';

const range = (shape: number[]) =>
  Tensor.float32(
    shape,
    Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => i),
  );

test('constructor checks sizes and shapes', () => {
  assert.throws(() => new Tensor('float32', [2, 3], new Float32Array(5)), /needs 6 elements/);
  assert.throws(() => new Tensor('float32', [-1]), /invalid tensor shape/);
  assert.equal(new Tensor('int64', [2, 2]).data.constructor, BigInt64Array);
  assert.equal(new Tensor('float16', [3]).data.constructor, Uint16Array);
});

test('reshape infers -1 and refuses impossible shapes', () => {
  const t = range([2, 3, 4]);
  assert.deepEqual(t.reshape([6, -1]).shape, [6, 4]);
  assert.throws(() => t.reshape([5, -1]), /cannot reshape/);
  assert.throws(() => t.reshape([2, 2]), /cannot reshape/);
});

test('dtype conversion: float16 and bfloat16 exactly, integers truncate', () => {
  const t = Tensor.float32([4], [1, -2.5, 65519.99, 1e-8]);
  assert.deepEqual(t.to('float16').toArray(), [1, -2.5, 65504, 0]);
  assert.deepEqual(Tensor.float32([2], [1.00390625, 3]).to('bfloat16').toArray(), [1, 3]);
  assert.deepEqual(Tensor.float32([3], [2.7, -2.7, 0]).to('int32').toArray(), [2, -2, 0]);
  assert.deepEqual(Tensor.float32([2], [0, 0.5]).to('bool').toArray(), [0, 1]);
  assert.deepEqual(Tensor.int64([2], [3n, -4n]).toFloat32().toArray(), [3, -4]);
});

test('fromBytes copies unaligned little-endian bytes', () => {
  const bytes = new Uint8Array(9);
  new DataView(bytes.buffer).setFloat32(1, 1.5, true);
  new DataView(bytes.buffer).setFloat32(5, -2, true);
  assert.deepEqual(Tensor.fromBytes('float32', [2], bytes.subarray(1)).toArray(), [1.5, -2]);
  assert.throws(() => Tensor.fromBytes('float32', [3], bytes.subarray(1)), /needs 12 bytes/);
});

test('combine is the float32 sum of scaled terms', () => {
  const a = Tensor.float32([3], [1, 2, 3]);
  const b = Tensor.float32([3], [10, 20, 30]);
  assert.deepEqual(
    combine([
      [2, a],
      [-0.5, b],
    ]).toArray(),
    [-3, -6, -9],
  );
  assert.deepEqual(combine([[0.1, a]]).toArray(), [
    Math.fround(0.1),
    Math.fround(0.2),
    Math.fround(Math.fround(0.1) * 3),
  ]);
  assert.throws(
    () =>
      combine([
        [1, a],
        [1, Tensor.float32([2], [1, 2])],
      ]),
    /differ/,
  );
  assert.deepEqual(scale(a, 3).toArray(), [3, 6, 9]);
  assert.deepEqual(clamp(b, 15, 25).toArray(), [15, 20, 25]);
});

test('concat, slice and chunk along any axis', () => {
  const a = range([2, 2]); // [[0,1],[2,3]]
  const b = Tensor.float32([2, 1], [9, 8]);
  assert.deepEqual(concat([a, b], 1).toArray(), [0, 1, 9, 2, 3, 8]);
  assert.deepEqual(concat([a, a], 0).shape, [4, 2]);
  assert.deepEqual(slice(range([3, 4]), 1, 1, 3).toArray(), [1, 2, 5, 6, 9, 10]);
  const [first, second] = chunk(range([4, 2]), 2, 0);
  assert.deepEqual(first!.toArray(), [0, 1, 2, 3]);
  assert.deepEqual(second!.toArray(), [4, 5, 6, 7]);
  assert.throws(() => chunk(range([3, 2]), 2), /does not split/);
  assert.deepEqual(
    concat([Tensor.int64([1], [5n]), Tensor.int64([2], [6n, 7n])]).toArray(),
    [5, 6, 7],
  );
});

test('permute matches the index arithmetic of a transpose', () => {
  const t = range([2, 3, 4]);
  const p = permute(t, [2, 0, 1]);
  assert.deepEqual(p.shape, [4, 2, 3]);
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 2; j++) {
      for (let k = 0; k < 3; k++)
        assert.equal(p.data[i * 6 + j * 3 + k], t.data[j * 12 + k * 4 + i]);
    }
  }
  assert.throws(() => permute(t, [0, 0, 1]), /not a permutation/);
});

test('stats', () => {
  const s = stats(Tensor.float32([4], [1, 2, 3, 4]));
  assert.deepEqual(s, { min: 1, max: 4, mean: 2.5, std: Math.sqrt(1.25) });
});
