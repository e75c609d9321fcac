import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { readParameters, settingsFromInfotext } from '../src/generation/outputs.js';
import { toUint8 } from '../src/io/image.js';
import { decodePng } from '../src/io/png.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { openSingleFile } from '../src/loaders/single-file.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, fixtures, golden, needsGolden, runGesso, withTempDir } from './helpers.js';

/**
 * Single-file checkpoints with the original CompVis key names. The golden file carries no config:
 * its architecture comes from the tensor shapes and SD 1.x's defaults, and it must give diffusers'
 * outputs. `gesso convert` turns it into a diffusers folder and back without changing a byte.
 */

const FILE = () => golden('single-file', 'sd15-structure-tiny.safetensors');

interface Run {
  key: string;
  scheduler: string;
  steps: number;
  guidance_scale: number;
  generator_seed: number;
}

const spec = () =>
  JSON.parse(readFileSync(golden('single-file', 'pipeline.json'), 'utf8')) as {
    prompt: string;
    negative_prompt: string;
    runs: Run[];
  };

const read = (name: string) =>
  SafetensorsFile.with(golden('single-file', 'pipeline.safetensors'), async (f) =>
    (await f.read(name)).toFloat32(),
  );

const maxAbs = (t: Tensor<'float32'>) => t.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/** Every golden run; the tolerances of the SD 1.x parity issue. */
async function assertGoldenRuns(model: string): Promise<void> {
  const s = spec();
  const pipe = await StableDiffusionPipeline.fromPretrained(model, { cacheDir: false });
  const latentsIn = await read('latents_in');
  assert.equal(s.runs.length, 2);
  for (const run of s.runs) {
    const result = await pipe.generate({
      prompt: s.prompt,
      negativePrompt: s.negative_prompt,
      steps: run.steps,
      guidance: run.guidance_scale,
      seed: run.generator_seed,
      latents: latentsIn,
      scheduler: run.scheduler,
    });
    const latents = await read(`${run.key}_latents`);
    // Latents within 1e-3 of their scale, images within 2e-3 (pixels in [0, 1]).
    assertClose(result.latents, latents, { atol: 1e-3 * maxAbs(latents) }, `${run.key} latents`);
    assertClose(result.images, await read(`${run.key}_image`), { atol: 2e-3 }, `${run.key} image`);
  }
  await pipe.release();
}

test(
  'a single-file SD 1.x checkpoint: the architecture read from its shapes',
  needsGolden(),
  async () => {
    const model = await openSingleFile(FILE());
    assert.equal(model.family, 'sd1');
    const unet = model.components.unet!.config;
    // The README's description of the file: 4 down blocks of 2 layers, attention in the first three.
    assert.deepEqual(unet.down_block_types, [
      'CrossAttnDownBlock2D',
      'CrossAttnDownBlock2D',
      'CrossAttnDownBlock2D',
      'DownBlock2D',
    ]);
    assert.deepEqual(unet.up_block_types, [
      'UpBlock2D',
      'CrossAttnUpBlock2D',
      'CrossAttnUpBlock2D',
      'CrossAttnUpBlock2D',
    ]);
    assert.equal(unet.layers_per_block, 2);
    assert.equal(unet.in_channels, 4);
    assert.equal(unet.use_linear_projection, false);
    const vae = model.components.vae!.config;
    assert.equal((vae.block_out_channels as number[]).length, 4); // downsamples by 8
    assert.equal(vae.scaling_factor, 0.18215);
    assert.equal(model.components.text_encoder!.config.num_hidden_layers, 3);
    assert.equal(model.schedulerConfig._class_name, 'EulerDiscreteScheduler');
    assert.equal(model.schedulerConfig.timestep_spacing, 'leading');
    assert.equal(model.tokenizers.tokenizer!.padToken, '<|endoftext|>');
  },
);

test('a single-file SD 1.x checkpoint gives diffusers’ outputs (Euler, DDIM)', needsGolden(), () =>
  assertGoldenRuns(FILE()),
);

test(
  'gesso convert: single file → diffusers folder → single file, same outputs and bytes',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      const folder = join(dir, 'sd15');
      const back = join(dir, 'sd15-again.safetensors');
      let r = runGesso(['convert', FILE(), folder]);
      assert.equal(r.status, 0, r.stderr);
      await assertGoldenRuns(folder);
      r = runGesso(['convert', folder, back]);
      assert.equal(r.status, 0, r.stderr);
      // Every weight comes back under its original name with the same bytes.
      await SafetensorsFile.with(FILE(), async (original) => {
        await SafetensorsFile.with(back, async (copy) => {
          const dropped = original.names.filter((n) => !copy.tensors.has(n));
          assert.ok(
            dropped.every((n) => n.endsWith('position_ids')),
            `only buffers are dropped: ${dropped.join(', ')}`,
          );
          assert.equal(copy.names.length, original.names.length - dropped.length);
          for (const name of copy.names) {
            assert.deepEqual(
              copy.tensors.get(name)!.shape,
              original.tensors.get(name)!.shape,
              name,
            );
            assert.deepEqual(await copy.readBytes(name), await original.readBytes(name), name);
          }
          assert.equal(copy.metadata['modelspec.architecture'], 'stable-diffusion-v1');
        });
      });
      // Converting to fp16 halves the weights and still runs.
      const half = join(dir, 'sd15-fp16.safetensors');
      r = runGesso(['convert', folder, half, '--dtype', 'fp16']);
      assert.equal(r.status, 0, r.stderr);
      await SafetensorsFile.with(half, async (f) => {
        assert.ok([...f.tensors.values()].every((t) => t.dtype === 'F16'));
      });
    });
  },
);

