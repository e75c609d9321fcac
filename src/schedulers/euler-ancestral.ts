import { fill, predictionType, randnLike, type F32, type Generators } from './scheduler.js';
import { SigmaScheduler } from './sigma.js';

/** diffusers' `EulerAncestralDiscreteScheduler`: Euler steps to σ_down plus fresh noise of σ_up. */
export class EulerAncestralDiscreteScheduler extends SigmaScheduler {
  readonly className = 'EulerAncestralDiscreteScheduler';

  setTimesteps(steps: number): void {
    // diffusers raises for `sample`; x₀ from the model is exactly what the step needs, so allow it.
    predictionType(this.config);
    const { timesteps, sigmas } = this.sigmaSchedule(steps, { karras: false });
    this.timesteps = timesteps;
    this.sigmas = sigmas;
    this.updateInitNoiseSigma();
    this.resetIndices();
  }

  step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32 {
    const index = this.initStepIndex(timestep);
    const from = this.sigmas[index]!;
    const to = this.sigmas[index + 1]!;
    const original = this.predictOriginal(modelOutput, sample, from).data;
    const up = Math.sqrt((to * to * (from * from - to * to)) / (from * from));
    const down = Math.sqrt(to * to - up * up);
    const dt = down - from;
    const x = sample.data;
    const noise = randnLike(modelOutput.shape, generator).data;
    const out = fill(
      sample.shape,
      (i) => x[i]! + ((x[i]! - original[i]!) / from) * dt + noise[i]! * up,
    );
    this.stepIndexValue = index + 1;
    return out;
  }
}
