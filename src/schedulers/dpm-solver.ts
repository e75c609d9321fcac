import { UserError } from '../errors.js';
import {
  bool,
  fill,
  num,
  randnLike,
  str,
  type F32,
  type Generators,
  type SchedulerConfig,
} from './scheduler.js';
import { MultistepScheduler } from './multistep.js';

/**
 * diffusers' `DPMSolverMultistepScheduler` (Lu et al., 2022): DPM-Solver++ (data prediction) or
 * DPM-Solver (noise prediction), orders 1–3, midpoint or Heun second-order updates, the SDE
 * variants with fresh noise, Karras sigmas, and lower-order final steps.
 */
export class DPMSolverMultistepScheduler extends MultistepScheduler {
  readonly className = 'DPMSolverMultistepScheduler';
  private readonly algorithm: 'dpmsolver++' | 'dpmsolver' | 'sde-dpmsolver++' | 'sde-dpmsolver';
  private readonly solverType: 'midpoint' | 'heun';

  constructor(config: SchedulerConfig) {
    super(config);
    const algorithm = str(config, 'algorithm_type', 'dpmsolver++');
    const normalized = algorithm === 'deis' ? 'dpmsolver++' : algorithm;
    if (!['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++', 'sde-dpmsolver'].includes(normalized)) {
      throw new UserError('bad-config', `unknown DPM-Solver algorithm_type '${algorithm}'`);
    }
    this.algorithm = normalized as typeof this.algorithm;
    // As diffusers: the noise-prediction solvers divide by σ, so they cannot step to σ = 0.
    if (!normalized.endsWith('++') && str(config, 'final_sigmas_type', 'zero') === 'zero') {
      throw new UserError(
        'bad-config',
        `final_sigmas_type 'zero' is not supported for algorithm_type '${algorithm}'; use 'sigma_min'`,
      );
    }
    const solver = str(config, 'solver_type', 'midpoint');
    this.solverType = solver === 'heun' ? 'heun' : 'midpoint';
    if (config.use_lu_lambdas === true)
      throw new UserError('unsupported-model', 'gesso does not support use_lu_lambdas yet');
    if (str(config, 'variance_type', '') !== '' && config.variance_type !== null) {
      throw new UserError(
        'unsupported-model',
        `gesso's DPM-Solver does not support variance_type ${JSON.stringify(config.variance_type)}`,
      );
    }
  }

  private dataPrediction(): boolean {
    return this.algorithm === 'dpmsolver++' || this.algorithm === 'sde-dpmsolver++';
  }

  setTimesteps(steps: number): void {
    const total = num(this.config, 'num_train_timesteps', 1000);
    const minLambda = num(this.config, 'lambda_min_clipped', -Infinity);
    // searchsorted over the flipped λ(t): the number of timesteps whose λ is below the clip.
    let clipped = 0;
    for (let t = total - 1; t >= 0; t--) {
      const a = this.alphasCumprod[t]!;
      const lambda = Math.log(Math.sqrt(a)) - Math.log(Math.sqrt(1 - a));
      if (lambda < minLambda) clipped++;
      else break;
    }
    this.schedule(steps, total - clipped, { karrasFinalFromSchedule: false });
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const index = this.initStepIndex(timestep);
    const n = this.timesteps.length;
    const lowerOrderFinalConfig = bool(this.config, 'lower_order_final', true);
    const lowerFinal =
      index === n - 1 &&
      (bool(this.config, 'euler_at_final', false) ||
        (lowerOrderFinalConfig && n < 15) ||
        str(this.config, 'final_sigmas_type', 'zero') === 'zero');
    const lowerSecond = index === n - 2 && lowerOrderFinalConfig && n < 15;

    const converted = this.convert(modelOutput, sample, this.dataPrediction());
    this.pushModelOutput(converted);
    const noise = this.algorithm.startsWith('sde')
      ? randnLike(modelOutput.shape, generator)
      : undefined;

    const order = this.solverOrder();
    let out: F32;
    if (order === 1 || this.lowerOrderNums < 1 || lowerFinal)
      out = this.firstOrder(converted, sample, index, noise);
    else if (order === 2 || this.lowerOrderNums < 2 || lowerSecond)
      out = this.secondOrder(sample, index, noise);
    else out = this.thirdOrder(sample, index);
    if (this.lowerOrderNums < order) this.lowerOrderNums += 1;
    this.stepIndexValue = index + 1;
    return out;
  }

  private firstOrder(m0: F32, sample: F32, index: number, noise: F32 | undefined): F32 {
    const t = this.alphaSigma(this.sigmas[index + 1]!);
    const s = this.alphaSigma(this.sigmas[index]!);
    const h = t.lambda - s.lambda;
    const x = sample.data;
    const m = m0.data;
    const z = noise?.data;
    switch (this.algorithm) {
      case 'dpmsolver++': {
        const a = t.sigma / s.sigma;
        const b = t.alpha * (Math.exp(-h) - 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m[i]!);
      }
      case 'dpmsolver': {
        const a = t.alpha / s.alpha;
        const b = t.sigma * (Math.exp(h) - 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m[i]!);
      }
      case 'sde-dpmsolver++': {
        const a = (t.sigma / s.sigma) * Math.exp(-h);
        const b = t.alpha * (1 - Math.exp(-2 * h));
        const c = t.sigma * Math.sqrt(1 - Math.exp(-2 * h));
        return fill(sample.shape, (i) => a * x[i]! + b * m[i]! + c * z![i]!);
      }
      case 'sde-dpmsolver': {
        const a = t.alpha / s.alpha;
        const b = 2 * t.sigma * (Math.exp(h) - 1);
        const c = t.sigma * Math.sqrt(Math.exp(2 * h) - 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m[i]! + c * z![i]!);
      }
    }
  }

