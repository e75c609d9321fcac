import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { decodePng } from '../src/io/png.js';
import { parseInfotext } from '../src/io/infotext.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { cachesOptimizedGraph, widensHalfWeights } from '../src/pipelines/components.js';
import {
  AUTO_LOW_MEMORY_SHARE,
  resolveLowMemory,
  StableDiffusionPipeline,
} from '../src/pipelines/stable-diffusion.js';
import { createScheduler } from '../src/schedulers/index.js';
import { chunk } from '../src/tensor/ops.js';
import { PhiloxGenerator, TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, golden, goldenDir, needsGolden, repoRoot, withTempDir } from './helpers.js';

interface Run {
  key: string;
  scheduler: string;
  steps: number;
  guidance_scale: number;
  generator_seed: number;
  negative_prompt_used: boolean;
}
interface Spec {
  prompt: string;
  negative_prompt: string;
  runs: Run[];
  seeded: { key: string; scheduler: string; steps: number; guidance_scale: number; seed: number };
  img2img: {
    scheduler: string;
    steps: number;
    strength: number;
    guidance_scale: number;
    seed: number;
  };
}
interface Meta {
  scheduler_meta: {
    scheduler_base_config: Record<string, unknown>;
    schedulers: Record<string, { class: string; extra: Record<string, unknown> }>;
  };
}

const spec =
  goldenDir === undefined
    ? undefined
    : (JSON.parse(readFileSync(golden('sd1-tiny', 'pipeline.json'), 'utf8')) as Spec);
const meta =
  goldenDir === undefined
    ? undefined
    : (JSON.parse(readFileSync(golden('sd1-tiny', 'meta.json'), 'utf8')) as Meta).scheduler_meta;

/** The golden runs build each scheduler from the base config in meta.json (class-default spacing). */
function goldenScheduler(name: string) {
  const info = meta!.schedulers[name]!;
  return createScheduler({ ...meta!.scheduler_base_config, ...info.extra }, info.class);
}

async function goldenTensor(name: string): Promise<Tensor<'float32'>> {
  return (
    await SafetensorsFile.with(golden('sd1-tiny', 'pipeline.safetensors'), (f) => f.read(name))
  ).toFloat32();
}

function maxAbs(t: Tensor<'float32'>): number {
  return t.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
}

let shared: Promise<StableDiffusionPipeline> | undefined;
const pipeline = () =>
  (shared ??= StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
    cacheDir: false,
  }));

for (const variant of ['fp32', 'fp16', 'onnx'] as const) {
  // fp32 (and the diffusers ONNX layout, fp32 too): final latents within 1e-3 of their scale,
  // images within 2e-3. fp16 weights: 5e-3 and 1e-2.
  const [latentTol, imageTol] = variant === 'fp16' ? [5e-3, 1e-2] : [1e-3, 2e-3];
  test(
    `every golden pipeline run (${variant} weights): final latents and image`,
    needsGolden(),
    async () => {
      const pipe =
        variant === 'fp32'
          ? await pipeline()
          : variant === 'fp16'
            ? await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
                cacheDir: false,
                variant: 'fp16',
              })
            : // text_encoder/, unet/, vae_encoder/, vae_decoder/ as model.onnx files
              await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny-onnx'), {
                cacheDir: false,
              });
      const latentsIn = await goldenTensor('latents_in');
      assert.equal(spec!.runs.length, 12);
      for (const run of spec!.runs) {
        const result = await pipe.generate({
          prompt: spec!.prompt,
          ...(run.negative_prompt_used ? { negativePrompt: spec!.negative_prompt } : {}),
          steps: run.steps,
          guidance: run.guidance_scale,
          seed: run.generator_seed,
          latents: latentsIn,
          scheduler: goldenScheduler(run.scheduler),
        });
        const latents = await goldenTensor(`${run.key}_latents`);
        assertClose(
          result.latents,
          latents,
          { atol: latentTol * maxAbs(latents) },
          `${run.key} latents`,
        );
        assertClose(
          result.images,
          await goldenTensor(`${run.key}_image`),
          { atol: imageTol },
          `${run.key} image`,
        );
      }
      if (variant !== 'fp32') await pipe.release();
    },
  );
}

