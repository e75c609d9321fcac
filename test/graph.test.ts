import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { fromTensor, interpret } from '../src/graph/interpret.js';
import { Graph } from '../src/graph/ir.js';
import { emitOnnx, IR_VERSION, OPSET, onnxSchema } from '../src/graph/onnx.js';
import * as op from '../src/graph/ops.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { runOnce } from '../src/runtime/session.js';
import { Tensor } from '../src/tensor/tensor.js';
import { withTempDir } from './helpers.js';

test('shape inference: broadcasting, matmul, conv, reshape, slice, concat with static and symbolic dims', () => {
  const g = new Graph();
  const x = g.input('x', 'float32', ['batch', 4, 'h', 'w']);
  assert.deepEqual(op.add(x, g.input('b', 'float32', [4, 1, 1])).shape, ['batch', 4, 'h', 'w']);
  assert.deepEqual(op.mul(x, 2).shape, ['batch', 4, 'h', 'w']);
  assert.throws(
    () => op.add(g.input('p', 'float32', [3]), g.input('q', 'float32', [4])),
    /do not broadcast/,
  );

  const a = g.input('a', 'float32', ['batch', 77, 32]);
  assert.deepEqual(op.matmul(a, g.input('w', 'float32', [32, 8])).shape, ['batch', 77, 8]);
  assert.deepEqual(
    op.matmul(g.input('v', 'float32', [32]), g.input('m', 'float32', [32, 5])).shape,
    [5],
  );
  assert.throws(() => op.matmul(a, g.input('w2', 'float32', [31, 8])), /do not multiply/);

  const img = g.input('img', 'float32', [2, 3, 64, 48]);
  const k = g.input('k', 'float32', [8, 3, 3, 3]);
  assert.deepEqual(
    op.conv(img, k, null, { strides: [2, 2], pads: [1, 1, 1, 1] }).shape,
    [2, 8, 32, 24],
  );
  assert.deepEqual(
    op.conv(x.graph.input('x4', 'float32', [1, 3, 'h', 'w']), k, null, { pads: [1, 1, 1, 1] })
      .shape,
    [1, 8, 'h', 'w'],
  );
  assert.throws(() => op.conv(x, k, null), /channels/);
  const kt = g.input('kt', 'float32', [3, 5, 4, 4]);
  assert.deepEqual(
    op.convTranspose(img, kt, null, { strides: [2, 2], pads: [1, 1, 1, 1] }).shape,
    [2, 5, 128, 96],
  );

  assert.deepEqual(op.reshape(img, [0, 3, -1]).shape, [2, 3, 3072]);
  assert.deepEqual(op.reshape(a, [0, 0, 4, 8]).shape, ['batch', 77, 4, 8]);
  assert.throws(() => op.reshape(img, [5, -1]), /cannot reshape/);
  assert.deepEqual(op.slice(img, [1, -16], [Infinity, -1], [1, 3]).shape, [2, 2, 64, 15]);
  assert.deepEqual(op.slice(img, [10], [0], [2], [-2]).shape, [2, 3, 5, 48]);
  assert.deepEqual(op.concat([img, img], 1).shape, [2, 6, 64, 48]);
  assert.deepEqual(op.transpose(a, [0, 2, 1]).shape, ['batch', 32, 77]);
  assert.deepEqual(
    op.gather(g.input('e', 'float32', [100, 16]), g.input('ids', 'int64', ['batch', 77])).shape,
    ['batch', 77, 16],
  );
  assert.deepEqual(op.reduceMean(img, [2, 3], false).shape, [2, 3]);
  assert.deepEqual(op.unsqueeze(a, [0, -1]).shape, [1, 'batch', 77, 32, 1]);
  assert.deepEqual(
    op.split(img, [1, 2], 1).map((v) => v.shape[1]),
    [1, 2],
  );
  assert.deepEqual(op.upsampleNearest(img, [2, 2]).shape, [2, 3, 128, 96]);
  assert.deepEqual(op.pad(img, [0, 0, 0, 0, 0, 0, 1, 1]).shape, [2, 3, 65, 49]);
});

