import { UserError } from '../errors.js';
import {
  alphasCumprodFor,
  arange,
  bool,
  fill,
  interpIndex,
  karrasSigmas,
  linspace,
  logFloat32,
  num,
  roundHalfEven,
  Scheduler,
  sigmaToT,
  str,
  trainingSigmas,
  type F32,
  type SchedulerConfig,
} from './scheduler.js';

/**
 * The base of the k-diffusion style schedulers (Euler, Euler ancestral, Heun, LMS): a decreasing
 * list of sigmas with a final 0, model inputs scaled by 1/√(σ² + 1), and x₀ predictions from ε or v.
 */

/** diffusers' float timestep spacings (`linspace` unrounded, `leading`, `trailing`), as float32. */
export function floatTimesteps(
  config: SchedulerConfig,
  steps: number,
  defaultSpacing = 'linspace',
): number[] {
  const total = num(config, 'num_train_timesteps', 1000);
  if (!Number.isInteger(steps) || steps < 1)
    throw new UserError('bad-steps', `steps must be a positive integer (got ${steps})`);
  const spacing = str(config, 'timestep_spacing', defaultSpacing);
  let ts: number[];
  if (spacing === 'linspace') ts = linspace(0, total - 1, steps).reverse();
  else if (spacing === 'leading') {
    const ratio = Math.floor(total / steps);
    const offset = num(config, 'steps_offset', 0);
    ts = arange(0, steps)
      .map((i) => roundHalfEven(i * ratio))
      .reverse()
      .map((t) => Math.fround(t) + offset);
  } else if (spacing === 'trailing') {
    ts = arange(total, 0, -total / steps).map((t) => roundHalfEven(t) - 1);
  } else
    throw new UserError(
      'bad-config',
      `timestep_spacing '${spacing}' is not one of linspace, leading, trailing`,
    );
  return ts.map(Math.fround);
}

export abstract class SigmaScheduler extends Scheduler {
  readonly alphasCumprod: Float32Array;
  /** σ per step, then a final 0 (or σ_min); float32 values. */
  sigmas: number[] = [];
  protected readonly trainSigmas: Float32Array;
  protected readonly logSigmas: Float32Array;

  constructor(config: SchedulerConfig) {
    super(config);
    this.alphasCumprod = alphasCumprodFor(config);
    this.trainSigmas = trainingSigmas(this.alphasCumprod);
    this.logSigmas = logFloat32(this.trainSigmas);
  }

  /** Timesteps and sigmas for `steps` steps, with Karras sigmas when the config asks. */
  protected sigmaSchedule(
    steps: number,
    options: { karras: boolean; finalSigmaMin?: boolean },
  ): { timesteps: number[]; sigmas: number[] } {
    let timesteps = floatTimesteps(this.config, steps);
    let sigmas = timesteps.map((t) => interpIndex(t, this.trainSigmas));
    if (options.karras) {
      const min =
        typeof this.config.sigma_min === 'number'
          ? this.config.sigma_min
          : sigmas[sigmas.length - 1]!;
      const max = typeof this.config.sigma_max === 'number' ? this.config.sigma_max : sigmas[0]!;
      sigmas = karrasSigmas(min, max, steps);
      timesteps = sigmas.map((s) => Math.fround(sigmaToT(s, this.logSigmas)));
    }
    const last =
      options.finalSigmaMin === true
        ? Math.sqrt((1 - this.alphasCumprod[0]!) / this.alphasCumprod[0]!)
        : 0;
    return { timesteps, sigmas: [...sigmas, last].map(Math.fround) };
  }

  /** The starting noise scale: σ_max, or √(σ_max² + 1) with `leading` spacing (as diffusers). */
  protected updateInitNoiseSigma(): void {
    const max = Math.max(...this.sigmas);
    const spacing = str(this.config, 'timestep_spacing', 'linspace');
    this.initNoiseSigma = Math.fround(
      spacing === 'linspace' || spacing === 'trailing' ? max : Math.sqrt(max * max + 1),
    );
  }

  override scaleModelInput(sample: F32, timestep: number): F32 {
    const sigma = this.sigmas[this.initStepIndex(timestep)]!;
    const scale = Math.sqrt(sigma * sigma + 1);
    const x = sample.data;
    return fill(sample.shape, (i) => x[i]! / scale);
  }

  /** x₀ from the model output at σ. */
  protected predictOriginal(modelOutput: F32, sample: F32, sigma: number, sigmaInput = sigma): F32 {
    const m = modelOutput.data;
    const x = sample.data;
    const p = str(this.config, 'prediction_type', 'epsilon');
    if (p === 'epsilon') return fill(sample.shape, (i) => x[i]! - sigmaInput * m[i]!);
    if (p === 'v_prediction') {
      const c = -sigmaInput / Math.sqrt(sigmaInput * sigmaInput + 1);
      const d = 1 / (sigmaInput * sigmaInput + 1);
      return fill(sample.shape, (i) => m[i]! * c + x[i]! * d);
    }
    if (p === 'sample' || p === 'original_sample') return modelOutput;
    throw new UserError('bad-config', `unknown prediction_type '${p}'`);
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    const index = this.beginIndexValue ?? this.stepIndexValue ?? this.indexForTimestep(timestep);
    const sigma = this.sigmas[index]!;
    const o = original.data;
    const n = noise.data;
    return fill(original.shape, (i) => o[i]! + n[i]! * sigma);
  }

  protected karras(): boolean {
    return bool(this.config, 'use_karras_sigmas', false);
  }
}