test(
  'the seeded run: latents drawn from torch.Generator(42), Euler, guidance 5',
  needsGolden(),
  async () => {
    const s = spec!.seeded;
    const result = await (
      await pipeline()
    ).generate({
      prompt: spec!.prompt,
      negativePrompt: spec!.negative_prompt,
      steps: s.steps,
      guidance: s.guidance_scale,
      seed: s.seed,
      scheduler: goldenScheduler(s.scheduler),
    });
    assert.deepEqual(result.seeds, [42]);
    assertClose(result.images, await goldenTensor(s.key), { atol: 2e-3 }, 'seeded image');
  },
);

test(
  'image-to-image: DDIM, strength 0.6, VAE sample then add_noise from one generator',
  needsGolden(),
  async () => {
    const s = spec!.img2img;
    const result = await (
      await pipeline()
    ).generate({
      prompt: spec!.prompt,
      negativePrompt: spec!.negative_prompt,
      steps: s.steps,
      guidance: s.guidance_scale,
      seed: s.seed,
      strength: s.strength,
      image: await goldenTensor('img2img_init_image_0to1'),
      scheduler: goldenScheduler(s.scheduler),
    });
    assertClose(
      result.images,
      await goldenTensor('img2img_image'),
      { atol: 2e-3 },
      'img2img image',
    );
  },
);

test('progress every step, cancellation by AbortSignal, and batching', needsGolden(), async () => {
  const pipe = await pipeline();
  const seen: number[] = [];
  const result = await pipe.generate({
    prompt: 'a cat',
    steps: 5,
    seed: 3,
    scheduler: 'euler_a',
    onProgress: ({ step, steps, latents }) => {
      assert.equal(steps, 5);
      assert.deepEqual(latents.shape, [1, 4, 32, 32]);
      seen.push(step);
    },
  });
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  assert.deepEqual(result.images.shape, [1, 64, 64, 3]);

  const controller = new AbortController();
  let steps = 0;
  await assert.rejects(
    pipe.generate({
      prompt: 'a cat',
      steps: 20,
      seed: 3,
      signal: controller.signal,
      onProgress: () => {
        steps++;
        if (steps === 2) controller.abort();
      },
    }),
    (e: unknown) => (e as Error).name === 'AbortError',
  );
  assert.equal(steps, 2, 'stopped right after the step that cancelled');

  // Two prompts with one generator each equal each prompt alone with its seed.
  const both = await pipe.generate({
    prompt: ['a cat', 'a dog'],
    steps: 4,
    seed: [7, 8],
    scheduler: 'euler_a',
    negativePrompt: 'blurry',
  });
  const [cat, dog] = chunk(both.images, 2);
  const catAlone = await pipe.generate({
    prompt: 'a cat',
    steps: 4,
    seed: 7,
    scheduler: 'euler_a',
    negativePrompt: 'blurry',
  });
  const dogAlone = await pipe.generate({
    prompt: 'a dog',
    steps: 4,
    seed: 8,
    scheduler: 'euler_a',
    negativePrompt: 'blurry',
  });
  assertClose(cat!, catAlone.images, { atol: 1e-5 }, 'cat in batch');
  assertClose(dog!, dogAlone.images, { atol: 1e-5 }, 'dog in batch');
  const counted = await pipe.generate({
    prompt: 'a cat',
    count: 3,
    steps: 2,
    seed: 1,
    width: 48,
    height: 32,
  });
  assert.deepEqual(counted.images.shape, [3, 32, 48, 3]);
});

test(
  'rng nv: starting and step noise from Philox generators seeded per image',
  needsGolden(),
  async () => {
    const pipe = await pipeline();
    const options = { prompt: 'a cat', steps: 4, guidance: 3 } as const;
    const seeded = await pipe.generate({
      ...options,
      count: 2,
      seed: [5, 6],
      rng: 'nv',
      scheduler: 'euler_a',
    });
    const given = await pipe.generate({
      ...options,
      count: 2,
      generator: [new PhiloxGenerator(5), new PhiloxGenerator(6)],
      scheduler: 'euler_a',
    });
    assert.deepEqual(seeded.latents.data, given.latents.data);
    // DDIM draws no step noise: its result is fixed by the starting latents alone.
    const ddim = await pipe.generate({ ...options, seed: 5, rng: 'nv', scheduler: 'ddim' });
    const start = await pipe.generate({
      ...options,
      latents: new PhiloxGenerator(5).randn([1, 4, 32, 32]),
      scheduler: 'ddim',
    });
    assert.deepEqual(ddim.latents.data, start.latents.data);
    const cpu = await pipe.generate({ ...options, seed: 5, scheduler: 'ddim' });
    assert.notDeepEqual(cpu.latents.data, ddim.latents.data);
  },
);

