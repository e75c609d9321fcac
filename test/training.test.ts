import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { interruptHandler } from '../src/cli/train.js';
import { tunedMallocEnvironment } from '../src/cli/tuned-malloc.js';
import { detect } from '../src/data/detect.js';
import { centroid, HELD_OUT, sampleBatch, seededRandom, SHAPES_WORDS } from '../src/data/shapes.js';
import { Graph } from '../src/graph/ir.js';
import * as op from '../src/graph/ops.js';
import { emitOnnx } from '../src/graph/onnx.js';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { ClipTextModel, clipTextConfig } from '../src/models/clip-text.js';
import { PatchAutoencoder, patchify } from '../src/models/patch-autoencoder.js';
import { UNet2DConditionModel, unetConfig } from '../src/models/unet-2d-condition.js';
import { WeightSet } from '../src/nn/weights.js';
import { TextEncoder } from '../src/pipelines/components.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { runOnce } from '../src/runtime/session.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { map } from '../src/tensor/ops.js';
import { Tensor } from '../src/tensor/tensor.js';
import { WordTokenizer } from '../src/tokenizers/word.js';
import { readTrainConfigFile, resolveTrainConfig } from '../src/training/config.js';
import { DiffusionTask, minSnrWeight } from '../src/training/diffusion.js';
import { DEFAULT_ADAMW } from '../src/training/step.js';
import { Trainer } from '../src/training/trainer.js';
import { assertClose, ddimClipsSample, options, repoRoot, TINY, withTempDir } from './helpers.js';

/** The process a `gesso train` process started to run its steps in (Linux). */
const trainingProcess = (gesso: ChildProcess) =>
  Number(
    readFileSync(`/proc/${gesso.pid}/task/${gesso.pid}/children`, 'utf8').trim().split(' ')[0],
  );

const bytesOf = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

test('the shapes world: every caption form, held-out pairs never in training data, clean renders detected exactly', () => {
  const random = seededRandom(3);
  const { images, captions, scenes } = sampleBatch(random, 1500, { excludeHeldOut: true });
  for (const scene of scenes) {
    for (const o of scene.objects) {
      assert.ok(
        !HELD_OUT.some(([c, s]) => c === o.colour && s === o.shape),
        `held-out ${o.colour} ${o.shape} in training data`,
      );
      assert.notEqual(o.colour, scene.background);
    }
  }
  for (const caption of captions) {
    assert.ok(!HELD_OUT.some(([c, s]) => new RegExp(`\\b${c} ${s}`).test(caption)), caption);
    assert.match(caption, /^[a-z ]+$/);
  }
  const text = captions.join('\n');
  for (const form of [
    /^a photo of /m,
    /^an image of /m,
    /^a picture of /m,
    /^a drawing of /m,
    /^there is /m,
    / to the left of /,
    / to the right of /,
    / above /,
    / below /,
    / and /,
    /(two|three|four) \w+ \w+s/,
    / in the top left corner/,
    / at the bottom/,
    / on a (gray|white|black) background/,
    /\b(small|large) /,
  ]) {
    assert.match(text, form);
  }
  const pixels = 64 * 64 * 3;
  scenes.forEach((scene, i) => {
    const found = detect((images.data as Uint8Array).subarray(i * pixels, (i + 1) * pixels));
    assert.equal(found.background, scene.background);
    assert.equal(found.objects.length, scene.objects.length, captions[i]);
    for (const o of scene.objects) {
      const [x, y] = centroid(o);
      assert.ok(
        found.objects.some(
          (d) =>
            d.colour === o.colour &&
            d.shape === o.shape &&
            Math.abs(d.size - o.size) <= 2 &&
            Math.hypot(d.cx - x, d.cy - y) < 1.5,
        ),
        `${captions[i]}: ${o.colour} ${o.shape} not found`,
      );
    }
  });
});

test('colourless training captions: single-object captions may leave the colour unnamed, still true of the image', () => {
  const colourWords =
    /\b(red|orange|yellow|green|blue|purple|white|black) (circle|square|triangle|diamond)/;
  const plain = sampleBatch(seededRandom(4), 400, { excludeHeldOut: true });
  assert.ok(
    plain.captions.every((c) => colourWords.test(c)),
    'the grammar always names colours',
  );
  const { captions, scenes } = sampleBatch(seededRandom(4), 400, {
    excludeHeldOut: true,
    colourless: 1,
  });
  let colourless = 0;
  captions.forEach((caption, i) => {
    const scene = scenes[i]!;
    if (colourWords.test(caption)) return;
    colourless += 1;
    assert.equal(scene.objects.length, 1, caption);
    const o = scene.objects[0]!;
    assert.match(caption, new RegExp(`\\b(a|an|one) (small |large )?${o.shape}\\b`), caption);
    assert.doesNotMatch(caption, / {2}/, caption);
  });
  // Single objects are 40% of captions; all of them lose their colour, nothing else does.
  assert.ok(colourless > 120 && colourless < 200, `${colourless} colourless captions`);
});

