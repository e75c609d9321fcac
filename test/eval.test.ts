import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { BACKGROUNDS, render, seededRandom } from '../src/data/shapes.js';
import { shapesSource } from '../src/data/source.js';
import { evaluate, formatReport } from '../src/eval/evaluate.js';
import { FEATURE_DIM, FeatureExtractor } from '../src/eval/features.js';
import {
  CATEGORIES,
  fidelityPrompts,
  sceneFor,
  scoreFidelity,
  type FidelityPrompt,
} from '../src/eval/fidelity.js';
import {
  covariance,
  frechetDistance,
  meanPairwiseDistance,
  sqrtm,
  symmetricEigen,
} from '../src/eval/statistics.js';
import { decodePng } from '../src/io/png.js';
import { loadPipeline, StableDiffusionPipeline } from '../src/pipelines/index.js';
import { Tensor } from '../src/tensor/tensor.js';
import { DiffusionTask } from '../src/training/diffusion.js';
import { GanTrainer, type GanRecipe } from '../src/training/gan.js';
import { ganConfig, poolSentence } from '../src/models/gan.js';
import { TextEncoder } from '../src/pipelines/components.js';
import { Trainer } from '../src/training/trainer.js';
import { options, repoRoot, TINY, withTempDir } from './helpers.js';

const FEATURES = join(repoRoot, 'models', 'shapes-features');

function perfectImages(prompts: readonly FidelityPrompt[], seed: number): Tensor<'uint8'> {
  const random = seededRandom(seed);
  return render(prompts.map((p) => sceneFor(p.expect, random)));
}

test('fidelity: clean renders of every prompt pass, in every category and for several seeds', () => {
  for (const seed of [1, 2, 3]) {
    const prompts = fidelityPrompts(seed, 12);
    assert.equal(prompts.length, 12 * CATEGORIES.length);
    for (const c of CATEGORIES) assert.equal(prompts.filter((p) => p.category === c).length, 12, c);
    const score = scoreFidelity(prompts, perfectImages(prompts, seed + 100));
    const failed = score.results.filter((r) => !r.passed).map((r) => r.prompt.prompt);
    assert.ok(score.overall >= 0.98, `overall ${score.overall}; failed: ${failed.join('; ')}`);
    for (const c of CATEGORIES)
      assert.ok(score.perCategory[c] >= 0.9, `${c} ${score.perCategory[c]}`);
  }
});

test('fidelity: the prompt set is seeded, held-out prompts use only held-out pairs', () => {
  assert.deepEqual(fidelityPrompts(4, 3), fidelityPrompts(4, 3));
  assert.notDeepEqual(
    fidelityPrompts(4, 3).map((p) => p.prompt),
    fidelityPrompts(5, 3).map((p) => p.prompt),
  );
  const heldOut = fidelityPrompts(4, 8).filter((p) => p.category === 'held-out pairs');
  for (const p of heldOut)
    assert.match(p.prompt, /purple triangle|orange circle|green square|yellow diamond/);
});

test('fidelity: wrong images fail — blank canvases, and each image scored against another prompt', () => {
  const prompts = fidelityPrompts(9, 10);
  const blank = new Tensor('uint8', [prompts.length, 64, 64, 3]);
  blank.data.fill(BACKGROUNDS.gray[0]);
  assert.equal(scoreFidelity(prompts, blank).overall, 0);

  const images = perfectImages(prompts, 7);
  // Rotate prompts within each category: every image now answers a different prompt of its kind.
  const rotated = prompts.map((p) => {
    const same = prompts.filter((q) => q.category === p.category);
    return same[(same.indexOf(p) + 1) % same.length]!;
  });
  const score = scoreFidelity(rotated, images);
  assert.ok(score.overall < 0.35, `mismatched overall ${score.overall}`);
  assert.ok(score.perCategory.counting < 0.5, `counting ${score.perCategory.counting}`);
});

