import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { Graph, type Value } from '../src/graph/ir.js';
import { emitOnnx } from '../src/graph/onnx.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import {
  Attention,
  Conv2d,
  Downsample2D,
  Embedding,
  gelu,
  GroupNorm,
  LayerNorm,
  Linear,
  Module,
  quickGelu,
  silu,
  Upsample2D,
  WeightMismatchError,
  WeightSet,
} from '../src/nn/index.js';
import { Vae } from '../src/pipelines/components.js';
import { runOnce, Session } from '../src/runtime/session.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, fixtures, withTempDir } from './helpers.js';

// Reference values come from PyTorch (scripts/make-nn-fixtures.py); weights load by their
// state-dict keys from one .safetensors file into this module tree.
class Zoo extends Module {
  readonly linear2d = this.addModule('linear2d', new Linear(5, 7));
  readonly linear3d = this.addModule('linear3d', new Linear(6, 4, false));
  readonly conv = this.addModule('conv', new Conv2d(4, 6, 3, { padding: 1 }));
  readonly convGrouped = this.addModule(
    'conv_grouped',
    new Conv2d(4, 8, 3, { stride: 2, padding: 1, groups: 2 }),
  );
  readonly convDilated = this.addModule(
    'conv_dilated',
    new Conv2d(3, 2, [3, 1], { padding: [2, 0], dilation: 2, bias: false }),
  );
  readonly groupnorm = this.addModule('groupnorm', new GroupNorm(4, 8, 1e-6));
  readonly groupnormPlain = this.addModule('groupnorm_plain', new GroupNorm(2, 6, 1e-5, false));
  readonly layernorm = this.addModule('layernorm', new LayerNorm(6));
  readonly embedding = this.addModule('embedding', new Embedding(11, 5));
  readonly selfAttn = this.addModule(
    'self_attn',
    new Attention({ queryDim: 8, heads: 2, dimHead: 4 }),
  );
  readonly crossAttn = this.addModule(
    'cross_attn',
    new Attention({
      queryDim: 8,
      crossAttentionDim: 6,
      heads: 2,
      dimHead: 3,
      qkvBias: true,
      outDim: 8,
    }),
  );
  readonly maskedAttn = this.addModule(
    'masked_attn',
    new Attention({ queryDim: 6, heads: 3, dimHead: 2 }),
  );
  readonly upsample = this.addModule('upsample', new Upsample2D(4));
  readonly downPad1 = this.addModule(
    'down_pad1',
    new Downsample2D(4, { outChannels: 6, padding: 1 }),
  );
  readonly downPad0 = this.addModule('down_pad0', new Downsample2D(4, { padding: 0 }));
  readonly downPool = this.addModule('down_pool', new Downsample2D(4, { useConv: false }));
}

async function readAll(path: string): Promise<Record<string, Tensor>> {
  return SafetensorsFile.with(path, async (f) => {
    const out: Record<string, Tensor> = {};
    for (const n of f.names) out[n] = await f.read(n);
    return out;
  });
}