test('the word tokenizer ignores case and punctuation and maps unknown words to <unk>', () => {
  const t = new WordTokenizer(SHAPES_WORDS, 12);
  assert.deepEqual(t.encode('A  RED, circle!'), t.encode('a red circle'));
  const ids = t.encode('a crimson circle');
  assert.equal(ids[2], t.unkId);
  assert.equal(ids.length, 12);
  assert.equal(t.decode(t.encode('three blue squares')), 'three blue squares');
  // Other spellings fall back to the vocabulary's word, and only when it lacks theirs.
  assert.deepEqual(
    t.encode('3 red circles in the centre on a grey background'),
    t.encode('three red circles in the center on a gray background'),
  );
  const british = new WordTokenizer([...SHAPES_WORDS, 'grey'], 12);
  assert.equal(british.decode(british.encode('a grey square')), 'a grey square');
  assert.equal(t.encode('7 squares')[1], t.unkId); // seven is not a shapes-world word
});

test('host patchify equals the graph codec, and decoding inverts it', async () => {
  const { images } = sampleBatch(seededRandom(1), 2, { excludeHeldOut: true });
  const host = patchify(images, 4);
  const codec = new PatchAutoencoder({ patchSize: 4, inChannels: 3, scalingFactor: 1 });
  const g = new Graph();
  const x = g.input('x', 'float32', [2, 3, 64, 64]);
  const z = codec.encode(x);
  g.output(z, 'z');
  g.output(codec.decode(z), 'back');
  const nchw = new Tensor('float32', [2, 3, 64, 64]);
  for (let n = 0; n < 2; n++)
    for (let i = 0; i < 4096; i++)
      for (let c = 0; c < 3; c++)
        nchw.data[(n * 3 + c) * 4096 + i] =
          (images.data as Uint8Array)[(n * 4096 + i) * 3 + c]! / 127.5 - 1;
  const r = await runOnce(emitOnnx(g), { x: nchw });
  assert.deepEqual(r.z!.toArray(), host.toArray());
  assert.deepEqual(r.back!.toArray(), nchw.toArray());
});

test('Min-SNR weights the clean-image error alike whatever the UNet predicts', () => {
  // One example's weighted loss, for the same clean-image estimate written as each prediction.
  const x0 = [0.3, -1.2, 0.8];
  const eps = [1.1, 0.4, -0.7];
  const estimate = [0.5, -0.9, 0.2];
  const cap = 5;
  for (const alphaBar of [0.9995, 0.9, 0.5, 0.1, 0.002]) {
    const [a, s] = [Math.sqrt(alphaBar), Math.sqrt(1 - alphaBar)];
    const snr = alphaBar / (1 - alphaBar);
    const noisy = x0.map((x, i) => a * x + s * eps[i]!);
    // The ε and v the UNet would output to mean `estimate` at this noisy point.
    const epsHat = noisy.map((z, i) => (z - a * estimate[i]!) / s);
    const vHat = noisy.map((z, i) => (a * z - estimate[i]!) / s);
    const squared = (p: number[], q: number[]) => p.reduce((t, v, i) => t + (v - q[i]!) ** 2, 0);
    const clean = squared(estimate, x0);
    const sample = minSnrWeight(snr, cap, 'sample') * clean;
    assert.ok(Math.abs(sample - Math.min(1 + snr, cap) * clean) < 1e-12);
    const v =
      minSnrWeight(snr, cap, 'v_prediction') *
      squared(
        vHat,
        x0.map((x, i) => a * eps[i]! - s * x),
      );
    assert.ok(Math.abs(v - sample) < 1e-9 * sample, `v at ᾱ ${alphaBar}: ${v} against ${sample}`);
    const e = minSnrWeight(snr, cap, 'epsilon') * squared(epsHat, eps);
    const expected = Math.min(snr, cap) * clean;
    assert.ok(
      Math.abs(e - expected) < 1e-9 * expected,
      `ε at ᾱ ${alphaBar}: ${e} against ${expected}`,
    );
  }
  assert.equal(minSnrWeight(0, cap, 'epsilon'), 1);
});

test('a very small diffusion model trains: the loss falls over a few dozen steps', async () => {
  const trainer = await Trainer.create(new DiffusionTask(TINY), options(40));
  const losses: number[] = [];
  for (let i = 0; i < 40; i++) losses.push((await trainer.runStep()).loss);
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  assert.ok(
    mean(losses.slice(-8)) < 0.8 * mean(losses.slice(0, 8)),
    `loss ${mean(losses.slice(0, 8))} → ${mean(losses.slice(-8))}`,
  );
  await trainer.release();
});

test('resuming from a checkpoint continues bit for bit', async () => {
  await withTempDir(async (dir) => {
    const straight = await Trainer.create(new DiffusionTask(TINY), options(8));
    for (let i = 0; i < 8; i++) await straight.runStep();
    const first = await Trainer.create(new DiffusionTask(TINY), options(8));
    for (let i = 0; i < 5; i++) await first.runStep();
    await first.save(join(dir, 'state.safetensors'));
    await first.release();
    const resumed = await Trainer.resume(
      join(dir, 'state.safetensors'),
      new DiffusionTask(TINY),
      options(8),
    );
    assert.equal(resumed.step, 5);
    for (let i = 0; i < 3; i++) await resumed.runStep();
    for (const name of ['params', 'adam_m', 'adam_v', 'ema'] as const) {
      assert.deepEqual(
        bytesOf(resumed.state[name]),
        bytesOf(straight.state[name]),
        `${name} differs after resume`,
      );
    }
    await straight.release();
    await resumed.release();
  });
});

