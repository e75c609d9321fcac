import { fill, type F32 } from './scheduler.js';
import { SigmaScheduler } from './sigma.js';

const GAUSS_NODES = [
  -0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526,
];
const GAUSS_WEIGHTS = [
  0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538,
];

/**
 * diffusers' `LMSDiscreteScheduler`: linear multistep over up to four past derivatives, with
 * coefficients that integrate Lagrange polynomials between consecutive sigmas (exactly, here by
 * four-point Gauss–Legendre quadrature, where diffusers calls scipy's quad).
 */
export class LMSDiscreteScheduler extends SigmaScheduler {
  readonly className = 'LMSDiscreteScheduler';
  private derivatives: F32[] = [];

  setTimesteps(steps: number): void {
    const { timesteps, sigmas } = this.sigmaSchedule(steps, { karras: this.karras() });
    this.timesteps = timesteps;
    this.sigmas = sigmas;
    this.derivatives = [];
    this.updateInitNoiseSigma();
    this.resetIndices();
  }

  private coefficient(order: number, t: number, current: number): number {
    const s = this.sigmas;
    const basis = (tau: number) => {
      let prod = 1;
      for (let k = 0; k < order; k++) {
        if (k === current) continue;
        prod *= (tau - s[t - k]!) / (s[t - current]! - s[t - k]!);
      }
      return prod;
    };
    const a = s[t]!;
    const b = s[t + 1]!;
    const half = (b - a) / 2;
    const mid = (a + b) / 2;
    return (
      GAUSS_NODES.reduce((sum, x, i) => sum + GAUSS_WEIGHTS[i]! * basis(mid + half * x), 0) * half
    );
  }

  step(modelOutput: F32, timestep: number, sample: F32, _generator?: unknown, maxOrder = 4): F32 {
    const index = this.initStepIndex(timestep);
    const sigma = this.sigmas[index]!;
    const original = this.predictOriginal(modelOutput, sample, sigma).data;
    const x = sample.data;
    this.derivatives.push(fill(sample.shape, (i) => (x[i]! - original[i]!) / sigma));
    if (this.derivatives.length > maxOrder) this.derivatives.shift();
    const order = Math.min(index + 1, maxOrder);
    const coefficients = Array.from({ length: order }, (_, k) => this.coefficient(order, index, k));
    const recent = [...this.derivatives].reverse();
    const out = fill(sample.shape, (i) => {
      let v = x[i]!;
      for (let k = 0; k < order; k++) v += coefficients[k]! * recent[k]!.data[i]!;
      return v;
    });
    this.stepIndexValue = index + 1;
    return out;
  }
}