  private secondOrder(sample: F32, index: number, noise: F32 | undefined): F32 {
    const t = this.alphaSigma(this.sigmas[index + 1]!);
    const s0 = this.alphaSigma(this.sigmas[index]!);
    const s1 = this.alphaSigma(this.sigmas[index - 1]!);
    const m0 = this.modelOutputs[this.modelOutputs.length - 1]!.data;
    const m1 = this.modelOutputs[this.modelOutputs.length - 2]!.data;
    const h = t.lambda - s0.lambda;
    const r0 = (s0.lambda - s1.lambda) / h;
    const d1 = (i: number) => (1 / r0) * (m0[i]! - m1[i]!);
    const x = sample.data;
    const z = noise?.data;
    const midpoint = this.solverType === 'midpoint';
    switch (this.algorithm) {
      case 'dpmsolver++': {
        const a = t.sigma / s0.sigma;
        const b = t.alpha * (Math.exp(-h) - 1);
        const c = midpoint ? -0.5 * b : t.alpha * ((Math.exp(-h) - 1) / h + 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m0[i]! + c * d1(i));
      }
      case 'dpmsolver': {
        const a = t.alpha / s0.alpha;
        const b = t.sigma * (Math.exp(h) - 1);
        const c = midpoint ? 0.5 * b : t.sigma * ((Math.exp(h) - 1) / h - 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m0[i]! - c * d1(i));
      }
      case 'sde-dpmsolver++': {
        const a = (t.sigma / s0.sigma) * Math.exp(-h);
        const b = t.alpha * (1 - Math.exp(-2 * h));
        const c = midpoint ? 0.5 * b : t.alpha * ((1 - Math.exp(-2 * h)) / (-2 * h) + 1);
        const e = t.sigma * Math.sqrt(1 - Math.exp(-2 * h));
        return fill(sample.shape, (i) => a * x[i]! + b * m0[i]! + c * d1(i) + e * z![i]!);
      }
      case 'sde-dpmsolver': {
        const a = t.alpha / s0.alpha;
        const b = 2 * t.sigma * (Math.exp(h) - 1);
        const c = midpoint
          ? t.sigma * (Math.exp(h) - 1)
          : 2 * t.sigma * ((Math.exp(h) - 1) / h - 1);
        const e = t.sigma * Math.sqrt(Math.exp(2 * h) - 1);
        return fill(sample.shape, (i) => a * x[i]! - b * m0[i]! - c * d1(i) + e * z![i]!);
      }
    }
  }

  private thirdOrder(sample: F32, index: number): F32 {
    if (this.algorithm.startsWith('sde')) {
      throw new UserError(
        'bad-config',
        'third-order DPM-Solver has no SDE variant; use solver_order 2',
      );
    }
    const t = this.alphaSigma(this.sigmas[index + 1]!);
    const s0 = this.alphaSigma(this.sigmas[index]!);
    const s1 = this.alphaSigma(this.sigmas[index - 1]!);
    const s2 = this.alphaSigma(this.sigmas[index - 2]!);
    const outs = this.modelOutputs;
    const m0 = outs[outs.length - 1]!.data;
    const m1 = outs[outs.length - 2]!.data;
    const m2 = outs[outs.length - 3]!.data;
    const h = t.lambda - s0.lambda;
    const r0 = (s0.lambda - s1.lambda) / h;
    const r1 = (s1.lambda - s2.lambda) / h;
    const x = sample.data;
    const plus = this.algorithm === 'dpmsolver++';
    const a = plus ? t.sigma / s0.sigma : t.alpha / s0.alpha;
    const b = plus ? t.alpha * (Math.exp(-h) - 1) : t.sigma * (Math.exp(h) - 1);
    const c = plus ? t.alpha * ((Math.exp(-h) - 1) / h + 1) : t.sigma * ((Math.exp(h) - 1) / h - 1);
    const d = plus
      ? t.alpha * ((Math.exp(-h) - 1 + h) / h ** 2 - 0.5)
      : t.sigma * ((Math.exp(h) - 1 - h) / h ** 2 - 0.5);
    return fill(sample.shape, (i) => {
      const d10 = (1 / r0) * (m0[i]! - m1[i]!);
      const d11 = (1 / r1) * (m1[i]! - m2[i]!);
      const D1 = d10 + (r0 / (r0 + r1)) * (d10 - d11);
      const D2 = (1 / (r0 + r1)) * (d10 - d11);
      return plus
        ? a * x[i]! - b * m0[i]! + c * D1 - d * D2
        : a * x[i]! - b * m0[i]! - c * D1 - d * D2;
    });
  }
}
