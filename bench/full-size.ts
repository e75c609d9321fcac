import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Graph } from '../src/graph/ir.js';
import { emitOnnx } from '../src/graph/onnx.js';
import { countMacs } from '../src/graph/macs.js';
import * as op from '../src/graph/ops.js';
import { writeSafetensors, type LazyTensor } from '../src/io/safetensors.js';
import { AutoencoderKL, autoencoderKLConfig } from '../src/models/autoencoder-kl.js';
import { ClipTextModel, clipTextConfig } from '../src/models/clip-text.js';
import { UNet2DConditionModel, unetConfig } from '../src/models/unet-2d-condition.js';
import type { Module } from '../src/nn/module.js';
import { WeightSet } from '../src/nn/weights.js';
import { UNet, type UNetCall } from '../src/pipelines/components.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { defaultComputeThreads } from '../src/runtime/cpu.js';
import { Session } from '../src/runtime/session.js';
import { float32ArrayToFloat16 } from '../src/tensor/half.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { measurement, timeRuns, type Recorder } from './harness.js';

/**
 * Full-size Stable Diffusion with random weights: speed does not depend on the weights' values,
 * so these measure what users get. The models are written once, in the diffusers layout with the
 * released configs, into ~/.cache/gesso/bench-models (or $GESSO_BENCH_MODELS).
 */

type Json = Record<string, unknown>;

interface FullSizeModel {
  readonly name: string;
  readonly index: Json;
  readonly unet: Json;
  readonly vae: Json;
  readonly textEncoders: readonly {
    readonly role: string;
    readonly config: Json;
    readonly pad: string;
  }[];
  readonly scheduler: Json;
}

const SD_SCHEDULER: Json = {
  _class_name: 'EulerDiscreteScheduler',
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  prediction_type: 'epsilon',
  steps_offset: 1,
  timestep_spacing: 'leading',
};

const SD_VAE: Json = {
  _class_name: 'AutoencoderKL',
  in_channels: 3,
  out_channels: 3,
  latent_channels: 4,
  block_out_channels: [128, 256, 512, 512],
  down_block_types: Array(4).fill('DownEncoderBlock2D'),
  up_block_types: Array(4).fill('UpDecoderBlock2D'),
  layers_per_block: 2,
  norm_num_groups: 32,
  scaling_factor: 0.18215,
  sample_size: 512,
};

const CLIP_L: Json = {
  architectures: ['CLIPTextModel'],
  vocab_size: 49408,
  hidden_size: 768,
  intermediate_size: 3072,
  num_hidden_layers: 12,
  num_attention_heads: 12,
  max_position_embeddings: 77,
  hidden_act: 'quick_gelu',
  layer_norm_eps: 1e-5,
  bos_token_id: 49406,
  eos_token_id: 49407,
  pad_token_id: 1,
};

/** SD 1.x and 2.x's UNet; 2.x changes the context width and the attention. */
const SD_UNET: Json = {
  _class_name: 'UNet2DConditionModel',
  in_channels: 4,
  out_channels: 4,
  block_out_channels: [320, 640, 1280, 1280],
  layers_per_block: 2,
  down_block_types: [
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'DownBlock2D',
  ],
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  cross_attention_dim: 768,
  attention_head_dim: 8,
  norm_num_groups: 32,
  sample_size: 64,
};

