import { readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { UserError } from '../errors.js';
import { readUserFile } from '../io/atomic.js';
import { SafetensorsFile } from '../io/safetensors.js';
import { jsonObject } from './component.js';

/** What `gesso inspect` reports about a weight file. */
export interface WeightFileSummary {
  readonly file: string;
  readonly bytes: number;
  readonly format: 'safetensors' | 'onnx' | 'pytorch-pickle';
  /** `fp16` for `model.fp16.safetensors` and the like. */
  readonly variant: string | undefined;
  readonly tensors?: number;
  readonly parameters?: number;
  /** Tensor count per dtype. */
  readonly dtypes?: Readonly<Record<string, number>>;
}

export interface ComponentSummary {
  readonly name: string;
  readonly library: string | undefined;
  readonly className: string | undefined;
  readonly configFiles: readonly string[];
  readonly weightFiles: readonly WeightFileSummary[];
}

export interface ModelFolderSummary {
  readonly path: string;
  readonly pipelineClass: string | undefined;
  readonly diffusersVersion: string | undefined;
  readonly components: readonly ComponentSummary[];
}

async function readJson(path: string): Promise<Record<string, unknown>> {
  return jsonObject((await readUserFile(path)).toString('utf8'), path);
}

/** Counts of a .safetensors file's tensors, parameters and dtypes (reads only the header). */
export async function summarizeSafetensors(path: string): Promise<WeightFileSummary> {
  return SafetensorsFile.with(path, async (file) => {
    const dtypes: Record<string, number> = {};
    let parameters = 0;
    for (const t of file.tensors.values()) {
      dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
      parameters += t.shape.reduce((n, d) => n * d, 1);
    }
    return {
      file: basename(path),
      bytes: file.size,
      format: 'safetensors',
      variant: variantOf(basename(path)),
      tensors: file.tensors.size,
      parameters,
      dtypes,
    };
  });
}

function variantOf(file: string): string | undefined {
  const m = /\.([a-z0-9]+)\.(safetensors|bin|onnx)$/.exec(file);
  return m?.[1];
}

const WEIGHT_FORMATS: readonly [RegExp, WeightFileSummary['format']][] = [
  [/\.safetensors$/, 'safetensors'],
  [/\.onnx$/, 'onnx'],
  [/\.(bin|ckpt|pt|pth)$/, 'pytorch-pickle'],
];

async function summarizeComponent(
  dir: string,
  name: string,
  library: string | undefined,
  className: string | undefined,
): Promise<ComponentSummary> {
  const entries = (await readdir(dir, { withFileTypes: true }))
    .filter((e) => e.isFile())
    .map((e) => e.name)
    .sort();
  const configFiles = entries.filter((f) => f.endsWith('.json') || f.endsWith('.txt'));
  const weightFiles: WeightFileSummary[] = [];
  for (const file of entries) {
    const format = WEIGHT_FORMATS.find(([pattern]) => pattern.test(file))?.[1];
    if (format === undefined) continue;
    const path = join(dir, file);
    if (format === 'safetensors') weightFiles.push(await summarizeSafetensors(path));
    else
      weightFiles.push({ file, bytes: (await stat(path)).size, format, variant: variantOf(file) });
  }
  let cls = className;
  if (cls === undefined && configFiles.includes('config.json')) {
    const config = await readJson(join(dir, 'config.json'));
    const architectures = config.architectures;
    cls =
      typeof config._class_name === 'string'
        ? config._class_name
        : Array.isArray(architectures) && typeof architectures[0] === 'string'
          ? architectures[0]
          : undefined;
  }
  return { name, library, className: cls, configFiles, weightFiles };
}

/**
 * Describes a model folder: a diffusers pipeline (`model_index.json` naming its components), or a
 * single component folder (`config.json` beside weight files).
 */
export async function describeModelFolder(path: string): Promise<ModelFolderSummary> {
  const info = await stat(path).catch(() => undefined);
  if (info === undefined) throw new UserError('file-not-found', `${path} does not exist`);
  if (!info.isDirectory()) throw new UserError('not-a-folder', `${path} is not a folder`);
  const entries = await readdir(path);
  if (entries.includes('model_index.json')) {
    const index = await readJson(join(path, 'model_index.json'));
    const components: ComponentSummary[] = [];
    for (const [name, value] of Object.entries(index)) {
      if (name.startsWith('_') || !Array.isArray(value) || value.length !== 2) continue;
      const [library, className] = value as [unknown, unknown];
      if (library === null || className === null) continue;
      const dir = join(path, name);
      if (!(await stat(dir).catch(() => undefined))?.isDirectory()) {
        throw new UserError(
          'missing-component',
          `${path}: model_index.json names component '${name}', but the folder ${dir} is missing`,
        );
      }
      components.push(await summarizeComponent(dir, name, String(library), String(className)));
    }
    return {
      path,
      pipelineClass: typeof index._class_name === 'string' ? index._class_name : undefined,
      diffusersVersion:
        typeof index._diffusers_version === 'string' ? index._diffusers_version : undefined,
      components,
    };
  }
  const component = await summarizeComponent(path, basename(path), undefined, undefined);
  if (component.weightFiles.length === 0 && !component.configFiles.includes('config.json')) {
    throw new UserError(
      'not-a-model',
      `${path} holds no model: expected model_index.json (a diffusers pipeline) or config.json with weight files`,
    );
  }
  return { path, pipelineClass: undefined, diffusersVersion: undefined, components: [component] };
}
