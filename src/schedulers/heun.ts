import { bool, fill, num, type F32 } from './scheduler.js';
import { SigmaScheduler } from './sigma.js';

/**
 * diffusers' `HeunDiscreteScheduler` (Karras et al., 2022, Algorithm 1): two model calls per step,
 * an Euler prediction then its trapezoidal correction; sigmas and timesteps are repeated to match.
 */
export class HeunDiscreteScheduler extends SigmaScheduler {
  readonly className = 'HeunDiscreteScheduler';
  override readonly order = 2;
  private prevDerivative: F32 | undefined;
  private dt: number | undefined;
  private savedSample: F32 | undefined;

  setTimesteps(steps: number): void {
    const { timesteps, sigmas } = this.sigmaSchedule(steps, { karras: this.karras() });
    this.sigmas = [
      sigmas[0]!,
      ...sigmas.slice(1, -1).flatMap((s) => [s, s]),
      sigmas[sigmas.length - 1]!,
    ];
    this.timesteps = [timesteps[0]!, ...timesteps.slice(1).flatMap((t) => [t, t])];
    this.prevDerivative = undefined;
    this.dt = undefined;
    this.savedSample = undefined;
    this.updateInitNoiseSigma();
    this.resetIndices();
  }

  /** True between the two model calls of a step. */
  get inSecondOrder(): boolean {
    return this.dt !== undefined;
  }

  step(modelOutput: F32, timestep: number, sample: F32): F32 {
    const index = this.initStepIndex(timestep);
    const first = this.dt === undefined;
    const sigma = first ? this.sigmas[index]! : this.sigmas[index - 1]!;
    const sigmaNext = first ? this.sigmas[index + 1]! : this.sigmas[index]!;
    let original = this.predictOriginal(modelOutput, sample, sigma, first ? sigma : sigmaNext);
    if (bool(this.config, 'clip_sample', false)) {
      const r = num(this.config, 'clip_sample_range', 1);
      const o = original.data;
      original = fill(sample.shape, (i) => Math.min(Math.max(o[i]!, -r), r));
    }
    const x = sample.data;
    const x0 = original.data;
    let out: F32;
    if (first) {
      const derivative = fill(sample.shape, (i) => (x[i]! - x0[i]!) / sigma);
      const dt = sigmaNext - sigma;
      this.prevDerivative = derivative;
      this.dt = dt;
      this.savedSample = sample;
      const d = derivative.data;
      out = fill(sample.shape, (i) => x[i]! + d[i]! * dt);
    } else {
      const previous = this.prevDerivative!.data;
      const base = this.savedSample!.data;
      const dt = this.dt!;
      out = fill(
        sample.shape,
        (i) => base[i]! + ((previous[i]! + (x[i]! - x0[i]!) / sigmaNext) / 2) * dt,
      );
      this.prevDerivative = undefined;
      this.dt = undefined;
      this.savedSample = undefined;
    }
    this.stepIndexValue = index + 1;
    return out;
  }
}