/** The released configs (diffusers' keys) of the models the benchmark measures. */
export const FULL_SIZE: Record<string, FullSizeModel> = {
  // SD 1.x's structure at a fraction of the width: the suite's own test runs it end to end.
  'sd15-mini': {
    name: 'sd15-mini',
    index: { _class_name: 'StableDiffusionPipeline' },
    unet: {
      ...SD_UNET,
      block_out_channels: [32, 32, 64, 64],
      layers_per_block: 1,
      cross_attention_dim: 64,
      sample_size: 8,
    },
    vae: { ...SD_VAE, block_out_channels: [32, 32, 32, 32], layers_per_block: 1, sample_size: 64 },
    textEncoders: [
      {
        role: 'text_encoder',
        config: {
          ...CLIP_L,
          hidden_size: 64,
          intermediate_size: 128,
          num_hidden_layers: 2,
          num_attention_heads: 4,
        },
        pad: '<|endoftext|>',
      },
    ],
    scheduler: SD_SCHEDULER,
  },
  sd15: {
    name: 'sd15',
    index: { _class_name: 'StableDiffusionPipeline' },
    unet: SD_UNET,
    vae: SD_VAE,
    textEncoders: [{ role: 'text_encoder', config: CLIP_L, pad: '<|endoftext|>' }],
    scheduler: SD_SCHEDULER,
  },
  sd21: {
    name: 'sd21',
    index: { _class_name: 'StableDiffusionPipeline' },
    unet: {
      ...SD_UNET,
      cross_attention_dim: 1024,
      attention_head_dim: [5, 10, 20, 20],
      use_linear_projection: true,
      upcast_attention: true,
      sample_size: 96,
    },
    vae: SD_VAE,
    textEncoders: [
      {
        role: 'text_encoder',
        config: {
          ...CLIP_L,
          hidden_size: 1024,
          intermediate_size: 4096,
          num_hidden_layers: 23,
          num_attention_heads: 16,
          hidden_act: 'gelu',
        },
        pad: '!',
      },
    ],
    scheduler: { ...SD_SCHEDULER, prediction_type: 'v_prediction' },
  },
  sdxl: {
    name: 'sdxl',
    index: { _class_name: 'StableDiffusionXLPipeline', force_zeros_for_empty_prompt: true },
    unet: {
      _class_name: 'UNet2DConditionModel',
      in_channels: 4,
      out_channels: 4,
      block_out_channels: [320, 640, 1280],
      layers_per_block: 2,
      down_block_types: ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
      up_block_types: ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
      transformer_layers_per_block: [1, 2, 10],
      cross_attention_dim: 2048,
      attention_head_dim: [5, 10, 20],
      use_linear_projection: true,
      addition_embed_type: 'text_time',
      addition_time_embed_dim: 256,
      projection_class_embeddings_input_dim: 2816,
      norm_num_groups: 32,
      sample_size: 128,
    },
    vae: { ...SD_VAE, scaling_factor: 0.13025, sample_size: 1024 },
    textEncoders: [
      { role: 'text_encoder', config: CLIP_L, pad: '<|endoftext|>' },
      {
        role: 'text_encoder_2',
        config: {
          ...CLIP_L,
          architectures: ['CLIPTextModelWithProjection'],
          hidden_size: 1280,
          intermediate_size: 5120,
          num_hidden_layers: 32,
          num_attention_heads: 20,
          hidden_act: 'gelu',
          projection_dim: 1280,
        },
        pad: '!',
      },
    ],
    scheduler: SD_SCHEDULER,
  },
};

export function benchModelsDir(): string {
  return process.env.GESSO_BENCH_MODELS ?? join(homedir(), '.cache', 'gesso', 'bench-models');
}

/**
 * Random weights with the scale of a trained network's (uniform, variance 1/fan-in; norms 1,
 * biases 0), so activations stay in range and no denormals slow the arithmetic.
 */
function randomWeights(
  module: Module,
  seed: number,
  dtype: 'F32' | 'F16',
): Record<string, LazyTensor> {
  const g = new TorchGenerator(seed);
  const out: Record<string, LazyTensor> = {};
  for (const [key, shape] of module.namedParameters()) {
    out[key] = {
      dtype,
      shape: [...shape],
      bytes: () => {
        const size = shape.reduce((n, d) => n * d, 1);
        let values: Float32Array;
        if (key.endsWith('bias')) values = new Float32Array(size);
        else if (shape.length === 1) values = new Float32Array(size).fill(1);
        else {
          const fanIn = shape.slice(1).reduce((n, d) => n * d, 1);
          const bound = Math.sqrt(3 / fanIn);
          values = g.rand([size]).data.map((u) => (2 * u - 1) * bound);
        }
        return dtype === 'F32'
          ? new Uint8Array(values.buffer)
          : new Uint8Array(float32ArrayToFloat16(values).buffer);
      },
    };
  }
  return out;
}

const TOKENIZER = fileURLToPath(new URL('../../assets/clip-tokenizer', import.meta.url));

