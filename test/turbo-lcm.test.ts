import assert from 'node:assert/strict';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, golden, needsGolden, withTempDir } from './helpers.js';

/**
 * Turbo and LCM folders run with their own scheduler configs. The expected latents are worked out
 * here from the formulas (float64 noise schedule, the UNet called directly), not by the pipeline's
 * scheduler code: one step from pure noise lands on the model's clean-latent estimate.
 */

/** ᾱ at timestep t for SD's scaled-linear betas (0.00085 → 0.012 over 1000 steps). */
function alphaBar(t: number): number {
  let product = 1;
  for (let i = 0; i <= t; i++) {
    const beta = (Math.sqrt(0.00085) + ((Math.sqrt(0.012) - Math.sqrt(0.00085)) * i) / 999) ** 2;
    product *= 1 - beta;
  }
  return product;
}

const randn = (shape: number[], seed: number) => new TorchGenerator(seed).randn(shape);

const combine = (a: Tensor<'float32'>, b: Tensor<'float32'>, fa: number, fb: number) =>
  new Tensor(
    'float32',
    a.shape,
    a.data.map((v, i) => fa * v + fb * b.data[i]!),
  );

async function setScheduler(dir: string, config: Record<string, unknown>): Promise<void> {
  await writeFile(join(dir, 'scheduler', 'scheduler_config.json'), JSON.stringify(config));
}

test(
  'a Turbo folder (Euler a, trailing spacing): 1 step at guidance 0 gives the model’s x₀',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      // sd2-tiny (v-prediction) with SDXL-Turbo's scheduler settings.
      await cp(golden('sd2-tiny', 'sd2-tiny'), dir, { recursive: true });
      await setScheduler(dir, {
        _class_name: 'EulerAncestralDiscreteScheduler',
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: 'scaled_linear',
        num_train_timesteps: 1000,
        prediction_type: 'v_prediction',
        steps_offset: 1,
        timestep_spacing: 'trailing',
      });
      const pipe = await StableDiffusionPipeline.fromPretrained(dir, { cacheDir: false });
      const latentsIn = randn([1, 4, 16, 16], 5);
      const result = await pipe.generate({
        prompt: 'a red circle',
        steps: 1,
        guidance: 0,
        seed: 1,
        latents: latentsIn,
      });
      // Trailing spacing: the one step is t = 999; the start is noise × σ_max; Euler a to σ = 0
      // adds no noise and lands on x₀ = x/(σ²+1) − v·σ/√(σ²+1). Guidance 0 means no negative pass.
      const a = alphaBar(999);
      const sigma = Math.sqrt((1 - a) / a);
      const x = combine(latentsIn, latentsIn, sigma, 0);
      const { embeddings } = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false);
      const v = await pipe.unet.predict({
        sample: combine(x, x, 1 / Math.sqrt(sigma ** 2 + 1), 0),
        timestep: Tensor.float32([1], [999]),
        encoderHiddenStates: embeddings,
      });
      const expected = combine(x, v, 1 / (sigma ** 2 + 1), -sigma / Math.sqrt(sigma ** 2 + 1));
      assertClose(result.latents, expected, { atol: 1e-4, rtol: 1e-4 }, 'turbo latents');
      await pipe.release();
    });
  },
);

/** diffusers' `get_guidance_scale_embedding` in float64: sin and cos of 1000·w at log-spaced rates. */
function guidanceEmbedding(w: number, dim: number): number[] {
  const half = dim / 2;
  const rates = Array.from({ length: half }, (_, i) =>
    Math.exp((-i * Math.log(10000)) / (half - 1)),
  );
  return [...rates.map((r) => Math.sin(1000 * w * r)), ...rates.map((r) => Math.cos(1000 * w * r))];
}

test(
  'an LCM folder (distilled UNet with a guidance embedding): 1 step gives the model’s x₀',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      await cp(golden('sd1-tiny', 'sd-tiny'), dir, {
        recursive: true,
        filter: (p) => !p.includes('.fp16.'),
      });
      // An LCM-distilled UNet: time_cond_proj_dim, and cond_proj feeding w's embedding into the
      // timestep embedding (diffusers' TimestepEmbedding.cond_proj, no bias).
      const unetDir = join(dir, 'unet');
      const config = JSON.parse(await readFile(join(unetDir, 'config.json'), 'utf8')) as Record<
        string,
        unknown
      >;
      const condDim = 16;
      await writeFile(
        join(unetDir, 'config.json'),
        JSON.stringify({ ...config, time_cond_proj_dim: condDim }),
      );
      const file = join(unetDir, 'diffusion_pytorch_model.safetensors');
      const tensors: Record<string, Tensor> = {};
      await SafetensorsFile.with(file, async (f) => {
        for (const name of f.names) tensors[name] = await f.read(name);
      });
      const channels = (config.block_out_channels as number[])[0]!;
      const proj = randn([channels, condDim], 7);
      tensors['time_embedding.cond_proj.weight'] = combine(proj, proj, 0.2, 0);
      await writeSafetensors(file, tensors);
      await setScheduler(dir, {
        _class_name: 'LCMScheduler',
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: 'scaled_linear',
        num_train_timesteps: 1000,
        original_inference_steps: 50,
        prediction_type: 'epsilon',
        set_alpha_to_one: true,
        steps_offset: 1,
        timestep_scaling: 10,
        timestep_spacing: 'leading',
        clip_sample: false,
      });
      const pipe = await StableDiffusionPipeline.fromPretrained(dir, { cacheDir: false });
      const latentsIn = randn([1, 4, 16, 16], 9);
      const guidance = 8;
      const result = await pipe.generate({
        prompt: 'a red circle',
        steps: 1,
        guidance,
        seed: 1,
        latents: latentsIn,
      });
      // LCM's one step from 50 original steps is t = 999; its boundary condition there is
      // c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²) with σ_d = 0.5.
      const t = 999;
      const a = alphaBar(t);
      const { embeddings } = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false);
      const eps = await pipe.unet.predict({
        sample: latentsIn,
        timestep: Tensor.float32([1], [t]),
        encoderHiddenStates: embeddings,
        timestepCond: Tensor.float32([1, condDim], guidanceEmbedding(guidance - 1, condDim)),
      });
      const x0 = combine(latentsIn, eps, 1 / Math.sqrt(a), -Math.sqrt(1 - a) / Math.sqrt(a));
      const scaled = 10 * t;
      const cSkip = 0.25 / (scaled ** 2 + 0.25);
      const cOut = scaled / Math.sqrt(scaled ** 2 + 0.25);
      const expected = combine(x0, latentsIn, cOut, cSkip);
      assertClose(result.latents, expected, { atol: 2e-4, rtol: 1e-3 }, 'lcm latents');
      // The embedding matters: another guidance scale gives other latents.
      const other = await pipe.generate({
        prompt: 'a red circle',
        steps: 1,
        guidance: 2,
        seed: 1,
        latents: latentsIn,
      });
      assert.ok(other.latents.data.some((v, i) => Math.abs(v - result.latents.data[i]!) > 1e-3));
      await pipe.release();
    });
  },
);