test('fidelity: the binding diagnosis tells swapped colours and mirrored relations from misses', () => {
  const relation: FidelityPrompt = {
    category: 'spatial relation',
    prompt: 'a red circle to the left of a blue square',
    expect: { kind: 'pair', a: ['red', 'circle'], b: ['blue', 'square'], relation: 'left of' },
  };
  const sameColour: FidelityPrompt = {
    category: 'two objects',
    prompt: 'a red circle and a red square',
    expect: { kind: 'pair', a: ['red', 'circle'], b: ['red', 'square'] },
  };
  const object = (shape: 'circle' | 'square', colour: 'red' | 'blue', cx: number) =>
    ({ shape, colour, size: 20, cx, cy: 32 }) as const;
  const scenes = [
    [object('circle', 'red', 16), object('square', 'blue', 48)], // as asked
    [object('circle', 'red', 48), object('square', 'blue', 16)], // mirrored
    [object('square', 'red', 16), object('circle', 'blue', 48)], // colours swapped, named side
    [object('circle', 'red', 32)], // one object: neither
    [object('circle', 'red', 16), object('square', 'red', 48)], // the same-colour prompt, as asked
  ].map((objects) => ({ background: 'gray' as const, objects }));
  const prompts = [relation, relation, relation, relation, sameColour];
  const result = scoreFidelity(prompts, render(scenes));
  assert.deepEqual(
    result.results.map((r) => r.passed),
    [true, false, false, false, true],
  );
  assert.deepEqual(result.binding, {
    pairImages: 4,
    swapped: 1,
    relationImages: 3,
    relationNamed: 2,
    relationMirrored: 1,
  });

  // Clean renders of a whole prompt set: nothing swapped or mirrored, every relation as named.
  const all = fidelityPrompts(5, 12);
  const clean = scoreFidelity(all, perfectImages(all, 3)).binding;
  assert.ok(clean.pairImages > 10 && clean.relationImages > 5, JSON.stringify(clean));
  assert.equal(clean.swapped, 0);
  assert.equal(clean.relationMirrored, 0);
  assert.equal(clean.relationNamed, clean.relationImages);
});

test('statistics: eigen decomposition, matrix square root and Fréchet distance in closed form', () => {
  const a = [
    Float64Array.from([4, 1, 0.5]),
    Float64Array.from([1, 3, 0.2]),
    Float64Array.from([0.5, 0.2, 2]),
  ];
  const { values, vectors } = symmetricEigen(a);
  // A·v = λ·v for each column v.
  for (let k = 0; k < 3; k++) {
    for (let i = 0; i < 3; i++) {
      let av = 0;
      for (let j = 0; j < 3; j++) av += a[i]![j]! * vectors[j]![k]!;
      assert.ok(Math.abs(av - values[k]! * vectors[i]![k]!) < 1e-10);
    }
  }
  const root = sqrtm(a);
  for (let i = 0; i < 3; i++)
    for (let j = 0; j < 3; j++) {
      let s = 0;
      for (let k = 0; k < 3; k++) s += root[i]![k]! * root[k]![j]!;
      assert.ok(Math.abs(s - a[i]![j]!) < 1e-10, `sqrtm² [${i}][${j}]`);
    }

  // Two Gaussians: identity covariance vs 4·identity, means 3 apart in one axis.
  // FD = ‖Δμ‖² + tr(I + 4I − 2·2I) = 9 + 1·d.
  const random = seededRandom(5);
  const gauss = () => Math.sqrt(-2 * Math.log(1 - random())) * Math.cos(2 * Math.PI * random());
  const d = 4;
  const n = 40_000;
  const x = Array.from({ length: n }, () => Float64Array.from({ length: d }, gauss));
  const y = Array.from({ length: n }, () =>
    Float64Array.from({ length: d }, (_, i) => 2 * gauss() + (i === 0 ? 3 : 0)),
  );
  const fd = frechetDistance(x, y);
  assert.ok(Math.abs(fd - (9 + d)) < 0.25, `FD ${fd}, expected ${9 + d}`);
  assert.ok(frechetDistance(x, x) < 1e-6);
  const cov = covariance(x);
  assert.ok(Math.abs(cov[0]![0]! - 1) < 0.05 && Math.abs(cov[0]![1]!) < 0.05);
  // Mean distance between independent N(0, I) draws is about √(2d) (slightly less).
  const spread = meanPairwiseDistance(x.slice(0, 400));
  assert.ok(spread > 2.5 && spread < Math.sqrt(2 * d), `spread ${spread}`);
});

test(
  'realism features: real shapes images sit close to each other and far from corrupted ones',
  { skip: existsSync(FEATURES) ? false : 'models/shapes-features is missing' },
  async () => {
    const extractor = await FeatureExtractor.load(FEATURES, { cacheDir: false });
    const source = shapesSource();
    const realA = source.sample(seededRandom(1), 256).images;
    const realB = source.sample(seededRandom(2), 256).images;
    const noisy = new Tensor('uint8', realB.shape);
    const random = seededRandom(3);
    realB.data.forEach((v, i) => {
      noisy.data[i] = Math.max(0, Math.min(255, v + Math.round((random() - 0.5) * 120)));
    });
    const [fa, fb, fn] = await Promise.all([
      extractor.embed(realA),
      extractor.embed(realB),
      extractor.embed(noisy),
    ]);
    assert.equal(fa[0]!.length, FEATURE_DIM);
    const same = frechetDistance(fa, fb);
    const corrupted = frechetDistance(fa, fn);
    assert.ok(corrupted > 5 * same, `real↔real ${same}, real↔noisy ${corrupted}`);
    await extractor.release();
  },
);

