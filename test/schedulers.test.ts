import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import {
  createScheduler,
  displayName,
  normalizeSchedulerName,
  SCHEDULER_NAMES,
} from '../src/schedulers/index.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { assertClose, golden, goldenDir, needsGolden } from './helpers.js';

interface SchedulerMeta {
  scheduler_base_config: Record<string, unknown>;
  schedulers: Record<string, { class: string; extra: Record<string, unknown> }>;
}

const meta: SchedulerMeta | undefined =
  goldenDir === undefined
    ? undefined
    : (
        JSON.parse(readFileSync(golden('sd1-tiny', 'meta.json'), 'utf8')) as {
          scheduler_meta: SchedulerMeta;
        }
      ).scheduler_meta;

/**
 * The golden traces (how they were made, recovered from the files): sample₀ = randn(1,4,8,8) of
 * generator seed 5 × init_noise_sigma; model output at call i = 0.1·x + 0.5·sin(0.7·x + i) of the
 * scaled input x; ancestral noise from generator seed 11. Tolerance: 1e-5 of each tensor's scale.
 */
for (const name of Object.keys(meta?.schedulers ?? { golden: 0 })) {
  test(
    `scheduler ${name}: timesteps, sigmas and full traces for ε and v, 1/4/20/50 steps`,
    needsGolden(),
    async () => {
      const info = meta!.schedulers[name]!;
      await SafetensorsFile.with(
        golden('sd1-tiny', `scheduler_${name}.safetensors`),
        async (file) => {
          let checked = 0;
          for (const prediction of ['epsilon', 'v_prediction']) {
            for (const steps of [1, 4, 20, 50]) {
              const prefix = `${name}_${prediction}_${steps}_`;
              const scheduler = createScheduler(
                { ...meta!.scheduler_base_config, ...info.extra, prediction_type: prediction },
                info.class,
              );
              scheduler.setTimesteps(steps);
              const timesteps = (await file.read(`${prefix}timesteps`)).toArray();
              assert.deepEqual(
                scheduler.timesteps.map(Math.fround),
                timesteps.map(Math.fround),
                `${prefix}timesteps`,
              );
              if (file.has(`${prefix}sigmas`)) {
                const sigmas = (await file.read(`${prefix}sigmas`)).toFloat32();
                const ours = (scheduler as unknown as { sigmas: number[] }).sigmas;
                assertClose(
                  Tensor.float32([ours.length], ours),
                  sigmas,
                  { rtol: 1e-5, atol: 1e-9 },
                  `${prefix}sigmas`,
                );
              }
              const initSigma = (await file.read(`${prefix}init_noise_sigma`)).toArray()[0]!;
              assert.ok(
                Math.abs(scheduler.initNoiseSigma - initSigma) <= 1e-5 * initSigma,
                `${prefix}init_noise_sigma`,
              );

              const inputs = (await file.read(`${prefix}scaled_inputs`)).toFloat32();
              const trace = (await file.read(`${prefix}trace`)).toFloat32();
              assert.equal(inputs.shape[0], scheduler.timesteps.length);
              const scale = (t: Tensor<'float32'>) =>
                t.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
              const tolIn = 1e-5 * scale(inputs);
              const tolTrace = 1e-5 * scale(trace);
              let sample = new TorchGenerator(5).randn([1, 4, 8, 8]);
              sample = new Tensor(
                'float32',
                sample.shape,
                sample.data.map((v) => v * scheduler.initNoiseSigma),
              );
              const noise = new TorchGenerator(11);
              for (const [i, t] of scheduler.timesteps.entries()) {
                const input = scheduler.scaleModelInput(sample, t);
                const output = new Tensor(
                  'float32',
                  input.shape,
                  input.data.map((x) => 0.1 * x + 0.5 * Math.sin(0.7 * x + i)),
                );
                sample = scheduler.step(output, t, sample, noise);
                const size = 256;
                assertClose(
                  input,
                  new Tensor(
                    'float32',
                    input.shape,
                    inputs.data.subarray(i * size, (i + 1) * size),
                  ),
                  { atol: tolIn },
                  `${prefix}input ${i}`,
                );
                assertClose(
                  sample,
                  new Tensor(
                    'float32',
                    sample.shape,
                    trace.data.subarray(i * size, (i + 1) * size),
                  ),
                  { atol: tolTrace },
                  `${prefix}step ${i}`,
                );
                checked++;
              }
            }
          }
          assert.ok(checked >= 150, `${checked} steps compared`);
        },
      );
    },
  );
}