test(
  'gesso generate --model FILE.safetensors writes the file’s name as the model',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      const r = runGesso([
        'generate',
        '--model',
        FILE(),
        'a red circle',
        '--steps',
        '2',
        '--size',
        '64x64',
        '--seed',
        '3',
        '--out',
        dir,
      ]);
      assert.equal(r.status, 0, r.stderr);
      const manifest = readFileSync(join(dir, 'manifest.jsonl'), 'utf8');
      assert.match(manifest, /"model":"sd15-structure-tiny"/);
    });
  },
);

test('files that are not checkpoints get a clear error, exit status 2', async () => {
  await withTempDir(async (dir) => {
    const lora = join(dir, 'lora.safetensors');
    await writeSafetensors(lora, {
      'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': Tensor.float32([4, 32]),
    });
    let r = runGesso(['generate', '--model', lora, 'a cat']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /not an original-format Stable Diffusion checkpoint.*--lora/);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
    const partial = join(dir, 'unet-only.safetensors');
    await writeSafetensors(partial, {
      'model.diffusion_model.input_blocks.0.0.weight': Tensor.float32([32, 4, 3, 3]),
    });
    r = runGesso(['generate', '--model', partial, 'a cat']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /no text encoder/);
    const broken = join(dir, 'broken.safetensors');
    await writeFile(broken, Buffer.from('not a safetensors file at all'));
    r = runGesso(['generate', '--model', broken, 'a cat']);
    assert.equal(r.status, 2);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  });
});

test(
  'gesso generate --fast-decode: the tiny autoencoder decodes, the metadata says so, --from reproduces it',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      const tiny = join(fixtures, 'taesd-tiny');
      const common = ['--model', FILE(), 'a red circle', '--steps', '2', '--size', '64x64'];
      let r = runGesso([
        'generate',
        ...common,
        '--seed',
        '4',
        '--out',
        join(dir, 'fast'),
        '--fast-decode',
        '--tiny-vae',
        tiny,
      ]);
      assert.equal(r.status, 0, r.stderr);
      r = runGesso(['generate', ...common, '--seed', '4', '--out', join(dir, 'full')]);
      assert.equal(r.status, 0, r.stderr);
      const fastPng = readFileSync(join(dir, 'fast', '00000-4.png'));
      const fast = decodePng(fastPng);
      const full = decodePng(readFileSync(join(dir, 'full', '00000-4.png')));
      assert.notDeepEqual(
        fast.data,
        full.data,
        'the tiny autoencoder draws differently from the VAE',
      );
      const settings = settingsFromInfotext(readParameters(fastPng, 'fast'), 'fast');
      assert.equal(settings.vae, tiny);
      // The library's fast decode of the same latents gives the same pixels.
      const pipe = await StableDiffusionPipeline.fromPretrained(FILE(), {
        cacheDir: false,
        tinyVae: tiny,
      });
      const result = await pipe.generate({
        prompt: 'a red circle',
        steps: 2,
        seed: 4,
        width: 64,
        height: 64,
        promptSyntax: 'a1111',
        guidance: pipe.defaults.guidance,
        fastDecode: true,
      });
      assert.deepEqual(Array.from(fast.data), Array.from(toUint8(result.images).data));
      await pipe.release();
      r = runGesso([
        'generate',
        '--from',
        join(dir, 'fast', '00000-4.png'),
        '--model',
        FILE(),
        '--out',
        join(dir, 'again'),
      ]);
      assert.equal(r.status, 0, r.stderr);
      assert.deepEqual(decodePng(readFileSync(join(dir, 'again', '00000-4.png'))).data, fast.data);
    });
  },
);

test(
  'what real checkpoints carry beside the model (EMA copies, schedule buffers, the VAE’s loss) is passed over',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      const tensors: Record<string, Tensor> = {};
      await SafetensorsFile.with(FILE(), async (f) => {
        for (const name of f.names) tensors[name] = await f.read(name);
      });
      Object.assign(tensors, {
        'model_ema.decay': Tensor.float32([], [0.9999]),
        'model_ema.diffusion_modelinput_blocks00weight': Tensor.float32([32, 4, 3, 3]),
        alphas_cumprod: Tensor.float32([1000]),
        'first_stage_model.loss.logvar': Tensor.float32([]),
        'first_stage_model.loss.discriminator.main.0.weight': Tensor.float32([64, 3, 4, 4]),
        'cond_stage_model.transformer.text_model.embeddings.position_ids': Tensor.int64(
          [1, 77],
          Array.from({ length: 77 }, (_, i) => i),
        ),
      });
      const file = join(dir, 'full.safetensors');
      await writeSafetensors(file, tensors);
      const [clean, full] = [await openSingleFile(FILE()), await openSingleFile(file)];
      for (const role of ['unet', 'vae', 'text_encoder'])
        assert.deepEqual(
          [...full.components[role]!.weights.records.keys()].sort(),
          [...clean.components[role]!.weights.records.keys()].sort(),
          role,
        );
    });
  },
);