async function runZoo(fused: boolean) {
  const io = await readAll(join(fixtures, 'nn-io.safetensors'));
  const zoo = new Zoo();
  const weights = (await WeightSet.fromFiles(join(fixtures, 'nn-weights.safetensors'))).bind(zoo);
  const g = new Graph('zoo');
  const p = weights.parameters(g);
  const feeds: Record<string, Tensor> = {};
  const input = (name: string): Value => {
    const t = io[name]!;
    feeds[name] = t;
    return g.input(name, t.dtype, t.shape);
  };
  const outputs: Record<string, Value> = {
    'linear2d.y': zoo.linear2d.forward(p, input('linear2d.x')),
    'linear3d.y': zoo.linear3d.forward(p, input('linear3d.x')),
    'conv.y': zoo.conv.forward(p, input('conv.x')),
    'conv_grouped.y': zoo.convGrouped.forward(p, input('conv_grouped.x')),
    'conv_dilated.y': zoo.convDilated.forward(p, input('conv_dilated.x')),
    'groupnorm.y': zoo.groupnorm.forward(p, input('groupnorm.x')),
    'groupnorm_plain.y': zoo.groupnormPlain.forward(p, input('groupnorm_plain.x')),
    'layernorm.y': zoo.layernorm.forward(p, input('layernorm.x')),
    'embedding.y': zoo.embedding.forward(p, input('embedding.ids')),
    'act.silu': silu(input('act.x')),
    'self_attn.y': zoo.selfAttn.forward(p, input('self_attn.x'), undefined, { fused }),
    'cross_attn.y': zoo.crossAttn.forward(p, input('cross_attn.x'), input('cross_attn.context'), {
      fused,
    }),
    'masked_attn.y': zoo.maskedAttn.forward(p, input('masked_attn.x'), undefined, {
      bias: input('masked_attn.mask'),
      fused,
    }),
    'upsample.y': zoo.upsample.forward(p, input('upsample.x')),
    'down_pad1.y': zoo.downPad1.forward(p, input('down_pad1.x')),
    'down_pad0.y': zoo.downPad0.forward(p, input('down_pad0.x')),
    'down_pool.y': zoo.downPool.forward(p, input('down_pool.x')),
  };
  const x = g.inputs.find((v) => v.name === 'act.x')!;
  outputs['act.gelu'] = gelu(x);
  outputs['act.gelu_tanh'] = gelu(x, 'tanh');
  outputs['act.quick_gelu'] = quickGelu(x);
  for (const [name, v] of Object.entries(outputs)) g.output(v, name);
  const model = emitOnnx(g);
  return { io, results: await runOnce(model, feeds), names: Object.keys(outputs), model };
}

for (const fused of [false, true]) {
  test(`every nn module matches PyTorch (fp32, atol 1e-5 + rtol 1e-5; ${fused ? 'fused' : 'plain-op'} attention)`, async () => {
    const { io, results, names } = await runZoo(fused);
    assert.equal(names.length, 20);
    for (const name of names)
      assertClose(results[name]!, io[name]!, { atol: 1e-5, rtol: 1e-5 }, name);
  });
}

test('weights stay in the file: the emitted model only points at them', async () => {
  const { model } = await runZoo(true);
  assert.equal(model.externalDataFolder, fixtures);
  await withTempDir(async (dir) => {
    // 16 MB of weights, a graph of a few hundred bytes.
    const big = new Linear(2048, 2048);
    const path = join(dir, 'big.safetensors');
    const g0 = new TorchGenerator(3);
    await writeSafetensors(path, { weight: g0.randn([2048, 2048]), bias: g0.randn([2048]) });
    const g = new Graph();
    const y = big.forward(
      (await WeightSet.fromFiles(path)).bind(big).parameters(g),
      g.input('x', 'float32', [1, 2048]),
    );
    g.output(y, 'y');
    const emitted = emitOnnx(g);
    assert.ok(emitted.bytes.byteLength < 2_000, `${emitted.bytes.byteLength} bytes`);
    const x = g0.randn([1, 2048]);
    const { y: out } = await runOnce(emitted, { x });
    // Spot-check one output against a float64 dot product.
    const w = await SafetensorsFile.with(path, (f) => f.read('weight'));
    const b = await SafetensorsFile.with(path, (f) => f.read('bias'));
    for (const j of [0, 777, 2047]) {
      let sum = b.data[j] as number;
      for (let i = 0; i < 2048; i++)
        sum += (x.data[i] as number) * (w.data[j * 2048 + i] as number);
      assert.ok(Math.abs((out!.data[j] as number) - sum) < 1e-3, `output ${j}`);
    }
  });
});

