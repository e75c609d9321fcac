import { readdir, readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { UserError } from '../errors.js';
import { WeightSet } from '../nn/weights.js';

/** Reads a component's `config.json` (or another JSON config file) as a plain object. */
export async function readConfig(
  dir: string,
  file = 'config.json',
): Promise<Record<string, unknown>> {
  const path = join(dir, file);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new UserError(
      'missing-config',
      `${path} is missing: every model component needs its ${file}`,
    );
  }
  return jsonObject(text, path);
}

/** The JSON object a config file holds; anything else is the user's file to mend. */
export function jsonObject(text: string, path: string): Record<string, unknown> {
  try {
    const value: unknown = JSON.parse(text);
    if (typeof value !== 'object' || value === null || Array.isArray(value))
      throw new Error('not a JSON object');
    return value as Record<string, unknown>;
  } catch (error) {
    throw new UserError('bad-config', `${path} is not valid JSON: ${(error as Error).message}`);
  }
}

/**
 * The .safetensors files holding a component's weights: `<base>[.<variant>].safetensors`, or the
 * shards its `.safetensors.index.json` lists. A variant that is absent falls back to the default
 * weights only when `fallback` is set.
 */
export async function findWeightFiles(
  dir: string,
  base: string,
  variant?: string,
): Promise<string[]> {
  const entries = await readdir(dir).catch(() => {
    throw new UserError('missing-component', `${dir} does not exist`);
  });
  const stem = variant === undefined ? base : `${base}.${variant}`;
  if (entries.includes(`${stem}.safetensors`)) return [join(dir, `${stem}.safetensors`)];
  const index = `${stem}.safetensors.index.json`;
  if (entries.includes(index)) {
    const parsed = await readConfig(dir, index);
    const map = parsed.weight_map;
    if (typeof map !== 'object' || map === null) {
      throw new UserError('bad-config', `${join(dir, index)} has no weight_map`);
    }
    const shards = [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort();
    const missing = shards.filter((s) => !entries.includes(s));
    if (missing.length > 0) {
      throw new UserError(
        'missing-weights',
        `${dir}: shards listed in ${index} are missing: ${missing.join(', ')}`,
      );
    }
    return shards.map((s) => join(dir, s));
  }
  const pickles = entries.filter((e) => e.startsWith(stem) && /\.(bin|ckpt|pt|pth)$/.test(e));
  if (pickles.length > 0) {
    throw new UserError(
      'unsupported-weights',
      `${dir} has only PyTorch pickle weights (${pickles.join(', ')}); gesso loads .safetensors (convert them with diffusers' save_pretrained(safe_serialization=True))`,
    );
  }
  const available = entries.filter((e) => e.endsWith('.safetensors'));
  throw new UserError(
    'missing-weights',
    `${dir} has no ${stem}.safetensors${variant !== undefined ? ` (variant '${variant}')` : ''}${available.length > 0 ? `; found: ${available.join(', ')}` : ''}`,
  );
}

/**
 * One model component's config and weights, wherever they come from: a diffusers component folder,
 * or a part of a single-file checkpoint.
 */
export interface ComponentSource {
  /** `unet`, `vae`, `text_encoder` or `text_encoder_2` (LoRAs are matched by it). */
  readonly role: string;
  /** The folder or `FILE#role`, for messages and cache keys. */
  readonly name: string;
  /** The config.json a diffusers folder would hold. */
  readonly config: Record<string, unknown>;
  readonly weights: WeightSet;
}

/** Config and weight headers of one component folder. */
export async function loadComponent(
  dir: string,
  base: string,
  variant?: string,
): Promise<ComponentSource> {
  const config = await readConfig(dir);
  const weights = await WeightSet.fromFiles(await findWeightFiles(dir, base, variant));
  return { role: basename(dir), name: dir, config, weights };
}
