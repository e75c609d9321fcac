import { spawnSync } from 'node:child_process';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { createScheduler, type SchedulerConfig } from '../src/schedulers/index.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { DiffusionTask, type DiffusionRecipe } from '../src/training/diffusion.js';
import { Trainer, type TrainerOptions } from '../src/training/trainer.js';

/** The repository root (tests run from dist/test/). */
export const repoRoot = resolve(fileURLToPath(new URL('../../', import.meta.url)));
export const fixtures = join(repoRoot, 'test', 'fixtures');

/** The built command-line entry point. */
export const GESSO_BIN = join(repoRoot, 'dist', 'src', 'cli', 'main.js');

/** Runs the real `gesso` command and returns its exit status and output. */
export function runGesso(args: readonly string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(process.execPath, [GESSO_BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** `../shared/golden` beside the clone, as CI provides it; undefined when absent. */
export const goldenDir: string | undefined = (() => {
  const dir = process.env.GESSO_GOLDEN_DIR ?? resolve(repoRoot, '..', 'shared', 'golden');
  return existsSync(dir) ? dir : undefined;
})();

export const GOLDEN_MISSING =
  'golden reference files are absent: ../shared/golden (or GESSO_GOLDEN_DIR) not found';

/** Skip option for node:test when the golden folder is missing. */
export function needsGolden(): { skip: string | false } {
  return { skip: goldenDir === undefined ? GOLDEN_MISSING : false };
}

export function golden(...parts: string[]): string {
  if (goldenDir === undefined) throw new Error(GOLDEN_MISSING);
  return join(goldenDir, ...parts);
}

export interface Tolerance {
  /** Absolute tolerance. */
  atol?: number;
  /** Tolerance relative to each expected value. */
  rtol?: number;
}

/** Elementwise |a - e| <= atol + rtol·|e|, with shape equality; reports the worst element. */
export function assertClose(
  actual: Tensor,
  expected: Tensor,
  tolerance: Tolerance,
  label = '',
): void {
  assert.deepEqual([...actual.shape], [...expected.shape], `${label} shape`);
  const a = actual.toFloat32().data;
  const e = expected.toFloat32().data;
  const { atol = 0, rtol = 0 } = tolerance;
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < e.length; i++) {
    const diff = Math.abs(a[i]! - e[i]!);
    const excess = diff - (atol + rtol * Math.abs(e[i]!));
    if (!(excess <= 0) && (worst < 0 || excess > worstExcess || Number.isNaN(diff))) {
      worst = i;
      worstExcess = excess;
    }
  }
  if (worst >= 0) {
    assert.fail(
      `${label}: element ${worst} is ${a[worst]}, expected ${e[worst]} (|diff| ${Math.abs(a[worst]! - e[worst]!)} > atol ${atol} + rtol ${rtol})`,
    );
  }
}

/** Bitwise equality of two float32 tensors (NaN payloads and signed zeros included). */
export function assertBitEqual(
  actual: Tensor<'float32'>,
  expected: Tensor<'float32'>,
  label = '',
): void {
  assert.deepEqual([...actual.shape], [...expected.shape], `${label} shape`);
  const a = new Uint32Array(actual.data.buffer, actual.data.byteOffset, actual.size);
  const e = new Uint32Array(expected.data.buffer, expected.data.byteOffset, expected.size);
  for (let i = 0; i < e.length; i++) {
    if (a[i] !== e[i]) {
      assert.fail(
        `${label}: element ${i} is ${actual.data[i]}, expected ${expected.data[i]} (bits differ)`,
      );
    }
  }
}

/** A fresh temporary folder, removed after `use`. */
export async function withTempDir<T>(use: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'gesso-test-'));
  try {
    return await use(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A diffusion recipe small enough to train in a test. */
export const TINY: DiffusionRecipe = {
  batchSize: 4,
  captionDropout: 0.1,
  patchSize: 8,
  maxLength: 16,
  textEncoder: {
    hidden_size: 16,
    intermediate_size: 32,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    max_position_embeddings: 16,
    hidden_act: 'gelu',
    causal: false,
  },
  unet: {
    in_channels: 192,
    out_channels: 192,
    sample_size: 8,
    block_out_channels: [16, 32],
    layers_per_block: 1,
    down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D'],
    cross_attention_dim: 16,
    attention_head_dim: 2,
    norm_num_groups: 8,
  },
  noise: {
    num_train_timesteps: 1000,
    beta_schedule: 'squaredcos_cap_v2',
    prediction_type: 'sample',
  },
  snrWeightCap: 5,
};

/** Trainer options for a few test steps. */
export const options = (steps: number): TrainerOptions => ({
  seed: 7,
  schedule: {
    steps,
    learningRate: 3e-3,
    warmupSteps: 5,
    decay: 'cosine',
    finalLearningRate: 3e-4,
    emaDecay: 0.99,
  },
  runtime: { cacheDir: false },
});

/** A tiny trained model folder: real weights in the real layout, 3 steps by default. */
export async function tinyModel(dir: string): Promise<string> {
  const task = new DiffusionTask(TINY);
  const trainer = await Trainer.create(task, options(2));
  for (let i = 0; i < 2; i++) await trainer.runStep();
  await task.exportModel(dir, trainer.weights('ema'), { defaults: { steps: 3, guidance: 2 } });
  await trainer.release();
  return dir;
}

/**
 * A kohya-format LoRA for a model folder: one random rank-2 layer on the first attention query
 * of each component named. A layer depends only on its component, so files holding the same
 * component agree on it.
 */
export async function writeRandomLora(
  modelDir: string,
  path: string,
  components: readonly ('unet' | 'text_encoder')[],
): Promise<void> {
  const tensors: Record<string, Tensor> = {};
  for (const component of components) {
    const [file, prefix, pattern, seed] =
      component === 'unet'
        ? ['diffusion_pytorch_model.safetensors', 'lora_unet_', /attn2\.to_q\.weight$/, 40]
        : ['model.safetensors', 'lora_te_', /q_proj\.weight$/, 41];
    const [key, shape] = await SafetensorsFile.with(join(modelDir, component, file), async (f) => {
      const name = f.names.find((n) => pattern.test(n));
      assert.ok(name !== undefined, `${component} has no weight matching ${pattern}`);
      return [name, f.tensors.get(name)!.shape] as const;
    });
    const g = new TorchGenerator(seed);
    const inner = shape.slice(1).reduce((a, b) => a * b, 1);
    const layer = `${prefix}${key.slice(0, -'.weight'.length).replace(/\./g, '_')}`;
    tensors[`${layer}.lora_down.weight`] = Tensor.float32(
      [2, ...shape.slice(1)],
      g.randn([2, inner]).data,
    );
    tensors[`${layer}.lora_up.weight`] = Tensor.float32(
      [shape[0]!, 2, ...shape.slice(2).map(() => 1)],
      g.randn([shape[0]!, 2]).data,
    );
  }
  await writeSafetensors(path, tensors);
}

/**
 * Whether a model folder's scheduler, switched to DDIM, clamps a predicted x₀ of ±3 to ±1: one
 * step from the same state, compared with DDIM told explicitly to clip and not to.
 */
export function ddimClipsSample(modelDir: string): boolean {
  const config = JSON.parse(
    readFileSync(join(modelDir, 'scheduler', 'scheduler_config.json'), 'utf8'),
  ) as SchedulerConfig;
  const step = (c: SchedulerConfig): Float32Array => {
    const ddim = createScheduler(c, 'ddim');
    ddim.setTimesteps(4);
    const x = Tensor.float32([1, 1, 1, 2], [0.5, -0.5]);
    const x0 = Tensor.float32([1, 1, 1, 2], [3, -3]);
    return ddim.step(x0, ddim.timesteps[0]!, x).data;
  };
  const asIs = step(config);
  const clipped = step({ ...config, clip_sample: true });
  const unclipped = step({ ...config, clip_sample: false });
  assert.notDeepEqual(clipped, unclipped);
  assert.ok(
    [clipped, unclipped].some((s) => s.every((v, i) => v === asIs[i])),
    'DDIM from this config matches neither clip_sample setting',
  );
  return asIs.every((v, i) => v === clipped[i]);
}