test(
  "noise seed delta (A1111 ENSD): the starting noise from the seed, the samplers' later noise from seed + delta",
  needsGolden(),
  async () => {
    const pipe = await pipeline();
    const options = { prompt: 'a cat', steps: 4, guidance: 3, scheduler: 'euler_a' } as const;
    const delta = await pipe.generate({ ...options, seed: 5, noiseSeedDelta: 31337 });
    const byHand = await pipe.generate({
      ...options,
      latents: new TorchGenerator(5).randn([1, 4, 32, 32]),
      generator: new TorchGenerator(5 + 31337),
    });
    assert.deepEqual(delta.latents.data, byHand.latents.data);
    const none = await pipe.generate({ ...options, seed: 5 });
    assert.notDeepEqual(none.latents.data, delta.latents.data);
    // A sampler that draws no later noise is untouched by it.
    const ddim = { ...options, scheduler: 'ddim' } as const;
    assert.deepEqual(
      (await pipe.generate({ ...ddim, seed: 5, noiseSeedDelta: 31337 })).latents.data,
      (await pipe.generate({ ...ddim, seed: 5 })).latents.data,
    );
  },
);

test('bad requests are refused with clear errors', needsGolden(), async () => {
  const pipe = await pipeline();
  await assert.rejects(
    pipe.generate({ prompt: 'x', width: 100 }),
    /width 100 must be a positive multiple of 8/,
  );
  await assert.rejects(
    pipe.generate({ prompt: 'x', steps: 0 }),
    /steps must be a positive integer/,
  );
  await assert.rejects(
    pipe.generate({ prompt: 'x', scheduler: 'nope' }),
    /unknown scheduler 'nope'/,
  );
  await assert.rejects(
    pipe.generate({ prompt: 'x', width: 64, height: 64, latents: Tensor.float32([1, 4, 8, 8]) }),
    /starting latents have shape \[1, 4, 8, 8\], this generation needs \[1, 4, 32, 32\]/,
  );
  await assert.rejects(pipe.generate({ prompt: [] }), /no prompt/);
  await assert.rejects(
    StableDiffusionPipeline.fromPretrained('/nonexistent'),
    /model_index\.json is missing/,
  );
});

const BIN = join(repoRoot, 'dist', 'src', 'cli', 'main.js');

test('gesso generate reproduces a golden run from the command line', needsGolden(), async () => {
  await withTempDir(async (dir) => {
    const latents = join(dir, 'noise.safetensors');
    await writeSafetensors(latents, { latents: await goldenTensor('latents_in') });
    const run = spec!.runs.find((r) => r.scheduler === 'pndm')!;
    const args = [
      BIN,
      'generate',
      '--model',
      golden('sd1-tiny', 'sd-tiny'),
      '--prompt',
      spec!.prompt,
      '--negative-prompt',
      spec!.negative_prompt,
      '--steps',
      String(run.steps),
      '--guidance',
      String(run.guidance_scale),
      '--scheduler',
      'pndm',
      '--seed',
      String(run.generator_seed),
      '--latents',
      latents,
    ];
    const raw = spawnSync(process.execPath, [...args, '--out', join(dir, 'out.safetensors')], {
      encoding: 'utf8',
    });
    assert.equal(raw.status, 0, raw.stderr);
    const out = await SafetensorsFile.with(join(dir, 'out.safetensors'), async (f) => ({
      image: (await f.read('image')).toFloat32(),
      latents: (await f.read('latents')).toFloat32(),
    }));
    const expected = await goldenTensor(`${run.key}_latents`);
    assertClose(out.latents, expected, { atol: 1e-3 * maxAbs(expected) }, 'CLI latents');
    assertClose(out.image, await goldenTensor(`${run.key}_image`), { atol: 2e-3 }, 'CLI image');

    const png = spawnSync(process.execPath, [...args, '--out', join(dir, 'out.png')], {
      encoding: 'utf8',
    });
    assert.equal(png.status, 0, png.stderr);
    const decoded = decodePng(readFileSync(join(dir, 'out.png')));
    assert.deepEqual([decoded.width, decoded.height, decoded.channels], [64, 64, 3]);
    // The PNG holds the float image rounded to 8 bits.
    const golden8 = await goldenTensor(`${run.key}_image`);
    for (let i = 0; i < decoded.data.length; i++)
      assert.ok(Math.abs(decoded.data[i]! - golden8.data[i]! * 255) <= 1.01, `pixel ${i}`);
    const info = parseInfotext(decoded.text.parameters!);
    assert.equal(info.prompt, spec!.prompt);
    assert.equal(info.negativePrompt, spec!.negative_prompt);
    assert.deepEqual(Object.fromEntries(info.params).Steps, '10');
    assert.deepEqual(Object.fromEntries(info.params).Seed, String(run.generator_seed));

    const bad = spawnSync(
      process.execPath,
      [
        BIN,
        'generate',
        '--model',
        golden('sd1-tiny', 'sd-tiny'),
        'x',
        '--width',
        '100',
        '--out',
        join(dir, 'x.png'),
      ],
      { encoding: 'utf8' },
    );
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /image size 100x64 is not a multiple of 8 on both sides; try 104x64/);
    assert.doesNotMatch(bad.stderr, /\n\s+at /);
  });
});

