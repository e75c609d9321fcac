import { UserError } from '../errors.js';
import { thresholdSample } from './alpha.js';
import {
  alphasCumprodFor,
  arange,
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
 * What DPM-Solver and UniPC share: integer timesteps (of n + 1 points, the last dropped), sigmas
 * with a final 0, and the conversion σ → (α_t, σ_t, λ_t) of the data-prediction solvers.
 */
export abstract class MultistepScheduler extends Scheduler {
  readonly alphasCumprod: Float32Array;
  sigmas: number[] = [];
  protected readonly trainSigmas: Float32Array;
  protected readonly logSigmas: Float32Array;
  protected modelOutputs: (F32 | undefined)[] = [];
  protected lowerOrderNums = 0;

  constructor(config: SchedulerConfig) {
    super(config);
    this.alphasCumprod = alphasCumprodFor(config);
    this.trainSigmas = trainingSigmas(this.alphasCumprod);
    this.logSigmas = logFloat32(this.trainSigmas);
  }

  protected solverOrder(): number {
    return num(this.config, 'solver_order', 2);
  }

  /** Timesteps and sigmas as DPM-Solver / UniPC compute them. */
  protected schedule(
    steps: number,
    lastTimestep: number,
    options: { karrasFinalFromSchedule: boolean },
  ): void {
    const total = num(this.config, 'num_train_timesteps', 1000);
    if (!Number.isInteger(steps) || steps < 1)
      throw new UserError('bad-steps', `steps must be a positive integer (got ${steps})`);
    const spacing = str(this.config, 'timestep_spacing', 'linspace');
    let timesteps: number[];
    if (spacing === 'linspace') {
      timesteps = linspace(0, lastTimestep - 1, steps + 1)
        .map(roundHalfEven)
        .reverse()
        .slice(0, -1);
    } else if (spacing === 'leading') {
      const ratio = Math.floor(lastTimestep / (steps + 1));
      const offset = num(this.config, 'steps_offset', 0);
      timesteps = arange(0, steps + 1)
        .map((i) => i * ratio)
        .reverse()
        .slice(0, -1)
        .map((t) => t + offset);
    } else if (spacing === 'trailing') {
      timesteps = arange(lastTimestep, 0, -total / steps).map((t) => roundHalfEven(t) - 1);
    } else
      throw new UserError(
        'bad-config',
        `timestep_spacing '${spacing}' is not one of linspace, leading, trailing`,
      );

    const finalSigmaMin = str(this.config, 'final_sigmas_type', 'zero') === 'sigma_min';
    let sigmas: number[];
    if (this.config.use_karras_sigmas === true) {
      // σ_min and σ_max of the training schedule (diffusers passes it flipped, largest first).
      const min =
        typeof this.config.sigma_min === 'number' ? this.config.sigma_min : this.trainSigmas[0]!;
      const max =
        typeof this.config.sigma_max === 'number'
          ? this.config.sigma_max
          : this.trainSigmas[this.trainSigmas.length - 1]!;
      sigmas = karrasSigmas(min, max, steps);
      timesteps = sigmas.map((s) => roundHalfEven(sigmaToT(s, this.logSigmas)));
      const last = finalSigmaMin
        ? options.karrasFinalFromSchedule
          ? sigmas[sigmas.length - 1]!
          : Math.sqrt((1 - this.alphasCumprod[0]!) / this.alphasCumprod[0]!)
        : 0;
      sigmas = [...sigmas, last];
    } else {
      sigmas = timesteps.map((t) => interpIndex(t, this.trainSigmas));
      sigmas.push(
        finalSigmaMin ? Math.sqrt((1 - this.alphasCumprod[0]!) / this.alphasCumprod[0]!) : 0,
      );
    }
    this.sigmas = sigmas.map(Math.fround);
    this.timesteps = timesteps;
    this.modelOutputs = new Array<F32 | undefined>(this.solverOrder()).fill(undefined);
    this.lowerOrderNums = 0;
    this.resetIndices();
  }

  /** α_t = 1/√(σ²+1), σ_t = σ·α_t, λ = log α_t − log σ_t. */
  protected alphaSigma(sigma: number): { alpha: number; sigma: number; lambda: number } {
    const alpha = Math.fround(1 / Math.sqrt(sigma * sigma + 1));
    const s = Math.fround(sigma * alpha);
    return { alpha, sigma: s, lambda: Math.fround(Math.log(alpha)) - Math.fround(Math.log(s)) };
  }

  /** The model output as a data (x₀) prediction, or as noise, at the current step's σ. */
  protected convert(modelOutput: F32, sample: F32, toData: boolean): F32 {
    const { alpha, sigma } = this.alphaSigma(this.sigmas[this.stepIndexValue!]!);
    const m = modelOutput.data;
    const x = sample.data;
    const p = str(this.config, 'prediction_type', 'epsilon');
    let data: F32;
    if (p === 'epsilon') data = fill(sample.shape, (i) => (x[i]! - sigma * m[i]!) / alpha);
    else if (p === 'sample') data = modelOutput;
    else if (p === 'v_prediction') data = fill(sample.shape, (i) => alpha * x[i]! - sigma * m[i]!);
    else throw new UserError('bad-config', `unknown prediction_type '${p}'`);
    if (toData)
      return this.config.thresholding === true ? thresholdSample(data, this.config) : data;
    if (p === 'epsilon' && this.config.thresholding !== true) return modelOutput;
    const d = (this.config.thresholding === true ? thresholdSample(data, this.config) : data).data;
    return fill(sample.shape, (i) => (x[i]! - alpha * d[i]!) / sigma);
  }

  protected pushModelOutput(output: F32): void {
    this.modelOutputs.shift();
    this.modelOutputs.push(output);
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    const index = this.beginIndexValue ?? this.stepIndexValue ?? this.indexForTimestep(timestep);
    const { alpha, sigma } = this.alphaSigma(this.sigmas[index]!);
    const o = original.data;
    const n = noise.data;
    return fill(original.shape, (i) => alpha * o[i]! + sigma * n[i]!);
  }
}
