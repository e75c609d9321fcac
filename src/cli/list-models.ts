import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { hubOptionsFromEnv } from '../hub/index.js';
import { formatBytes, table } from './format.js';
import { BUNDLED_DIR, bundledModels, configuredModels, configuredModelsFile } from './models.js';

export const MODELS_USAGE = `usage: gesso models [--json]

Lists the models gesso can run: bundled with gesso, in the Hugging Face Hub cache
($HF_HUB_CACHE), and named in ${configuredModelsFile()} ({"name": "folder or org/name"}),
with each one's family, size on disk and weight formats.`;

interface ModelRow {
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

export async function modelsCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: { json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help === true) {
    process.stdout.write(`${MODELS_USAGE}\n`);
    return 0;
  }
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
  if (values.json) {
    process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
    return 0;
  }
  if (rows.length === 0) {
    process.stdout.write('no models found\n');
    return 0;
  }
  process.stdout.write(
    `${table(
      ['name', 'source', 'family', 'size', 'formats', 'path'],
      rows.map((r) => [
        r.name,
        r.source,
        r.family,
        r.bytes > 0 ? formatBytes(r.bytes) : '-',
        r.formats.join(', ') || '-',
        r.path,
      ]),
      [3],
    )}\n`,
  );
  return 0;
}
