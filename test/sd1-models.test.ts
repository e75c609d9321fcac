import assert from 'node:assert/strict';
import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { autoencoderKLConfig } from '../src/models/autoencoder-kl.js';
import { UNet2DConditionModel, unetConfig } from '../src/models/unet-2d-condition.js';
import { isUserError } from '../src/errors.js';
import { TextEncoder, UNet, Vae } from '../src/pipelines/components.js';
import { chunk } from '../src/tensor/ops.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, golden, needsGolden } from './helpers.js';

// Tolerance: every element within 1e-4 of the expected tensor's scale (its largest magnitude).
function assertWithinScale(actual: Tensor, expected: Tensor, label: string, relative = 1e-4): void {
  let scale = 0;
  for (const v of expected.toFloat32().data) scale = Math.max(scale, Math.abs(v));
  assertClose(actual, expected, { atol: relative * scale }, label);
}

async function read(file: string, name: string): Promise<Tensor<'float32'>> {
  return (await SafetensorsFile.with(golden('sd1-tiny', file), (f) => f.read(name))).toFloat32();
}

const noCache = { cacheDir: false as const };

for (const variant of [undefined, 'fp16'] as const) {
  // fp16 weights round every parameter to 11 bits; 5e-3 of scale is their tolerance.
  const tolerance = variant === undefined ? 1e-4 : 5e-3;
  const tag = variant ?? 'fp32';

  test(
    `CLIP text encoder (${tag} weights): last hidden state, every layer, pooled output, clip skip 2`,
    needsGolden(),
    async () => {
      const encoder = await TextEncoder.load(golden('sd1-tiny', 'sd-tiny', 'text_encoder'), {
        ...noCache,
        ...(variant ? { variant } : {}),
      });
      const ids = (await SafetensorsFile.with(golden('sd1-tiny', 'text_encoder.safetensors'), (f) =>
        f.read('input_ids'),
      )) as Tensor<'int64'>;
      const plain = await encoder.encode(ids);
      assertWithinScale(
        plain.hidden,
        await read('text_encoder.safetensors', 'last_hidden_state'),
        'last_hidden_state',
        tolerance,
      );
      assertWithinScale(
        plain.pooled,
        await read('text_encoder.safetensors', 'pooler_output'),
        'pooler_output',
        tolerance,
      );
      assertWithinScale(
        (await encoder.encode(ids, 2)).hidden,
        await read('text_encoder.safetensors', 'clip_skip2_embeds'),
        'clip skip 2',
        tolerance,
      );
      await encoder.release();
    },
  );

  test(
    `UNet (${tag} weights) at t = 1, 500, 999 and per-element timesteps [10, 700]`,
    needsGolden(),
    async () => {
      const unet = await UNet.load(golden('sd1-tiny', 'sd-tiny', 'unet'), {
        ...noCache,
        ...(variant ? { variant } : {}),
      });
      const sample = await read('unet.safetensors', 'sample');
      const encoderHiddenStates = await read('unet.safetensors', 'encoder_hidden_states');
      for (const [name, t] of [
        ['out_t1', [1, 1]],
        ['out_t500', [500, 500]],
        ['out_t999', [999, 999]],
        ['out_t_batch', [10, 700]],
      ] as const) {
        const out = await unet.predict({
          sample,
          timestep: Tensor.float32([2], t),
          encoderHiddenStates,
        });
        assertWithinScale(out, await read('unet.safetensors', name), name, tolerance);
      }
      await unet.release();
    },
  );

  test(
    `VAE (${tag} weights): posterior mean and std of an image, decoding of latents`,
    needsGolden(),
    async () => {
      const vae = await Vae.load(golden('sd1-tiny', 'sd-tiny', 'vae'), {
        ...noCache,
        ...(variant ? { variant } : {}),
      });
      const { mean, std } = await vae.encode(await read('vae.safetensors', 'image'));
      assertWithinScale(
        mean,
        await read('vae.safetensors', 'posterior_mean'),
        'posterior mean',
        tolerance,
      );
      assertWithinScale(
        std,
        await read('vae.safetensors', 'posterior_std'),
        'posterior std',
        tolerance,
      );
      const decoded = await vae.decode(await read('vae.safetensors', 'latents'));
      assertWithinScale(decoded, await read('vae.safetensors', 'decoded'), 'decoded', tolerance);
      await vae.release();
    },
  );
}

test(
  'fused and plain-op attention give the same UNet output (within 1e-5 of scale)',
  needsGolden(),
  async () => {
    const sample = await read('unet.safetensors', 'sample');
    const encoderHiddenStates = await read('unet.safetensors', 'encoder_hidden_states');
    const outs = [];
    for (const fusedAttention of [true, false]) {
      const unet = await UNet.load(golden('sd1-tiny', 'sd-tiny', 'unet'), {
        ...noCache,
        fusedAttention,
      });
      outs.push(
        await unet.predict({
          sample,
          timestep: Tensor.float32([2], [321, 321]),
          encoderHiddenStates,
        }),
      );
      await unet.release();
    }
    assertWithinScale(outs[0]!, outs[1]!, 'fused vs plain', 1e-5);
    // A batch of two equals its halves run alone.
    const unet = await UNet.load(golden('sd1-tiny', 'sd-tiny', 'unet'), noCache);
    const [s0] = chunk(sample, 2);
    const [e0] = chunk(encoderHiddenStates, 2);
    const single = await unet.predict({
      sample: s0!,
      timestep: Tensor.float32([1], [321]),
      encoderHiddenStates: e0!,
    });
    assertWithinScale(single, chunk(outs[0]!, 2)[0]!, 'batch 1 vs batch 2', 1e-5);
    await unet.release();
  },
);

