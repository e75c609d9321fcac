import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { sampleBatch, seededRandom } from '../src/data/shapes.js';
import { patchify } from '../src/models/patch-autoencoder.js';
import { evaluate } from '../src/eval/evaluate.js';
import { fromModelPixels } from '../src/io/image.js';
import { Vae } from '../src/pipelines/components.js';
import { loadPipeline } from '../src/pipelines/index.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import {
  AutoencoderTask,
  DecoderTask,
  edgeWeights,
  type AutoencoderRecipe,
} from '../src/training/autoencoder.js';
import { shapesSource } from '../src/data/source.js';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { resolveTrainConfig } from '../src/training/config.js';
import { DiffusionTask, LatentSpace } from '../src/training/diffusion.js';
import { DataRandom, Trainer } from '../src/training/trainer.js';
import {
  GESSO_BIN as BIN,
  ddimClipsSample,
  options,
  repoRoot,
  TINY,
  withTempDir,
} from './helpers.js';
import { Tensor } from '../src/tensor/tensor.js';

const TINY_AUTOENCODER: AutoencoderRecipe = {
  batchSize: 4,
  vae: {
    down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
    up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'],
    block_out_channels: [8, 8, 16],
    layers_per_block: 1,
    latent_channels: 4,
    norm_num_groups: 4,
    sample_size: 64,
  },
  klWeight: 1e-6,
  loss: 'mse',
  edgeWeight: 0,
};

const mean = (xs: ArrayLike<number>) => Array.from(xs).reduce((a, b) => a + b, 0) / xs.length;