test('learning_rate_scales: a parameter moves its scale times as far in a step, by its longest prefix; a prefix naming nothing is refused', async () => {
  const scales = {
    'text_encoder.': 0,
    'text_encoder.text_model.embeddings.token_embedding.': 3,
    'unet.conv_in.': 0.5,
  };
  const before = (await Trainer.create(new DiffusionTask(TINY), options(1))).weights('params');
  const plain = await Trainer.create(new DiffusionTask(TINY), options(1));
  const scaled = await Trainer.create(new DiffusionTask(TINY), {
    ...options(1),
    adam: { ...DEFAULT_ADAMW, learningRateScales: scales },
  });
  await plain.runStep();
  await scaled.runStep();
  const [plainAfter, scaledAfter] = [plain.weights('params'), scaled.weights('params')];
  const seen = new Set<number>();
  for (const [key, start] of Object.entries(before)) {
    const scale = key.startsWith('text_encoder.text_model.embeddings.token_embedding.')
      ? 3
      : key.startsWith('text_encoder.')
        ? 0
        : key.startsWith('unet.conv_in.')
          ? 0.5
          : 1;
    seen.add(scale);
    const a = plainAfter[key]!.data;
    const b = scaledAfter[key]!.data;
    let moved = 0;
    for (let i = 0; i < start.data.length; i++) {
      const want = scale * (a[i]! - start.data[i]!);
      const got = b[i]! - start.data[i]!;
      moved = Math.max(moved, Math.abs(got));
      assert.ok(
        Math.abs(got - want) <= 1e-4 * Math.abs(want) + 2e-7,
        `${key}[${i}] moved ${got}, expected ${scale} × ${a[i]! - start.data[i]!}`,
      );
    }
    if (scale === 0) assert.equal(moved, 0, `${key} moved at scale 0`);
    else assert.ok(moved > 1e-4, `${key} did not move`);
  }
  assert.deepEqual([...seen].sort(), [0, 0.5, 1, 3]);
  await plain.release();
  await scaled.release();
  await assert.rejects(
    Trainer.create(new DiffusionTask(TINY), {
      ...options(1),
      adam: { ...DEFAULT_ADAMW, learningRateScales: { 'unet.no_such_layer': 2 } },
    }),
    /learning_rate_scales names 'unet.no_such_layer', which begins no parameter's name; .*\(text_encoder\., unet\.\)/,
  );
  assert.throws(
    () => resolveTrainConfig({ learning_rate_scales: { 'unet.': -1 } }),
    /'learning_rate_scales' must be a mapping of names to numbers of at least 0/,
  );
  assert.throws(
    () => resolveTrainConfig({ route: 'autoencoder', learning_rate_scales: { 'decoder.': 2 } }),
    /learning_rate_scales applies to the diffusion route only; remove it to train route autoencoder/,
  );
});

test('a trained model folder loads and generates through the ordinary pipeline', async () => {
  await withTempDir(async (dir) => {
    const task = new DiffusionTask(TINY);
    const trainer = await Trainer.create(task, options(3));
    for (let i = 0; i < 3; i++) await trainer.runStep();
    await task.exportModel(join(dir, 'model'), trainer.weights('ema'), { fp16: true });
    // Pixel patches live in [-1, 1], so DDIM and DDPM may clamp x₀ there, as diffusers does.
    assert.equal(ddimClipsSample(join(dir, 'model')), true);
    const pipe = await StableDiffusionPipeline.fromPretrained(join(dir, 'model'), {
      cacheDir: false,
    });
    const { images } = await pipe.generate({ prompt: 'a red circle', steps: 3, seed: 1 });
    assert.deepEqual(images.shape, [1, 64, 64, 3]);
    assert.ok(images.data.every((v) => v >= 0 && v <= 1));
    await pipe.release();
    const unet = await SafetensorsFile.with(
      join(dir, 'model', 'unet', 'diffusion_pytorch_model.safetensors'),
      async (f) => f.info('conv_in.weight'),
    );
    assert.equal(unet.dtype, 'F16');
    await trainer.release();
  });
});

