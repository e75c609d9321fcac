import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { UNet } from '../src/pipelines/components.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { Tensor } from '../src/tensor/tensor.js';
import { folderToSingleFile } from '../src/loaders/convert-layout.js';
import { openSingleFile } from '../src/loaders/single-file.js';
import { assertClose, golden, needsGolden, withTempDir } from './helpers.js';

/**
 * Parity with ../shared/golden for the other Stable Diffusion families. sd2-tiny: v-prediction,
 * linear projections, per-block head dims [2, 4], upcast attention, a GELU text encoder whose
 * tokenizer pads with `!`. sdxl-tiny: two text encoders (penultimate states side by side, the
 * second's projected pooled state), `text_time` added conditioning with six time ids,
 * transformer layers per block [1, 2], VAE scaling 0.13025.
 */

interface Run {
  key: string;
  scheduler_class: string;
  extra: Record<string, unknown>;
  steps: number;
  guidance_scale: number;
  generator_seed: number;
}

const FAMILIES = { 'sd2-tiny': 'SD 2.x', 'sdxl-tiny': 'SDXL' } as const;
type Family = keyof typeof FAMILIES;

const specOf = (family: Family) =>
  JSON.parse(readFileSync(golden(family, 'pipeline.json'), 'utf8')) as {
    prompt: string;
    negative_prompt: string;
    runs: Run[];
  };

const read = (family: Family, file: string, name: string) =>
  SafetensorsFile.with(golden(family, file), async (f) => (await f.read(name)).toFloat32());

const maxAbs = (t: Tensor<'float32'>) => t.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/** Every run of the family's pipeline.json, from a folder or a single file. */
async function assertGoldenRuns(family: Family, model: string): Promise<void> {
  const spec = specOf(family);
  const pipe = await StableDiffusionPipeline.fromPretrained(model, { cacheDir: false });
  const latentsIn = await read(family, 'pipeline.safetensors', 'latents_in');
  assert.ok(spec.runs.length >= 4);
  for (const run of spec.runs) {
    // The goldens' DDIM runs use Stability's DDIM settings (clip_sample and set_alpha_to_one
    // off); every other key comes from the folder's scheduler config.
    const ddim = run.scheduler_class === 'DDIMScheduler';
    const result = await pipe.generate({
      prompt: spec.prompt,
      ...(run.guidance_scale > 1 ? { negativePrompt: spec.negative_prompt } : {}),
      steps: run.steps,
      guidance: run.guidance_scale,
      seed: run.generator_seed,
      latents: latentsIn,
      scheduler: run.scheduler_class,
      schedulerConfig: {
        ...run.extra,
        ...(ddim ? { clip_sample: false, set_alpha_to_one: false } : {}),
      },
    });
    // As for SD 1.x: latents within 1e-3 of their scale, images within 2e-3.
    const latents = await read(family, 'pipeline.safetensors', `${run.key}_latents`);
    const where = `${family} ${run.key}`;
    assertClose(result.latents, latents, { atol: 1e-3 * maxAbs(latents) }, `${where} latents`);
    const image = await read(family, 'pipeline.safetensors', `${run.key}_image`);
    assertClose(result.images, image, { atol: 2e-3 }, `${where} image`);
  }
  await pipe.release();
}