for (const tag of ['fp16', 'bf16'] as const) {
  test(`${tag} weight files feed float32 compute exactly (atol 1e-6)`, async () => {
    const io = await readAll(join(fixtures, 'nn-io.safetensors'));
    class Half extends Module {
      readonly linear = this.addModule(`linear_${tag}`, new Linear(6, 5));
    }
    const m = new Half();
    const weights = await WeightSet.fromFiles(join(fixtures, `nn-weights-${tag}.safetensors`));
    assert.equal(
      weights.get(`linear_${tag}.weight`)!.dtype,
      tag === 'fp16' ? 'float16' : 'bfloat16',
    );
    const g = new Graph();
    g.output(m.linear.forward(weights.bind(m).parameters(g), g.input('x', 'float32', [2, 6])), 'y');
    const { y } = await runOnce(emitOnnx(g), { x: io[`linear_${tag}.x`]! });
    assert.equal(y!.dtype, 'float32');
    assertClose(y!, io[`linear_${tag}.y`]!, { atol: 1e-6, rtol: 1e-6 }, tag);
  });
}

test('hand-checked values: Linear, GroupNorm, LayerNorm, nearest upsampling', async () => {
  class Tiny extends Module {
    readonly fc = this.addModule('fc', new Linear(2, 2));
    readonly gn = this.addModule('gn', new GroupNorm(1, 2, 0));
    readonly ln = this.addModule('ln', new LayerNorm(4, 0));
    readonly up = this.addModule('up', new Upsample2D(1, { useConv: false }));
  }
  const m = new Tiny();
  const weights = WeightSet.fromTensors({
    'fc.weight': Tensor.float32([2, 2], [1, 2, 3, 4]),
    'fc.bias': Tensor.float32([2], [1, -1]),
    'gn.weight': Tensor.float32([2], [1, 2]),
    'gn.bias': Tensor.float32([2], [0, 10]),
    'ln.weight': Tensor.float32([4], [1, 1, 1, 1]),
    'ln.bias': Tensor.float32([4], [0, 0, 0, 0]),
  });
  const g = new Graph();
  const p = weights.bind(m).parameters(g);
  g.output(m.fc.forward(p, g.input('a', 'float32', [1, 2])), 'fc');
  g.output(m.gn.forward(p, g.input('b', 'float32', [1, 2, 1, 2])), 'gn');
  g.output(m.ln.forward(p, g.input('c', 'float32', [1, 4])), 'ln');
  g.output(m.up.forward(p, g.input('d', 'float32', [1, 1, 1, 2])), 'up');
  const r = await runOnce(emitOnnx(g), {
    a: Tensor.float32([1, 2], [1, 1]),
    b: Tensor.float32([1, 2, 1, 2], [1, 2, 3, 4]),
    c: Tensor.float32([1, 4], [1, 2, 3, 4]),
    d: Tensor.float32([1, 1, 1, 2], [5, 6]),
  });
  assert.deepEqual(r.fc!.toArray(), [4, 6]); // [1+2+1, 3+4-1]
  // One group over [1,2,3,4]: mean 2.5, variance 1.25; then channel scale 1 and 2, bias 0 and 10.
  const z = [1, 2, 3, 4].map((v) => (v - 2.5) / Math.sqrt(1.25));
  assertClose(r.gn!, Tensor.float32([1, 2, 1, 2], [z[0]!, z[1]!, 2 * z[2]! + 10, 2 * z[3]! + 10]), {
    atol: 1e-6,
  });
  assertClose(r.ln!, Tensor.float32([1, 4], z), { atol: 1e-6 });
  assert.deepEqual(r.up!.toArray(), [5, 5, 6, 6, 5, 5, 6, 6]);
});