test("init_from: training starts from a model folder's weights (fp16 widened), an added token-mixing window at zero; a different architecture or vocabulary is refused by name", async () => {
  await withTempDir(async (dir) => {
    const task = new DiffusionTask(TINY);
    const trainer = await Trainer.create(task, options(3));
    for (let i = 0; i < 3; i++) await trainer.runStep();
    const trained = trainer.weights('ema');
    await task.exportModel(join(dir, 'model'), trained, { fp16: true });
    await trainer.release();

    const tuned = new DiffusionTask(TINY);
    await tuned.startFrom(join(dir, 'model'));
    const start = tuned.initialParameters(new TorchGenerator(99));
    const fresh = new DiffusionTask(TINY).initialParameters(new TorchGenerator(99));
    assert.equal(start.size, Object.keys(trained).length);
    for (const [key, values] of start) {
      const want = trained[key]!.to('float16').to('float32').data;
      assert.deepEqual(values, want, `${key} is not the folder's weight`);
    }
    assert.notDeepEqual(start.get('unet.conv_in.weight'), fresh.get('unet.conv_in.weight'));
    // Fine-tuning runs: the first step starts from those weights.
    const next = await Trainer.create(tuned, options(2));
    const firstLoss = (await next.runStep()).loss;
    assert.ok(Number.isFinite(firstLoss));
    await next.release();

    // A token-mixing window added to the folder's encoder starts at zero: the same model.
    const mixing = 'text_encoder.text_model.embeddings.token_mixing.weight';
    const mixed = new DiffusionTask({
      ...TINY,
      textEncoder: { ...TINY.textEncoder, gesso_token_mixing: 3 },
    });
    await mixed.startFrom(join(dir, 'model'));
    const mixedStart = mixed.initialParameters(new TorchGenerator(99));
    assert.deepEqual(mixedStart.get(mixing), new Float32Array(16 * 16 * 3));
    for (const [key, values] of start) assert.deepEqual(mixedStart.get(key), values, key);
    const mixedNext = await Trainer.create(mixed, options(2));
    assert.equal((await mixedNext.runStep()).loss, firstLoss);
    await mixedNext.release();

    const wider = new DiffusionTask({
      ...TINY,
      unet: { ...TINY.unet, block_out_channels: [16, 48] },
    });
    await assert.rejects(wider.startFrom(join(dir, 'model')), (e: Error) =>
      /init_from: .* has unet\.\S+ of shape \[[\d, ]+\] where this run's model has \[[\d, ]+\]/.test(
        e.message,
      ),
    );
    const vocab = JSON.parse(readFileSync(join(dir, 'model', 'tokenizer', 'vocab.json'), 'utf8'));
    writeFileSync(
      join(dir, 'model', 'tokenizer', 'vocab.json'),
      JSON.stringify([...(vocab as string[]), 'zebra']),
    );
    await assert.rejects(new DiffusionTask(TINY).startFrom(join(dir, 'model')), (e: Error) =>
      /init_from: .* has a tokenizer of \d+ words that differs/.test(e.message),
    );
  });
});

