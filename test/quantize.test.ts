import assert from 'node:assert/strict';
import test from 'node:test';
import { Graph } from '../src/graph/ir.js';
import { UNet2DConditionModel, unetConfig } from '../src/models/unet-2d-condition.js';
import { quantizePerChannel } from '../src/nn/quantize.js';
import { WeightSet } from '../src/nn/weights.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
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
