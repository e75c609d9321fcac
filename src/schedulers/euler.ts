import { UserError } from '../errors.js';
import { fill, num, randnLike, str, type F32, type Generators } from './scheduler.js';
import { SigmaScheduler } from './sigma.js';

/** diffusers' `EulerDiscreteScheduler` (Karras et al., 2022, Algorithm 2 with s_churn = 0). */
export class EulerDiscreteScheduler extends SigmaScheduler {
  readonly className = 'EulerDiscreteScheduler';

  setTimesteps(steps: number): void {
    if (str(this.config, 'interpolation_type', 'linear') !== 'linear') {
      throw new UserError('unsupported-model', 'gesso supports interpolation_type "linear" only');
    }
    if (str(this.config, 'timestep_type', 'discrete') !== 'discrete') {
      throw new UserError('unsupported-model', 'gesso supports timestep_type "discrete" only');
    }
    const { timesteps, sigmas } = this.sigmaSchedule(steps, {
      karras: this.karras(),
      finalSigmaMin: str(this.config, 'final_sigmas_type', 'zero') === 'sigma_min',
    });
    this.timesteps = timesteps;
    this.sigmas = sigmas;
    this.updateInitNoiseSigma();
    this.resetIndices();
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const index = this.initStepIndex(timestep);
    const sigma = this.sigmas[index]!;
    // diffusers draws this noise whether or not churn uses it; drawing keeps the generator in step.
    if (generator !== undefined) randnLike(modelOutput.shape, generator);
    const churn = num(this.config, 's_churn', 0);
    if (churn !== 0) throw new UserError('unsupported-model', 'gesso runs Euler with s_churn = 0');
    const original = this.predictOriginal(modelOutput, sample, sigma).data;
    const dt = this.sigmas[index + 1]! - sigma;
    const x = sample.data;
    const out = fill(sample.shape, (i) => x[i]! + ((x[i]! - original[i]!) / sigma) * dt);
    this.stepIndexValue = index + 1;
    return out;
  }
}