test(
  'tiled VAE decoding: tiles of the training size, blended linearly over a quarter tile',
  needsGolden(),
  async () => {
    const vae = await Vae.load(golden('sd1-tiny', 'sd-tiny', 'vae'), noCache);
    // sd1-tiny's VAE: trained at 64 px, 2 px per latent, so tiles of 32 latents every 24.
    assert.equal(vae.tile, 32);
    const latents = new TorchGenerator(3).randn([1, 4, 56, 40]);
    const tiled = await vae.decode(latents, true);
    assert.deepEqual(tiled.shape, [1, 3, 112, 80]);
    const crop = async (top: number, left: number) => {
      const [h, w] = [Math.min(32, 56 - top), Math.min(32, 40 - left)];
      const t = new Tensor('float32', [1, 4, h, w]);
      for (let c = 0; c < 4; c++)
        for (let y = 0; y < h; y++)
          for (let x = 0; x < w; x++)
            t.data[(c * h + y) * w + x] = latents.data[(c * 56 + top + y) * 40 + left + x]!;
      return vae.decode(t, false);
    };
    const [t00, t01, t10] = [await crop(0, 0), await crop(0, 24), await crop(24, 0)];
    const at = (t: Tensor<'float32'>, c: number, y: number, x: number) => {
      const [, , h, w] = t.shape as number[];
      return t.data[(c * h! + y) * w! + x]!;
    };
    const blend = 16; // a quarter of the 64-pixel tile
    for (let c = 0; c < 3; c++) {
      for (let k = 0; k < blend; k++) {
        const f = k / blend;
        // Inside the first tile, away from every seam: that tile's own pixels.
        assert.ok(Math.abs(at(tiled, c, k, 5) - at(t00, c, k, 5)) < 1e-6);
        // The seam below it: the first tile's last rows fading into the second row's first.
        const below = at(t00, c, 48 + k, 5) * (1 - f) + at(t10, c, k, 5) * f;
        assert.ok(Math.abs(at(tiled, c, 48 + k, 5) - below) < 1e-5, `vertical seam row ${k}`);
        // The seam to its right, likewise across columns.
        const right = at(t00, c, 5, 48 + k) * (1 - f) + at(t01, c, 5, k) * f;
        assert.ok(Math.abs(at(tiled, c, 5, 48 + k) - right) < 1e-5, `horizontal seam column ${k}`);
      }
    }
    // Latents no larger than a tile decode whole, tiled or not.
    const small = new TorchGenerator(4).randn([1, 4, 16, 16]);
    assert.deepEqual((await vae.decode(small, true)).data, (await vae.decode(small, false)).data);
    await vae.release();
  },
);

test('UNet configs asking for layers or inputs gesso lacks are refused by name, not run without them', () => {
  for (const [key, value] of [
    ['num_class_embeds', 10],
    ['encoder_hid_dim', 768],
    ['reverse_transformer_layers_per_block', [[1], [1]]],
    ['resnet_time_scale_shift', 'ada_group'],
    ['class_embed_type', 'timestep'],
    ['addition_embed_type', 'image'],
  ] as const)
    assert.throws(
      () => unetConfig({ [key]: value }),
      new RegExp(
        `gesso does not support UNet config ${key} = ${JSON.stringify(value).replace(/[[\]]/g, '\\$&')}`,
      ),
      key,
    );
  // diffusers writes them out at their defaults: accepted.
  const config = unetConfig({
    num_class_embeds: null,
    encoder_hid_dim: null,
    reverse_transformer_layers_per_block: null,
    resnet_time_scale_shift: 'default',
  });
  assert.equal(config.resnetTimeScaleShift, 'default');
});

test('a VAE config with per-channel latent statistics is refused by name', () => {
  assert.throws(
    () => autoencoderKLConfig({ latents_mean: [0, 0, 0, 0], latents_std: [1, 1, 1, 1] }),
    /gesso does not support VAE config latents_mean/,
  );
  assert.equal(
    autoencoderKLConfig({ latents_mean: null, latents_std: null }).scalingFactor,
    0.18215,
  );
});

test('an activation gesso lacks, named by a config, is the model’s problem, said so', () => {
  assert.throws(
    () =>
      new UNet2DConditionModel(
        unetConfig({
          act_fn: 'mish',
          block_out_channels: [32, 64],
          down_block_types: ['DownBlock2D', 'DownBlock2D'],
          up_block_types: ['UpBlock2D', 'UpBlock2D'],
          norm_num_groups: 8,
        }),
      ),
    (e: Error) => isUserError(e) && /does not support the activation 'mish'/.test(e.message),
  );
});