test(
  'gesso eval: a latent model also reports its autoencoder ceiling, the score of real images of the same prompts after its VAE, which eval of the vae/ folder alone gives too',
  { skip: existsSync(FEATURES) ? false : 'models/shapes-features is missing' },
  async () => {
    const model = join(repoRoot, 'models', 'shapes-diffusion');
    const seed = 3;
    const report = await evaluate({
      model,
      features: FEATURES,
      seed,
      promptsPerCategory: 3,
      imagesPerPrompt: 1,
      runtime: { cacheDir: false },
    });
    const ceiling = report.autoencoder;
    assert.ok(ceiling !== undefined);
    // By hand: the same real scenes (evaluate draws them from seed + 17, one per image), the
    // encoder's mean decoded as it is, pixels [−1, 1] → 0–255.
    const prompts = fidelityPrompts(seed, 3);
    const real = perfectImages(prompts, seed + 17);
    const pipe = await loadPipeline(model, { cacheDir: false });
    assert.ok(pipe instanceof StableDiffusionPipeline);
    const [count, h, w] = real.shape as [number, number, number, number];
    const pixels = new Tensor('float32', [count, 3, h, w]);
    for (let n = 0; n < count; n++)
      for (let i = 0; i < h * w; i++)
        for (let c = 0; c < 3; c++)
          pixels.data[(n * 3 + c) * h * w + i] = real.data[(n * h * w + i) * 3 + c]! / 127.5 - 1;
    const decoded = await pipe.vae.decode((await pipe.vae.encode(pixels)).mean);
    await pipe.release();
    const roundTrip = new Tensor('uint8', real.shape);
    for (let n = 0; n < count; n++)
      for (let i = 0; i < h * w; i++)
        for (let c = 0; c < 3; c++) {
          const v = (decoded.data[(n * 3 + c) * h * w + i]! + 1) * 127.5;
          roundTrip.data[(n * h * w + i) * 3 + c] = Math.max(0, Math.min(255, Math.round(v)));
        }
    const expected = scoreFidelity(prompts, roundTrip);
    // Rounding may move a pixel by one level; that can change at most one image's verdict.
    const images = prompts.length;
    assert.ok(
      Math.abs(ceiling.overall - expected.overall) * images <= 1 + 1e-9,
      `ceiling ${ceiling.overall}, by hand ${expected.overall}`,
    );
    for (const c of CATEGORIES) {
      assert.ok(ceiling.perCategory[c] >= 0 && ceiling.perCategory[c] <= 1, c);
      assert.ok(Math.abs(ceiling.perCategory[c] - expected.perCategory[c]) * 3 <= 1 + 1e-9, c);
    }
    // The bundled autoencoder keeps many objects readable (0.54 here, 0.80 at 8 prompts × 2 with
    // seed 1), which a decoder fed wrongly scaled latents does not (0.04).
    assert.ok(ceiling.overall >= 0.4, `ceiling ${ceiling.overall}`);

    // The autoencoder's folder on its own: its round trip of the same real images is the score.
    const alone = await evaluate({
      model: join(model, 'vae'),
      features: FEATURES,
      seed,
      promptsPerCategory: 3,
      imagesPerPrompt: 1,
      runtime: { cacheDir: false },
    });
    assert.deepEqual(alone.fidelity, ceiling);
    assert.equal(alone.autoencoder, undefined);
    assert.equal(alone.settings.roundTrip, true);
    assert.equal(alone.settings.steps, undefined);
    assert.ok(alone.realism.frechetDistance < report.realism.frechetDistance);
    assert.ok(alone.size.parameters > 0 && alone.size.parameters < report.size.parameters);
    assert.match(
      formatReport(alone),
      /an autoencoder: real images of the prompts after its round trip/,
    );
    await assert.rejects(
      evaluate({
        model: join(model, 'vae'),
        features: FEATURES,
        seed,
        promptsPerCategory: 1,
        imagesPerPrompt: 1,
        steps: 3,
        guidance: 2,
      }),
      /shapes-diffusion\/vae is an autoencoder, which samples nothing: leave out --steps, --guidance/,
    );
  },
);

