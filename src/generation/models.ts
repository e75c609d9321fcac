import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { join, resolve } from 'node:path';
import { UserError } from '../errors.js';
import { downloadModel, hubOptionsFromEnv, parseRepoSpec } from '../hub/index.js';

/** The repository's models/ folder, where the bundled models live. */
export const BUNDLED_DIR = resolve(fileURLToPath(new URL('../../../models', import.meta.url)));

/** The model used when none is named. */
export const DEFAULT_MODEL = 'shapes-diffusion';

/** The path of a bundled model, if it is installed. */
export function bundledModelPath(name: string): string | undefined {
  const dir = join(BUNDLED_DIR, name);
  return existsSync(join(dir, 'model_index.json')) || existsSync(join(dir, 'config.json'))
    ? dir
    : undefined;
}

/** Names of the bundled text-to-image models. */
export function bundledModels(): string[] {
  if (!existsSync(BUNDLED_DIR)) return [];
  return readdirSync(BUNDLED_DIR).filter((name) =>
    existsSync(join(BUNDLED_DIR, name, 'model_index.json')),
  );
}

/** `$GESSO_CONFIG_DIR/models.json` (default ~/.config/gesso): names for folders and Hub ids. */
export function configuredModelsFile(env: NodeJS.ProcessEnv = process.env): string {
  const dir =
    env.GESSO_CONFIG_DIR ?? join(env.XDG_CONFIG_HOME ?? join(homedir(), '.config'), 'gesso');
  return join(dir, 'models.json');
}

/** The user's named models: `{ "name": "/path/to/folder" | "org/name" }`. */
export function configuredModels(): Record<string, string> {
  const file = configuredModelsFile();
  if (!existsSync(file)) return {};
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    throw new UserError('bad-config', `${file} is not valid JSON: ${(error as Error).message}`);
  }
  if (
    typeof value !== 'object' ||
    value === null ||
    Array.isArray(value) ||
    Object.values(value).some((v) => typeof v !== 'string')
  )
    throw new UserError(
      'bad-config',
      `${file} must map model names to folders or Hub ids (strings)`,
    );
  return value as Record<string, string>;
}

/**
 * A model folder from what the user typed: a folder, a bundled name, a Hub id (`org/name`,
 * `org/name@revision`: downloaded into the Hub cache on first use), or nothing (the default).
 */
export async function resolveModel(
  spec: string | undefined,
  options: {
    variant?: string;
    onFile?: (info: { path: string; bytes: number; cached: boolean }) => void;
  } = {},
): Promise<string> {
  const name = spec ?? DEFAULT_MODEL;
  if (spec !== undefined && existsSync(spec)) return spec;
  const configured = spec !== undefined ? configuredModels()[spec] : undefined;
  if (configured !== undefined && configured !== spec) return resolveModel(configured, options);
  const bundled = bundledModelPath(name);
  if (bundled !== undefined && existsSync(join(bundled, 'model_index.json'))) return bundled;
  const hub = spec !== undefined ? parseRepoSpec(spec) : undefined;
  if (hub !== undefined)
    return downloadModel(hub, {
      ...hubOptionsFromEnv(),
      ...(options.variant !== undefined ? { variant: options.variant } : {}),
      ...(options.onFile !== undefined ? { onFile: options.onFile } : {}),
    });
  const known = bundledModels();
  throw new UserError(
    'model-not-found',
    spec === undefined
      ? `no --model given and the bundled default '${DEFAULT_MODEL}' is not installed in ${BUNDLED_DIR}; pass --model DIR`
      : `no model folder, bundled model or Hub id '${spec}' (bundled: ${known.join(', ') || 'none'}); pass a folder with model_index.json, a bundled name, or org/name from the Hub`,
  );
}

export interface ModelRow {
  readonly name: string;
  readonly source: 'bundled' | 'hub cache' | 'configured';
  readonly family: string;
  readonly bytes: number;
  readonly formats: string[];
  readonly path: string;
}

function readJson(path: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** A family name people recognise, from the folder's configs. */
export function modelFamily(dir: string): string {
  const index = readJson(join(dir, 'model_index.json'));
  if (index === undefined) return 'unknown';
  const gesso = index._gesso as { route?: string } | undefined;
  if (index._class_name === 'GessoGanPipeline') return 'gesso GAN (shapes world)';
  if (gesso?.route === 'diffusion') return 'gesso diffusion (shapes world)';
  const unet = readJson(join(dir, 'unet', 'config.json'));
  const cross = unet?.cross_attention_dim;
  const width = Array.isArray(cross) ? cross[0] : cross;
  if (index._class_name === 'StableDiffusionXLPipeline' || width === 2048) return 'SDXL';
  if (width === 1024) return 'SD 2.x';
  if (width === 768) return 'SD 1.x';
  if (index._class_name === 'StableDiffusionPipeline') return 'Stable Diffusion (1.x/2.x layout)';
  return String(index._class_name ?? 'unknown');
}

function sizeAndFormats(dir: string): { bytes: number; formats: string[] } {
  let bytes = 0;
  const formats = new Set<string>();
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    if (!entry.isFile() && !entry.isSymbolicLink()) continue;
    try {
      bytes += statSync(path).size; // follows the Hub cache's symlinks to their blobs
    } catch {
      continue;
    }
    const m = /(?:\.(fp16|bf16|fp32))?\.(safetensors|bin|onnx|ckpt)$/.exec(entry.name);
    if (m !== null) formats.add(m[1] !== undefined ? `${m[2]} (${m[1]})` : m[2]!);
  }
  return { bytes, formats: [...formats].sort() };
}

function listHubCache(): ModelRow[] {
  const cache = hubOptionsFromEnv().cacheDir;
  if (!existsSync(cache)) return [];
  const rows: ModelRow[] = [];
  for (const folder of readdirSync(cache)) {
    if (!folder.startsWith('models--')) continue;
    const repo = folder.slice('models--'.length).split('--').join('/');
    const refs = join(cache, folder, 'refs');
    const names = new Map<string, string>();
    if (existsSync(refs))
      for (const ref of readdirSync(refs))
        names.set(readFileSync(join(refs, ref), 'utf8').trim(), ref);
    const snapshots = join(cache, folder, 'snapshots');
    if (!existsSync(snapshots)) continue;
    for (const commit of readdirSync(snapshots)) {
      const path = join(snapshots, commit);
      if (!existsSync(join(path, 'model_index.json'))) continue;
      const ref = names.get(commit);
      rows.push({
        name: ref === undefined || ref === 'main' ? repo : `${repo}@${ref}`,
        source: 'hub cache',
        family: modelFamily(path),
        ...sizeAndFormats(path),
        path,
      });
    }
  }
  return rows;
}

/** Every model gesso can run here: bundled, in the Hub cache, and configured by name. */
export function listModels(): ModelRow[] {
  const rows: ModelRow[] = bundledModels().map((name) => {
    const path = join(BUNDLED_DIR, name);
    return { name, source: 'bundled', family: modelFamily(path), ...sizeAndFormats(path), path };
  });
  rows.push(...listHubCache());
  for (const [name, target] of Object.entries(configuredModels())) {
    const present = existsSync(join(target, 'model_index.json'));
    rows.push({
      name,
      source: 'configured',
      family: present ? modelFamily(target) : 'Hub id (downloaded on first use)',
      ...(present ? sizeAndFormats(target) : { bytes: 0, formats: [] }),
      path: target,
    });
  }
  return rows;
}
