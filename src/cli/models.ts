import { existsSync, readdirSync, readFileSync } from 'node:fs';
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
