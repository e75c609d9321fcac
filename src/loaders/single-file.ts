import { open, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { UserError } from '../errors.js';
import type { ExternalData } from '../graph/ir.js';
import { SafetensorsFile, type LazyTensor, type TensorInfo } from '../io/safetensors.js';
import { bytesPerElement as dtypeBytes } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';
import { fileFingerprint, WeightSet, type WeightRecord } from '../nn/weights.js';
import {
  openClipKeyToDiffusers,
  openClipKeyToOriginal,
  unetKeyToDiffusers,
  unetKeyToOriginal,
  vaeKeyToDiffusers,
  vaeKeyToOriginal,
  type KeyLink,
} from './checkpoint-keys.js';
import type { ComponentSource } from './component.js';

/**
 * Single-file checkpoints: one .safetensors with the original CompVis / Stability key names, as
 * model sites share them. The family comes from the keys, the architecture from the tensor shapes
 * (as ComfyUI's model detection reads them), and what shapes cannot tell from the family's
 * released models: attention heads (SD 1.x: 8 per block; SD 2.x and SDXL: 64 channels a head;
 * CLIP text encoders: 64 channels a head), 32 normalization groups, the VAE scaling, the
 * scheduler. A file gesso wrote carries its exact diffusers configs in the header metadata
 * (`gesso.configs`), and those win.
 */

export type CheckpointFamily = 'sd1' | 'sd2' | 'sdxl';

type Json = Record<string, unknown>;

/** Where each component's weights sit in an original checkpoint. */
const PREFIX = {
  unet: 'model.diffusion_model.',
  vae: 'first_stage_model.',
  sd1Text: 'cond_stage_model.transformer.',
  sd2Text: 'cond_stage_model.model.',
  sdxlText: 'conditioner.embedders.0.transformer.',
  sdxlText2: 'conditioner.embedders.1.model.',
} as const;

export const CLIP_BOS = 49406;
export const CLIP_EOS = 49407;

/** A single-file model opened as the components of a diffusers folder. */
export interface SingleFileModel {
  readonly path: string;
  readonly family: CheckpointFamily;
  /** The pipeline's model_index.json as the diffusers folder would have it. */
  readonly index: Json;
  readonly components: Readonly<Record<string, ComponentSource>>;
  readonly schedulerConfig: Json;
  /** Each tokenizer's pad token ('!' for OpenCLIP encoders). */
  readonly tokenizers: Readonly<Record<string, { readonly padToken: string }>>;
}

function fail(path: string, message: string): never {
  throw new UserError('bad-checkpoint', `${path}: ${message}`);
}

/** Keys under `prefix`, without it. */
function under(tensors: ReadonlyMap<string, TensorInfo>, prefix: string): Map<string, TensorInfo> {
  const out = new Map<string, TensorInfo>();
  for (const [key, info] of tensors)
    if (key.startsWith(prefix)) out.set(key.slice(prefix.length), info);
  return out;
}

function familyOf(keys: ReadonlyMap<string, TensorInfo>, path: string): CheckpointFamily {
  const has = (prefix: string) => [...keys.keys()].some((k) => k.startsWith(prefix));
  if (!has(PREFIX.unet))
    fail(
      path,
      'holds no model.diffusion_model.* weights, so it is not an original-format Stable Diffusion checkpoint (a LoRA? pass it with --lora; a diffusers model? give its folder)',
    );
  if (has('conditioner.embedders.0.model.'))
    throw new UserError(
      'unsupported-model',
      `${path} is an SDXL refiner checkpoint, which gesso does not run yet; use an SDXL base model`,
    );
  if (has(PREFIX.sdxlText2)) return 'sdxl';
  if (has(PREFIX.sd2Text)) return 'sd2';
  if (has(PREFIX.sd1Text)) return 'sd1';
  return fail(
    path,
    'has a UNet but no text encoder (cond_stage_model.* or conditioner.embedders.*); gesso needs a complete checkpoint',
  );
}

const count = (keys: Iterable<string>, pattern: RegExp): number => {
  const seen = new Set<string>();
  for (const k of keys) {
    const m = pattern.exec(k);
    if (m !== null) seen.add(m[1]!);
  }
  return seen.size;
};

/** Heads for a width when the file cannot say: 64 channels a head where it divides, else 8. */
function headsFor(width: number): number {
  return width % 64 === 0 ? width / 64 : Math.max(1, Math.floor(width / 8));
}

function shapeOf(
  keys: ReadonlyMap<string, TensorInfo>,
  key: string,
  path: string,
): readonly number[] {
  const info = keys.get(key);
  if (info === undefined)
    fail(path, `lacks the weight '${key}' that every checkpoint of its kind has`);
  return info.shape;
}

/** The UNet's diffusers config, read from the shapes of its original keys. */
export function inferUnetConfig(
  unet: ReadonlyMap<string, TensorInfo>,
  family: CheckpointFamily,
  path: string,
): Json {
  const shape = (key: string) => shapeOf(unet, `${key}.weight`, path);
  const keys = [...unet.keys()];
  const [modelChannels, inChannels] = shape('input_blocks.0.0') as [number, number];
  const downsamplers = keys
    .map((k) => /^input_blocks\.(\d+)\.0\.op\.weight$/.exec(k))
    .filter((m) => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
  const lastInput = Math.max(
    ...keys.map((k) => Number(/^input_blocks\.(\d+)\./.exec(k)?.[1] ?? 0)),
  );
  const layers = downsamplers.length > 0 ? downsamplers[0]! - 1 : lastInput;
  const levels = downsamplers.length + 1;
  const blockOut: number[] = [];
  const attention: boolean[] = [];
  const depth: number[] = [];
  let linear = false;
  let context = 0;
  for (let level = 0; level < levels; level++) {
    const first = `input_blocks.${1 + level * (layers + 1)}`;
    blockOut.push(shape(`${first}.0.out_layers.3`)[0]!);
    const attn = `${first}.1.`;
    const hasAttention = unet.has(`${attn}proj_in.weight`);
    attention.push(hasAttention);
    depth.push(
      hasAttention
        ? count(keys, new RegExp(`^${attn.replace(/\./g, '\\.')}transformer_blocks\\.(\\d+)\\.`))
        : 1,
    );
    if (hasAttention) {
      linear = unet.get(`${attn}proj_in.weight`)!.shape.length === 2;
      context = shape(`${attn}transformer_blocks.0.attn2.to_k`)[1]!;
    }
  }
  if (modelChannels !== blockOut[0]) {
    // diffusers' conv_in writes block_out_channels[0] channels; other layouts are not SD UNets.
    fail(
      path,
      `its UNet's first convolution has ${modelChannels} channels but its first level ${blockOut[0]}`,
    );
  }
  const heads = family === 'sd1' ? 8 : blockOut.map((channels) => headsFor(channels));
  const config: Json = {
    _class_name: 'UNet2DConditionModel',
    in_channels: inChannels,
    out_channels: shape('out.2')[0],
    block_out_channels: blockOut,
    layers_per_block: layers,
    down_block_types: attention.map((a) => (a ? 'CrossAttnDownBlock2D' : 'DownBlock2D')),
    up_block_types: [...attention].reverse().map((a) => (a ? 'CrossAttnUpBlock2D' : 'UpBlock2D')),
    transformer_layers_per_block: depth,
    attention_head_dim: heads,
    cross_attention_dim: context,
    use_linear_projection: linear,
    norm_num_groups: 32,
    sample_size: family === 'sdxl' ? 128 : 64,
  };
  if (unet.has('label_emb.0.0.weight')) {
    config.addition_embed_type = 'text_time';
    config.projection_class_embeddings_input_dim = shape('label_emb.0.0')[1];
  }
  return config;
}

export function inferVaeConfig(
  vae: ReadonlyMap<string, TensorInfo>,
  family: CheckpointFamily,
  path: string,
): Json {
  const keys = [...vae.keys()];
  const levels = count(keys, /^encoder\.down\.(\d+)\./);
  if (levels === 0)
    fail(path, 'has no VAE (first_stage_model.encoder.down.*); gesso needs a complete checkpoint');
  const blockOut = Array.from(
    { length: levels },
    (_, i) => shapeOf(vae, `encoder.down.${i}.block.0.conv2.weight`, path)[0]!,
  );
  return {
    _class_name: 'AutoencoderKL',
    in_channels: shapeOf(vae, 'encoder.conv_in.weight', path)[1],
    out_channels: shapeOf(vae, 'decoder.conv_out.weight', path)[0],
    latent_channels: shapeOf(vae, 'decoder.conv_in.weight', path)[1],
    block_out_channels: blockOut,
    down_block_types: blockOut.map(() => 'DownEncoderBlock2D'),
    up_block_types: blockOut.map(() => 'UpDecoderBlock2D'),
    layers_per_block: count(keys, /^encoder\.down\.0\.block\.(\d+)\./),
    norm_num_groups: 32,
    scaling_factor: family === 'sdxl' ? 0.13025 : 0.18215,
    use_quant_conv: vae.has('quant_conv.weight'),
    use_post_quant_conv: vae.has('post_quant_conv.weight'),
    sample_size: family === 'sdxl' ? 1024 : 512,
  };
}

/** A CLIP text model's config from its diffusers-named weights. */
function clipConfig(
  weights: ReadonlyMap<string, readonly number[]>,
  act: string,
  path: string,
): Json {
  const get = (key: string) => weights.get(key) ?? fail(path, `its text encoder lacks '${key}'`);
  const [vocab, hidden] = get('text_model.embeddings.token_embedding.weight') as [number, number];
  const projection = weights.get('text_projection.weight');
  return {
    architectures: [projection !== undefined ? 'CLIPTextModelWithProjection' : 'CLIPTextModel'],
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: get('text_model.encoder.layers.0.mlp.fc1.weight')[0],
    num_hidden_layers: count(weights.keys(), /^text_model\.encoder\.layers\.(\d+)\./),
    num_attention_heads: headsFor(hidden),
    max_position_embeddings: get('text_model.embeddings.position_embedding.weight')[0],
    hidden_act: act,
    layer_norm_eps: 1e-5,
    bos_token_id: CLIP_BOS,
    eos_token_id: CLIP_EOS,
    pad_token_id: 1,
    ...(projection !== undefined ? { projection_dim: projection[0] } : {}),
  };
}

function schedulerFor(prediction: string): Json {
  return {
    _class_name: 'EulerDiscreteScheduler',
    num_train_timesteps: 1000,
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: 'scaled_linear',
    prediction_type: prediction,
    steps_offset: 1,
    timestep_spacing: 'leading',
    interpolation_type: 'linear',
    use_karras_sigmas: false,
    clip_sample: false,
    set_alpha_to_one: false,
  };
}

/**
 * SD 2.x checkpoints do not say whether they predict noise or velocity. In order: the header's
 * ModelSpec `modelspec.prediction_type`, a `v_pred` marker key, then ComfyUI's test (the 768-v
 * models' last transformer norm bias has a standard deviation above 0.09; the 512 base's does not).
 */
async function sd2Prediction(file: SafetensorsFile): Promise<'epsilon' | 'v_prediction'> {
  const spec = file.metadata['modelspec.prediction_type'];
  if (spec === 'v' || spec === 'v_prediction') return 'v_prediction';
  if (spec === 'epsilon') return 'epsilon';
  if (file.tensors.has('v_pred')) return 'v_prediction';
  const key = `${PREFIX.unet}output_blocks.11.1.transformer_blocks.0.norm1.bias`;
  if (!file.tensors.has(key)) return 'epsilon';
  const values = (await file.read(key)).to('float32').data as Float32Array;
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  const variance = values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length;
  return Math.sqrt(variance) > 0.09 ? 'v_prediction' : 'epsilon';
}

// ---- records ----

function recordOf(key: string, info: TensorInfo, path: string): WeightRecord {
  return {
    key,
    dtype: WeightSet.dtypeOf(info, path),
    shape: info.shape,
    data: { path, offset: info.byteOffset, length: info.byteLength },
  };
}

/** The three equal row blocks of an OpenCLIP in_proj tensor, as ranges of the same bytes. */
function splitRows(record: WeightRecord, keys: readonly string[]): WeightRecord[] {
  const [rows, ...rest] = record.shape as [number, ...number[]];
  const data = record.data as ExternalData;
  const part = data.length / 3;
  return keys.map((key, i) => ({
    key,
    dtype: record.dtype,
    shape: [rows / 3, ...rest],
    data: { path: data.path, offset: data.offset + i * part, length: part },
  }));
}

export async function readRecord(record: WeightRecord): Promise<Tensor> {
  if (record.data instanceof Tensor) return record.data;
  const { path, offset, length } = record.data;
  const handle = await open(path, 'r');
  try {
    const bytes = Buffer.alloc(length);
    await handle.read(bytes, 0, length, offset);
    return Tensor.fromBytes(record.dtype, record.shape, bytes);
  } finally {
    await handle.close();
  }
}

function transpose2d(t: Tensor): Tensor {
  const [rows, cols] = t.shape as [number, number];
  const size = dtypeBytes(t.dtype);
  const from = t.bytes();
  const to = new Uint8Array(from.length);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++)
      to.set(
        from.subarray((r * cols + c) * size, (r * cols + c + 1) * size),
        (c * rows + r) * size,
      );
  return Tensor.fromBytes(t.dtype, [cols, rows], to);
}

/** Original records → diffusers records through one component's key mapping. */
async function mapRecords(
  records: ReadonlyMap<string, WeightRecord>,
  map: (key: string) => KeyLink | undefined,
  path: string,
  what: string,
): Promise<WeightRecord[]> {
  const out: WeightRecord[] = [];
  const unknown: string[] = [];
  for (const [key, record] of records) {
    const link = map(key);
    if (link === undefined) {
      unknown.push(key);
      continue;
    }
    const [first] = link.diffusers as [string];
    if (link.transform === 'qkv') out.push(...splitRows(record, link.diffusers));
    else if (link.transform === 'conv1x1')
      out.push({ ...record, key: first, shape: record.shape.slice(0, 2) });
    else if (link.transform === 'transpose') {
      const t = transpose2d(await readRecord(record));
      out.push({ key: first, dtype: t.dtype, shape: t.shape, data: t });
    } else out.push({ ...record, key: first });
  }
  if (unknown.length > 0)
    fail(
      path,
      `its ${what} has weights gesso cannot place: ${unknown.slice(0, 6).join(', ')}${unknown.length > 6 ? ` and ${unknown.length - 6} more` : ''}`,
    );
  return out;
}

const same = (key: string): KeyLink => ({ diffusers: [key], transform: 'same' });

/** HF-style CLIP keys, with the `text_model.` level older exports lack. */
function clipKey(key: string): KeyLink | undefined {
  if (key === 'logit_scale') return undefined;
  return same(key.startsWith('text_model.') ? key : `text_model.${key}`);
}

/**
 * Keys inside a component's prefix that no diffusers module has (buffers and CLIP's logit scale).
 * Keys outside every prefix (EMA copies, noise-schedule buffers) are never read.
 */
function isIgnored(key: string): boolean {
  // `loss.*` under the VAE: the training loss's discriminator some checkpoints still carry.
  return /(^|\.)(position_ids|logit_scale|attn_mask)$/.test(key) || key.startsWith('loss.');
}

/**
 * Opens a single-file checkpoint as a diffusers folder's components (nothing is copied).
 * `storedConfigs: false` ignores configs recorded in the header and infers every one.
 */
export async function openSingleFile(
  file: string,
  options: { storedConfigs?: boolean } = {},
): Promise<SingleFileModel> {
  const path = resolve(file);
  const fingerprint = fileFingerprint(path, await stat(path).catch(() => undefined));
  return SafetensorsFile.with(path, async (st) => {
    const tensors = st.tensors;
    const family = familyOf(tensors, path);
    const stored =
      options.storedConfigs === false ? {} : parseStoredConfigs(st.metadata['gesso.configs'], path);

    const records = (prefix: string) => {
      const out = new Map<string, WeightRecord>();
      for (const [key, info] of under(tensors, prefix))
        if (!isIgnored(key)) out.set(key, recordOf(key, info, path));
      return out;
    };
    const unetInfo = under(tensors, PREFIX.unet);
    const vaeInfo = under(tensors, PREFIX.vae);
    const unetConfigInferred = inferUnetConfig(unetInfo, family, path);
    const layers = unetConfigInferred.layers_per_block as number;
    const vaeConfigInferred = inferVaeConfig(vaeInfo, family, path);
    const vaeLevels = (vaeConfigInferred.block_out_channels as number[]).length;

    const unetRecords = await mapRecords(
      records(PREFIX.unet),
      (k) => {
        const d = unetKeyToDiffusers(k, layers);
        return d === undefined ? undefined : same(d);
      },
      path,
      'UNet',
    );
    const vaeRecords = await mapRecords(
      records(PREFIX.vae),
      (k) => vaeKeyToDiffusers(k, vaeLevels),
      path,
      'VAE',
    );

    const text: Record<string, { records: WeightRecord[]; act: string; pad: string }> = {};
    if (family === 'sd1') {
      text.text_encoder = {
        records: await mapRecords(records(PREFIX.sd1Text), clipKey, path, 'text encoder'),
        act: 'quick_gelu',
        pad: '<|endoftext|>',
      };
    } else if (family === 'sd2') {
      // SD 2.x conditions on the penultimate block of OpenCLIP-H: diffusers' model stops there.
      const all = records(PREFIX.sd2Text);
      const blocks = count(all.keys(), /^transformer\.resblocks\.(\d+)\./);
      const used = new Map(
        [...all].filter(
          ([k]) => !k.startsWith(`transformer.resblocks.${blocks - 1}.`) && k !== 'text_projection',
        ),
      );
      text.text_encoder = {
        records: await mapRecords(used, openClipKeyToDiffusers, path, 'text encoder'),
        act: 'gelu',
        pad: '!',
      };
    } else {
      text.text_encoder = {
        records: await mapRecords(records(PREFIX.sdxlText), clipKey, path, 'first text encoder'),
        act: 'quick_gelu',
        pad: '<|endoftext|>',
      };
      text.text_encoder_2 = {
        records: await mapRecords(
          records(PREFIX.sdxlText2),
          openClipKeyToDiffusers,
          path,
          'second text encoder',
        ),
        act: 'gelu',
        pad: '!',
      };
    }

    const components: Record<string, ComponentSource> = {};
    const textConfigs: Record<string, Json> = {};
    for (const [role, t] of Object.entries(text)) {
      const config =
        stored[role] ?? clipConfig(new Map(t.records.map((r) => [r.key, r.shape])), t.act, path);
      textConfigs[role] = config;
      components[role] = {
        role,
        name: `${path}#${role}`,
        config,
        weights: WeightSet.fromRecords(t.records, `${path} (${role})`, `${fingerprint}#${role}`),
      };
    }
    const unetConfig = stored.unet ?? { ...unetConfigInferred };
    if (stored.unet === undefined && family === 'sdxl') {
      // The pooled text embedding fills the added conditioning; the rest is six time ids.
      const pooled =
        (textConfigs.text_encoder_2!.projection_dim as number | undefined) ??
        (textConfigs.text_encoder_2!.hidden_size as number);
      unetConfig.addition_time_embed_dim =
        ((unetConfig.projection_class_embeddings_input_dim as number) - pooled) / 6;
    }
    const prediction =
      (stored.scheduler?.prediction_type as string | undefined) ??
      (family === 'sd2' ? await sd2Prediction(st) : 'epsilon');
    if (stored.unet === undefined && family === 'sd2' && prediction === 'v_prediction') {
      unetConfig.sample_size = 96;
      unetConfig.upcast_attention = true;
    }
    components.unet = {
      role: 'unet',
      name: `${path}#unet`,
      config: unetConfig,
      weights: WeightSet.fromRecords(unetRecords, `${path} (UNet)`, `${fingerprint}#unet`),
    };
    components.vae = {
      role: 'vae',
      name: `${path}#vae`,
      config: stored.vae ?? vaeConfigInferred,
      weights: WeightSet.fromRecords(vaeRecords, `${path} (VAE)`, `${fingerprint}#vae`),
    };
    const index: Json = {
      _class_name: family === 'sdxl' ? 'StableDiffusionXLPipeline' : 'StableDiffusionPipeline',
      ...(family === 'sdxl' ? { force_zeros_for_empty_prompt: true } : {}),
      ...(stored.index ?? {}),
    };
    return {
      path,
      family,
      index,
      components,
      schedulerConfig: stored.scheduler ?? schedulerFor(prediction),
      tokenizers: Object.fromEntries(
        Object.entries(text).map(([role, t]) => [
          role === 'text_encoder' ? 'tokenizer' : 'tokenizer_2',
          { padToken: t.pad },
        ]),
      ),
    };
  });
}

function parseStoredConfigs(text: string | undefined, path: string): Partial<Record<string, Json>> {
  if (text === undefined) return {};
  try {
    const value = JSON.parse(text) as unknown;
    if (typeof value === 'object' && value !== null && !Array.isArray(value))
      return value as Record<string, Json>;
  } catch {
    // reported below
  }
  return fail(
    path,
    "its header's gesso.configs metadata is not a JSON object; remove it to infer the configs from the shapes",
  );
}

// ---- writing ----

/** A diffusers component to write under original names. */
export interface ComponentToWrite {
  readonly role: 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2';
  readonly config: Json;
  readonly weights: WeightSet;
}

function lazy(record: WeightRecord, transform: (t: Tensor) => Tensor = (t) => t): LazyTensor {
  const shape = transform === transpose2d ? [record.shape[1]!, record.shape[0]!] : record.shape;
  return {
    dtype: record.dtype,
    shape,
    bytes: async () => transform(await readRecord(record)).bytes(),
  };
}

/**
 * The original-format tensors of a diffusers model (the inverse of openSingleFile's mapping), and
 * the header metadata that records its exact configs. SD 2.x's unused last OpenCLIP block is
 * written as zeros, so the file has the block count the original format implies.
 */
export function originalTensors(
  family: CheckpointFamily,
  parts: readonly ComponentToWrite[],
): Record<string, LazyTensor> {
  const out: Record<string, LazyTensor> = {};
  for (const part of parts) {
    const records = [...part.weights.records.values()];
    if (part.role === 'unet') {
      const layers = (part.config.layers_per_block as number | undefined) ?? 2;
      const up = ((part.config.up_block_types as string[] | undefined) ?? []).map((t) =>
        t.startsWith('CrossAttn'),
      );
      for (const r of records) {
        const key = unetKeyToOriginal(r.key, layers, up);
        if (key === undefined)
          throw new UserError('bad-checkpoint', `no original name for UNet weight '${r.key}'`);
        out[PREFIX.unet + key] = lazy(r);
      }
    } else if (part.role === 'vae') {
      const levels = ((part.config.block_out_channels as number[] | undefined) ?? [0, 0, 0, 0])
        .length;
      for (const r of records) {
        const key = vaeKeyToOriginal(r.key, levels);
        if (key === undefined)
          throw new UserError('bad-checkpoint', `no original name for VAE weight '${r.key}'`);
        const conv = /\.attn_1\.(q|k|v|proj_out)\.weight$/.test(key);
        out[PREFIX.vae + key] = conv ? { ...lazy(r), shape: [...r.shape, 1, 1] } : lazy(r);
      }
    } else if (part.role === 'text_encoder' && family !== 'sd2') {
      const prefix = family === 'sd1' ? PREFIX.sd1Text : PREFIX.sdxlText;
      for (const r of records) out[prefix + r.key] = lazy(r);
    } else {
      const prefix = family === 'sd2' ? PREFIX.sd2Text : PREFIX.sdxlText2;
      const byKey = new Map(records.map((r) => [r.key, r]));
      for (const r of records) {
        const key = openClipKeyToOriginal(r.key);
        if (key === undefined)
          throw new UserError(
            'bad-checkpoint',
            `no original name for text encoder weight '${r.key}'`,
          );
        if (key.endsWith('in_proj_weight') || key.endsWith('in_proj_bias')) {
          if (!r.key.includes('.q_proj.')) continue;
          const parts3 = ['q', 'k', 'v'].map((p) =>
            byKey.get(r.key.replace('.q_proj.', `.${p}_proj.`))!,
          );
          out[prefix + key] = {
            dtype: r.dtype,
            shape: [r.shape[0]! * 3, ...r.shape.slice(1)],
            bytes: async () => {
              const chunks = await Promise.all(
                parts3.map(async (p) => (await readRecord(p)).bytes()),
              );
              return Buffer.concat(chunks);
            },
          };
        } else out[prefix + key] = key === 'text_projection' ? lazy(r, transpose2d) : lazy(r);
      }
      if (family === 'sd2') {
        const layers = count(byKey.keys(), /^text_model\.encoder\.layers\.(\d+)\./);
        const last = `text_model.encoder.layers.${layers - 1}.`;
        for (const r of records.filter((x) => x.key.startsWith(last))) {
          const key = openClipKeyToOriginal(
            r.key.replace(last, `text_model.encoder.layers.${layers}.`),
          )!;
          const entry = out[prefix + openClipKeyToOriginal(r.key)!]!;
          out[prefix + key] = {
            dtype: entry.dtype,
            shape: entry.shape,
            bytes: () =>
              new Uint8Array(entry.shape.reduce((n, d) => n * d, 1) * dtypeBytes(r.dtype)),
          };
        }
      }
    }
  }
  return out;
}
