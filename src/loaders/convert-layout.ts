import { copyFile, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { UserError } from '../errors.js';
import { writeSafetensors, type LazyTensor } from '../io/safetensors.js';
import type { WeightRecord, WeightSet } from '../nn/weights.js';
import { Tensor } from '../tensor/tensor.js';
import { loadComponent, readConfig } from './component.js';
import {
  openSingleFile,
  originalTensors,
  readRecord,
  type CheckpointFamily,
  type ComponentToWrite,
} from './single-file.js';

/**
 * `gesso convert` between the two layouts of a Stable Diffusion model: a diffusers folder and a
 * single original-format .safetensors file. Both directions use the key tables of
 * checkpoint-keys.ts; a file gesso writes records the folder's exact configs in its header
 * (`gesso.configs`) and the ModelSpec keys other tools read (`modelspec.architecture`,
 * `modelspec.prediction_type`), so reading it back gives the same model.
 */

export type FloatDType = 'float16' | 'float32';

function converted(t: Tensor, dtype: FloatDType | undefined): Tensor {
  const floating = t.dtype === 'float32' || t.dtype === 'float16' || t.dtype === 'bfloat16';
  return dtype !== undefined && floating && t.dtype !== dtype ? t.to(dtype) : t;
}

/** A lazy entry in `dtype` (or as stored): bytes are read when the writer reaches them. */
function retyped(entry: LazyTensor, dtype: FloatDType | undefined): LazyTensor {
  const stored = entry.dtype;
  const floating = stored === 'float32' || stored === 'float16' || stored === 'bfloat16';
  if (dtype === undefined || !floating) return entry;
  return {
    dtype,
    shape: entry.shape,
    bytes: async () =>
      converted(Tensor.fromBytes(stored, entry.shape, await entry.bytes()), dtype).bytes(),
  };
}

function lazyRecord(record: WeightRecord, dtype: FloatDType | undefined): LazyTensor {
  return retyped(
    {
      dtype: record.dtype,
      shape: record.shape,
      bytes: async () => (await readRecord(record)).bytes(),
    },
    dtype,
  );
}

/** Writes to `dest.tmp-PID` first and renames, so a failure leaves nothing half-written. */
async function staged(dest: string, write: (staging: string) => Promise<void>): Promise<void> {
  const staging = `${dest}.tmp-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  try {
    await write(staging);
    await rename(staging, dest);
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    throw error;
  }
}

const ARCHITECTURE: Record<CheckpointFamily, string> = {
  sd1: 'stable-diffusion-v1',
  sd2: 'stable-diffusion-v2',
  sdxl: 'stable-diffusion-xl-v1-base',
};

/** A diffusers folder → one original-format .safetensors file. */
export async function folderToSingleFile(
  folder: string,
  dest: string,
  dtype?: FloatDType,
): Promise<void> {
  const index = await readConfig(folder, 'model_index.json');
  const vaeClass = (index.vae as unknown[] | undefined)?.[1];
  if (vaeClass !== 'AutoencoderKL' || !Array.isArray(index.text_encoder))
    throw new UserError(
      'unsupported-model',
      `${folder} is not a Stable Diffusion model with a KL autoencoder and CLIP text encoders; only those have a single-file layout`,
    );
  const sdxl = Array.isArray(index.text_encoder_2) && index.text_encoder_2[0] !== null;
  const tokenizer = await readConfig(join(folder, 'tokenizer'), 'tokenizer_config.json').catch(
    () => ({}) as Record<string, unknown>,
  );
  const padToken =
    typeof tokenizer.pad_token === 'string'
      ? tokenizer.pad_token
      : (tokenizer.pad_token as { content?: string } | undefined)?.content;
  // The OpenCLIP encoder of SD 2.x pads with '!'; SD 1.x's CLIP with its end token.
  const family: CheckpointFamily = sdxl ? 'sdxl' : padToken === '!' ? 'sd2' : 'sd1';
  const roles: ComponentToWrite['role'][] = [
    'unet',
    'vae',
    'text_encoder',
    ...(sdxl ? (['text_encoder_2'] as const) : []),
  ];
  const parts: ComponentToWrite[] = [];
  const configs: Record<string, unknown> = {};
  for (const role of roles) {
    const base = role.startsWith('text_encoder') ? 'model' : 'diffusion_pytorch_model';
    const { config, weights } = await loadComponent(join(folder, role), base);
    parts.push({ role, config, weights });
    configs[role] = config;
  }
  const scheduler = await readConfig(join(folder, 'scheduler'), 'scheduler_config.json');
  configs.scheduler = scheduler;
  configs.index = Object.fromEntries(
    Object.entries(index).filter(([k]) => k === 'force_zeros_for_empty_prompt' || k === '_gesso'),
  );
  const tensors = Object.fromEntries(
    Object.entries(originalTensors(family, parts)).map(([k, v]) => [k, retyped(v, dtype)]),
  );
  const prediction = scheduler.prediction_type === 'v_prediction' ? 'v' : 'epsilon';
  await mkdir(dirname(dest), { recursive: true });
  await writeSafetensors(dest, tensors, {
    'modelspec.sai_model_spec': '1.0.0',
    'modelspec.architecture': ARCHITECTURE[family],
    'modelspec.prediction_type': prediction,
    'gesso.configs': JSON.stringify(configs),
  });
}

const TOKENIZER_DIR = fileURLToPath(new URL('../../../assets/clip-tokenizer', import.meta.url));

function clipTokenizerConfig(padToken: string): Record<string, unknown> {
  return {
    tokenizer_class: 'CLIPTokenizer',
    model_max_length: 77,
    bos_token: '<|startoftext|>',
    eos_token: '<|endoftext|>',
    unk_token: '<|endoftext|>',
    pad_token: padToken,
    do_lower_case: true,
  };
}

const json = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

/** A single original-format .safetensors file → a diffusers folder. */
export async function singleFileToFolder(
  file: string,
  dest: string,
  dtype?: FloatDType,
): Promise<void> {
  const model = await openSingleFile(file);
  const sdxl = model.components.text_encoder_2 !== undefined;
  await staged(dest, async (staging) => {
    const index: Record<string, unknown> = {
      ...model.index,
      tokenizer: ['transformers', 'CLIPTokenizer'],
      text_encoder: ['transformers', 'CLIPTextModel'],
      ...(sdxl
        ? {
            tokenizer_2: ['transformers', 'CLIPTokenizer'],
            text_encoder_2: ['transformers', 'CLIPTextModelWithProjection'],
          }
        : {}),
      unet: ['diffusers', 'UNet2DConditionModel'],
      vae: ['diffusers', 'AutoencoderKL'],
      scheduler: [
        'diffusers',
        String(model.schedulerConfig._class_name ?? 'EulerDiscreteScheduler'),
      ],
    };
    await mkdir(staging, { recursive: true });
    await writeFile(join(staging, 'model_index.json'), json(index));
    await mkdir(join(staging, 'scheduler'));
    await writeFile(
      join(staging, 'scheduler', 'scheduler_config.json'),
      json(model.schedulerConfig),
    );
    for (const [name, { padToken }] of Object.entries(model.tokenizers)) {
      await mkdir(join(staging, name));
      for (const f of ['vocab.json', 'merges.txt'])
        await copyFile(join(TOKENIZER_DIR, f), join(staging, name, f));
      await writeFile(
        join(staging, name, 'tokenizer_config.json'),
        json(clipTokenizerConfig(padToken)),
      );
    }
    for (const [role, source] of Object.entries(model.components)) {
      const dir = join(staging, role);
      await mkdir(dir);
      await writeFile(join(dir, 'config.json'), json(source.config));
      const base = role.startsWith('text_encoder') ? 'model' : 'diffusion_pytorch_model';
      await writeSafetensors(join(dir, `${base}.safetensors`), lazyEntries(source.weights, dtype));
    }
  });
}

function lazyEntries(
  weights: WeightSet,
  dtype: FloatDType | undefined,
): Record<string, LazyTensor> {
  const out: Record<string, LazyTensor> = {};
  for (const [key, record] of weights.records) out[key] = lazyRecord(record, dtype);
  return out;
}
