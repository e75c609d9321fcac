import { UserError } from '../errors.js';
import { addNoiseAt, clipOriginal, predictOriginalAndEpsilon } from './alpha.js';
import {
  alphasCumprodFor,
  arange,
  bool,
  fill,
  linspace,
  num,
  predictionType,
  randnLike,
  Scheduler,
  type F32,
  type Generators,
  type SchedulerConfig,
} from './scheduler.js';

/**
 * diffusers' `LCMScheduler` (Luo et al., 2023): consistency-model steps for LCM-distilled models,
 * timesteps picked from the `original_inference_steps` skipping schedule, fresh noise between steps.
 */
export class LCMScheduler extends Scheduler {
  readonly className = 'LCMScheduler';
  readonly alphasCumprod: Float32Array;
  private readonly finalAlphaCumprod: number;

  constructor(config: SchedulerConfig) {
    super({ beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', ...config });
    this.alphasCumprod = alphasCumprodFor(this.config);
    this.finalAlphaCumprod = bool(this.config, 'set_alpha_to_one', true)
      ? 1
      : this.alphasCumprod[0]!;
  }

  /** `strength` < 1 keeps only the low-noise part of the original schedule (image-to-image). */
  setTimesteps(steps: number, strength = 1): void {
    const total = num(this.config, 'num_train_timesteps', 1000);
    const original = num(this.config, 'original_inference_steps', 50);
    if (original > total)
      throw new UserError(
        'bad-config',
        `original_inference_steps ${original} exceeds ${total} training steps`,
      );
    const k = Math.floor(total / original);
    const origin = arange(1, Math.trunc(original * strength) + 1).map((i) => i * k - 1);
    if (steps > total)
      throw new UserError(
        'bad-steps',
        `${steps} steps is more than the ${total} training timesteps`,
      );
    if (Math.floor(origin.length / steps) < 1) {
      throw new UserError(
        'bad-steps',
        `LCM can take at most ${origin.length} steps here (original_inference_steps × strength)`,
      );
    }
    origin.reverse();
    this.timesteps = linspace(0, origin.length, steps, false).map((x) => origin[Math.floor(x)]!);
    this.resetIndices();
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const index = this.initStepIndex(timestep);
    const prevTimestep = index + 1 < this.timesteps.length ? this.timesteps[index + 1]! : timestep;
    const alphaProd = this.alphasCumprod[timestep]!;
    const alphaPrev =
      prevTimestep >= 0 ? this.alphasCumprod[prevTimestep]! : this.finalAlphaCumprod;
    const scaled = timestep * num(this.config, 'timestep_scaling', 10);
    const sigmaData = 0.5;
    const cSkip = sigmaData ** 2 / (scaled ** 2 + sigmaData ** 2);
    const cOut = scaled / Math.sqrt(scaled ** 2 + sigmaData ** 2);
    const predicted = predictOriginalAndEpsilon(
      predictionType(this.config),
      modelOutput,
      sample,
      alphaProd,
    );
    const x0 = clipOriginal(this.config, predicted.original, false).data;
    const x = sample.data;
    const denoised = fill(sample.shape, (i) => cOut * x0[i]! + cSkip * x[i]!);
    let out = denoised;
    if (index !== this.timesteps.length - 1) {
      const noise = randnLike(modelOutput.shape, generator).data;
      const d = denoised.data;
      const a = Math.sqrt(alphaPrev);
      const b = Math.sqrt(1 - alphaPrev);
      out = fill(sample.shape, (i) => a * d[i]! + b * noise[i]!);
    }
    this.stepIndexValue = index + 1;
    return out;
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    return addNoiseAt(this.alphasCumprod, original, noise, timestep);
  }
}
