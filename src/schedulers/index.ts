import { UserError } from '../errors.js';
import { DDIMScheduler } from './ddim.js';
import { DDPMScheduler } from './ddpm.js';
import { DPMSolverMultistepScheduler } from './dpm-solver.js';
import { EulerAncestralDiscreteScheduler } from './euler-ancestral.js';
import { EulerDiscreteScheduler } from './euler.js';
import { HeunDiscreteScheduler } from './heun.js';
import { LCMScheduler } from './lcm.js';
import { LMSDiscreteScheduler } from './lms.js';
import { PNDMScheduler } from './pndm.js';
import type { Scheduler, SchedulerConfig } from './scheduler.js';
import { UniPCMultistepScheduler } from './unipc.js';

export { Scheduler } from './scheduler.js';
export type { Generators, SchedulerConfig } from './scheduler.js';

const CLASSES: Readonly<Record<string, new (config: SchedulerConfig) => Scheduler>> = {
  DDIMScheduler,
  DDPMScheduler,
  PNDMScheduler,
  LMSDiscreteScheduler,
  EulerDiscreteScheduler,
  EulerAncestralDiscreteScheduler,
  HeunDiscreteScheduler,
  DPMSolverMultistepScheduler,
  LCMScheduler,
  UniPCMultistepScheduler,
};

