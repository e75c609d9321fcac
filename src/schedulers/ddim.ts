import { addNoiseAt, clipOriginal, integerTimesteps, predictOriginalAndEpsilon } from './alpha.js';
import {
  alphasCumprodFor,
  bool,
  fill,
  num,
  predictionType,
  randnLike,
  Scheduler,
  type F32,
  type Generators,
  type SchedulerConfig,
} from './scheduler.js';

/** diffusers' `DDIMScheduler` (Song et al., 2020), deterministic at eta = 0. */
export class DDIMScheduler extends Scheduler {
  readonly className = 'DDIMScheduler';
  readonly alphasCumprod: Float32Array;
  private readonly finalAlphaCumprod: number;
  /** Stochasticity η: 0 is DDIM, 1 is DDPM-like. */
  eta = 0;
  private steps = 0;

  constructor(config: SchedulerConfig) {
    super(config);
    this.alphasCumprod = alphasCumprodFor(config);
    this.finalAlphaCumprod = bool(config, 'set_alpha_to_one', true) ? 1 : this.alphasCumprod[0]!;
  }

  setTimesteps(steps: number): void {
    this.steps = steps;
    this.timesteps = integerTimesteps(this.config, steps, 'leading');
    this.resetIndices();
  }

  private alphaAt(t: number): number {
    return t >= 0 ? this.alphasCumprod[t]! : this.finalAlphaCumprod;
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const prev = timestep - Math.floor(num(this.config, 'num_train_timesteps', 1000) / this.steps);
    const alphaProd = this.alphaAt(timestep);
    const alphaPrev = this.alphaAt(prev);
    const predicted = predictOriginalAndEpsilon(
      predictionType(this.config),
      modelOutput,
      sample,
      alphaProd,
    );
    const original = clipOriginal(this.config, predicted.original, true);
    const variance = ((1 - alphaPrev) / (1 - alphaProd)) * (1 - alphaProd / alphaPrev);
    const std = this.eta * Math.sqrt(variance);
    const x0 = original.data;
    const eps = predicted.epsilon.data;
    const a = Math.sqrt(alphaPrev);
    const direction = Math.sqrt(1 - alphaPrev - std * std);
    let prevSample = fill(sample.shape, (i) => a * x0[i]! + direction * eps[i]!);
    if (this.eta > 0) {
      const noise = randnLike(modelOutput.shape, generator).data;
      const p = prevSample.data;
      prevSample = fill(sample.shape, (i) => p[i]! + std * noise[i]!);
    }
    this.stepIndexValue = (this.stepIndexValue ?? this.indexForTimestep(timestep)) + 1;
    return prevSample;
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    return addNoiseAt(this.alphasCumprod, original, noise, timestep);
  }
}