test(
  'low-memory mode: models unloaded after use give the same images, run after run',
  needsGolden(),
  async () => {
    const dir = golden('sd1-tiny', 'sd-tiny');
    const request = { prompt: 'a red circle', steps: 3, seed: 11, width: 32, height: 32 };
    const normal = await StableDiffusionPipeline.fromPretrained(dir, { cacheDir: false });
    const expected = await normal.generate(request);
    await normal.release();
    const low = await StableDiffusionPipeline.fromPretrained(dir, {
      cacheDir: false,
      lowMemory: true,
    });
    for (let run = 0; run < 2; run++) {
      const got = await low.generate(request);
      assert.deepEqual(got.images.data, expected.images.data, `run ${run}`);
    }
    await low.release();
  },
);

test('low-memory by itself: on when the weights pass the share of memory, as asked otherwise', () => {
  const memory = 16 * 2 ** 30;
  const edge = AUTO_LOW_MEMORY_SHARE * memory;
  assert.equal(AUTO_LOW_MEMORY_SHARE, 0.4);
  assert.equal(resolveLowMemory(undefined, edge + 1, memory), true);
  assert.equal(resolveLowMemory('auto', edge + 1, memory), true);
  assert.equal(resolveLowMemory('auto', edge, memory), false);
  // SDXL's fp32 weights (13.9 GB) on a 24 GiB machine; SD 1.5's (4.3 GB) there and on 8 GiB.
  assert.equal(resolveLowMemory(undefined, 13.9e9, 24 * 2 ** 30), true);
  assert.equal(resolveLowMemory(undefined, 4.3e9, 24 * 2 ** 30), false);
  assert.equal(resolveLowMemory(undefined, 4.3e9, 8 * 2 ** 30), true);
  assert.equal(resolveLowMemory(false, 1e12, memory), false);
  assert.equal(resolveLowMemory(true, 1, memory), true);
});

test(
  'a pipeline weighs its models as float32 in memory, from fp32 or fp16 files alike',
  needsGolden(),
  async () => {
    const dir = golden('sd1-tiny', 'sd-tiny');
    // Counted here from the files' headers: every tensor of the three models at 4 bytes.
    let expected = 0;
    for (const [part, file] of [
      ['text_encoder', 'model.safetensors'],
      ['unet', 'diffusion_pytorch_model.safetensors'],
      ['vae', 'diffusion_pytorch_model.safetensors'],
    ] as const) {
      const header = await SafetensorsFile.with(join(dir, part, file), async (f) => [
        ...f.tensors.values(),
      ]);
      for (const t of header) expected += 4 * t.shape.reduce((a, b) => a * b, 1);
    }
    for (const variant of [undefined, 'fp16']) {
      const pipe = await StableDiffusionPipeline.fromPretrained(dir, {
        cacheDir: false,
        ...(variant !== undefined ? { variant } : {}),
      });
      const weighed = pipe.textEncoder.weightBytes + pipe.unet.weightBytes + pipe.vae.weightBytes;
      assert.equal(weighed, expected, `variant ${variant ?? 'fp32'}`);
      assert.equal(pipe.lowMemory, false, 'a tiny model stays resident by default');
      await pipe.release();
    }
  },
);

