import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { UserError } from '../errors.js';
import { SafetensorsFile } from '../io/safetensors.js';
import type { WeightSet } from '../nn/weights.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * LoRA: low-rank deltas merged into a model's weights before its graph is built, so a model with
 * LoRAs runs exactly as fast as without. For a layer with weight W, a LoRA gives `down` (A, rank
 * × in), `up` (B, out × rank) and optionally `alpha`; the merged weight is
 *   W + scale · (alpha / rank) · B·A        (alpha defaults to rank, i.e. a factor of 1)
 * with convolutions flattened to (out × in·kh·kw). Formats read:
 * - diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (also without the
 *   component prefix, with `base_model.model.`, and the older `.lora.down.weight` /
 *   `.lora.up.weight` and `processor.to_q_lora.down.weight` spellings);
 * - kohya (sd-scripts, A1111): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight`
 *   / `.alpha`, and `lora_te_` (`lora_te1_`, `lora_te2_` for SDXL) for the text encoders.
 */

export interface LoraSpec {
  readonly path: string;
  /** The UNet's scale, and the text encoders' unless `textEncoderScale` is given. */
  readonly scale: number;
  /** A1111's `te` multiplier, `<lora:name:te:unet>`. */
  readonly textEncoderScale?: number;
}

/** Which model component a LoRA layer belongs to. */
export type LoraComponent = 'unet' | 'text_encoder' | 'text_encoder_2';

interface LoraLayer {
  down?: Tensor<'float32'>;
  up?: Tensor<'float32'>;
  alpha?: number;
}

/** One LoRA file's layers, by component and by the module path they name. */
export interface LoraFile {
  readonly path: string;
  readonly scale: number;
  readonly textEncoderScale: number;
  /** Module path as written in the file (dots or kohya's underscores), per component. */
  readonly layers: ReadonlyMap<LoraComponent, ReadonlyMap<string, LoraLayer>>;
  readonly fingerprint: string;
}

const KOHYA_PREFIX: [string, LoraComponent][] = [
  ['lora_unet_', 'unet'],
  ['lora_te1_', 'text_encoder'],
  ['lora_te2_', 'text_encoder_2'],
  ['lora_te_', 'text_encoder'],
];

/** Splits a key into component, module path and role (down, up, alpha), or undefined. */
function parseKey(
  key: string,
): { component: LoraComponent; module: string; role: 'down' | 'up' | 'alpha' } | undefined {
  for (const [prefix, component] of KOHYA_PREFIX) {
    if (!key.startsWith(prefix)) continue;
    const rest = key.slice(prefix.length);
    const m = /^(.*)\.(lora_down\.weight|lora_up\.weight|alpha)$/.exec(rest);
    if (m === null) return undefined;
    const role = m[2] === 'alpha' ? 'alpha' : m[2]!.startsWith('lora_down') ? 'down' : 'up';
    return { component, module: m[1]!, role };
  }
  let rest = key.replace(/^base_model\.model\./, '');
  let component: LoraComponent = 'unet';
  for (const c of ['text_encoder_2', 'text_encoder', 'unet'] as const) {
    if (rest.startsWith(`${c}.`)) {
      component = c;
      rest = rest.slice(c.length + 1);
      break;
    }
  }
  const patterns: [RegExp, 'down' | 'up' | 'alpha'][] = [
    [/^(.*)\.lora_A(?:\.default)?\.weight$/, 'down'],
    [/^(.*)\.lora_B(?:\.default)?\.weight$/, 'up'],
    [/^(.*)\.lora\.down\.weight$/, 'down'],
    [/^(.*)\.lora\.up\.weight$/, 'up'],
    [/^(.*)\.alpha$/, 'alpha'],
  ];
  for (const [pattern, role] of patterns) {
    const m = pattern.exec(rest);
    if (m !== null) {
      // The attention-processor spelling: `attn1.processor.to_q_lora` is `attn1.to_q`.
      const module = m[1]!.replace(/\.processor\.(to_[qkv]|to_out)_lora$/, (_, l: string) =>
        l === 'to_out' ? '.to_out.0' : `.${l}`,
      );
      return { component, module, role };
    }
  }
  return undefined;
}

export async function readLora(spec: LoraSpec): Promise<LoraFile> {
  const layers = new Map<LoraComponent, Map<string, LoraLayer>>();
  const info = await stat(spec.path).catch(() => undefined);
  if (info === undefined)
    throw new UserError('missing-file', `LoRA file ${spec.path} does not exist`);
  await SafetensorsFile.with(spec.path, async (file) => {
    for (const name of file.names) {
      const parsed = parseKey(name);
      if (parsed === undefined) continue;
      const byModule = layers.get(parsed.component) ?? new Map<string, LoraLayer>();
      layers.set(parsed.component, byModule);
      const layer = byModule.get(parsed.module) ?? {};
      byModule.set(parsed.module, layer);
      const t = (await file.read(name)).toFloat32();
      if (parsed.role === 'alpha') layer.alpha = t.data[0]!;
      else layer[parsed.role] = t;
    }
  });
  if (layers.size === 0)
    throw new UserError(
      'bad-lora',
      `${spec.path} holds no LoRA weights gesso recognises (diffusers/PEFT lora_A/lora_B, or kohya lora_down/lora_up)`,
    );
  return {
    path: spec.path,
    scale: spec.scale,
    textEncoderScale: spec.textEncoderScale ?? spec.scale,
    layers,
    fingerprint: `${spec.path}:${info.size}:${info.mtimeMs}:${spec.scale}:${spec.textEncoderScale ?? spec.scale}`,
  };
}

/** Finds the weight a LoRA module path names: dotted as is, or kohya's underscored form. */
function targetKey(
  weights: WeightSet,
  module: string,
  underscored: Map<string, string>,
): string | undefined {
  const dotted = `${module}.weight`;
  if (weights.has(dotted)) return dotted;
  return underscored.get(module);
}

/**
 * The component's weights with every LoRA layer for it merged in. Merged weights become float32
 * tensors in memory; the rest stay in their files.
 */
export async function mergeLoras(
  weights: WeightSet,
  component: LoraComponent,
  loras: readonly LoraFile[],
): Promise<WeightSet> {
  const relevant = loras.filter((l) => (l.layers.get(component)?.size ?? 0) > 0);
  if (relevant.length === 0) return weights;
  const underscored = new Map<string, string>();
  for (const key of weights.records.keys()) {
    if (key.endsWith('.weight'))
      underscored.set(key.slice(0, -'.weight'.length).replace(/\./g, '_'), key);
  }
  const merged = new Map<string, Float32Array>();
  for (const lora of relevant) {
    for (const [module, layer] of lora.layers.get(component)!) {
      const key = targetKey(weights, module, underscored);
      if (key === undefined)
        throw new UserError(
          'bad-lora',
          `${lora.path}: layer '${module}' matches no weight of the ${component} (is this LoRA for another model family?)`,
        );
      if (layer.down === undefined || layer.up === undefined)
        throw new UserError(
          'bad-lora',
          `${lora.path}: layer '${module}' lacks its down or up matrix`,
        );
      const record = weights.get(key)!;
      let w = merged.get(key);
      if (w === undefined) {
        w = (await readRecord(weights, key)).data.slice();
        merged.set(key, w);
      }
      const rank = layer.down.shape[0]!;
      const out = layer.up.shape[0]!;
      const inner = layer.down.size / rank; // in · kh · kw
      if (out * inner !== w.length)
        throw new UserError(
          'bad-lora',
          `${lora.path}: layer '${module}' is ${out}×${inner}, the weight ${key} has shape [${record.shape.join(', ')}]`,
        );
      const scale = component === 'unet' ? lora.scale : lora.textEncoderScale;
      const factor = scale * ((layer.alpha ?? rank) / rank);
      const up = layer.up.data;
      const down = layer.down.data;
      for (let o = 0; o < out; o++) {
        for (let r = 0; r < rank; r++) {
          const u = up[o * rank + r]! * factor;
          if (u === 0) continue;
          const row = o * inner;
          const drow = r * inner;
          for (let i = 0; i < inner; i++) w[row + i] = w[row + i]! + u * down[drow + i]!;
        }
      }
    }
  }
  const overrides: Record<string, Tensor> = {};
  for (const [key, data] of merged)
    overrides[key] = new Tensor('float32', weights.get(key)!.shape, data);
  const print = createHash('sha256')
    .update(relevant.map((l) => l.fingerprint).join('|'))
    .digest('hex')
    .slice(0, 16);
  return weights.withTensors(overrides, `lora:${print}`);
}

async function readRecord(weights: WeightSet, key: string): Promise<Tensor<'float32'>> {
  const record = weights.get(key)!;
  if (record.data instanceof Tensor) return record.data.toFloat32();
  const { path, offset, length } = record.data;
  return SafetensorsFile.with(path, async (file) => {
    const t = [...file.tensors.values()].find(
      (x) => x.byteOffset === offset && x.byteLength === length,
    );
    if (t === undefined) throw new Error(`weight ${key} moved in ${path}`);
    return (await file.read(t.name)).toFloat32();
  });
}