/** Writes the model folder once (fp32 and the fp16 variant); later calls return its path. */
export async function ensureFullSizeModel(model: FullSizeModel): Promise<string> {
  const dir = join(benchModelsDir(), model.name);
  if (existsSync(join(dir, 'model_index.json'))) return dir;
  const staging = `${dir}.tmp-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  const json = (v: unknown) => `${JSON.stringify(v, null, 2)}\n`;
  const component = async (
    role: string,
    config: Json,
    module: Module,
    base: string,
    seed: number,
  ) => {
    await mkdir(join(staging, role), { recursive: true });
    await writeFile(join(staging, role, 'config.json'), json(config));
    for (const [variant, dtype] of [
      ['', 'F32'],
      ['.fp16', 'F16'],
    ] as const)
      await writeSafetensors(
        join(staging, role, `${base}${variant}.safetensors`),
        randomWeights(module, seed, dtype),
      );
  };
  const index: Json = {
    ...model.index,
    unet: ['diffusers', 'UNet2DConditionModel'],
    vae: ['diffusers', 'AutoencoderKL'],
    scheduler: ['diffusers', String(model.scheduler._class_name)],
  };
  await component(
    'unet',
    model.unet,
    new UNet2DConditionModel(unetConfig(model.unet)),
    'diffusion_pytorch_model',
    1,
  );
  await component(
    'vae',
    model.vae,
    new AutoencoderKL(autoencoderKLConfig(model.vae)),
    'diffusion_pytorch_model',
    2,
  );
  for (const [i, t] of model.textEncoders.entries()) {
    await component(t.role, t.config, new ClipTextModel(clipTextConfig(t.config)), 'model', 3 + i);
    const tokenizer = t.role === 'text_encoder' ? 'tokenizer' : 'tokenizer_2';
    await mkdir(join(staging, tokenizer));
    for (const f of ['vocab.json', 'merges.txt'])
      await copyFile(join(TOKENIZER, f), join(staging, tokenizer, f));
    await writeFile(
      join(staging, tokenizer, 'tokenizer_config.json'),
      json({ tokenizer_class: 'CLIPTokenizer', model_max_length: 77, pad_token: t.pad }),
    );
    index[t.role] = ['transformers', (t.config.architectures as string[])[0]];
    index[tokenizer] = ['transformers', 'CLIPTokenizer'];
  }
  await mkdir(join(staging, 'scheduler'));
  await writeFile(join(staging, 'scheduler', 'scheduler_config.json'), json(model.scheduler));
  await writeFile(join(staging, 'model_index.json'), json(index));
  await rename(staging, dir);
  return dir;
}

/** Multiply–accumulates of one UNet evaluation at a batch and latent size (static shapes). */
export async function unetMacs(
  dir: string,
  config: Json,
  batch: number,
  side: number,
  context: number,
  width: number,
): Promise<number> {
  const module = new UNet2DConditionModel(unetConfig(config));
  const weights = (
    await WeightSet.fromFiles(join(dir, 'unet', 'diffusion_pytorch_model.safetensors'))
  ).bind(module);
  const graph = new Graph();
  const c = module.config;
  const sdxl = c.additionEmbedType === 'text_time';
  const out = module.forward(weights.parameters(graph), {
    sample: graph.input('sample', 'float32', [batch, 4, side, side]),
    timestep: graph.input('timestep', 'float32', [batch]),
    encoderHiddenStates: graph.input('context', 'float32', [batch, context, width]),
    ...(sdxl
      ? {
          textEmbeds: graph.input('text_embeds', 'float32', [
            batch,
            c.projectionClassEmbeddingsInputDim! - 6 * c.additionTimeEmbedDim!,
          ]),
          timeIds: graph.input('time_ids', 'float32', [batch, 6]),
        }
      : {}),
  });
  graph.output(out, 'out');
  return countMacs(graph);
}

/** This machine's fp32 matrix rate on ONNX Runtime: a 2048³ MatMul, in multiply–accumulates/s. */
export async function matmulPeak(runs: number, threads?: number): Promise<number> {
  const n = 2048;
  const graph = new Graph('peak');
  const a = graph.input('a', 'float32', [n, n]);
  const b = graph.input('b', 'float32', [n, n]);
  graph.output(op.matmul(a, b), 'c');
  const session = await Session.create(
    { key: undefined, emit: () => emitOnnx(graph) },
    { cacheDir: false, ...(threads !== undefined ? { threads } : {}) },
  );
  const g = new TorchGenerator(0);
  const feeds = { a: g.randn([n, n]), b: g.randn([n, n]) };
  const times = await timeRuns(runs, () => session.run(feeds), 2);
  await session.release();
  return n ** 3 / Math.min(...times);
}

/**
 * The processor's fp32 peak by measurement: bench/fma-peak.c (independent FMA chains on the
 * widest vectors -march=native allows) built with the system C compiler, on `threads` threads, in
 * multiply–accumulates/s. Undefined, with a note, where no compiler is found.
 */
export function fmaPeak(threads: number): number | undefined {
  const source = fileURLToPath(new URL('../../bench/fma-peak.c', import.meta.url));
  const binary = join(benchModelsDir(), 'fma-peak');
  try {
    if (!existsSync(binary)) {
      const staging = `${binary}.tmp-${process.pid}`;
      execFileSync('cc', ['-O3', '-march=native', source, '-o', staging, '-lpthread']);
      execFileSync('mv', [staging, binary]);
    }
    const out = execFileSync(binary, [String(threads)], { encoding: 'utf8' });
    return ((JSON.parse(out) as { gflops: number }).gflops * 1e9) / 2;
  } catch (error) {
    process.stderr.write(
      `FMA peak not measured (a C compiler, cc, is needed): ${(error as Error).message.split('\n')[0]}\n`,
    );
    return undefined;
  }
}

/** Debian's python3-torch lives with the system Python, not a pyenv one. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const TORCH_SCRIPT = fileURLToPath(new URL('../../bench/torch_diffusion_step.py', import.meta.url));

/**
 * The same UNet written in PyTorch and exported by torch.onnx.export (random weights), once, into
 * the bench-models folder: what ONNX Runtime does with a clean PyTorch export, beside gesso's own
 * graph. SD 1.x structure only (the PyTorch script has no linear projections or added
 * embeddings); undefined, with a note, for others or where python3-torch is missing.
 */
async function torchExportedUnet(model: FullSizeModel, dir: string): Promise<string | undefined> {
  const c = model.unet;
  if (
    c.addition_embed_type !== undefined ||
    c.use_linear_projection === true ||
    typeof c.attention_head_dim !== 'number'
  ) {
    process.stderr.write(`${model.name}: no PyTorch-export comparison (SD 1.x structure only)\n`);
    return undefined;
  }
  const out = join(benchModelsDir(), `${model.name}-torch-onnx`);
  if (existsSync(join(out, 'model.onnx'))) return out;
  const staging = `${out}.tmp-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  try {
    execFileSync(
      PYTHON,
      [TORCH_SCRIPT, '--export-onnx', staging, join(dir, 'unet', 'config.json')],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    await rename(staging, out);
    return out;
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    process.stderr.write(
      `${model.name}: no PyTorch-export comparison (${PYTHON} with torch is needed: apt-get install python3-torch): ${(error as Error).message.split('\n')[0]}\n`,
    );
    return undefined;
  }
}

const rss = () => process.resourceUsage().maxRSS * 1024;

/** The slow parts of a full-size run, which `--skip` can leave out. */
export const FULL_SIZE_PARTS = ['export', 'images', 'int8', 'memory'] as const;
export type FullSizePart = (typeof FULL_SIZE_PARTS)[number];

/**
 * One model's numbers: load (first, then from the graph cache), text encoder, UNet at batch 1 and
 * 2 (classifier-free guidance) at its native size and half of it, VAE decode, whole images at 1 and
 * 20 steps, peak resident memory, and the UNet's achieved MAC rate as a fraction of the peak.
 */
export async function fullSizeSuite(
  name: string,
  runs: number,
  results: Recorder,
  options: {
    threads?: number;
    sizes?: readonly number[];
    peak?: number;
    skip?: readonly FullSizePart[];
  } = {},
): Promise<void> {
  const included = (part: FullSizePart) => !(options.skip ?? []).includes(part);
  const model = FULL_SIZE[name];
  if (model === undefined)
    throw new Error(`unknown model '${name}' (have: ${Object.keys(FULL_SIZE).join(', ')})`);
  const created = Date.now();
  const dir = await ensureFullSizeModel(model);
  process.stderr.write(
    `${name}: model folder ${dir} (${((Date.now() - created) / 1000).toFixed(0)} s to make)\n`,
  );
  const peak = options.peak ?? (await matmulPeak(5, options.threads));
  results.push(measurement('machine fp32 MatMul peak (2048³)', 'GFLOP/s', [(2 * peak) / 1e9]));
  const fma =
    options.peak === undefined ? fmaPeak(options.threads ?? defaultComputeThreads()) : undefined;
  if (fma !== undefined)
    results.push(measurement('machine fp32 FMA peak (all threads)', 'GFLOP/s', [(2 * fma) / 1e9]));
  const rate = (macs: number, seconds: number) => {
    const perSecond = macs / seconds;
    return `${(macs / 1e9).toFixed(1)} GMAC, ${(perSecond / 1e9).toFixed(0)} GMAC/s = ${(
      (100 * perSecond) /
      peak
    ).toFixed(
      0,
    )}% of MatMul peak${fma !== undefined ? `, ${((100 * perSecond) / fma).toFixed(0)}% of FMA peak` : ''}`;
  };
  const cacheDir = join(benchModelsDir(), `${name}-graph-cache`);
  await rm(cacheDir, { recursive: true, force: true });
  const runtime = {
    cacheDir,
    ...(options.threads !== undefined ? { threads: options.threads } : {}),
  };
  const native = ((model.unet.sample_size as number) ?? 64) * 8;
  const sizes = options.sizes ?? [native, native / 2];
  const textWidth = (model.unet.cross_attention_dim as number) ?? 768;
  const g = new TorchGenerator(0);

  // Loads and memory come from fresh processes (bench/memory-probe.ts), each a user's first
  // command: this process would count what it holds already, and the heap keeps what it frees.
  const probeScript = fileURLToPath(new URL('./memory-probe.js', import.meta.url));
  const probe = (steps: number, flags: readonly string[]) => {
    const r = spawnSync(
      process.execPath,
      [
        probeScript,
        dir,
        String(sizes[0]),
        String(steps),
        ...flags,
        ...(options.threads !== undefined ? [`threads=${options.threads}`] : []),
      ],
      { encoding: 'utf8', env: { ...process.env, GESSO_CACHE_DIR: cacheDir } },
    );
    if (r.status !== 0) {
      // Out of memory is a finding, not a reason to lose the rest of the run.
      const how = r.signal !== null ? `killed by ${r.signal} (out of memory?)` : r.stderr.trim();
      process.stderr.write(`${name}: ${sizes[0]}² image with [${flags.join(', ')}]: ${how}\n`);
      return undefined;
    }
    return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as {
      maxRssBytes: number;
      seconds: number;
      lowMemory: boolean;
    };
  };
  // The first builds and optimizes every graph a generation needs; the second finds them cached.
  for (const label of ['first load + 1-step image (graphs built)', 'cached load + 1-step image']) {
    const run = probe(1, []);
    if (run !== undefined) results.push(measurement(`${name}: ${label}`, 's', [run.seconds]));
  }
  if (included('memory')) {
    // Each weight format by default, and in the other mode: low-memory, or for a model large
    // enough to be low-memory by itself, every model kept resident.
    for (const format of [[], ['fp16']]) {
      const byDefault = probe(2, format);
      const auto = byDefault?.lowMemory === true;
      const other = auto ? 'keep-loaded' : 'low-memory';
      for (const [mode, run] of [
        [auto ? 'default: low-memory by itself' : 'default', byDefault],
        [other, probe(2, [...format, other])],
      ] as const) {
        if (run === undefined) continue;
        results.push(
          measurement(
            `${name}: peak resident memory, ${sizes[0]}² image (${format[0] ?? 'fp32'}, ${mode})`,
            'GiB',
            [run.maxRssBytes / 2 ** 30],
          ),
        );
      }
    }
  }

  // The pipeline as users get it. Where it keeps one model resident at a time (a large model), the
  // component timings below release each model when done, as a generation does.
  const pipe = await StableDiffusionPipeline.fromPretrained(dir, runtime);
  const releaseIfLowMemory = async (part: { unload(): Promise<void> } | undefined) => {
    if (pipe.lowMemory) await part?.unload();
  };
  const prompt = ['a red circle above a blue square'];
  const ids = pipe.tokenize(prompt);
  const ids2 = pipe.tokenizer2 !== undefined ? pipe.tokenize(prompt, pipe.tokenizer2) : undefined;
  results.push(
    measurement(
      `${name}: text encoder${pipe.textEncoder2 !== undefined ? 's (both)' : ''} (batch 1)`,
      's',
      await timeRuns(runs, async () => {
        await pipe.textEncoder.encode(ids);
        if (ids2 !== undefined) await pipe.textEncoder2!.encode(ids2);
      }),
    ),
  );
  const context = (await pipe.encodePrompts(['a red circle'], [''], 1, 0, true)).embeddings;
  await releaseIfLowMemory(pipe.textEncoder);
  await releaseIfLowMemory(pipe.textEncoder2);
  const unetCalls: { size: number; batch: number; call: UNetCall; macs: number }[] = [];
  for (const size of sizes) {
    const side = size / 8;
    for (const batch of [1, 2]) {
      const sdxl = model.unet.addition_embed_type === 'text_time';
      const call = {
        sample: g.randn([batch, 4, side, side]),
        timestep: Tensor.float32([batch], new Array<number>(batch).fill(500)),
        encoderHiddenStates:
          batch === 2
            ? context
            : new Tensor(
                'float32',
                [1, ...context.shape.slice(1)],
                context.data.slice(0, context.size / 2),
              ),
        ...(sdxl
          ? {
              textEmbeds: g.randn([batch, 1280]),
              timeIds: Tensor.float32([batch, 6], new Array<number>(batch * 6).fill(size)),
            }
          : {}),
      };
      const macs = await unetMacs(dir, model.unet, batch, side, context.shape[1]!, textWidth);
      unetCalls.push({ size, batch, call, macs });
      results.push(
        measurement(
          `${name}: UNet ${size}×${size} batch ${batch}`,
          's',
          await timeRuns(runs, () => pipe.unet.predict(call)),
          (m) => rate(macs, m),
        ),
      );
    }
    await releaseIfLowMemory(pipe.unet);
    const latents = g.randn([1, 4, side, side]);
    results.push(
      measurement(
        `${name}: VAE decode ${size}×${size}`,
        's',
        await timeRuns(Math.min(runs, 3), () => pipe.vae.decode(latents)),
      ),
    );
    await releaseIfLowMemory(pipe.vae);
  }
  // The same UNet exported from PyTorch, on the same ONNX Runtime with the same session options.
  const exported = included('export') ? await torchExportedUnet(model, dir) : undefined;
  if (exported !== undefined) {
    const unet = await UNet.load(exported, { ...runtime, cacheDir: false });
    for (const { size, batch, call, macs } of unetCalls) {
      results.push(
        measurement(
          `${name}: UNet ${size}×${size} batch ${batch}, ORT on a PyTorch export`,
          's',
          await timeRuns(runs, () => unet.predict(call)),
          (m) => rate(macs, m),
        ),
      );
    }
    await unet.release();
  }
  let reference: Tensor<'float32'> | undefined;
  // One request for the fp32 images and the int8 image compared with them.
  const request = (steps: number, guidance: number) => ({
    prompt: 'a red circle',
    steps,
    guidance,
    seed: 1,
    width: sizes[0],
    height: sizes[0],
  });
  const image = (steps: number, guidance: number) => async () => {
    const r = await pipe.generate(request(steps, guidance));
    if (steps === 20) reference = r.images;
  };
  const reloads = pipe.lowMemory ? ' (low-memory by itself: models load for each image)' : '';
  if (included('images')) {
    results.push(
      measurement(
        `${name}: image ${sizes[0]}² 1 step, guidance 0 (Turbo-style)${reloads}`,
        's',
        await timeRuns(Math.min(runs, 3), image(1, 0)),
      ),
    );
    results.push(
      measurement(
        `${name}: image ${sizes[0]}² 20 steps, guidance 7.5${reloads}`,
        's',
        await timeRuns(Math.min(runs, 2), image(20, 7.5), 0),
      ),
    );
  } else if (included('int8')) await image(20, 7.5)(); // int8's reference
  results.push(
    measurement(`${name}: peak resident memory (this whole run)`, 'GiB', [rss() / 2 ** 30]),
  );
  await pipe.release();

  // int8: the UNet at batch 2 (calibrated on the first call), and the same 20-step image's PSNR.
  const int8Suite = async () => {
    const int8 = await StableDiffusionPipeline.fromPretrained(dir, {
      ...runtime,
      quantize: 'int8',
    });
    const int8Image = await int8.generate(request(20, 7.5));
    let squared = 0;
    for (let i = 0; i < int8Image.images.size; i++)
      squared += (int8Image.images.data[i]! - reference!.data[i]!) ** 2;
    const psnr = 10 * Math.log10(int8Image.images.size / squared);
    // The fp32 timings' batch-2 call at the first size, and its MAC count.
    const { call, macs } = unetCalls.find((c) => c.size === sizes[0] && c.batch === 2)!;
    results.push(
      measurement(
        `${name}: UNet ${sizes[0]}×${sizes[0]} batch 2, int8`,
        's',
        await timeRuns(runs, () => int8.unet.predict(call)),
        (m) =>
          `${(macs / m / 1e9).toFixed(0)} G(int8)MAC/s; 20-step image PSNR vs fp32 ${psnr.toFixed(1)} dB`,
      ),
    );
    await int8.release();
  };

  if (included('int8')) await int8Suite();
}