test('latent training: an autoencoder learns, exports a diffusers VAE that normalizes its latents, and a diffusion model trains in its latent space', async () => {
  await withTempDir(async (dir) => {
    // The autoencoder: its reconstruction loss falls.
    const autoencoder = new AutoencoderTask(TINY_AUTOENCODER);
    const trainer = await Trainer.create(autoencoder, options(60));
    const losses: number[] = [];
    for (let i = 0; i < 60; i++) losses.push((await trainer.runStep()).loss);
    assert.ok(
      mean(losses.slice(-10)) < 0.6 * mean(losses.slice(0, 10)),
      `loss ${mean(losses.slice(0, 10))} → ${mean(losses.slice(-10))}`,
    );
    const vaeDir = join(dir, 'vae');
    const scale = await autoencoder.exportModel(vaeDir, trainer.weights('params'));
    await trainer.release();

    // A diffusers AutoencoderKL folder; on images it did not measure, scale and shift bring its
    // latents near zero mean and unit variance.
    const config = JSON.parse(readFileSync(join(vaeDir, 'config.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    assert.equal(config._class_name, 'AutoencoderKL');
    assert.equal(config.scaling_factor, scale.scalingFactor);
    assert.equal(config.shift_factor, scale.shiftFactor);
    const vae = await Vae.load(vaeDir, { cacheDir: false });
    const { images } = sampleBatch(seededRandom(99), 64, { excludeHeldOut: true });
    const { mean: latents } = await vae.encode(patchify(images, 1));
    await vae.release();
    assert.deepEqual(latents.shape, [64, 4, 16, 16]);
    const scaled = latents.data.map((v) => (v - scale.shiftFactor) * scale.scalingFactor);
    const m = mean(scaled);
    const sd = Math.sqrt(mean(scaled.map((v) => (v - m) ** 2)));
    assert.ok(Math.abs(m) < 0.2, `scaled latent mean ${m}`);
    assert.ok(sd > 0.8 && sd < 1.25, `scaled latent standard deviation ${sd}`);

    // A diffusion model in that latent space: the UNet must take its channels.
    const space = await LatentSpace.load(vaeDir);
    assert.throws(
      () => new DiffusionTask(TINY, undefined, space),
      /in_channels and out_channels must be 4, the channels of the latents of/,
    );
    const recipe = {
      ...TINY,
      unet: { ...TINY.unet, in_channels: 4, out_channels: 4, sample_size: 16 },
    };
    const task = new DiffusionTask(recipe, undefined, space);
    const batch = await task.batch(0, new DataRandom(1), new TorchGenerator(1));
    assert.deepEqual(batch.noisy!.shape, [4, 4, 16, 16]);
    const diffusion = await Trainer.create(task, options(3));
    for (let i = 0; i < 3; i++) await diffusion.runStep();
    const modelDir = join(dir, 'model');
    await task.exportModel(modelDir, diffusion.weights('ema'), { fp16: true });
    await diffusion.release();
    await space.release();
    const index = JSON.parse(readFileSync(join(modelDir, 'model_index.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    assert.deepEqual(index.vae, ['diffusers', 'AutoencoderKL']);
    // Latents are not bounded as pixels are: a switch to DDIM or DDPM must not clamp x₀ to ±1.
    assert.equal(ddimClipsSample(modelDir), false);
    assert.deepEqual(
      readFileSync(join(modelDir, 'vae', 'config.json')),
      readFileSync(join(vaeDir, 'config.json')),
    );
    const copied = await SafetensorsFile.with(
      join(modelDir, 'vae', 'diffusion_pytorch_model.safetensors'),
      async (f) => f.info('decoder.conv_out.weight'),
    );
    assert.equal(copied.dtype, 'F16');

    // Fine-tuning the decoder keeps the encoder and the latent scale: the same latents as before.
    const decoder = await DecoderTask.load(
      vaeDir,
      4,
      { loss: 'l1', edgeWeight: 4 },
      shapesSource(),
    );
    assert.ok(decoder.trainedParameters > 0);
    assert.ok(
      [...decoder.shapes.keys()].every(
        (k) => k.startsWith('decoder.') || k.startsWith('post_quant_conv.'),
      ),
    );
    const tuning = await Trainer.create(decoder, options(4));
    for (let i = 0; i < 4; i++) await tuning.runStep();
    const tunedDir = join(dir, 'vae-tuned');
    await decoder.exportModel(tunedDir, tuning.weights('params'));
    await tuning.release();
    await decoder.release();
    assert.deepEqual(
      readFileSync(join(tunedDir, 'config.json')),
      readFileSync(join(vaeDir, 'config.json')),
    );
    const [before, after] = await Promise.all(
      [vaeDir, tunedDir].map((d) =>
        SafetensorsFile.with(join(d, 'diffusion_pytorch_model.safetensors'), async (f) => ({
          encoder: (await f.read('encoder.conv_in.weight')).toArray(),
          decoder: (await f.read('decoder.conv_out.weight')).toArray(),
        })),
      ),
    );
    assert.deepEqual(after!.encoder, before!.encoder);
    assert.notDeepEqual(after!.decoder, before!.decoder);
    const someImages = sampleBatch(seededRandom(4), 2, { excludeHeldOut: true }).images;
    const [tunedSpace, firstSpace] = await Promise.all([
      LatentSpace.load(tunedDir),
      LatentSpace.load(vaeDir),
    ]);
    assert.deepEqual(
      (await tunedSpace.encode(someImages)).toArray(),
      (await firstSpace.encode(someImages)).toArray(),
    );
    await Promise.all([tunedSpace.release(), firstSpace.release()]);

    const pipe = await StableDiffusionPipeline.fromPretrained(modelDir, { cacheDir: false });
    const { images: drawn } = await pipe.generate({ prompt: 'a red circle', steps: 2, seed: 1 });
    await pipe.release();
    assert.deepEqual(drawn.shape, [1, 64, 64, 3]);
    assert.ok(drawn.data.every((v) => v >= 0 && v <= 1));
  });
});

test('edge weights: the pixels on either side of a colour edge weigh 1 + w, the rest 1, scaled to average 1', () => {
  // Image 0: flat gray. Image 1: gray with a 2×2 red square at (3, 3); 8×8 each.
  const side = 8;
  const images = new Tensor('uint8', [2, side, side, 3]);
  images.data.fill(128);
  for (const [y, x] of [
    [3, 3],
    [3, 4],
    [4, 3],
    [4, 4],
  ] as const)
    images.data.set([220, 38, 38], ((side + y) * side + x) * 3);
  // A faint change (below the contrast threshold) is not an edge.
  images.data.set([140, 140, 140], (0 * side + 1) * 3);
  const w = edgeWeights(images, 3);
  assert.deepEqual(w.shape, [2, 1, side, side]);
  // Edge pixels: the 4×4 block from (2, 2) to (5, 5) in image 1 (the square and its neighbours).
  const edges = 16;
  const total = 2 * side * side;
  const scale = total / (total + 3 * edges);
  for (let n = 0; n < 2; n++)
    for (let y = 0; y < side; y++)
      for (let x = 0; x < side; x++) {
        const edge = n === 1 && y >= 2 && y <= 5 && x >= 2 && x <= 5;
        const got = w.data[(n * side + y) * side + x]!;
        assert.ok(Math.abs(got - (edge ? 4 : 1) * scale) < 1e-6, `image ${n} (${y}, ${x}): ${got}`);
      }
  assert.ok(Math.abs(w.data.reduce((a, b) => a + b, 0) / total - 1) < 1e-6);
});

test('training config: the autoencoder route, vae_from, and partial gan blocks', () => {
  const c = resolveTrainConfig({
    route: 'autoencoder',
    autoencoder: { kl_weight: 1e-4 },
    vae_from: 'runs/vae/model',
  });
  assert.equal(c.route, 'autoencoder');
  assert.equal(c.autoencoder.kl_weight, 1e-4);
  assert.deepEqual(c.autoencoder.vae.block_out_channels, [16, 32, 64, 64]);
  assert.equal(c.vae_from, 'runs/vae/model');
  assert.throws(() => resolveTrainConfig({ vae_from: 3 }), /'vae_from' must be a string/);
  // A partial gan block keeps the defaults of the fields it leaves out.
  const gan = resolveTrainConfig({ route: 'gan', gan: { nf: 8 } }).gan;
  assert.equal(gan.nf, 8);
  assert.equal(gan.gp_weight, 2);
  assert.equal(gan.discriminator_learning_rate, 4e-4);
});

test('gesso train: autoencoder, its decoder fine-tuned, a diffusion model in its latents, then gesso generate; a GAN in the same latents', async () => {
  await withTempDir(async (dir) => {
    const yaml = (name: string, fields: Record<string, unknown>) => {
      const path = join(dir, `${name}.yaml`);
      writeFileSync(
        path,
        Object.entries(fields)
          .map(([k, v]) => `${k}: ${JSON.stringify(v)}`)
          .join('\n'),
      );
      return path;
    };
    const train = (config: string) =>
      spawnSync(process.execPath, [BIN, 'train', '--config', config], { encoding: 'utf8' });
    const common = { steps: 3, batch_size: 2, save_every: 100, warmup_steps: 1 };
    const autoencoder = {
      vae: TINY_AUTOENCODER.vae,
      kl_weight: 1e-6,
    };
    let r = train(
      yaml('ae', { ...common, route: 'autoencoder', out: join(dir, 'ae'), autoencoder }),
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /training an autoencoder of [\d,]+ parameters/);
    r = train(
      yaml('bad', {
        ...common,
        route: 'autoencoder',
        out: join(dir, 'bad'),
        autoencoder: { loss: 'l3' },
      }),
    );
    assert.equal(r.status, 2);
    assert.match(r.stderr, /autoencoder.loss "l3" is not one of mse, l1/);
    r = train(
      yaml('bad-edges', {
        ...common,
        route: 'autoencoder',
        out: join(dir, 'bad-edges'),
        autoencoder: { edge_weight: -1 },
      }),
    );
    assert.equal(r.status, 2);
    assert.match(r.stderr, /autoencoder.edge_weight must be a number of 0 or more \(got -1\)/);
    r = train(
      yaml('decoder', {
        ...common,
        route: 'autoencoder',
        out: join(dir, 'decoder'),
        autoencoder: {
          ...autoencoder,
          loss: 'l1',
          edge_weight: 8,
          finetune_decoder_of: join(dir, 'ae', 'model'),
        },
      }),
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(
      r.stderr,
      /training the decoder of .* \([\d,]+ parameters; encoder frozen\) .*, from its trained weights →/,
    );
    const diffusion = {
      ...common,
      route: 'diffusion',
      sample_every: 3,
      sample_prompts: ['a red circle'],
      sample_steps: 2,
      model: {
        max_length: TINY.maxLength,
        text_encoder: TINY.textEncoder,
        unet: { ...TINY.unet, in_channels: 4, out_channels: 4, sample_size: 16 },
      },
    };
    r = train(
      yaml('pixel', { ...diffusion, out: join(dir, 'pixel'), vae_from: join(dir, 'none') }),
    );
    assert.equal(r.status, 2);
    assert.match(r.stderr, /vae_from names .*none, which holds no trained autoencoder/);
    r = train(
      yaml('latent', {
        ...diffusion,
        out: join(dir, 'latent'),
        vae_from: join(dir, 'decoder', 'model'),
      }),
    );
    assert.equal(r.status, 0, r.stderr);
    assert.ok(existsSync(join(dir, 'latent', 'samples', 'step-000003.png')));
    const out = join(dir, 'drawn.png');
    r = spawnSync(
      process.execPath,
      [
        BIN,
        'generate',
        'a blue square',
        '--model',
        join(dir, 'latent', 'model'),
        '--steps',
        '2',
        '--seed',
        '3',
        '--out',
        out,
      ],
      { encoding: 'utf8' },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.ok(existsSync(out));

    // A GAN in the same latent space: it draws latents, and its folder carries the autoencoder
    // that turns them into pixels.
    r = train(
      yaml('gan', {
        ...common,
        route: 'gan',
        out: join(dir, 'gan'),
        text_encoder_from: join(dir, 'latent', 'model'),
        vae_from: join(dir, 'decoder', 'model'),
        gan: { z_dim: 8, nf: 4, attention_resolutions: [8], blocks_per_resolution: 2 },
      }),
    );
    assert.equal(r.status, 0, r.stderr);
    r = train(
      yaml('bad-gan', {
        ...common,
        route: 'gan',
        out: join(dir, 'bad-gan'),
        text_encoder_from: join(dir, 'latent', 'model'),
        gan: { blocks_per_resolution: 0 },
      }),
    );
    assert.equal(r.status, 2);
    assert.match(
      r.stderr,
      /gan.blocks_per_resolution must be a whole number of 1 or more \(got 0\)/,
    );
    r = train(
      yaml('bad-pooling', {
        ...common,
        route: 'gan',
        out: join(dir, 'bad-pooling'),
        text_encoder_from: join(dir, 'latent', 'model'),
        gan: { sentence: 'mean' },
      }),
    );
    assert.equal(r.status, 2);
    assert.match(r.stderr, /gan.sentence must be one of eos, max \(got "mean"\)/);
    const ganDir = join(dir, 'gan', 'model');
    const index = JSON.parse(readFileSync(join(ganDir, 'model_index.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    assert.deepEqual(index.vae, ['diffusers', 'AutoencoderKL']);
    const generatorConfig = JSON.parse(
      readFileSync(join(ganDir, 'generator', 'config.json'), 'utf8'),
    ) as Record<string, unknown>;
    assert.equal(generatorConfig.latent_channels, 4);
    assert.equal(generatorConfig.image_size, 16);
    assert.equal(generatorConfig.blocks_per_resolution, 2);
    // The default pooling, recorded so the pipeline reads captions as training did.
    assert.equal(generatorConfig.sentence_pooling, 'max');
    // 4×4 → 16×16 in two doublings, each followed by one block that keeps the grid.
    const blockShapes = await SafetensorsFile.with(
      join(ganDir, 'generator', 'model.safetensors'),
      async (f) => [0, 1, 2, 3, 4].map((i) => f.names.includes(`blocks.${i}.c1.weight`)),
    );
    assert.deepEqual(blockShapes, [true, true, true, true, false]);
    assert.deepEqual(
      readFileSync(join(ganDir, 'vae', 'diffusion_pytorch_model.safetensors')),
      readFileSync(join(dir, 'decoder', 'model', 'diffusion_pytorch_model.safetensors')),
    );
    r = spawnSync(
      process.execPath,
      [BIN, 'generate', 'a red circle', '--model', ganDir, '--out', join(dir, 'gan.png')],
      { encoding: 'utf8' },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.ok(existsSync(join(dir, 'gan.png')));
    const gan = await loadPipeline(ganDir, { cacheDir: false });
    const drawnByGan = await gan.generate({ prompt: 'a red circle', seed: 5 });
    await gan.release();
    assert.deepEqual(drawnByGan.images.shape, [1, 64, 64, 3]);
    assert.deepEqual(drawnByGan.latents.shape, [1, 4, 16, 16]);
    // The images are the generator's latents through the autoencoder, as diffusion decodes them.
    const vae = await Vae.load(join(ganDir, 'vae'), { cacheDir: false });
    const byHand = fromModelPixels(await vae.decodeScaled(drawnByGan.latents));
    await vae.release();
    assert.deepEqual(drawnByGan.images.toArray(), byHand.toArray());
    assert.ok(byHand.data.some((v) => v > 0.05 && v < 0.95));

    // gesso eval reads a latent GAN's autoencoder for the ceiling, as for latent diffusion.
    const report = await evaluate({
      model: ganDir,
      features: join(repoRoot, 'models', 'shapes-features'),
      seed: 1,
      promptsPerCategory: 1,
      imagesPerPrompt: 1,
      out: join(dir, 'gan-eval'),
      runtime: { cacheDir: false },
    });
    assert.ok(report.autoencoder !== undefined);
    assert.ok(report.autoencoder.overall >= 0 && report.autoencoder.overall <= 1);
  });
});
