import { UserError } from '../errors.js';
import { addNoiseAt, integerTimesteps } from './alpha.js';
import {
  alphasCumprodFor,
  arange,
  bool,
  fill,
  num,
  predictionType,
  roundHalfEven,
  Scheduler,
  str,
  type F32,
  type SchedulerConfig,
} from './scheduler.js';

/**
 * diffusers' `PNDMScheduler` (Liu et al., 2022): Runge–Kutta warm-up steps (PRK), then linear
 * multistep (PLMS) over the last four model outputs. Stable Diffusion configs skip the PRK steps.
 */
export class PNDMScheduler extends Scheduler {
  readonly className = 'PNDMScheduler';
  readonly alphasCumprod: Float32Array;
  private readonly finalAlphaCumprod: number;
  private steps = 0;
  private prkTimesteps: number[] = [];
  private ets: F32[] = [];
  private counter = 0;
  private curModelOutput: F32 | undefined;
  private curSample: F32 | undefined;

  constructor(config: SchedulerConfig) {
    super(config);
    this.alphasCumprod = alphasCumprodFor(config);
    this.finalAlphaCumprod = bool(config, 'set_alpha_to_one', false) ? 1 : this.alphasCumprod[0]!;
    predictionType(config);
  }

  setTimesteps(steps: number): void {
    this.steps = steps;
    const total = num(this.config, 'num_train_timesteps', 1000);
    let base: number[];
    if (str(this.config, 'timestep_spacing', 'leading') === 'trailing') {
      // PNDM keeps its base timesteps ascending.
      base = arange(total, 0, -total / steps)
        .map((t) => roundHalfEven(t))
        .reverse()
        .map((t) => t - 1);
    } else {
      base = integerTimesteps(this.config, steps, 'leading').reverse();
    }
    if (bool(this.config, 'skip_prk_steps', false)) {
      this.prkTimesteps = [];
      const plms = [...base.slice(0, -1), ...base.slice(-2, -1), ...base.slice(-1)].reverse();
      this.timesteps = plms;
    } else {
      const half = Math.floor(Math.floor(total / steps) / 2);
      const last = base.slice(-4);
      const prk = last.flatMap((t) => [t, t + half]);
      const repeated = prk
        .slice(0, -1)
        .flatMap((t) => [t, t])
        .slice(1, -1);
      this.prkTimesteps = repeated.reverse();
      this.timesteps = [...this.prkTimesteps, ...base.slice(0, -3).reverse()];
    }
    this.ets = [];
    this.counter = 0;
    this.curModelOutput = undefined;
    this.curSample = undefined;
    this.resetIndices();
  }

  step(modelOutput: F32, timestep: number, sample: F32): F32 {
    const out =
      this.counter < this.prkTimesteps.length && !bool(this.config, 'skip_prk_steps', false)
        ? this.stepPrk(modelOutput, timestep, sample)
        : this.stepPlms(modelOutput, timestep, sample);
    this.counter += 1;
    return out;
  }

  private stride(): number {
    return Math.floor(num(this.config, 'num_train_timesteps', 1000) / this.steps);
  }

  private stepPrk(modelOutput: F32, timestep: number, sample: F32): F32 {
    const diff = this.counter % 2 ? 0 : Math.floor(this.stride() / 2);
    const prev = timestep - diff;
    const t = this.prkTimesteps[Math.floor(this.counter / 4) * 4]!;
    const m = modelOutput.data;
    let output = modelOutput;
    const phase = this.counter % 4;
    const accumulate = (weight: number) => {
      const acc = this.curModelOutput?.data;
      this.curModelOutput = fill(modelOutput.shape, (i) => (acc?.[i] ?? 0) + weight * m[i]!);
    };
    if (phase === 0) {
      accumulate(1 / 6);
      this.ets.push(modelOutput);
      this.curSample = sample;
    } else if (phase === 1 || phase === 2) {
      accumulate(1 / 3);
    } else {
      const acc = this.curModelOutput!.data;
      output = fill(modelOutput.shape, (i) => acc[i]! + (1 / 6) * m[i]!);
      this.curModelOutput = undefined;
    }
    return this.prevSample(this.curSample ?? sample, t, prev, output);
  }

  private stepPlms(modelOutput: F32, timestep: number, sample: F32): F32 {
    if (!bool(this.config, 'skip_prk_steps', false) && this.ets.length < 3) {
      throw new UserError(
        'bad-config',
        'PNDM needs its Runge–Kutta warm-up steps before linear multistep',
      );
    }
    let t = timestep;
    let prev = timestep - this.stride();
    if (this.counter !== 1) {
      this.ets = this.ets.slice(-3);
      this.ets.push(modelOutput);
    } else {
      prev = timestep;
      t = timestep + this.stride();
    }
    const e = this.ets.map((x) => x.data);
    const n = e.length;
    let output: F32;
    let x = sample;
    if (n === 1 && this.counter === 0) {
      output = modelOutput;
      this.curSample = sample;
    } else if (n === 1 && this.counter === 1) {
      const m = modelOutput.data;
      const e1 = e[0]!;
      output = fill(sample.shape, (i) => (m[i]! + e1[i]!) / 2);
      x = this.curSample!;
      this.curSample = undefined;
    } else if (n === 2) {
      output = fill(sample.shape, (i) => (3 * e[1]![i]! - e[0]![i]!) / 2);
    } else if (n === 3) {
      output = fill(sample.shape, (i) => (23 * e[2]![i]! - 16 * e[1]![i]! + 5 * e[0]![i]!) / 12);
    } else {
      output = fill(
        sample.shape,
        (i) => (1 / 24) * (55 * e[3]![i]! - 59 * e[2]![i]! + 37 * e[1]![i]! - 9 * e[0]![i]!),
      );
    }
    return this.prevSample(x, t, prev, output);
  }

  private prevSample(sample: F32, t: number, prev: number, modelOutput: F32): F32 {
    const alphaProd = this.alphasCumprod[t]!;
    const alphaPrev = prev >= 0 ? this.alphasCumprod[prev]! : this.finalAlphaCumprod;
    const betaProd = 1 - alphaProd;
    const betaPrev = 1 - alphaPrev;
    const x = sample.data;
    let m = modelOutput.data;
    const prediction = predictionType(this.config);
    if (prediction === 'v_prediction') {
      const mo = m;
      m = fill(
        sample.shape,
        (i) => Math.sqrt(alphaProd) * mo[i]! + Math.sqrt(betaProd) * x[i]!,
      ).data;
    } else if (prediction === 'sample') {
      // Beyond diffusers (which raises): the noise implied by a predicted x₀, as v is converted.
      const mo = m;
      m = fill(
        sample.shape,
        (i) => (x[i]! - Math.sqrt(alphaProd) * mo[i]!) / Math.sqrt(betaProd),
      ).data;
    }
    const sampleCoeff = Math.sqrt(alphaPrev / alphaProd);
    const denom = alphaProd * Math.sqrt(betaPrev) + Math.sqrt(alphaProd * betaProd * alphaPrev);
    return fill(
      sample.shape,
      (i) => sampleCoeff * x[i]! - ((alphaPrev - alphaProd) * m[i]!) / denom,
    );
  }

  addNoise(original: F32, noise: F32, timestep: number): F32 {
    return addNoiseAt(this.alphasCumprod, original, noise, timestep);
  }
}