test('one error names every missing, unexpected and mis-shaped weight', async () => {
  class Net extends Module {
    readonly a = this.addModule('a', new Linear(3, 4));
    readonly b = this.addModule('b', new Conv2d(2, 2, 3));
  }
  const weights = WeightSet.fromTensors(
    {
      'a.weight': Tensor.float32([4, 2]), // wrong shape
      'b.weight': Tensor.float32([2, 2, 3, 3]),
      'extra.thing': Tensor.float32([1]),
      position_ids: Tensor.int64([1], [0]),
    },
    'test-weights.safetensors',
  );
  assert.throws(
    () => weights.bind(new Net()),
    (e: unknown) => {
      assert.ok(e instanceof WeightMismatchError);
      assert.equal(e.code, 'weights-mismatch');
      assert.deepEqual(e.missing, ['a.bias [4]', 'b.bias [2]']);
      assert.deepEqual(e.unexpected, ['extra.thing', 'position_ids']);
      assert.deepEqual(e.misshapen, ['a.weight is [4, 2] in the file, the model expects [4, 3]']);
      assert.match(e.message, /test-weights\.safetensors do not fit Net/);
      return true;
    },
  );
  // Known extras can be accepted by name.
  const partial = WeightSet.fromTensors({
    'a.weight': Tensor.float32([4, 3]),
    'a.bias': Tensor.float32([4]),
    skip: Tensor.float32([1]),
  });
  class OnlyA extends Module {
    readonly a = this.addModule('a', new Linear(3, 4));
  }
  assert.doesNotThrow(() => partial.bind(new OnlyA(), { ignoreUnexpected: (k) => k === 'skip' }));
});

test('parameter paths are state-dict keys', () => {
  const zoo = new Zoo();
  const keys = [...zoo.namedParameters().keys()];
  assert.ok(keys.includes('cross_attn.to_out.0.weight'));
  assert.ok(keys.includes('down_pad1.conv.bias'));
  assert.ok(!keys.some((k) => k.startsWith('down_pool')));
  assert.equal(zoo.selfAttn.path, 'self_attn');
  assert.equal(zoo.linear2d.parameterCount(), 5 * 7 + 7);
});

test('the tiny autoencoder (TAESD): encode and decode equal PyTorch’s on random weights', async () => {
  // scripts/make-taesd-fixture.py: TAESD written in PyTorch from its description, random weights.
  const vae = await Vae.load(join(fixtures, 'taesd-tiny'), { cacheDir: false });
  assert.equal(vae.scalingFactor, 1);
  assert.equal(vae.scaleFactor, 8);
  const io = async (name: string) =>
    SafetensorsFile.with(join(fixtures, 'taesd-io.safetensors'), async (f) =>
      (await f.read(name)).toFloat32(),
    );
  const decoded = await vae.decode(await io('latents'));
  const expected = await io('decoded');
  assert.deepEqual(decoded.shape, [1, 3, 32, 32]);
  // Float32 arithmetic in a different order: within 1e-5 of values of order 1.
  assertClose(decoded, expected, { atol: 1e-5, rtol: 1e-5 }, 'decode');
  const { mean, std } = await vae.encode(await io('image'));
  assertClose(mean, await io('encoded'), { atol: 1e-5, rtol: 1e-5 }, 'encode');
  assert.ok(std.data.every((v) => v === 0));
  await vae.release();
});

test('ONNX Runtime fuses the exact GELU gesso emits into its one-pass Gelu kernel', async () => {
  await withTempDir(async (dir) => {
    const emit = () => {
      const g = new Graph('gelu');
      g.output(gelu(g.input('x', 'float32', ['n', 8])), 'y');
      return emitOnnx(g);
    };
    const session = await Session.create(
      { key: 'gelu-fusion', emit },
      { cacheDir: dir, cacheOptimized: true },
    );
    await session.release();
    // What ORT ran, as it wrote it to the optimized-graph cache.
    const files = (await readdir(dir, { recursive: true })).filter((f) =>
      /optimized-[^/]*\/model\.onnx$/.test(f),
    );
    assert.equal(files.length, 1, files.join(', '));
    const optimized = (await readFile(join(dir, files[0]!))).toString('latin1');
    assert.ok(optimized.includes('Gelu'), 'no Gelu node in the optimized graph');
    assert.ok(!optimized.includes('Erf'), 'an Erf node is left: the GELU was not fused');
  });
});
