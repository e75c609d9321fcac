import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, readFileSync } from 'node:fs';
import { lstat, mkdir, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { downloadFile, listFiles, modelInfo, type ListFileEntry } from '@huggingface/hub';
import { UserError } from '../errors.js';

/**
 * Models from the Hugging Face Hub, cached where Python's huggingface_hub caches them
 * (`$HF_HUB_CACHE/models--org--name/{blobs,refs,snapshots}`), so both share the files. The Hub's
 * HTTP API is spoken by @huggingface/hub; this module chooses the files a pipeline needs, resumes
 * partial downloads with Range requests and checks every blob against its hash before it enters
 * the cache (the library's own cache writer does neither).
 */

export interface HubOptions {
  /** `HF_ENDPOINT`, default https://huggingface.co. */
  readonly endpoint: string;
  /** `HF_TOKEN`, else the token file `$HF_TOKEN_PATH` or `$HF_HOME/token`. */
  readonly token?: string;
  /** `HF_HUB_CACHE`, default `$HF_HOME/hub`. */
  readonly cacheDir: string;
  /** `HF_HUB_OFFLINE=1`: no network; serve from the cache or fail. */
  readonly offline: boolean;
  /** The weight variant to prefer (`fp16`). */
  readonly variant?: string;
  readonly fetch?: typeof fetch;
  readonly onFile?: (info: { path: string; bytes: number; cached: boolean }) => void;
}

function truthy(value: string | undefined): boolean {
  return value !== undefined && ['1', 'true', 'yes', 'on'].includes(value.trim().toLowerCase());
}

/** Hub settings from the environment variables huggingface_hub reads. */
export function hubOptionsFromEnv(env: NodeJS.ProcessEnv = process.env): HubOptions {
  const home = env.HF_HOME ?? join(env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'huggingface');
  let token = env.HF_TOKEN;
  if (token === undefined || token === '') {
    const tokenPath = env.HF_TOKEN_PATH ?? join(home, 'token');
    token = existsSync(tokenPath) ? readFileSync(tokenPath, 'utf8').trim() : undefined;
  }
  return {
    endpoint: (env.HF_ENDPOINT ?? 'https://huggingface.co').replace(/\/+$/, ''),
    ...(token !== undefined && token !== '' ? { token } : {}),
    cacheDir: env.HF_HUB_CACHE ?? env.HUGGINGFACE_HUB_CACHE ?? join(home, 'hub'),
    offline: truthy(env.HF_HUB_OFFLINE) || truthy(env.TRANSFORMERS_OFFLINE),
  };
}

export interface RepoSpec {
  readonly repo: string;
  readonly revision: string;
}

const REPO = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;

/** `org/name` or `org/name@revision`; undefined when the text is not a Hub id. */
export function parseRepoSpec(text: string): RepoSpec | undefined {
  const at = text.indexOf('@');
  const repo = at < 0 ? text : text.slice(0, at);
  const revision = at < 0 ? 'main' : text.slice(at + 1);
  if (!REPO.test(repo) || repo.includes('..') || revision === '' || /\s/.test(revision))
    return undefined;
  return { repo, revision };
}

/** The cache folder of a model repository: `models--org--name`. */
export function repoFolder(cacheDir: string, repo: string): string {
  return join(cacheDir, `models--${repo.split('/').join('--')}`);
}

const COMMIT = /^[0-9a-f]{40}$/;

/** The cached snapshot folder of a revision, if the cache knows it. */
export function cachedSnapshot(spec: RepoSpec, cacheDir: string): string | undefined {
  const folder = repoFolder(cacheDir, spec.repo);
  let commit = spec.revision;
  if (!COMMIT.test(commit)) {
    const ref = join(folder, 'refs', spec.revision);
    if (!existsSync(ref)) return undefined;
    commit = readFileSync(ref, 'utf8').trim();
  }
  const snapshot = join(folder, 'snapshots', commit);
  return existsSync(join(snapshot, 'model_index.json')) || existsSync(join(snapshot, 'config.json'))
    ? snapshot
    : undefined;
}

/** Components gesso loads; others in a pipeline repo (safety checker, ...) are not fetched. */
const COMPONENTS = new Set([
  'tokenizer',
  'tokenizer_2',
  'text_encoder',
  'text_encoder_2',
  'unet',
  'vae',
  'scheduler',
  'generator',
]);

const WEIGHT = /\.(safetensors|bin|ckpt|pt|pth|msgpack|h5|onnx|onnx_data|pb)$/;

/**
 * One component's weights among its folder's files: the requested variant
 * (`name.fp16.safetensors`) where it exists, else the plain `.safetensors`, else `.bin`
 * (diffusers' preference), shards and their index included.
 */
function chooseWeights(names: readonly string[], variant?: string): string[] {
  const weights = names.filter((n) => WEIGHT.test(n) || n.endsWith('.index.json'));
  const isVariant = (n: string, v: string) =>
    n.includes(`.${v}.`) || new RegExp(`\\.${v}-\\d+-of-\\d+\\.`).test(n);
  const anyVariant = (n: string) => /\.(fp16|fp32|bf16|non_ema|ema)[.-]/.test(n);
  const pick = (ext: string): string[] => {
    const plain = weights.filter(
      (n) => (n.endsWith(ext) || n.endsWith(`${ext}.index.json`)) && !anyVariant(n),
    );
    if (variant !== undefined) {
      const wanted = weights.filter(
        (n) => (n.endsWith(ext) || n.endsWith(`${ext}.index.json`)) && isVariant(n, variant),
      );
      if (wanted.length > 0) return wanted;
    }
    return plain;
  };
  const safetensors = pick('.safetensors');
  return safetensors.length > 0 ? safetensors : pick('.bin');
}

/**
 * The files a model repo's loader needs. A diffusers pipeline repo: model_index.json and, for each
 * component gesso loads, its configuration files and one set of weights. A single-component repo
 * (config.json at the top, as the tiny autoencoders `madebyollin/taesd` and `taesdxl`): its
 * top-level configuration files and one set of weights.
 */
export function pipelineFiles(paths: readonly string[], variant?: string): string[] {
  const isConfig = (n: string) =>
    !WEIGHT.test(n) && n.endsWith('.json') && !n.endsWith('.index.json');
  if (!paths.includes('model_index.json')) {
    const top = paths.filter((p) => !p.includes('/'));
    return [...top.filter(isConfig), ...chooseWeights(top, variant)];
  }
  const chosen = ['model_index.json'];
  const byFolder = new Map<string, string[]>();
  for (const path of paths) {
    const parts = path.split('/');
    if (parts.length !== 2 || !COMPONENTS.has(parts[0]!)) continue;
    byFolder.set(parts[0]!, [...(byFolder.get(parts[0]!) ?? []), parts[1]!]);
  }
  for (const [folder, names] of byFolder) {
    const configs = names.filter((n) => !WEIGHT.test(n) && !n.endsWith('.index.json'));
    chosen.push(...configs.map((n) => `${folder}/${n}`));
    chosen.push(...chooseWeights(names, variant).map((n) => `${folder}/${n}`));
  }
  return chosen;
}

async function sizeOf(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch {
    return 0;
  }
}

async function hashFile(
  path: string,
  algorithm: 'sha256' | 'sha1',
  prefix?: Buffer,
): Promise<string> {
  const hash = createHash(algorithm);
  if (prefix !== undefined) hash.update(prefix);
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Whether a file holds exactly the bytes its Hub entry names (sha256 for LFS, git's blob sha1 otherwise). */
async function verify(path: string, entry: ListFileEntry): Promise<boolean> {
  if (entry.lfs !== undefined) return (await hashFile(path, 'sha256')) === entry.lfs.oid;
  if (entry.oid === undefined) return true;
  const size = await sizeOf(path);
  return (await hashFile(path, 'sha1', Buffer.from(`blob ${size}\0`))) === entry.oid;
}

function hubError(spec: RepoSpec, error: unknown): UserError {
  const message = error instanceof Error ? error.message : String(error);
  const status = (error as { statusCode?: number }).statusCode;
  if (status === 401 || status === 403)
    return new UserError(
      'hub-unauthorized',
      `the Hub refused access to ${spec.repo} (${message}); set HF_TOKEN to a token that can read it`,
    );
  if (status === 404)
    return new UserError(
      'model-not-found',
      `${spec.repo}@${spec.revision} is not on the Hub (${message}); check the name and revision`,
    );
  return new UserError(
    'hub-error',
    `cannot reach the Hub for ${spec.repo} (${message}); check the network or HF_ENDPOINT, or name a local folder instead`,
    {
      cause: error,
    },
  );
}

async function linkInto(snapshot: string, path: string, blob: string): Promise<void> {
  const pointer = join(snapshot, path);
  await mkdir(dirname(pointer), { recursive: true });
  try {
    await lstat(pointer);
    await rm(pointer);
  } catch {
    // not there yet
  }
  try {
    await symlink(relative(dirname(pointer), blob), pointer);
  } catch {
    await writeFile(pointer, await readFile(blob)); // no symlinks here: copy, as huggingface_hub does
  }
}

/**
 * Downloads (or finds in the cache) the files a pipeline needs from a Hub model repo and returns
 * the snapshot folder, which loads like any local model folder.
 */
export async function downloadModel(spec: RepoSpec, options: HubOptions): Promise<string> {
  const cached = cachedSnapshot(spec, options.cacheDir);
  if (options.offline) {
    if (cached !== undefined) return cached;
    throw new UserError(
      'offline',
      `${spec.repo}@${spec.revision} is not in the Hub cache ${options.cacheDir} and HF_HUB_OFFLINE is set; download it first with 'gesso download ${spec.repo}' while online`,
    );
  }
  const access = {
    hubUrl: options.endpoint,
    ...(options.token !== undefined ? { accessToken: options.token } : {}),
    ...(options.fetch !== undefined ? { fetch: options.fetch } : {}),
  };
  let commit: string;
  let entries: ListFileEntry[];
  try {
    const info = await modelInfo({
      name: spec.repo,
      revision: spec.revision,
      additionalFields: ['sha'],
      ...access,
    });
    commit = (info as { sha?: string }).sha ?? '';
    if (!COMMIT.test(commit))
      throw new Error(`the Hub gave no commit for revision ${spec.revision}`);
    entries = [];
    for await (const entry of listFiles({
      repo: spec.repo,
      revision: commit,
      recursive: true,
      ...access,
    }))
      entries.push(entry);
  } catch (error) {
    if (error instanceof UserError) throw error;
    // As huggingface_hub: with the network down, a cached snapshot still serves.
    const status = (error as { statusCode?: number }).statusCode;
    if (cached !== undefined && status === undefined) return cached;
    throw hubError(spec, error);
  }
  const files = new Map(entries.filter((e) => e.type === 'file').map((e) => [e.path, e]));
  if (!files.has('model_index.json') && !files.has('config.json'))
    throw new UserError(
      'unsupported-model',
      `${spec.repo} has no model_index.json (a diffusers pipeline) or config.json (one component) at its top level`,
    );
  const wanted = pipelineFiles([...files.keys()], options.variant);

  const folder = repoFolder(options.cacheDir, spec.repo);
  const snapshot = join(folder, 'snapshots', commit);
  await mkdir(join(folder, 'blobs'), { recursive: true });
  for (const path of wanted) {
    const entry = files.get(path)!;
    const etag = entry.lfs?.oid ?? entry.oid;
    if (etag === undefined)
      throw new UserError('hub-error', `the Hub listed ${path} without a hash`);
    const blob = join(folder, 'blobs', etag);
    const size = entry.lfs?.size ?? entry.size;
    if (existsSync(blob)) {
      await linkInto(snapshot, path, blob);
      options.onFile?.({ path, bytes: size, cached: true });
      continue;
    }
    const incomplete = `${blob}.incomplete`;
    let have = await sizeOf(incomplete);
    if (have > size) {
      await rm(incomplete);
      have = 0;
    }
    if (have < size) {
      try {
        const remote = await downloadFile({
          repo: spec.repo,
          path,
          revision: commit,
          xet: false,
          ...access,
        });
        if (remote === null) throw new Error(`${path} is missing on the Hub`);
        // Resume where an earlier attempt stopped: only the missing bytes are requested.
        const part = have > 0 ? remote.slice(have) : remote;
        await pipeline(
          Readable.fromWeb(part.stream() as import('node:stream/web').ReadableStream),
          createWriteStream(incomplete, { flags: 'a' }),
        );
      } catch (error) {
        throw hubError(spec, error);
      }
    }
    const got = await sizeOf(incomplete);
    if (got !== size || !(await verify(incomplete, entry))) {
      await rm(incomplete, { force: true });
      throw new UserError(
        'hub-integrity',
        `${spec.repo}/${path}: the downloaded bytes ${got !== size ? `are ${got} long, not ${size}` : 'do not match the hash the Hub lists'}; it was discarded, run the command again`,
      );
    }
    await rename(incomplete, blob);
    await linkInto(snapshot, path, blob);
    options.onFile?.({ path, bytes: size, cached: false });
  }
  if (spec.revision !== commit) {
    await mkdir(join(folder, 'refs'), { recursive: true });
    await writeFile(join(folder, 'refs', spec.revision), commit);
  }
  return snapshot;
}