test('the ModelProto: opset, IR version, symbolic dims, external data by location/offset/length', async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'sub', 'w.safetensors');
    await writeSafetensors(path, { w: Tensor.float32([3, 2], [1, 2, 3, 4, 5, 6]) }, { pad: 'xyz' });
    const info = await SafetensorsFile.with(path, async (f) => f.info('w'));
    const g = new Graph('tiny');
    const x = g.input('x', 'float32', ['n', 3]);
    const w = g.initializer('w', 'float32', [3, 2], {
      path,
      offset: info.byteOffset,
      length: info.byteLength,
    });
    g.output(op.matmul(x, w), 'y');
    const emitted = emitOnnx(g, { producerVersion: '1.2.3', metadata: { purpose: 'test' } });
    assert.equal(emitted.externalDataFolder, join(dir, 'sub'));

    const ModelProto = onnxSchema().lookupType('onnx.ModelProto');
    const model = ModelProto.toObject(ModelProto.decode(emitted.bytes), {
      longs: Number,
      defaults: false,
    }) as {
      ir_version: number;
      opset_import: { domain?: string; version: number }[];
      producer_name: string;
      graph: {
        name: string;
        input: {
          name: string;
          type: {
            tensor_type: {
              elem_type: number;
              shape: { dim: { dim_param?: string; dim_value?: number }[] };
            };
          };
        }[];
        output: { name: string }[];
        initializer: {
          name: string;
          data_location: number;
          external_data: { key: string; value: string }[];
        }[];
      };
      metadata_props: { key: string; value: string }[];
    };
    assert.equal(model.ir_version, IR_VERSION);
    assert.deepEqual(model.opset_import, [{ domain: '', version: OPSET }]);
    assert.equal(model.producer_name, 'gesso');
    assert.equal(model.graph.name, 'tiny');
    assert.deepEqual(model.graph.input[0]!.type.tensor_type.shape.dim, [
      { dim_param: 'n' },
      { dim_value: 3 },
    ]);
    assert.deepEqual(
      model.graph.output.map((o) => o.name),
      ['y'],
    );
    const init = model.graph.initializer.find((i) => i.name === 'w')!;
    assert.equal(init.data_location, 1);
    assert.deepEqual(init.external_data, [
      { key: 'location', value: 'w.safetensors' },
      { key: 'offset', value: String(info.byteOffset) },
      { key: 'length', value: '24' },
    ]);
    assert.deepEqual(model.metadata_props, [{ key: 'purpose', value: 'test' }]);

    // ONNX Runtime reads the weights at their (unaligned) offset inside the safetensors file.
    assert.notEqual(info.byteOffset % 64, 0);
    const { y } = await runOnce(emitted, { x: Tensor.float32([2, 3], [1, 0, 0, 0, 1, 1]) });
    assert.deepEqual(y!.toArray(), [1, 2, 8, 10]);
  });
});

test('weights from several files share one external-data folder', async () => {
  await withTempDir(async (dir) => {
    const a = join(dir, 'unet', 'a.safetensors');
    const b = join(dir, 'vae', 'b.safetensors');
    await writeSafetensors(a, { w: Tensor.float32([2], [1, 2]) });
    await writeSafetensors(b, { w: Tensor.float32([2], [10, 20]) });
    const g = new Graph();
    const ref = async (p: string) => {
      const i = await SafetensorsFile.with(p, async (f) => f.info('w'));
      return { path: p, offset: i.byteOffset, length: i.byteLength };
    };
    const wa = g.initializer('wa', 'float32', [2], await ref(a));
    const wb = g.initializer('wb', 'float32', [2], await ref(b));
    g.output(op.add(op.add(g.input('x', 'float32', [2]), wa), wb), 'y');
    const emitted = emitOnnx(g);
    assert.equal(emitted.externalDataFolder, dir);
    assert.deepEqual(
      (await runOnce(emitted, { x: Tensor.float32([2], [100, 200]) })).y!.toArray(),
      [111, 222],
    );
  });
});

test('outputs: renaming, an input passed through, the same value twice', async () => {
  const g = new Graph();
  const x = g.input('x', 'float32', [2]);
  const doubled = op.mul(x, 2);
  g.output(doubled, 'twice');
  g.output(doubled, 'twice_again');
  g.output(x, 'same');
  assert.throws(() => g.output(x), /cannot be an output/);
  assert.throws(() => g.input('x', 'float32', [1]), /already has a value named 'x'/);
  const r = await runOnce(emitOnnx(g), { x: Tensor.float32([2], [1.5, -3]) });
  assert.deepEqual(r.twice!.toArray(), [3, -6]);
  assert.deepEqual(r.twice_again!.toArray(), [3, -6]);
  assert.deepEqual(r.same!.toArray(), [1.5, -3]);
});

