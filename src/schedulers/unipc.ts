import { UserError } from '../errors.js';
import { bool, fill, num, str, type F32, type SchedulerConfig } from './scheduler.js';
import { MultistepScheduler } from './multistep.js';

/** Solves the small dense system A x = b (Gaussian elimination with partial pivoting). */
function solve(a: number[][], b: number[]): number[] {
  const n = b.length;
  const m = a.map((row, i) => [...row, b[i]!]);
  for (let c = 0; c < n; c++) {
    let pivot = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(m[r]![c]!) > Math.abs(m[pivot]![c]!)) pivot = r;
    [m[c], m[pivot]] = [m[pivot]!, m[c]!];
    for (let r = c + 1; r < n; r++) {
      const k = m[r]![c]! / m[c]![c]!;
      for (let j = c; j <= n; j++) m[r]![j]! -= k * m[c]![j]!;
    }
  }
  const x = new Array<number>(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    let s = m[r]![n]!;
    for (let j = r + 1; j < n; j++) s -= m[r]![j]! * x[j]!;
    x[r] = s / m[r]![r]!;
  }
  return x;
}

/**
 * diffusers' `UniPCMultistepScheduler` (Zhao et al., 2023): a predictor (UniP) and a corrector
 * (UniC) of orders up to `solver_order`, with the B(h) = h (bh1) or eʰ − 1 (bh2) variants.
 */
export class UniPCMultistepScheduler extends MultistepScheduler {
  readonly className = 'UniPCMultistepScheduler';
  private readonly predictX0: boolean;
  private readonly bh: 'bh1' | 'bh2';
  private lastSample: F32 | undefined;
  private thisOrder = 1;

  constructor(config: SchedulerConfig) {
    super(config);
    this.predictX0 = bool(config, 'predict_x0', true);
    const solver = str(config, 'solver_type', 'bh2');
    this.bh = solver === 'bh1' ? 'bh1' : 'bh2';
    if (config.solver_p !== undefined && config.solver_p !== null) {
      throw new UserError(
        'unsupported-model',
        'gesso does not support UniPC with an external solver_p',
      );
    }
  }

  setTimesteps(steps: number): void {
    this.schedule(steps, num(this.config, 'num_train_timesteps', 1000), {
      karrasFinalFromSchedule: true,
    });
    this.lastSample = undefined;
    this.thisOrder = 1;
  }

  private disabledCorrector(index: number): boolean {
    const list = this.config.disable_corrector;
    return Array.isArray(list) && list.includes(index);
  }

  step(modelOutput: F32, timestep: number, sample: F32): F32 {
    const index = this.initStepIndex(timestep);
    const useCorrector =
      index > 0 && !this.disabledCorrector(index - 1) && this.lastSample !== undefined;
    const converted = this.convert(modelOutput, sample, this.predictX0);
    let x = sample;
    if (useCorrector) x = this.corrector(converted, this.lastSample!, this.thisOrder, index);
    this.pushModelOutput(converted);
    const order = this.solverOrder();
    const thisOrder = bool(this.config, 'lower_order_final', true)
      ? Math.min(order, this.timesteps.length - index)
      : order;
    this.thisOrder = Math.min(thisOrder, this.lowerOrderNums + 1);
    this.lastSample = x;
    const out = this.predictor(x, this.thisOrder, index);
    if (this.lowerOrderNums < order) this.lowerOrderNums += 1;
    this.stepIndexValue = index + 1;
    return out;
  }

  /** The coefficient system shared by predictor and corrector. */
  private coefficients(h: number, rks: number[], order: number) {
    const hh = this.predictX0 ? -h : h;
    const hPhi1 = Math.expm1(hh);
    let hPhiK = hPhi1 / hh - 1;
    let factorial = 1;
    const bH = this.bh === 'bh1' ? hh : Math.expm1(hh);
    const R: number[][] = [];
    const b: number[] = [];
    for (let i = 1; i <= order; i++) {
      R.push(rks.map((r) => r ** (i - 1)));
      b.push((hPhiK * factorial) / bH);
      factorial *= i + 1;
      hPhiK = hPhiK / hh - 1 / factorial;
    }
    return { hPhi1, bH, R, b };
  }

  private predictor(sample: F32, order: number, index: number): F32 {
    const outs = this.modelOutputs;
    const m0 = outs[outs.length - 1]!.data;
    const t = this.alphaSigma(this.sigmas[index + 1]!);
    const s0 = this.alphaSigma(this.sigmas[index]!);
    const h = t.lambda - s0.lambda;
    const rks: number[] = [];
    const d1s: Float32Array[] = [];
    for (let i = 1; i < order; i++) {
      const mi = outs[outs.length - 1 - i]!.data;
      const rk = (this.alphaSigma(this.sigmas[index - i]!).lambda - s0.lambda) / h;
      rks.push(rk);
      d1s.push(Float32Array.from(mi, (v, j) => (v - m0[j]!) / rk));
    }
    rks.push(1);
    const { hPhi1, bH, R, b } = this.coefficients(h, rks, order);
    let rhos: number[] = [];
    if (d1s.length > 0) {
      rhos =
        order === 2
          ? [0.5]
          : solve(
              R.slice(0, -1).map((row) => row.slice(0, -1)),
              b.slice(0, -1),
            );
    }
    const x = sample.data;
    return fill(sample.shape, (i) => {
      let res = 0;
      for (let k = 0; k < d1s.length; k++) res += rhos[k]! * d1s[k]![i]!;
      return this.predictX0
        ? (t.sigma / s0.sigma) * x[i]! - t.alpha * hPhi1 * m0[i]! - t.alpha * bH * res
        : (t.alpha / s0.alpha) * x[i]! - t.sigma * hPhi1 * m0[i]! - t.sigma * bH * res;
    });
  }

  private corrector(modelT: F32, lastSample: F32, order: number, index: number): F32 {
    const outs = this.modelOutputs;
    const m0 = outs[outs.length - 1]!.data;
    const t = this.alphaSigma(this.sigmas[index]!);
    const s0 = this.alphaSigma(this.sigmas[index - 1]!);
    const h = t.lambda - s0.lambda;
    const rks: number[] = [];
    const d1s: Float32Array[] = [];
    for (let i = 1; i < order; i++) {
      const mi = outs[outs.length - 1 - i]!.data;
      const rk = (this.alphaSigma(this.sigmas[index - (i + 1)]!).lambda - s0.lambda) / h;
      rks.push(rk);
      d1s.push(Float32Array.from(mi, (v, j) => (v - m0[j]!) / rk));
    }
    rks.push(1);
    const { hPhi1, bH, R, b } = this.coefficients(h, rks, order);
    const rhos = order === 1 ? [0.5] : solve(R, b);
    const x = lastSample.data;
    const mt = modelT.data;
    return fill(lastSample.shape, (i) => {
      let res = 0;
      for (let k = 0; k < d1s.length; k++) res += rhos[k]! * d1s[k]![i]!;
      const d1t = mt[i]! - m0[i]!;
      const rhoLast = rhos[rhos.length - 1]!;
      return this.predictX0
        ? (t.sigma / s0.sigma) * x[i]! -
            t.alpha * hPhi1 * m0[i]! -
            t.alpha * bH * (res + rhoLast * d1t)
        : (t.alpha / s0.alpha) * x[i]! -
            t.sigma * hPhi1 * m0[i]! -
            t.sigma * bH * (res + rhoLast * d1t);
    });
  }
}