for (const [family, name] of Object.entries(FAMILIES) as [Family, string][]) {
  test(`${name} UNet at t = 1, 500, 999`, needsGolden(), async () => {
    const unet = await UNet.load(golden(family, family, 'unet'), { cacheDir: false });
    const sample = await read(family, 'unet.safetensors', 'sample');
    const context = await read(family, 'unet.safetensors', 'encoder_hidden_states');
    const added =
      family === 'sdxl-tiny'
        ? {
            textEmbeds: await read(family, 'unet.safetensors', 'text_embeds'),
            timeIds: await read(family, 'unet.safetensors', 'time_ids'),
          }
        : {};
    const batch = sample.shape[0]!;
    for (const t of [1, 500, 999]) {
      const out = await unet.predict({
        sample,
        timestep: new Tensor('float32', [batch], new Float32Array(batch).fill(t)),
        encoderHiddenStates: context,
        ...added,
      });
      const expected = await read(family, 'unet.safetensors', `out_t${t}`);
      // Float32 rounding: within 1e-4 of the output's scale.
      assertClose(out, expected, { atol: 1e-4 * maxAbs(expected) }, `${family} out_t${t}`);
    }
    await unet.release();
  });

  test(
    `${name} pipeline: every golden run (Euler, DDIM, DPM++ 2M Karras, Euler a, ...)`,
    needsGolden(),
    () => assertGoldenRuns(family, golden(family, family)),
  );

  test(
    `${name} as a single file in the original layout: shapes tell the architecture, outputs unchanged`,
    needsGolden(),
    async () => {
      await withTempDir(async (dir) => {
        const file = join(dir, `${family}.safetensors`);
        await folderToSingleFile(golden(family, family), file);
        // Without the configs gesso records in the header, the shapes alone give every
        // architecture field they determine.
        const inferred = await openSingleFile(file, { storedConfigs: false });
        assert.equal(inferred.family, family === 'sdxl-tiny' ? 'sdxl' : 'sd2');
        // SD 2.x's prediction type comes from the ModelSpec key gesso writes.
        assert.equal(
          inferred.schedulerConfig.prediction_type,
          family === 'sd2-tiny' ? 'v_prediction' : 'epsilon',
        );
        const folderConfig = (part: string) =>
          JSON.parse(readFileSync(golden(family, family, part, 'config.json'), 'utf8')) as Record<
            string,
            unknown
          >;
        const perBlock = (v: unknown, n: number) => (Array.isArray(v) ? v : Array(n).fill(v));
        const unet = folderConfig('unet');
        const got = inferred.components.unet!.config;
        for (const key of [
          'in_channels',
          'out_channels',
          'block_out_channels',
          'layers_per_block',
          'down_block_types',
          'up_block_types',
          'cross_attention_dim',
          'use_linear_projection',
          'addition_embed_type',
          'addition_time_embed_dim',
          'projection_class_embeddings_input_dim',
        ])
          assert.deepEqual(got[key] ?? null, unet[key] ?? null, `unet ${key}`);
        const levels = (unet.block_out_channels as number[]).length;
        assert.deepEqual(
          got.transformer_layers_per_block,
          perBlock(unet.transformer_layers_per_block, levels),
        );
        const vae = folderConfig('vae');
        for (const key of ['block_out_channels', 'layers_per_block', 'latent_channels'])
          assert.deepEqual(inferred.components.vae!.config[key], vae[key], `vae ${key}`);
        for (const part of family === 'sdxl-tiny'
          ? ['text_encoder', 'text_encoder_2']
          : ['text_encoder']) {
          const text = folderConfig(part);
          for (const key of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size'])
            assert.equal(inferred.components[part]!.config[key], text[key], `${part} ${key}`);
        }
        // What shapes cannot tell (this tiny model's head counts and norm groups) the header
        // carries, and the file gives the folder's outputs.
        await assertGoldenRuns(family, file);
      });
    },
  );
}

test(
  'the SD 2.x tokenizer pads with "!" (id 0), as its tokenizer config says',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd2-tiny', 'sd2-tiny'), {
      cacheDir: false,
    });
    const row = Array.from(pipe.tokenize(['a red circle']).data as BigInt64Array, Number);
    const eos = row.indexOf(Math.max(...row));
    assert.ok(eos > 0 && eos < 10, `eos at ${eos}`);
    assert.ok(
      row.slice(eos + 1).every((id) => id === 0),
      'padding after eos is "!" (0)',
    );
    await pipe.release();
  },
);

test(
  'SDXL without a negative prompt conditions on zeros (force_zeros_for_empty_prompt)',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sdxl-tiny', 'sdxl-tiny'), {
      cacheDir: false,
    });
    assert.equal(pipe.forceZerosForEmptyPrompt, true);
    const none = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, true);
    const empty = await pipe.encodePrompts(['a red circle'], [''], 1, 0, true);
    const half = none.embeddings.size / 2;
    assert.ok(none.embeddings.data.subarray(0, half).every((v) => v === 0));
    assert.ok(none.pooled!.data.subarray(0, none.pooled!.size / 2).every((v) => v === 0));
    assert.ok(
      empty.embeddings.data.subarray(0, half).some((v) => v !== 0),
      '"" is encoded',
    );
    // Both encoders' widths side by side: 32 + 32 in this tiny model's config.
    assert.equal(none.embeddings.shape[2], pipe.unet.config.crossAttentionDim[0]);
    await pipe.release();
  },
);
