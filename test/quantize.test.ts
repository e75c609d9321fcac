import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { Graph } from '../src/graph/ir.js';
import { UNet2DConditionModel, unetConfig } from '../src/models/unet-2d-condition.js';
import { emitOnnx, onnxSchema } from '../src/graph/onnx.js';
import { int8Conv, int8Linear, quantizePerChannel } from '../src/nn/quantize.js';
import { int8WeightLimit } from '../src/runtime/cpu.js';
import { WeightSet } from '../src/nn/weights.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { runOnce, Session } from '../src/runtime/session.js';
import { Tensor } from '../src/tensor/tensor.js';
import { readConfig } from '../src/loaders/component.js';
import { golden, needsGolden } from './helpers.js';

/**
 * int8 inference: per-channel symmetric weights, dynamic activations, calibrated convolution
 * outputs. The images must stay close to float32's and must not be float32's (the integer path
 * really runs).
 */

test('per-channel symmetric quantization: each row scaled by its largest magnitude', () => {
  const values = Float32Array.from([0.5, -1, 0.25, 2, 0, -2]);
  const q = quantizePerChannel(values, [2, 3]);
  assert.deepEqual(Array.from(q.scales), [1 / 127, 2 / 127].map(Math.fround));
  assert.deepEqual(Array.from(q.values), [64, -127, 32, 127, 0, -127]);
  // As a linear layer's B ([in, out]): transposed.
  const t = quantizePerChannel(values, [2, 3], true);
  assert.deepEqual(t.shape, [3, 2]);
  assert.deepEqual(Array.from(t.values), [64, 127, -127, 0, 32, -127]);
  // Seven bits, for processors whose integer kernels saturate on eight.
  const seven = quantizePerChannel(values, [2, 3], false, 63);
  assert.deepEqual(Array.from(seven.scales), [1 / 63, 2 / 63].map(Math.fround));
  assert.deepEqual(Array.from(seven.values), [32, -63, 16, 63, 0, -63]);
});

test('int8 weights get seven bits only on x64 processors known to lack VNNI', () => {
  assert.equal(int8WeightLimit(['avx2', 'fma'], 'x64'), 63); // Zen 3, Haswell to Comet Lake
  assert.equal(int8WeightLimit(['avx2', 'fma', 'avx512f'], 'x64'), 63); // Skylake-SP
  assert.equal(int8WeightLimit(['avx2', 'fma', 'avx512f', 'avx512_vnni'], 'x64'), 127);
  assert.equal(int8WeightLimit(['avx2', 'fma', 'avx_vnni'], 'x64'), 127); // Alder Lake
  assert.equal(int8WeightLimit([], 'x64'), 63); // flags unknown: the safe width
  assert.equal(int8WeightLimit([], 'arm64'), 127);
});

test(
  'an int8 UNet graph: integer convolutions and matrix products except the first and last layers',
  needsGolden(),
  async () => {
    const dir = golden('sd1-tiny', 'sd-tiny', 'unet');
    const module = new UNet2DConditionModel(unetConfig(await readConfig(dir)));
    const weights = (await WeightSet.fromFiles(`${dir}/diffusion_pytorch_model.safetensors`)).bind(
      module,
    );
    const convs = [...module.namedParameters().keys()]
      .filter((k) => k.endsWith('.weight') && module.namedParameters().get(k)!.length === 4)
      .map((k) => k.slice(0, -'.weight'.length));
    const keep = (layer: string) =>
      /^(conv_in|conv_out|time_embedding|add_embedding)(\.|$)/.test(layer);
    const graph = new Graph('int8');
    const c = module.config;
    graph.output(
      module.forward(
        weights.parameters(graph, 'float32', {
          scales: new Map(convs.map((l) => [l, 0.1])),
          keepFloat: keep,
          weightLimit: 127,
        }),
        {
          sample: graph.input('sample', 'float32', [1, c.inChannels, 8, 8]),
          timestep: graph.input('timestep', 'float32', [1]),
          encoderHiddenStates: graph.input('context', 'float32', [1, 77, c.crossAttentionDim[0]!]),
        },
      ),
      'out',
    );
    const count = (op: string) => graph.nodes.filter((n) => n.op === op).length;
    assert.equal(count('QLinearConv'), convs.filter((l) => !keep(l)).length);
    assert.equal(count('Conv'), 2); // conv_in and conv_out
    assert.ok(count('MatMulIntegerToFloat') > 0);
    assert.ok(
      count('DynamicQuantizeLinear') >= count('QLinearConv') + count('MatMulIntegerToFloat'),
    );
  },
);

test(
  'int8 generation stays close to float32 (PSNR) and is not float32',
  needsGolden(),
  async () => {
    const file = golden('single-file', 'sd15-structure-tiny.safetensors');
    const request = {
      prompt: 'a red circle above a blue square',
      steps: 8,
      seed: 3,
      width: 64,
      height: 64,
    };
    const float = await StableDiffusionPipeline.fromPretrained(file, { cacheDir: false });
    const a = await float.generate(request);
    await float.release();
    const int8 = await StableDiffusionPipeline.fromPretrained(file, {
      cacheDir: false,
      quantize: 'int8',
    });
    const b = await int8.generate(request);
    // A second generation reuses the calibration and gives the same image.
    const again = await int8.generate(request);
    assert.deepEqual(again.images.data, b.images.data);
    await int8.release();
    let squared = 0;
    for (let i = 0; i < a.images.size; i++) squared += (a.images.data[i]! - b.images.data[i]!) ** 2;
    const psnr = 10 * Math.log10(1 / (squared / a.images.size));
    // Random weights are harsher on 8 bits than trained ones; 25 dB is visibly the same picture.
    assert.ok(psnr > 25 && psnr < 60, `PSNR ${psnr.toFixed(1)} dB`);
  },
);