const sd = {
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  num_train_timesteps: 1000,
};

test('timestep spacings: leading (+offset), trailing, linspace', () => {
  const ts = (spacing: string, cls = 'DDIMScheduler') => {
    const s = createScheduler({ ...sd, timestep_spacing: spacing, steps_offset: 1 }, cls);
    s.setTimesteps(10);
    return s.timesteps;
  };
  assert.deepEqual(ts('leading'), [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
  assert.deepEqual(ts('trailing'), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
  assert.deepEqual(ts('linspace'), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
  // Euler keeps fractional linspace timesteps.
  const euler = ts('linspace', 'EulerDiscreteScheduler');
  assert.equal(euler[1], Math.fround(999 - 111));
  assert.equal(ts('trailing', 'EulerDiscreteScheduler')[0], 999);
});

test('Karras sigmas run from σ_max to σ_min with ρ = 7', () => {
  const s = createScheduler(
    { ...sd, _class_name: 'EulerDiscreteScheduler' },
    'euler_karras',
  ) as unknown as {
    setTimesteps(n: number): void;
    sigmas: number[];
  };
  s.setTimesteps(5);
  const plain = createScheduler(
    { ...sd, _class_name: 'EulerDiscreteScheduler' },
    'euler',
  ) as unknown as typeof s;
  plain.setTimesteps(5);
  const max = plain.sigmas[0]!;
  const min = plain.sigmas[4]!;
  assert.ok(Math.abs(s.sigmas[0]! - max) < 1e-5 * max);
  assert.ok(Math.abs(s.sigmas[4]! - min) < 1e-5 * min);
  const mid = (max ** (1 / 7) + 0.5 * (min ** (1 / 7) - max ** (1 / 7))) ** 7;
  assert.ok(Math.abs(s.sigmas[2]! - mid) < 1e-5 * mid);
  assert.equal(s.sigmas[5], 0);
});

test('prediction type "sample": one hand-checked DDIM and Euler step', () => {
  const x = Tensor.float32([1, 1, 1, 2], [1.0, -2.0]);
  const x0 = Tensor.float32([1, 1, 1, 2], [0.5, 0.25]);
  const ddim = createScheduler(
    { ...sd, prediction_type: 'sample', clip_sample: false, set_alpha_to_one: false },
    'ddim',
  );
  ddim.setTimesteps(4);
  const t = ddim.timesteps[1]!; // 500, previous 250
  const ac = (ddim as unknown as { alphasCumprod: Float32Array }).alphasCumprod;
  const out = ddim.step(x0, t, x);
  for (let i = 0; i < 2; i++) {
    const eps = (x.data[i]! - Math.sqrt(ac[t]!) * x0.data[i]!) / Math.sqrt(1 - ac[t]!);
    const expected = Math.sqrt(ac[t - 250]!) * x0.data[i]! + Math.sqrt(1 - ac[t - 250]!) * eps;
    assert.ok(Math.abs(out.data[i]! - expected) < 1e-5, `ddim element ${i}`);
  }
  const euler = createScheduler({ ...sd, prediction_type: 'sample' }, 'euler') as unknown as {
    setTimesteps(n: number): void;
    timesteps: number[];
    sigmas: number[];
    step(m: Tensor<'float32'>, t: number, s: Tensor<'float32'>): Tensor<'float32'>;
  };
  euler.setTimesteps(4);
  const [s0, s1] = euler.sigmas as [number, number];
  const e = euler.step(x0, euler.timesteps[0]!, x);
  for (let i = 0; i < 2; i++) {
    const expected = x.data[i]! + ((x.data[i]! - x0.data[i]!) / s0) * (s1 - s0);
    assert.ok(Math.abs(e.data[i]! - expected) < 1e-4, `euler element ${i}`);
  }
});

test('prediction type "sample": every scheduler lands on the x₀ a model keeps predicting', () => {
  // A model that always answers x₀ = target: a full sampling loop must end at the target (the
  // schedulers that stop short of σ = 0, like PNDM without set_alpha_to_one, end within ~σ_min).
  const target = Tensor.float32([1, 1, 2, 2], [0.5, -0.25, 0.9, -1]);
  for (const name of SCHEDULER_NAMES) {
    if (name === 'lcm') continue; // LCM needs a distilled model's guidance embedding, not a config
    const scheduler = createScheduler(
      {
        ...sd,
        beta_schedule: 'squaredcos_cap_v2',
        prediction_type: 'sample',
        timestep_spacing: 'trailing',
      },
      name,
    );
    scheduler.setTimesteps(20);
    const generator = new TorchGenerator(3);
    let x = Tensor.float32(
      target.shape,
      generator.randn(target.shape).data.map((v) => v * scheduler.initNoiseSigma),
    );
    for (const t of scheduler.timesteps) x = scheduler.step(target, t, x, generator);
    for (let i = 0; i < 4; i++)
      assert.ok(
        Math.abs(x.data[i]! - target.data[i]!) < 0.03,
        `${name}: element ${i} ends at ${x.data[i]}, target ${target.data[i]}`,
      );
  }
});

test('add_noise: √ᾱ·x + √(1−ᾱ)·ε for DDPM-style, x + σ·ε for sigma schedulers', () => {
  const x = Tensor.float32([1, 1, 1, 1], [2]);
  const n = Tensor.float32([1, 1, 1, 1], [1]);
  const ddim = createScheduler(sd, 'ddim');
  ddim.setTimesteps(10);
  const ac = (ddim as unknown as { alphasCumprod: Float32Array }).alphasCumprod[501]!;
  assert.ok(
    Math.abs(ddim.addNoise(x, n, 501).data[0]! - (2 * Math.sqrt(ac) + Math.sqrt(1 - ac))) < 1e-6,
  );
  const euler = createScheduler(sd, 'euler') as unknown as {
    setTimesteps(n: number): void;
    sigmas: number[];
    timesteps: number[];
    addNoise: typeof ddim.addNoise;
  };
  euler.setTimesteps(10);
  assert.ok(
    Math.abs(euler.addNoise(x, n, euler.timesteps[3]!).data[0]! - (2 + euler.sigmas[3]!)) < 1e-5,
  );
});

test('names users know map to schedulers; unknown names are refused with the list', () => {
  assert.equal(normalizeSchedulerName('DPM++ 2M Karras'), 'dpmpp_2m_karras');
  assert.equal(normalizeSchedulerName('Euler a'), 'euler_a');
  assert.equal(normalizeSchedulerName('k_euler'), 'euler');
  for (const name of SCHEDULER_NAMES) {
    const s = createScheduler(sd, name);
    s.setTimesteps(8);
    assert.ok(s.timesteps.length >= 8, name);
  }
  assert.equal(createScheduler(sd, 'DPM++ 2M Karras').config.use_karras_sigmas, true);
  assert.equal(createScheduler(sd, 'euler_a').className, 'EulerAncestralDiscreteScheduler');
  assert.equal(createScheduler({ ...sd, _class_name: 'DDIMScheduler' }).className, 'DDIMScheduler');
  assert.equal(displayName('euler_a'), 'Euler a');
  assert.equal(displayName('dpmpp_2m_karras'), 'DPM++ 2M Karras');
  assert.throws(
    () => createScheduler(sd, 'warp_drive'),
    /unknown scheduler 'warp_drive'; use one of: ddim/,
  );
  // Sigma spacings gesso lacks are refused, at their false defaults accepted.
  for (const key of ['use_exponential_sigmas', 'use_beta_sigmas', 'use_flow_sigmas'])
    assert.throws(
      () => createScheduler({ ...sd, _class_name: 'EulerDiscreteScheduler', [key]: true }),
      new RegExp(`does not support the scheduler config ${key} = true`),
      key,
    );
  assert.equal(
    createScheduler(sd, 'euler', { use_exponential_sigmas: false, use_beta_sigmas: false })
      .className,
    'EulerDiscreteScheduler',
  );
  assert.throws(() => createScheduler(sd, 'ddim').setTimesteps(0), /positive integer/);
  assert.throws(() => createScheduler(sd, 'ddim').setTimesteps(1001), /more than the 1000/);
});
