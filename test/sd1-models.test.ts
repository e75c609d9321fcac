import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { TextEncoder, UNet, Vae } from '../src/pipelines/components.js';
import { chunk } from '../src/tensor/ops.js';
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