test('every op helper runs in ONNX Runtime with the shape it inferred', async () => {
  const g = new Graph();
  const x = g.input('x', 'float32', [2, 4, 6, 6]);
  const v = g.input('v', 'float32', [3, 5]);
  const ids = g.input('ids', 'int64', [2, 3]);
  const outs = {
    sub: op.sub(x, 1),
    div: op.div(x, 4),
    pow: op.pow(op.abs(x), 2),
    exp: op.exp(v),
    log: op.log(op.add(op.abs(v), 1)),
    sqrt: op.sqrt(op.abs(v)),
    recip: op.reciprocal(op.add(op.abs(v), 1)),
    neg: op.neg(v),
    tanh: op.tanh(v),
    sigmoid: op.sigmoid(v),
    relu: op.relu(v),
    leaky: op.leakyRelu(v, 0.2),
    sincos: op.add(op.sin(v), op.cos(v)),
    where: op.where(op.greater(v, 0), v, 0),
    max: op.max(v, 0.5),
    min: op.min(v, 0.5),
    less: op.cast(op.less(v, 0), 'float32'),
    equal: op.cast(op.equal(v, v), 'float32'),
    gemm: op.gemm(v, g.constant(Tensor.full([4, 5], 0.5)), null, { transB: true, alpha: 2 }),
    softmax: op.softmax(v, 0),
    reduceSum: op.reduceSum(v, [1]),
    reduceMax: op.reduceMax(v, [0], false),
    squeeze: op.squeeze(op.reduceMean(x, [1]), [1]),
    expand: op.expand(g.constant(Tensor.float32([1, 5], [1, 2, 3, 4, 5])), [3, 5]),
    gather: op.gather(g.constant(Tensor.float32([4, 2], [0, 1, 2, 3, 4, 5, 6, 7])), ids),
    maxpool: op.maxPool(x, { kernel: [3, 3], strides: [3, 3] }),
    avgpool: op.averagePool(x, { kernel: [2, 2] }),
    instnorm: op.instanceNormalization(
      x,
      g.constant(Tensor.full([4], 1)),
      g.constant(Tensor.full([4], 0)),
      1e-5,
    ),
    identity: op.identity(v),
    stepSlice: op.slice(x, [5], [-Infinity], [3], [-2]),
    toDepth: op.spaceToDepth(x, 2),
    roundTrip: op.depthToSpace(op.spaceToDepth(x, 3), 3),
  };
  for (const [name, value] of Object.entries(outs)) g.output(value, name);
  const feeds = {
    x: Tensor.float32(
      [2, 4, 6, 6],
      Array.from({ length: 288 }, (_, i) => Math.sin(i)),
    ),
    v: Tensor.float32(
      [3, 5],
      Array.from({ length: 15 }, (_, i) => i / 3 - 2),
    ),
    ids: Tensor.int64([2, 3], [0, 1, 2, 3, 3, 0]),
  };
  const r = await runOnce(emitOnnx(g), feeds);
  for (const [name, value] of Object.entries(outs)) {
    assert.deepEqual(r[name]!.shape, value.shape, `${name} shape`);
  }
  // The float64 reference interpreter agrees with ONNX Runtime on every op (float32 tolerance).
  const reference = interpret(
    g,
    Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, fromTensor(t)])),
  );
  g.outputs.forEach((o, k) => {
    const expected = reference[k]!;
    assert.deepEqual(expected.shape, [...r[o.name]!.shape], `${o.name} interpreter shape`);
    r[o.name]!.toArray().forEach((v, i) =>
      assert.ok(
        Math.abs(v - expected.data[i]!) <= 1e-5 * Math.max(1, Math.abs(expected.data[i]!)),
        `${o.name}[${i}]: ORT ${v}, interpreter ${expected.data[i]}`,
      ),
    );
  });
  assert.deepEqual(r.where!.toArray().slice(0, 8), [0, 0, 0, 0, 0, 0, 0, 1 / 3].map(Math.fround));
  assert.deepEqual(r.expand!.toArray().slice(5, 10), [1, 2, 3, 4, 5]);
  assert.deepEqual(r.gather!.toArray(), [0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 0, 1]);
  assert.deepEqual(r.gemm!.shape, [3, 4]);
  assert.deepEqual(r.stepSlice!.shape, [2, 4, 6, 3]);
  assert.ok(
    Math.abs(
      r.gemm!.toArray()[0]! - 2 * 0.5 * [0, 1, 2, 3, 4].reduce((s, i) => s + (i / 3 - 2), 0),
    ) < 1e-5,
  );
});