test(
  'fp16 weight files can be read through a cached float32 copy: the same image, the copy made once',
  needsGolden(),
  async () => {
    const dir = golden('sd1-tiny', 'sd-tiny');
    const imageWith = async (options: { cacheDir: string | false; widenHalfWeights: boolean }) => {
      const pipe = await StableDiffusionPipeline.fromPretrained(dir, {
        variant: 'fp16',
        ...options,
      });
      try {
        const { images } = await pipe.generate({ prompt: 'a red circle', steps: 2, seed: 3 });
        return images;
      } finally {
        await pipe.release();
      }
    };
    const cast = await imageWith({ cacheDir: false, widenHalfWeights: false });
    await withTempDir(async (cacheDir) => {
      const widened = await imageWith({ cacheDir, widenHalfWeights: true });
      // fp16 → fp32 is exact, so the graphs compute with the same float32 values.
      assert.deepEqual(widened.data, cast.data);
      const folder = join(cacheDir, 'weights');
      const files = readdirSync(folder).filter((f) => f.endsWith('.safetensors'));
      assert.equal(files.length, 3, 'one copy per model: text encoder, UNet, VAE');
      let halfTensors = 0;
      for (const part of ['text_encoder', 'unet', 'vae']) {
        const name = part === 'text_encoder' ? 'model' : 'diffusion_pytorch_model';
        halfTensors += await SafetensorsFile.with(
          join(dir, part, `${name}.fp16.safetensors`),
          async (f) => [...f.tensors.values()].filter((t) => t.dtype === 'F16').length,
        );
      }
      let copied = 0;
      for (const file of files) {
        const dtypes = await SafetensorsFile.with(join(folder, file), async (f) =>
          [...f.tensors.values()].map((t) => t.dtype),
        );
        assert.ok(dtypes.every((d) => d === 'F32'));
        copied += dtypes.length;
      }
      assert.equal(copied, halfTensors, 'every fp16 tensor copied, nothing else');

      const written = files.map((f) => statSync(join(folder, f)).mtimeMs);
      // A copy cut short (a crash mid-write cannot leave one under its name, a damaged disk can)
      // is written again; the others are reused as they are.
      truncateSync(join(folder, files[0]!), 100);
      const again = await imageWith({ cacheDir, widenHalfWeights: true });
      assert.deepEqual(again.data, cast.data);
      assert.ok(statSync(join(folder, files[0]!)).size > 100, 'the damaged copy was rewritten');
      for (let i = 1; i < files.length; i++)
        assert.equal(statSync(join(folder, files[i]!)).mtimeMs, written[i], `${files[i]} reused`);
    });
  },
);

test(
  'a float32 copy that cannot be written is one clear error naming the place and the remedy',
  needsGolden(),
  async () => {
    await withTempDir(async (cacheDir) => {
      writeFileSync(join(cacheDir, 'weights'), 'a file where the copies’ folder should be');
      await assert.rejects(
        StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
          variant: 'fp16',
          cacheDir,
          widenHalfWeights: true,
        }),
        (error: Error & { code?: string }) =>
          error.code === 'weight-copy-failed' &&
          error.message.includes(join(cacheDir, 'weights')) &&
          error.message.includes('GESSO_CACHE_DIR'),
      );
    });
  },
);

test('half-precision weights are widened on disk exactly when the optimized-graph cache is off for size', () => {
  const gib = 2 ** 30;
  assert.equal(widensHalfWeights(3.44e9, 24 * gib), false, 'SD 1.5 UNet on 24 GiB');
  assert.equal(widensHalfWeights(3.44e9, 8 * gib), true, 'SD 1.5 UNet on 8 GiB');
  assert.equal(widensHalfWeights(10.3e9, 24 * gib), true, 'SDXL UNet on 24 GiB');
  for (const bytes of [1e9, 5e9, 6 * gib, 6.5 * gib, 12e9])
    assert.equal(
      widensHalfWeights(bytes, 24 * gib),
      bytes >= 256 * 2 ** 20 && !cachesOptimizedGraph(bytes, 24 * gib),
    );
});

test('large models keep ORT’s optimized graph, unless writing it would crowd the memory', () => {
  const gib = 2 ** 30;
  assert.equal(cachesOptimizedGraph(255 * 2 ** 20, 24 * gib), false, 'small: not worth a copy');
  assert.equal(cachesOptimizedGraph(256 * 2 ** 20, 24 * gib), true);
  assert.equal(cachesOptimizedGraph(3.44e9, 24 * gib), true, 'SD 1.5 UNet on 24 GiB');
  assert.equal(cachesOptimizedGraph(3.44e9, 8 * gib), false, 'SD 1.5 UNet on 8 GiB');
  assert.equal(cachesOptimizedGraph(10.3e9, 24 * gib), false, 'SDXL UNet on 24 GiB');
  assert.equal(cachesOptimizedGraph(6 * gib, 24 * gib), true, 'a quarter exactly');
});