test('training config: defaults, file fields and flags, with clear errors', () => {
  const c = resolveTrainConfig({ steps: 10, model: { patch_size: 8 } }, { batch_size: 2 });
  assert.equal(c.steps, 10);
  assert.equal(c.batch_size, 2);
  assert.equal(c.model.patch_size, 8);
  assert.equal(c.model.max_length, 24);
  assert.throws(() => resolveTrainConfig({ stepz: 3 }), /unknown training config field 'stepz'/);
  assert.throws(() => resolveTrainConfig({ steps: 2.5 }), /'steps' must be an integer/);
  assert.throws(() => resolveTrainConfig({ decay: 'linear' }), /one of cosine, constant/);
  assert.throws(
    () => resolveTrainConfig({ autoencoder: { edge_wieght: 4 } }),
    /unknown field 'edge_wieght' in training config field 'autoencoder' \(known: vae, kl_weight/,
  );
});

test('every config in configs/ resolves, each recipe writing to a run folder of its own', async () => {
  const dir = join(repoRoot, 'configs');
  const files = readdirSync(dir).filter((f) => f.endsWith('.yaml') || f.endsWith('.json'));
  assert.ok(files.length >= 5, `configs/ holds ${files.length} files`);
  const outs = new Map<string, { file: string; route: string }>();
  const latentSpaces: [string, string][] = [];
  for (const file of files) {
    const config = resolveTrainConfig(await readTrainConfigFile(join(dir, file)));
    assert.ok(
      !outs.has(config.out),
      `${file} and ${outs.get(config.out)?.file} both write ${config.out}`,
    );
    outs.set(config.out, { file, route: config.route });
    if (config.vae_from !== '') latentSpaces.push([file, config.vae_from]);
  }
  // A latent recipe's autoencoder is a bundled model's or one that an autoencoder config here trains.
  for (const [file, from] of latentSpaces) {
    const run = from.replace(/\/model$/, '');
    assert.ok(
      from.startsWith('models/') || outs.get(run)?.route === 'autoencoder',
      `${file}: vae_from ${from} is made by no config in configs/`,
    );
  }
});

const BIN = join(repoRoot, 'dist', 'src', 'cli', 'main.js');

test('gesso train: Ctrl-C saves, --resume finishes, and the result equals an uninterrupted run', async () => {
  await withTempDir(async (dir) => {
    const config = {
      steps: 12,
      batch_size: TINY.batchSize,
      save_every: 100,
      sample_every: 0,
      warmup_steps: 2,
      model: {
        patch_size: TINY.patchSize,
        max_length: TINY.maxLength,
        text_encoder: TINY.textEncoder,
        unet: TINY.unet,
        noise: TINY.noise,
      },
    };
    writeFileSync(
      join(dir, 'tiny.yaml'),
      Object.entries(config)
        .map(([k, v]) => `${k}: ${JSON.stringify(v)}`)
        .join('\n'),
    );
    const straight = spawnSync(
      process.execPath,
      [BIN, 'train', '--config', join(dir, 'tiny.yaml'), '--out', join(dir, 'a')],
      { encoding: 'utf8' },
    );
    assert.equal(straight.status, 0, straight.stderr);

    /** Starts a run into `out` and resolves once it has logged a few steps. */
    const startRun = async (out: string) => {
      const child = spawn(
        process.execPath,
        [BIN, 'train', '--config', join(dir, 'tiny.yaml'), '--out', out],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      const run = { child, stderr: '' };
      child.stderr.on('data', (d: Buffer) => {
        run.stderr += d.toString();
      });
      for (let i = 0; i < 1200; i++) {
        const log = join(out, 'log.jsonl');
        if (existsSync(log) && readFileSync(log, 'utf8').trim().split('\n').length >= 3) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      return run;
    };
    /** Waits for an interrupted run's exit; it must have saved, and says at which step. */
    const savedStep = async (run: { child: ChildProcess; stderr: string }) => {
      // 'close', not 'exit': the output is all read only once the pipes close.
      const code = await new Promise<number | null>((resolve) => run.child.on('close', resolve));
      assert.equal(code, 130, run.stderr);
      assert.match(run.stderr, /saved at step \d+; continue with: gesso train --resume/);
      return Number(/saved at step (\d+)/.exec(run.stderr)![1]);
    };

    const run = await startRun(join(dir, 'b'));
    // The steps run in a child process with glibc's malloc thresholds fixed (src/cli/tuned-malloc.ts).
    const tuned = tunedMallocEnvironment({}) !== undefined;
    if (tuned) {
      const environ = readFileSync(`/proc/${trainingProcess(run.child)}/environ`, 'utf8');
      // glibc cuts its copy of the variable at the first ':' as it parses it, so the start is what
      // /proc shows of it.
      const first = tunedMallocEnvironment({})!.GLIBC_TUNABLES!.split(':')[0]!;
      assert.ok(
        environ.split('\0').some((e) => e.startsWith(`GLIBC_TUNABLES=${first}`)),
        `the training process's environment: ${environ}`,
      );
    }
    run.child.kill('SIGINT');
    const stoppedAt = await savedStep(run);
    assert.ok(stoppedAt >= 3 && stoppedAt < 12, `stopped at ${stoppedAt}`);

    // An interrupt sent to every gesso process at once (pkill -f, a process group) still saves
    // (whether the two arrive apart is up to timing; interruptHandler's own test holds the rule).
    if (tuned) {
      const both = await startRun(join(dir, 'c'));
      process.kill(trainingProcess(both.child), 'SIGINT');
      both.child.kill('SIGINT');
      assert.ok((await savedStep(both)) >= 3);
    }

    // A run folder that was moved resumes where it now is.
    renameSync(join(dir, 'b'), join(dir, 'moved'));
    const resumed = spawnSync(
      process.execPath,
      [BIN, 'train', '--resume', '--out', join(dir, 'moved')],
      { encoding: 'utf8' },
    );
    assert.equal(resumed.status, 0, resumed.stderr);
    assert.ok(!existsSync(join(dir, 'b')), 'the resumed run wrote to the folder it was moved from');
    for (const file of [
      'text_encoder/model.safetensors',
      'unet/diffusion_pytorch_model.safetensors',
    ]) {
      assert.deepEqual(
        readFileSync(join(dir, 'moved', 'model', file)),
        readFileSync(join(dir, 'a', 'model', file)),
        `${file} differs from the uninterrupted run`,
      );
    }
    const again = spawnSync(
      process.execPath,
      [BIN, 'train', '--config', join(dir, 'tiny.yaml'), '--out', join(dir, 'a')],
      { encoding: 'utf8' },
    );
    assert.equal(again.status, 2);
    assert.match(again.stderr, /already holds a run; continue it with --resume/);
  });
});

test('the trained text encoder is bidirectional: an early token sees a later one', async () => {
  await withTempDir(async (dir) => {
    const task = new DiffusionTask(TINY);
    const trainer = await Trainer.create(task, options(1));
    await task.exportModel(dir, trainer.weights('params'));
    await trainer.release();
    const encoder = await TextEncoder.load(join(dir, 'text_encoder'), { cacheDir: false });
    const ids = (caption: string) =>
      Tensor.int64([1, TINY.maxLength], task.tokenizer.encode(caption));
    const a = (await encoder.encode(ids('a red circle'))).hidden;
    const b = (await encoder.encode(ids('a red square'))).hidden;
    const width = a.shape[2]!;
    // Position 1 ("a"; 0 is the start token) comes before the word that differs.
    let change = 0;
    for (let i = width; i < 2 * width; i++)
      change = Math.max(change, Math.abs(a.data[i]! - b.data[i]!));
    assert.ok(change > 1e-4, `position 1 did not change (${change}): the encoder is causal`);
    await encoder.release();
  });
});

/** Draws one image with the model in `dir`: 2 steps, seed 4, at size × size. */
async function drawWith(
  dir: string,
  size: number,
  prompt = 'a red circle in the top left corner',
  guidance?: number,
) {
  const pipe = await StableDiffusionPipeline.fromPretrained(dir, { cacheDir: false });
  const { images } = await pipe.generate({
    prompt,
    steps: 2,
    seed: 4,
    width: size,
    height: size,
    ...(guidance === undefined ? {} : { guidance }),
  });
  await pipe.release();
  return images;
}

for (const { key, parameters, shapes } of [
  {
    key: 'gesso_position_embedding',
    parameters: ['unet.position_embedding'],
    shapes: [[1, 16, 8, 8]],
  },
  {
    key: 'gesso_text_layout',
    parameters: ['unet.text_layout.weight', 'unet.text_layout.bias'],
    shapes: [[16 * 8 * 8, 16], [16 * 8 * 8]],
  },
]) {
  test(`${key}: zero at the start, trained, resized for other sizes, nothing when zero`, async () => {
    await withTempDir(async (dir) => {
      const extended = new DiffusionTask({ ...TINY, unet: { ...TINY.unet, [key]: true } });
      assert.throws(
        () =>
          new DiffusionTask({ ...TINY, unet: { ...TINY.unet, [key]: true, sample_size: null } }),
        new RegExp(`unet config: ${key} needs sample_size`),
      );
      assert.deepEqual(
        parameters.map((name) => extended.shapes.get(name)),
        shapes,
      );
      const trainer = await Trainer.create(extended, options(3));
      for (let i = 0; i < 3; i++) await trainer.runStep();
      const trained = trainer.weights('params');
      await trainer.release();
      for (const name of parameters)
        assert.ok(
          trained[name]!.data.some((v) => v !== 0),
          `${name} (zero at the start) got no gradient`,
        );

      // The same weights three ways: as trained; the addition zeroed; without it at all.
      await extended.exportModel(join(dir, 'trained'), trained);
      const zeros = Object.fromEntries(
        parameters.map((name) => [name, new Tensor('float32', trained[name]!.shape)]),
      );
      await extended.exportModel(join(dir, 'zeroed'), { ...trained, ...zeros });
      const rest = Object.fromEntries(
        Object.entries(trained).filter(([name]) => !parameters.includes(name)),
      );
      await new DiffusionTask(TINY).exportModel(join(dir, 'none'), rest);
      const [trained64, zeroed64, none64] = await Promise.all(
        ['trained', 'zeroed', 'none'].map((m) => drawWith(join(dir, m), 64)),
      );
      assert.deepEqual(zeroed64!.data, none64!.data);
      assert.ok(
        trained64!.data.some((v, i) => Math.abs(v - zeroed64!.data[i]!) > 1e-4),
        `the trained ${key} changed nothing`,
      );
      // At twice the size each cell's value covers 2×2 latents.
      const trained128 = await drawWith(join(dir, 'trained'), 128);
      assert.deepEqual(trained128.shape, [1, 128, 128, 3]);
      assert.ok(trained128.data.every((v) => Number.isFinite(v) && v >= 0 && v <= 1));
    });
  });
}

test('gesso_patch_size: the UNet runs on the latents folded into p×p patches, as a UNet of p² the channels on the folded grid', async () => {
  const unet = { ...TINY.unet, in_channels: 3, out_channels: 3, gesso_text_layout: true };
  const build = (config: Record<string, unknown>) =>
    new UNet2DConditionModel(unetConfig({ ...unet, ...config }), { fusedAttention: false });
  const patched = build({ sample_size: 8, gesso_patch_size: 2 });
  const folded = build({ in_channels: 12, out_channels: 12, sample_size: 4 });
  assert.deepEqual([...patched.namedParameters()], [...folded.namedParameters()]);
  assert.deepEqual(patched.namedParameters().get('conv_in.weight'), [16, 12, 3, 3]);
  assert.deepEqual(patched.namedParameters().get('text_layout.bias'), [16 * 4 * 4]);
  assert.throws(
    () => build({ sample_size: 9, gesso_patch_size: 2 }),
    /sample_size \(latents per side\), a multiple of gesso_patch_size 2/,
  );
  assert.throws(
    () => build({ gesso_patch_size: 1.5 }),
    /gesso_patch_size must be a positive integer/,
  );

  const random = new TorchGenerator(5);
  const weights = WeightSet.fromTensors(
    Object.fromEntries(
      [...patched.namedParameters()].map(([name, shape]) => [
        name,
        map(random.randn(shape), (v) => 0.3 * v),
      ]),
    ),
  );
  const inputs = {
    sample: random.randn([2, 3, 8, 8]),
    timestep: new Tensor('float32', [2], new Float32Array([10, 700])),
    context: random.randn([2, 5, 16]),
  };
  const run = async (module: UNet2DConditionModel, fold: boolean) => {
    const graph = new Graph('patch');
    const sample = graph.input('sample', 'float32', [2, 3, 8, 8]);
    const out = module.forward(weights.bind(module).parameters(graph), {
      sample: fold ? op.spaceToDepth(sample, 2) : sample,
      timestep: graph.input('timestep', 'float32', [2]),
      encoderHiddenStates: graph.input('context', 'float32', [2, 5, 16]),
    });
    graph.output(fold ? op.depthToSpace(out, 2) : out, 'out');
    return (await runOnce(emitOnnx(graph), inputs)).out!.toFloat32();
  };
  const [viaPatches, viaFolded] = await Promise.all([run(patched, false), run(folded, true)]);
  assert.deepEqual(viaPatches.shape, [2, 3, 8, 8]);
  assert.ok(viaPatches.data.some((v) => Math.abs(v) > 1e-3));
  assertClose(viaPatches, viaFolded, { atol: 1e-5, rtol: 0 });
});

test('gesso_patch_size: a patched model trains, generates through the pipeline, and refuses sizes its patches do not divide', async () => {
  await withTempDir(async (dir) => {
    const task = new DiffusionTask({ ...TINY, unet: { ...TINY.unet, gesso_patch_size: 2 } });
    assert.deepEqual(task.shapes.get('unet.conv_out.weight'), [192 * 4, 16, 3, 3]);
    const trainer = await Trainer.create(task, options(3));
    for (let i = 0; i < 3; i++) await trainer.runStep();
    await task.exportModel(join(dir, 'model'), trainer.weights('ema'));
    await trainer.release();
    const image = await drawWith(join(dir, 'model'), 64);
    assert.deepEqual(image.shape, [1, 64, 64, 3]);
    assert.ok(image.data.every((v) => Number.isFinite(v) && v >= 0 && v <= 1));
    // 8-pixel latents in 2×2 patches: 72 pixels is 9 latents, which 2×2 patches do not tile.
    await assert.rejects(
      drawWith(join(dir, 'model'), 72),
      /width 72 must be a positive multiple of 16/,
    );
  });
});

test('gesso_text_layout: its bias is a position embedding, its weight reads the caption', async () => {
  await withTempDir(async (dir) => {
    const layout = new DiffusionTask({ ...TINY, unet: { ...TINY.unet, gesso_text_layout: true } });
    const embedded = new DiffusionTask({
      ...TINY,
      unet: { ...TINY.unet, gesso_position_embedding: true },
    });
    const trainer = await Trainer.create(layout, options(1));
    const weights = trainer.weights('params');
    await trainer.release();
    const rest = Object.fromEntries(
      Object.entries(weights).filter(([name]) => !name.startsWith('unet.text_layout.')),
    );
    const random = new TorchGenerator(9);
    const cells = random.randn([16 * 8 * 8]);
    const weight = random.randn([16 * 8 * 8, 16]);
    // The layout's bias laid out [C, H, W] per cell equals that position embedding.
    await layout.exportModel(join(dir, 'bias'), {
      ...rest,
      'unet.text_layout.weight': new Tensor('float32', [16 * 8 * 8, 16]),
      'unet.text_layout.bias': cells,
    });
    await embedded.exportModel(join(dir, 'embedding'), {
      ...rest,
      'unet.position_embedding': cells.reshape([1, 16, 8, 8]),
    });
    const [bias, embedding] = await Promise.all([
      drawWith(join(dir, 'bias'), 64),
      drawWith(join(dir, 'embedding'), 64),
    ]);
    assert.ok(
      bias.data.every((v, i) => Math.abs(v - embedding.data[i]!) < 1e-5),
      'a layout with zero weight differs from the position embedding its bias spells',
    );
    // With a weight, the layout is W · (the mean of the caption's text states) + b: spelled out
    // by hand as a position embedding, it draws the same image (without guidance, whose empty
    // caption would get a layout of its own).
    const prompt = 'a red circle at the bottom';
    await layout.exportModel(join(dir, 'weight'), {
      ...rest,
      'unet.text_layout.weight': weight,
      'unet.text_layout.bias': cells,
    });
    const encoder = await TextEncoder.load(join(dir, 'weight', 'text_encoder'), {
      cacheDir: false,
    });
    const states = (
      await encoder.encode(Tensor.int64([1, TINY.maxLength], layout.tokenizer.encode(prompt)))
    ).hidden;
    await encoder.release();
    const [, length, width] = states.shape as [number, number, number];
    const byHand = cells.clone();
    for (let r = 0; r < 16 * 8 * 8; r++)
      for (let t = 0; t < length; t++)
        for (let k = 0; k < width; k++)
          byHand.data[r]! += (weight.data[r * width + k]! * states.data[t * width + k]!) / length;
    await embedded.exportModel(join(dir, 'by-hand'), {
      ...rest,
      'unet.position_embedding': byHand.reshape([1, 16, 8, 8]),
    });
    const [fromWeight, fromHand, fromBias] = await Promise.all(
      ['weight', 'by-hand', 'bias'].map((m) => drawWith(join(dir, m), 64, prompt, 1)),
    );
    assert.ok(
      fromWeight!.data.every((v, i) => Math.abs(v - fromHand!.data[i]!) < 1e-4),
      'the layout is not W · mean(text states) + b',
    );
    assert.ok(
      fromWeight!.data.some((v, i) => Math.abs(v - fromBias!.data[i]!) > 1e-3),
      'the layout weight changed nothing',
    );
  });
});

for (const [configKey, what, parameter] of [
  ['gesso_token_embedding_std', 'word', 'token_embedding'],
  ['gesso_position_embedding_std', 'position', 'position_embedding'],
] as const) {
  test(`${configKey}: the ${what} embeddings start with that spread, everything else as before`, () => {
    const key = `text_encoder.text_model.embeddings.${parameter}.weight`;
    const start = (extra: Record<string, unknown>) =>
      new DiffusionTask({
        ...TINY,
        textEncoder: { ...TINY.textEncoder, ...extra },
      }).initialParameters(new TorchGenerator(1));
    const clip = start({});
    const wide = start({ [configKey]: 1 });
    const spread = (values: Float32Array) =>
      Math.sqrt(values.reduce((s, v) => s + v * v, 0) / values.length);
    assert.ok(Math.abs(spread(clip.get(key)!) - 0.02) < 0.002, `CLIP's ${spread(clip.get(key)!)}`);
    assert.ok(Math.abs(spread(wide.get(key)!) - 1) < 0.1, `wide ${spread(wide.get(key)!)}`);
    // The same draws, scaled: every row keeps its direction.
    const ratio = wide.get(key)!.every((v, i) => Math.abs(v - 50 * clip.get(key)![i]!) < 1e-5);
    assert.ok(ratio, 'the wide embeddings are not the same draws scaled');
    for (const [name, values] of clip)
      if (name !== key) assert.deepEqual(wide.get(name), values, `${name} changed`);
    assert.throws(
      () => start({ [configKey]: 0 }),
      new RegExp(`'${configKey}' must be above 0 \\(got 0\\)`),
    );
  });
}

test('gesso_token_mixing: each embedding plus a window over its neighbours, trained, saved, loaded', async () => {
  const config = (extra: Record<string, unknown>) =>
    clipTextConfig({
      ...TINY.textEncoder,
      vocab_size: 10,
      architectures: ['GessoTextModel'],
      ...extra,
    });
  assert.equal(config({}).tokenMixing, 1);
  for (const bad of [2, 0, 1.5])
    assert.throws(
      () => config({ gesso_token_mixing: bad }),
      new RegExp(
        `'gesso_token_mixing' must be an odd whole number of tokens, 1 for none \\(got ${bad}\\)`,
      ),
    );
  const plain = new ClipTextModel(config({}));
  const mixed = new ClipTextModel(config({ gesso_token_mixing: 3 }));
  const name = 'text_model.embeddings.token_mixing.weight';
  assert.deepEqual(mixed.namedParameters().get(name), [16, 16, 1, 3]);
  assert.deepEqual(
    [...mixed.namedParameters()].filter(([n]) => n !== name),
    [...plain.namedParameters()],
  );

  // The embeddings' output by hand: e[s] + Σ_k W[:, :, 0, k] · e[s + k - 1], zero past the ends.
  const random = new TorchGenerator(3);
  const tensors = Object.fromEntries(
    [...mixed.namedParameters()].map(([n, shape]) => [n, random.randn(shape)]),
  );
  const ids = Tensor.int64([1, 5], [4, 7, 1, 9, 2]);
  const graph = new Graph('mixing');
  const out = mixed.forward(
    WeightSet.fromTensors(tensors).bind(mixed).parameters(graph),
    graph.input('ids', 'int64', [1, 5]),
  );
  graph.output(out.hiddenStates[0]!, 'embedded');
  const got = (await runOnce(emitOnnx(graph), { ids })).embedded!.toFloat32();
  const token = tensors['text_model.embeddings.token_embedding.weight']!.data;
  const position = tensors['text_model.embeddings.position_embedding.weight']!.data;
  const w = tensors[name]!.data;
  const e = (s: number, c: number) =>
    s < 0 || s >= 5 ? 0 : token[Number(ids.data[s]) * 16 + c]! + position[s * 16 + c]!;
  const want = new Tensor('float32', [1, 5, 16]);
  for (let s = 0; s < 5; s++)
    for (let o = 0; o < 16; o++) {
      let v = e(s, o);
      for (let i = 0; i < 16; i++)
        for (let k = 0; k < 3; k++) v += w[(o * 16 + i) * 3 + k]! * e(s + k - 1, i);
      want.data[s * 16 + o] = v;
    }
  assertClose(got, want, { atol: 1e-4, rtol: 1e-5 });

  // In a diffusion model: the window gets a gradient and goes out and back in with the model.
  await withTempDir(async (dir) => {
    const task = new DiffusionTask({
      ...TINY,
      textEncoder: { ...TINY.textEncoder, gesso_token_mixing: 3 },
    });
    const trainer = await Trainer.create(task, options(2));
    const start = trainer.weights('params')[`text_encoder.${name}`]!.data.slice();
    for (let i = 0; i < 2; i++) await trainer.runStep();
    const trained = trainer.weights('params')[`text_encoder.${name}`]!.data;
    assert.ok(
      trained.some((v, i) => v !== start[i]),
      'the window did not train',
    );
    await task.exportModel(join(dir, 'model'), trainer.weights('ema'));
    await trainer.release();
    const file = await SafetensorsFile.open(
      join(dir, 'model', 'text_encoder', 'model.safetensors'),
    );
    assert.deepEqual(file.tensors.get(name)?.shape, [16, 16, 1, 3]);
    await file.close();
    const image = await drawWith(join(dir, 'model'), 64);
    assert.ok(image.data.every((v) => Number.isFinite(v) && v >= 0 && v <= 1));
  });
});

test('gesso train chooses glibc malloc thresholds unless the user chose malloc settings', (t) => {
  const base = tunedMallocEnvironment({});
  if (base === undefined) {
    t.skip('not Linux with glibc: gesso train leaves malloc as it is');
    return;
  }
  assert.equal(
    base.GLIBC_TUNABLES,
    'glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296',
  );
  assert.equal(
    tunedMallocEnvironment({ GLIBC_TUNABLES: 'glibc.cpu.x86_shstk=off', HOME: '/h' })
      ?.GLIBC_TUNABLES,
    `glibc.cpu.x86_shstk=off:${base.GLIBC_TUNABLES}`,
  );
  assert.equal(tunedMallocEnvironment({ HOME: '/h' })?.HOME, '/h');
  assert.equal(tunedMallocEnvironment({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' }), undefined);
  assert.equal(tunedMallocEnvironment(base), undefined);
});

test('gesso train: a repeated interrupt within half a second is the same one; a later one quits', () => {
  let time = 0;
  const calls: string[] = [];
  const onSigint = interruptHandler(
    () => calls.push(`stop at ${time}`),
    () => calls.push(`quit at ${time}`),
    () => time,
  );
  onSigint();
  time = 3;
  onSigint();
  time = 499;
  onSigint();
  assert.deepEqual(calls, ['stop at 0']);
  time = 500;
  onSigint();
  assert.deepEqual(calls, ['stop at 0', 'quit at 500']);
});
