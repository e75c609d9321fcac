import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import { UserError } from '../errors.js';
import { SafetensorsFile } from '../io/safetensors.js';
import type { LoraSpec } from '../loaders/lora.js';
import {
  LORA_KINDS,
  refuseExtraNetworks,
  takeExtraNetworks,
} from '../tokenizers/prompt-schedule.js';

/**
 * LoRAs named in prompts, as AUTOMATIC1111 reads them: `<lora:NAME>`, `<lora:NAME:W>` (text
 * encoders and UNet alike), `<lora:NAME:TE:UNET>` or `te=`/`unet=` (extensions-builtin/Lora's
 * extra_networks_lora.py), NAME being a `.safetensors` file's name without its extension anywhere
 * under the LoRA folder (A1111's `--lora-dir`, models/Lora by default there).
 */

/** One `<lora:…>` tag of a prompt. */
export interface PromptLora {
  readonly tag: string;
  readonly name: string;
  readonly textEncoderScale: number;
  readonly unetScale: number;
}

/** The prompt without its LoRA tags (what the text encoder reads), and the tags. */
export function promptLoras(prompt: string): {
  readonly prompt: string;
  readonly loras: readonly PromptLora[];
} {
  const { tags } = takeExtraNetworks(prompt);
  const loras: PromptLora[] = [];
  let rest = prompt;
  for (const tag of tags) {
    // Other types stay in the prompt, where the pipeline refuses them by name.
    if (!LORA_KINDS.has(tag.kind)) continue;
    rest = rest.replace(tag.tag, '');
    const name = tag.positional[0];
    if (name === undefined || name.trim() === '')
      throw new UserError('bad-request', `${tag.tag} names no LoRA; write <lora:NAME:WEIGHT>`);
    if (tag.positional.length > 3 || 'dyn' in tag.named)
      throw new UserError(
        'bad-request',
        `${tag.tag}: gesso takes a LoRA's name and its weights (<lora:NAME:TE:UNET>), not a dyn rank`,
      );
    const unknown = Object.keys(tag.named).filter((k) => k !== 'te' && k !== 'unet');
    if (unknown.length > 0)
      throw new UserError(
        'bad-request',
        `${tag.tag}: unknown argument ${unknown[0]}= (a LoRA tag takes te= and unet=)`,
      );
    const weight = (text: string | undefined, fallback: number): number => {
      if (text === undefined) return fallback;
      const value = Number(text);
      if (text.trim() === '' || !Number.isFinite(value))
        throw new UserError('bad-request', `${tag.tag}: the weight '${text}' is not a number`);
      return value;
    };
    const textEncoderScale = weight(tag.named.te ?? tag.positional[1], 1);
    const unetScale = weight(tag.named.unet ?? tag.positional[2], textEncoderScale);
    loras.push({ tag: tag.tag, name: name.trim(), textEncoderScale, unetScale });
  }
  return { prompt: rest, loras };
}

/** A key equal for two prompts exactly when they name the same LoRAs with the same weights. */
export function loraSetKey(prompt: string): string {
  return JSON.stringify(
    promptLoras(prompt).loras.map((l) => [l.name, l.textEncoderScale, l.unetScale]),
  );
}

/** What a prompt's LoRAs resolve to: the files to merge and A1111's `Lora hashes` text. */
export interface ResolvedLoras {
  readonly specs: readonly LoraSpec[];
  /** `name: shorthash, …`, or undefined when the prompt names none. */
  readonly hashes?: string;
}

/** A folder of LoRA files, read again on every lookup so files added while serving are found. */
export class LoraFolder {
  private readonly hashCache = new Map<string, string>();

  constructor(readonly dir: string) {}

  /** Every `.safetensors` file under the folder by its name (the first found for a name). */
  async files(): Promise<Map<string, string>> {
    const found = new Map<string, string>();
    const walk = async (dir: string): Promise<void> => {
      const entries = await readdir(dir, { withFileTypes: true }).catch((error: unknown) => {
        if (dir !== this.dir) return [];
        throw new UserError(
          'missing-file',
          `the LoRA folder ${this.dir} cannot be read (${(error as Error).message}); check --lora-dir`,
        );
      });
      entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      for (const entry of entries) {
        const path = join(dir, entry.name);
        if (entry.isDirectory()) await walk(path);
        else if (extname(entry.name).toLowerCase() === '.safetensors') {
          const name = basename(entry.name, extname(entry.name));
          if (!found.has(name)) found.set(name, path);
        }
      }
    };
    await walk(this.dir);
    return found;
  }

  /** A1111's short hash of a LoRA: the first 12 hex digits of sha256 over its tensor bytes. */
  async shortHash(path: string): Promise<string> {
    const info = await stat(path);
    const key = `${path}:${info.size}:${info.mtimeMs}`;
    const cached = this.hashCache.get(key);
    if (cached !== undefined) return cached;
    // kohya's "addnet" hash, which A1111 uses for LoRAs: the header is left out, so editing the
    // metadata does not change it.
    const dataOffset = await SafetensorsFile.with(path, async (file) => file.dataOffset);
    const hash = createHash('sha256');
    for await (const chunk of createReadStream(path, { start: dataOffset }))
      hash.update(chunk as Buffer);
    const short = hash.digest('hex').slice(0, 12);
    this.hashCache.set(key, short);
    return short;
  }

  async resolve(loras: readonly PromptLora[]): Promise<ResolvedLoras> {
    if (loras.length === 0) return { specs: [] };
    const files = await this.files();
    const specs: LoraSpec[] = [];
    const hashes: string[] = [];
    for (const lora of loras) {
      const path = files.get(lora.name);
      if (path === undefined) {
        const names = [...files.keys()];
        throw new UserError(
          'bad-request',
          `${lora.tag}: no LoRA named '${lora.name}' in ${this.dir} (${names.length === 0 ? 'it holds no .safetensors files' : `it has: ${names.slice(0, 20).join(', ')}${names.length > 20 ? ', …' : ''}`})`,
        );
      }
      specs.push({ path, scale: lora.unetScale, textEncoderScale: lora.textEncoderScale });
      // As A1111 writes them: the name without ':' or ',', which would break the line.
      hashes.push(`${lora.name.replace(/[:,]/g, '')}: ${await this.shortHash(path)}`);
    }
    return { specs, hashes: hashes.join(', ') };
  }

  /** GET /sdapi/v1/loras's entries: name, alias, path and the file's metadata. */
  async list(): Promise<
    { name: string; alias: string; path: string; metadata: Readonly<Record<string, string>> }[]
  > {
    const entries = [];
    for (const [name, path] of await this.files()) {
      const metadata = await SafetensorsFile.with(path, async (file) => file.metadata).catch(
        () => ({}),
      );
      entries.push({ name, alias: name, path, metadata });
    }
    return entries;
  }
}

/**
 * The LoRAs a prompt names, resolved against the folder (an error naming the flag without one);
 * other extra-network types are refused.
 */
export async function resolvePromptLoras(
  prompt: string,
  folder: LoraFolder | undefined,
): Promise<ResolvedLoras> {
  const { prompt: rest, loras } = promptLoras(prompt);
  refuseExtraNetworks(rest, 'prompt');
  if (loras.length === 0) return { specs: [] };
  if (folder === undefined)
    throw new UserError(
      'bad-request',
      `the prompt names a LoRA, ${loras[0]!.tag}, and no LoRA folder was given; pass --lora-dir DIR (to gesso generate or gesso serve), the folder that holds ${loras[0]!.name}.safetensors`,
    );
  return folder.resolve(loras);
}
