import { UserError } from '../errors.js';
import { addNoiseAt, clipOriginal, integerTimesteps, predictOriginalAndEpsilon } from './alpha.js';
import {
  alphasCumprodFor,
  fill,
  num,
  predictionType,
  randnLike,
  Scheduler,
  str,
  type F32,
  type Generators,
  type SchedulerConfig,
} from './scheduler.js';

/** diffusers' `DDPMScheduler` (Ho et al., 2020): ancestral sampling with fixed variances. */
export class DDPMScheduler extends Scheduler {
  readonly className = 'DDPMScheduler';
  readonly alphasCumprod: Float32Array;
  private steps = 0;

  constructor(config: SchedulerConfig) {
    super(config);
    this.alphasCumprod = alphasCumprodFor(config);
    const variance = str(config, 'variance_type', 'fixed_small');
    if (!['fixed_small', 'fixed_small_log', 'fixed_large', 'fixed_large_log'].includes(variance)) {
      throw new UserError(
        'unsupported-model',
        `gesso's DDPM scheduler does not support variance_type '${variance}'`,
      );
    }
  }

  setTimesteps(steps: number): void {
    this.steps = steps;
    this.timesteps = integerTimesteps(this.config, steps, 'leading');
    this.resetIndices();
  }

  private previous(t: number): number {
    return t - Math.floor(num(this.config, 'num_train_timesteps', 1000) / this.steps);
  }

  private variance(t: number): number {
    const prev = this.previous(t);
    const alphaProd = this.alphasCumprod[t]!;
    const alphaPrev = prev >= 0 ? this.alphasCumprod[prev]! : 1;
    const beta = 1 - alphaProd / alphaPrev;
    const small = Math.max(((1 - alphaPrev) / (1 - alphaProd)) * beta, 1e-20);
    switch (str(this.config, 'variance_type', 'fixed_small')) {
      case 'fixed_small_log':
        return Math.exp(0.5 * Math.log(small)); // used as a standard deviation directly
      case 'fixed_large':
        return beta;
      case 'fixed_large_log':
        return Math.log(beta);
      default:
        return small;
    }
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const t = timestep;
    const prev = this.previous(t);
    const alphaProd = this.alphasCumprod[t]!;
    const alphaPrev = prev >= 0 ? this.alphasCumprod[prev]! : 1;
    const currentAlpha = alphaProd / alphaPrev;
    const currentBeta = 1 - currentAlpha;
    const predicted = predictOriginalAndEpsilon(
      predictionType(this.config),
      modelOutput,
      sample,
      alphaProd,
    );
    const x0 = clipOriginal(this.config, predicted.original, true).data;
    const originalCoeff = (Math.sqrt(alphaPrev) * currentBeta) / (1 - alphaProd);
    const sampleCoeff = (Math.sqrt(currentAlpha) * (1 - alphaPrev)) / (1 - alphaProd);
    const x = sample.data;
    let out = fill(sample.shape, (i) => originalCoeff * x0[i]! + sampleCoeff * x[i]!);
    if (t > 0) {
      const noise = randnLike(modelOutput.shape, generator).data;
      const v = this.variance(t);
      const std =
        str(this.config, 'variance_type', 'fixed_small') === 'fixed_small_log' ? v : Math.sqrt(v);
      const p = out.data;
      out = fill(sample.shape, (i) => p[i]! + std * noise[i]!);
    }
    this.stepIndexValue = (this.stepIndexValue ?? this.indexForTimestep(timestep)) + 1;
    return out;
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    return addNoiseAt(this.alphasCumprod, original, noise, timestep);
  }
}