test(
  'gesso eval --strength: images start from the real images of their prompts, noised that far',
  { skip: existsSync(FEATURES) ? false : 'models/shapes-features is missing' },
  async () => {
    const common = {
      model: join(repoRoot, 'models', 'shapes-diffusion'),
      features: FEATURES,
      seed: 1,
      promptsPerCategory: 8,
      imagesPerPrompt: 1,
      runtime: { cacheDir: false as const },
    };
    const fromNoise = await evaluate(common);
    const fromReal = await evaluate({ ...common, strength: 0.05 });
    assert.equal(fromReal.settings.strength, 0.05);
    assert.equal(fromNoise.settings.strength, undefined);
    // One of 20 steps from the real scenes keeps most of them (0.72 overall and a Fréchet
    // distance of 3.3 here, against 0.56 and 9.5 from noise); the real images and the
    // autoencoder's ceiling are the same in both.
    assert.ok(
      fromReal.fidelity.overall >= fromNoise.fidelity.overall + 0.08,
      `from real ${fromReal.fidelity.overall}, from noise ${fromNoise.fidelity.overall}`,
    );
    assert.ok(
      fromReal.realism.frechetDistance < fromNoise.realism.frechetDistance / 2,
      `Fréchet ${fromReal.realism.frechetDistance} against ${fromNoise.realism.frechetDistance}`,
    );
    assert.deepEqual(fromReal.autoencoder, fromNoise.autoencoder);
    assert.match(formatReport(fromReal), /from real images of the prompts at strength 0.05/);
  },
);

async function tinyTextEncoderFolder(dir: string): Promise<string> {
  const task = new DiffusionTask(TINY);
  const trainer = await Trainer.create(task, options(1));
  await task.exportModel(dir, trainer.weights('ema'));
  await trainer.release();
  return dir;
}

const tinyGan = (textEncoderFrom: string): GanRecipe => ({
  batchSize: 4,
  generator: {
    zDim: 8,
    textDim: 16,
    nf: 4,
    imageSize: 64,
    patchSize: 8,
    attentionResolutions: [8],
    latentChannels: 0,
    blocksPerResolution: 1,
    sentencePooling: 'max',
  },
  generatorLearningRate: 1e-3,
  discriminatorLearningRate: 2e-3,
  gpWeight: 2,
  gpPower: 6,
  textEncoderFrom,
});

test('sentence pooling: max over the caption up to its end-of-text token, or the encoder state there', () => {
  // Two captions of 4 positions, width 2; <eos> is id 2 and id 0 pads.
  const hidden = Tensor.float32(
    [2, 4, 2],
    [1, -5, 4, 0, 2, 3, 9, 9, /**/ -1, -2, -3, -4, 7, 7, 8, 8],
  );
  const pooled = Tensor.float32([2, 2], [0.5, 0.5, 0.25, 0.25]);
  const ids = Tensor.int64([2, 4], [1, 7, 2, 0, 1, 2, 0, 0]);
  // The padding after <eos> (9, 9 and 7, 7 / 8, 8) is not part of the caption.
  assert.deepEqual(poolSentence('max', { hidden, pooled }, ids, 2).toArray(), [4, 3, -1, -2]);
  assert.equal(poolSentence('eos', { hidden, pooled }, ids, 2), pooled);
  // Without an <eos>, every position counts.
  const noEos = Tensor.int64([2, 4], [1, 7, 7, 7, 1, 7, 7, 7]);
  assert.deepEqual(poolSentence('max', { hidden, pooled }, noEos, 2).toArray(), [9, 9, 8, 8]);
  assert.equal(ganConfig({}).sentencePooling, 'eos', 'folders from before the field');
  assert.throws(
    () => ganConfig({ sentence_pooling: 'mean' }),
    /sentence_pooling must be one of eos, max/,
  );
});

test("gesso's own text encoders pool at their <eos> (id 2), not at the largest id as CLIP's first ports", async () => {
  await withTempDir(async (dir) => {
    const encoder = await TextEncoder.load(join(await tinyTextEncoderFolder(dir), 'text_encoder'), {
      cacheDir: false,
    });
    const length = encoder.config.maxPositionEmbeddings;
    // <bos>, two words with ids above 2, <eos>, padding.
    const ids = Tensor.int64(
      [1, length],
      Array.from({ length }, (_, i) => [1, 9, 5, 2][i] ?? 0),
    );
    const { hidden, pooled } = await encoder.encode(ids);
    const width = pooled.size;
    assert.deepEqual(pooled.toArray(), Array.from(hidden.data.subarray(3 * width, 4 * width)));
    await encoder.release();
  });
});