/** Scheduler names users know (diffusers, AUTOMATIC1111, ComfyUI) → class and config overrides. */
const NAMES: Readonly<Record<string, readonly [string, SchedulerConfig]>> = {
  ddim: ['DDIMScheduler', {}],
  ddpm: ['DDPMScheduler', {}],
  pndm: ['PNDMScheduler', { skip_prk_steps: true }],
  plms: ['PNDMScheduler', { skip_prk_steps: true }],
  lms: ['LMSDiscreteScheduler', { use_karras_sigmas: false }],
  lms_karras: ['LMSDiscreteScheduler', { use_karras_sigmas: true }],
  euler: ['EulerDiscreteScheduler', { use_karras_sigmas: false }],
  euler_karras: ['EulerDiscreteScheduler', { use_karras_sigmas: true }],
  euler_a: ['EulerAncestralDiscreteScheduler', {}],
  euler_ancestral: ['EulerAncestralDiscreteScheduler', {}],
  heun: ['HeunDiscreteScheduler', { use_karras_sigmas: false }],
  heun_karras: ['HeunDiscreteScheduler', { use_karras_sigmas: true }],
  dpmpp_2m: [
    'DPMSolverMultistepScheduler',
    { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  ],
  dpmpp_2m_karras: [
    'DPMSolverMultistepScheduler',
    { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  ],
  dpmpp_2m_sde: [
    'DPMSolverMultistepScheduler',
    { algorithm_type: 'sde-dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  ],
  dpmpp_2m_sde_karras: [
    'DPMSolverMultistepScheduler',
    { algorithm_type: 'sde-dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  ],
  dpm_2m: [
    'DPMSolverMultistepScheduler',
    {
      algorithm_type: 'dpmsolver',
      solver_order: 2,
      use_karras_sigmas: false,
      final_sigmas_type: 'sigma_min',
    },
  ],
  dpmpp_3m: [
    'DPMSolverMultistepScheduler',
    { algorithm_type: 'dpmsolver++', solver_order: 3, use_karras_sigmas: false },
  ],
  lcm: ['LCMScheduler', {}],
  unipc: ['UniPCMultistepScheduler', {}],
};

/** `DPM++ 2M Karras`, `Euler a`, `dpmpp-2m-karras` → `dpmpp_2m_karras`, `euler_a`, ... */
export function normalizeSchedulerName(name: string): string {
  return name
    .trim()
    .toLowerCase()
    .replace(/\+\+/g, 'pp')
    .replace(/[\s\-.]+/g, '_')
    .replace(/^k_/, '');
}

export const SCHEDULER_NAMES: readonly string[] = Object.keys(NAMES);
export const SCHEDULER_CLASSES: readonly string[] = Object.keys(CLASSES);

/** The error for a scheduler name `createScheduler` does not know. */
export function unknownScheduler(name: string): UserError {
  return new UserError(
    'unknown-scheduler',
    `unknown scheduler '${name}'; use one of: ${SCHEDULER_NAMES.join(', ')}`,
  );
}

/** Whether `createScheduler` knows this name: a gesso or A1111 name, or a diffusers class. */
export function isSchedulerName(name: string): boolean {
  return NAMES[normalizeSchedulerName(name)] !== undefined || CLASSES[name] !== undefined;
}

/** A1111 (1.9 on) `scheduler` values gesso has: the sampler's own default, and two sigma spacings. */
export const A1111_SCHEDULE_TYPES = ['Automatic', 'Uniform', 'Karras'] as const;

/**
 * The spacing A1111 gives a sampler whose schedule type is Automatic, where it is not Uniform
 * (`samplers_k_diffusion` in its sd_samplers_kdiffusion.py). Before 1.9 the name alone decided.
 */
const A1111_DEFAULT_SPACING: Readonly<Record<string, string>> = {
  dpmpp_2m: 'karras',
  dpmpp_2m_sde: 'exponential',
};

/**
 * The schedule type to write beside a sampler's A1111 name where A1111 1.9 on would read the
 * name alone another way: its `Automatic` gives DPM++ 2M Karras sigmas, so gesso's plain
 * `dpmpp_2m` is `Uniform`. Undefined where the name says it all (or names a folder's class, whose
 * spacing its config decides).
 */
export function a1111ScheduleType(name: string): 'Uniform' | undefined {
  const normalized = normalizeSchedulerName(name);
  return NAMES[normalized] !== undefined && A1111_DEFAULT_SPACING[normalized] !== undefined
    ? 'Uniform'
    : undefined;
}

/**
 * The gesso scheduler for an A1111 sampler name and schedule type (the request's `scheduler`
 * field since A1111 1.9, which names the sigma spacing apart from the sampler): `DPM++ 2M` with
 * `Karras` is `dpmpp_2m_karras`. Spacings gesso does not have are refused by name.
 */
export function withScheduleType(sampler: string, scheduleType: string): string {
  const type = scheduleType.trim().toLowerCase();
  const name = normalizeSchedulerName(sampler);
  if (NAMES[name] === undefined) {
    if (type === 'automatic') return sampler;
    throw new UserError(
      'unknown-scheduler',
      `schedule type '${scheduleType}' goes with an A1111 sampler name, not '${sampler}'`,
    );
  }
  const base = name.replace(/_karras$/, '');
  const karras = NAMES[`${base}_karras`] !== undefined ? `${base}_karras` : undefined;
  const spacing =
    type === 'automatic'
      ? name !== base
        ? 'karras'
        : (A1111_DEFAULT_SPACING[base] ?? 'uniform')
      : type;
  if (spacing === 'uniform') return base;
  if (spacing === 'karras' && karras !== undefined) return karras;
  const withKarras = Object.keys(NAMES)
    .filter((n) => n.endsWith('_karras'))
    .map((n) => displayName(n.replace(/_karras$/, '')));
  throw new UserError(
    'unknown-scheduler',
    type === 'automatic'
      ? `A1111 samples ${displayName(base)} with ${spacing} sigmas when the schedule type is Automatic, and gesso has no ${spacing} spacing; ask for schedule type Karras or Uniform`
      : spacing === 'karras'
        ? `gesso has Karras sigmas for ${withKarras.join(', ')}, not for ${displayName(base)}; ask for schedule type Uniform or another sampler`
        : `unknown schedule type '${scheduleType}'; gesso has ${A1111_SCHEDULE_TYPES.join(', ')}`,
  );
}

/** The A1111 display name for a gesso scheduler name (for PNG metadata and the A1111 API). */
export function displayName(name: string): string {
  const names: Record<string, string> = {
    ddim: 'DDIM',
    ddpm: 'DDPM',
    pndm: 'PLMS',
    plms: 'PLMS',
    lms: 'LMS',
    lms_karras: 'LMS Karras',
    euler: 'Euler',
    euler_karras: 'Euler Karras',
    euler_a: 'Euler a',
    euler_ancestral: 'Euler a',
    heun: 'Heun',
    heun_karras: 'Heun Karras',
    dpmpp_2m: 'DPM++ 2M',
    dpmpp_2m_karras: 'DPM++ 2M Karras',
    dpmpp_2m_sde: 'DPM++ 2M SDE',
    dpmpp_2m_sde_karras: 'DPM++ 2M SDE Karras',
    dpm_2m: 'DPM2 M',
    dpmpp_3m: 'DPM++ 3M',
    lcm: 'LCM',
    unipc: 'UniPC',
  };
  const byClass: Record<string, string> = {
    DDIMScheduler: 'DDIM',
    DDPMScheduler: 'DDPM',
    PNDMScheduler: 'PLMS',
    LMSDiscreteScheduler: 'LMS',
    EulerDiscreteScheduler: 'Euler',
    EulerAncestralDiscreteScheduler: 'Euler a',
    HeunDiscreteScheduler: 'Heun',
    DPMSolverMultistepScheduler: 'DPM++ 2M',
    LCMScheduler: 'LCM',
    UniPCMultistepScheduler: 'UniPC',
  };
  return byClass[name] ?? names[normalizeSchedulerName(name)] ?? name;
}

/**
 * A scheduler from a model folder's `scheduler_config.json` (`base`), optionally switched to
 * another one by user name (`euler_a`) or diffusers class name, which keeps the folder's
 * training-schedule keys as diffusers' `from_config` does.
 */
export function createScheduler(
  base: SchedulerConfig,
  name?: string,
  overrides: SchedulerConfig = {},
): Scheduler {
  let className = typeof base._class_name === 'string' ? base._class_name : undefined;
  let extra: SchedulerConfig = {};
  if (name !== undefined) {
    const known = NAMES[normalizeSchedulerName(name)];
    if (known !== undefined) [className, extra] = known;
    else if (CLASSES[name] !== undefined) className = name;
    else throw unknownScheduler(name);
  }
  if (className === undefined)
    throw new UserError('bad-config', 'the scheduler config names no _class_name');
  const Class = CLASSES[className];
  if (Class === undefined) {
    throw new UserError(
      'unsupported-model',
      `gesso does not implement ${className}; use one of: ${SCHEDULER_NAMES.join(', ')}`,
    );
  }
  const config: SchedulerConfig = { ...base, ...extra, ...overrides, _class_name: className };
  // diffusers' other sigma spacings: read as absent, the schedule would be another one.
  for (const key of ['use_exponential_sigmas', 'use_beta_sigmas', 'use_flow_sigmas'])
    if (config[key] === true)
      throw new UserError(
        'unsupported-model',
        `gesso does not support the scheduler config ${key} = true (its sigma spacings are the plain and Karras ones); set it to false in scheduler_config.json, or use_karras_sigmas instead`,
      );
  return new Class(config);
}