test('int8 matrix products do not saturate on this processor at its weight width', async () => {
  // Activations at the top of uint8 against weights at the top of int8, in same-sign pairs: the
  // case where x64 kernels without VNNI overflow their 16-bit pair sums (runtime/cpu.ts).
  const inputs = 64;
  const outputs = 8;
  const x = Tensor.float32(
    [2, inputs],
    Array.from({ length: 2 * inputs }, (_, i) => (i % 5 === 0 ? 0 : 1)),
  );
  const w = Float32Array.from({ length: outputs * inputs }, (_, i) =>
    Math.floor(i / inputs) % 2 === 0 ? 1 : -1 + (i % 3) * 0.01,
  );
  const expected: number[] = [];
  for (let r = 0; r < 2; r++)
    for (let o = 0; o < outputs; o++) {
      let sum = 0;
      for (let i = 0; i < inputs; i++) sum += x.data[r * inputs + i]! * w[o * inputs + i]!;
      expected.push(sum);
    }
  const limit = int8WeightLimit();
  const q = quantizePerChannel(w, [outputs, inputs], true, limit);
  const g = new Graph('int8-linear');
  const y = int8Linear(
    g.input('x', 'float32', [2, inputs]),
    {
      weight: g.initializer('w', 'int8', q.shape, new Tensor('int8', q.shape, q.values)),
      scale: g.initializer('s', 'float32', [outputs], new Tensor('float32', [outputs], q.scales)),
      channels: outputs,
    },
    null,
  );
  g.output(y, 'y');
  const got = (await runOnce(emitOnnx(g), { x })).y!.toArray() as number[];
  got.forEach((v, i) => {
    // Quantization error alone is under 1 % here; a saturated pair sum is off by far more.
    assert.ok(
      Math.abs(v - expected[i]!) <= 0.01 * Math.abs(expected[i]!) + 0.05,
      `weights in ±${limit}: output ${i} is ${v}, float32 gives ${expected[i]}`,
    );
  });
});

test('ONNX Runtime keeps 8-bit weights signed (its uint8 × int8 kernels: VNNI, AMX)', async () => {
  // Weights beyond ±64, as gesso writes them for VNNI processors. ORT rewrites such weights to
  // uint8, and so runs its slower uint8 × uint8 kernels, only when a session option asks it to;
  // what it ran is in the optimized-graph cache.
  const inputs = 16;
  const outputs = 4;
  const w = Float32Array.from({ length: outputs * inputs }, (_, i) => Math.sin(i) * (1 + (i % 4)));
  const emit = () => {
    const g = new Graph('int8-kept');
    const weight = (name: string, shape: number[], transpose: boolean) => {
      const q = quantizePerChannel(w, shape, transpose, 127);
      return {
        weight: g.initializer(`${name}.w`, 'int8', q.shape, new Tensor('int8', q.shape, q.values)),
        scale: g.initializer(
          `${name}.s`,
          'float32',
          [outputs],
          Tensor.float32([outputs], q.scales),
        ),
        channels: outputs,
      };
    };
    const x = g.input('x', 'float32', [2, inputs]);
    g.output(int8Linear(x, weight('linear', [outputs, inputs], true), null), 'y');
    const image = g.input('image', 'float32', [1, inputs, 4, 4]);
    g.output(int8Conv(image, weight('conv', [outputs, inputs, 1, 1], false), null, 0.1, {}), 'z');
    return emitOnnx(g);
  };
  const dir = await mkdtemp(join(tmpdir(), 'gesso-int8-kept-'));
  try {
    const options = { cacheDir: dir, cacheOptimized: true };
    await (await Session.create({ key: 'int8-kept', emit }, options)).release();
    const files = (await readdir(dir, { recursive: true })).filter((f) =>
      /optimized-[^/]*\/model\.onnx$/.test(f),
    );
    assert.equal(files.length, 1, files.join(', '));
    const proto = onnxSchema().lookupType('onnx.ModelProto');
    const model = proto.toObject(proto.decode(await readFile(join(dir, files[0]!)))) as OnnxModel;
    const types = new Map(model.graph.initializer.map((t) => [t.name, t.data_type]));
    const integerOps = model.graph.node.filter((n) =>
      ['QLinearConv', 'MatMulInteger', 'MatMulIntegerToFloat', 'DynamicQuantizeMatMul'].includes(
        n.op_type,
      ),
    );
    assert.equal(integerOps.length, 2, integerOps.map((n) => n.op_type).join(', '));
    const INT8 = 3; // onnx.TensorProto.DataType
    for (const node of integerOps) {
      const weight = node.op_type === 'QLinearConv' ? node.input[3]! : node.input[1]!;
      assert.equal(
        types.get(weight),
        INT8,
        `${node.op_type}'s weights are of type ${types.get(weight)}`,
      );
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

interface OnnxModel {
  graph: {
    node: { op_type: string; input: string[] }[];
    initializer: { name: string; data_type: number }[];
  };
}