const ganSchedule = {
  seed: 3,
  schedule: {
    steps: 6,
    learningRate: 1e-3,
    warmupSteps: 0,
    decay: 'constant' as const,
    finalLearningRate: 1e-3,
    emaDecay: 0.9,
  },
  runtime: { cacheDir: false as const },
};

test('GAN route: trains, resumes bit for bit, exports a folder that generates in one step, and gesso eval scores it', async () => {
  await withTempDir(async (dir) => {
    const recipe = tinyGan(await tinyTextEncoderFolder(join(dir, 'text')));
    const data = shapesSource();
    const straight = await GanTrainer.create(recipe, data, ganSchedule);
    const results = [];
    for (let i = 0; i < 4; i++) results.push(await straight.runStep());
    for (const r of results) {
      assert.ok(Number.isFinite(r.generatorLoss) && Number.isFinite(r.discriminatorLoss));
      // Hinge terms are ≥ 0 and MA-GP is ≥ 0, so the discriminator loss is too.
      assert.ok(r.discriminatorLoss >= 0, `D loss ${r.discriminatorLoss}`);
    }

    const first = await GanTrainer.create(recipe, data, ganSchedule);
    for (let i = 0; i < 2; i++) await first.runStep();
    await first.save(join(dir, 'state.safetensors'));
    await first.release();
    const resumed = await GanTrainer.resume(
      join(dir, 'state.safetensors'),
      recipe,
      data,
      ganSchedule,
    );
    assert.equal(resumed.step, 2);
    for (let i = 0; i < 2; i++) await resumed.runStep();
    await resumed.exportModel(join(dir, 'resumed'));
    await straight.exportModel(join(dir, 'gan'));
    const generatorFile = (m: string) => readFile(join(dir, m, 'generator', 'model.safetensors'));
    assert.deepEqual(await generatorFile('resumed'), await generatorFile('gan'));
    await straight.release();
    await resumed.release();

    const pipe = await loadPipeline(join(dir, 'gan'), { cacheDir: false });
    const a = await pipe.generate({ prompt: ['a red circle', 'two blue squares'], seed: [5, 6] });
    const b = await pipe.generate({ prompt: 'two blue squares', seed: 6 });
    assert.deepEqual(a.images.shape, [2, 64, 64, 3]);
    // Same seed and prompt, alone or in a batch: the same image.
    const second = (a.images.data as Float32Array).subarray(64 * 64 * 3);
    assert.ok(second.every((v, i) => Math.abs(v - b.images.data[i]!) < 1e-5));
    await assert.rejects(
      pipe.generate({ prompt: 'x', image: new Tensor('float32', [1, 64, 64, 3]) }),
      /image-to-image needs a diffusion model/,
    );
    await assert.rejects(
      pipe.generate({ prompt: 'x', seed: [1], variation: { seeds: [2], strength: 0.5 } }),
      /a GAN has none/,
    );
    await pipe.release();

    if (!existsSync(FEATURES)) return;
    const report = await evaluate({
      model: join(dir, 'gan'),
      features: FEATURES,
      seed: 1,
      promptsPerCategory: 1,
      imagesPerPrompt: 2,
      out: join(dir, 'eval'),
      runtime: { cacheDir: false },
    });
    assert.equal(report.settings.images, CATEGORIES.length * 2);
    for (const c of CATEGORIES) assert.ok(report.fidelity.perCategory[c] >= 0);
    assert.ok(report.realism.frechetDistance > 0);
    assert.ok(report.speed.imagesPerSecond > 0);
    assert.ok(report.size.parameters > 0);
    assert.equal(report.autoencoder, undefined, 'a GAN has no latent space to bound it');
    const saved = JSON.parse(await readFile(join(dir, 'eval', 'report.json'), 'utf8')) as {
      fidelity: { overall: number; binding: unknown };
    };
    assert.equal(saved.fidelity.overall, report.fidelity.overall);
    assert.deepEqual(saved.fidelity.binding, report.fidelity.binding);
    assert.match(
      formatReport(report),
      /^binding: each colour on the other's shape in \d+ of \d+ pair images$/m,
    );
    const sheet = decodePng(await readFile(join(dir, 'eval', 'counting.png')));
    assert.equal(sheet.width, 2 * 64);
    assert.equal(sheet.height, 64);
  });
});
