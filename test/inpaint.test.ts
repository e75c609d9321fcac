import assert from 'node:assert/strict';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { toUint8 } from '../src/io/image.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { folderToSingleFile } from '../src/loaders/convert-layout.js';
import { openSingleFile } from '../src/loaders/single-file.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { golden, needsGolden, withTempDir } from './helpers.js';

/** A 64×64 picture with structure (so the VAE's round trip is not the identity). */
function picture(): Tensor<'uint8'> {
  const t = new Tensor('uint8', [1, 64, 64, 3]);
  for (let y = 0; y < 64; y++)
    for (let x = 0; x < 64; x++)
      for (let c = 0; c < 3; c++) t.data[(y * 64 + x) * 3 + c] = (x * 4 + y * (c + 1) * 3) % 256;
  return t;
}

/** White (repaint) on the left half, black (keep) on the right. */
function leftHalfMask(): Tensor<'uint8'> {
  const m = new Tensor('uint8', [1, 64, 64, 1]);
  for (let y = 0; y < 64; y++) for (let x = 0; x < 32; x++) m.data[y * 64 + x] = 255;
  return m;
}

function compareHalves(result: Tensor<'uint8'>, original: Tensor<'uint8'>) {
  let keptDiff = 0;
  let repaintedDiff = 0;
  for (let y = 0; y < 64; y++)
    for (let x = 0; x < 64; x++)
      for (let c = 0; c < 3; c++) {
        const i = (y * 64 + x) * 3 + c;
        const d = Math.abs(result.data[i]! - original.data[i]!);
        if (x >= 32) keptDiff = Math.max(keptDiff, d);
        else repaintedDiff = Math.max(repaintedDiff, d);
      }
  return { keptDiff, repaintedDiff };
}

test(
  'inpainting with an ordinary model: the kept pixels come back unchanged, the masked ones are redrawn',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
      cacheDir: false,
    });
    const image = picture();
    const common = {
      prompt: 'a red circle',
      steps: 6,
      guidance: 5,
      seed: 3,
      image,
      mask: leftHalfMask(),
    };
    const blended = toUint8((await pipe.generate(common)).images);
    const kept = compareHalves(blended, image);
    assert.equal(kept.keptDiff, 0, 'a kept pixel changed');
    assert.ok(kept.repaintedDiff > 20, `the masked half barely changed (${kept.repaintedDiff})`);
    // Without the paste-back, only latent blending keeps the right half: close, not exact.
    const raw = toUint8((await pipe.generate({ ...common, keepUnmasked: false })).images);
    assert.ok(compareHalves(raw, image).keptDiff > 0);
    await assert.rejects(
      pipe.generate({ ...common, mask: new Tensor('uint8', [1, 32, 32, 1]) }),
      /the mask is 32×32, the image is 64×64/,
    );
    await assert.rejects(
      pipe.generate({ prompt: 'x', mask: leftHalfMask() }),
      /a mask needs the image/,
    );
    await pipe.release();
  },
);

test('a 9-channel inpainting UNet sees the mask and the masked image', needsGolden(), async () => {
  await withTempDir(async (dir) => {
    // An inpainting variant of the tiny model: conv_in takes 4 + 1 + 4 channels.
    await cp(golden('sd1-tiny', 'sd-tiny'), dir, {
      recursive: true,
      filter: (p) => !p.includes('.fp16.'),
    });
    const configPath = join(dir, 'unet', 'config.json');
    const config = JSON.parse(await readFile(configPath, 'utf8')) as Record<string, unknown>;
    await writeFile(configPath, JSON.stringify({ ...config, in_channels: 9 }));
    const weightsPath = join(dir, 'unet', 'diffusion_pytorch_model.safetensors');
    const tensors = await SafetensorsFile.with(weightsPath, async (f) => {
      const out: Record<string, Tensor> = {};
      for (const name of f.names) out[name] = (await f.read(name)).toFloat32();
      return out;
    });
    const convIn = tensors['conv_in.weight'] as Tensor<'float32'>;
    const [o, , kh, kw] = convIn.shape as [number, number, number, number];
    const extra = new TorchGenerator(5).randn([o, 5, kh, kw]);
    const widened = new Tensor('float32', [o, 9, kh, kw]);
    for (let n = 0; n < o; n++) {
      widened.data.set(
        convIn.data.subarray(n * 4 * kh * kw, (n + 1) * 4 * kh * kw),
        n * 9 * kh * kw,
      );
      widened.data.set(
        extra.data.subarray(n * 5 * kh * kw, (n + 1) * 5 * kh * kw),
        (n * 9 + 4) * kh * kw,
      );
    }
    tensors['conv_in.weight'] = widened;
    await writeSafetensors(weightsPath, tensors);

    const pipe = await StableDiffusionPipeline.fromPretrained(dir, { cacheDir: false });
    const image = picture();
    const mask = leftHalfMask();
    const a = toUint8(
      (await pipe.generate({ prompt: 'a red circle', steps: 4, seed: 1, image, mask })).images,
    );
    assert.equal(compareHalves(a, image).keptDiff, 0);
    // The mask reaches the UNet: another mask gives another picture in the repainted region.
    const other = new Tensor('uint8', [1, 64, 64, 1]);
    for (let y = 0; y < 64; y++)
      for (let x = 0; x < 32; x++) other.data[y * 64 + x] = y < 32 ? 255 : 0;
    const b = toUint8(
      (await pipe.generate({ prompt: 'a red circle', steps: 4, seed: 1, image, mask: other }))
        .images,
    );
    let differs = 0;
    for (let y = 0; y < 32; y++)
      for (let x = 0; x < 32; x++)
        differs = Math.max(
          differs,
          Math.abs(a.data[(y * 64 + x) * 3]! - b.data[(y * 64 + x) * 3]!),
        );
    assert.ok(differs > 0, 'the mask did not reach the UNet');
    await assert.rejects(pipe.generate({ prompt: 'x', steps: 2 }), /this is an inpainting model/);
    await pipe.release();
    // The same model as an original-format single file: 9 input channels read from conv_in.
    const file = join(dir, 'inpainting.safetensors');
    await folderToSingleFile(dir, file);
    assert.equal(
      (await openSingleFile(file, { storedConfigs: false })).components.unet!.config.in_channels,
      9,
    );
    const single = await StableDiffusionPipeline.fromPretrained(file, { cacheDir: false });
    const c = toUint8(
      (await single.generate({ prompt: 'a red circle', steps: 4, seed: 1, image, mask })).images,
    );
    assert.deepEqual(c.data, a.data);
    await single.release();
  });
});
