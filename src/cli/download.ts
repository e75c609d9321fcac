import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { downloadModel, hubOptionsFromEnv, parseRepoSpec } from '../hub/index.js';
import { formatBytes } from './format.js';

export const DOWNLOAD_USAGE = `usage: gesso download ORG/NAME[@REVISION] [--variant fp16]

Downloads the files a pipeline needs from the Hugging Face Hub into the Hub cache
($HF_HUB_CACHE, default ~/.cache/huggingface/hub), where Python tools find them too, and prints
the snapshot folder. Interrupted downloads resume; every file is checked against its hash.
Honours HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE.`;

export async function downloadCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    options: { variant: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    allowPositionals: true,
  });
  if (values.help === true) {
    process.stdout.write(`${DOWNLOAD_USAGE}\n`);
    return 0;
  }
  if (positionals.length !== 1) throw new UserError('usage', DOWNLOAD_USAGE);
  const spec = parseRepoSpec(positionals[0]!);
  if (spec === undefined)
    throw new UserError(
      'usage',
      `'${positionals[0]}' is not a Hub id such as org/name or org/name@revision`,
    );
  let fetched = 0;
  let reused = 0;
  const snapshot = await downloadModel(spec, {
    ...hubOptionsFromEnv(),
    ...(values.variant !== undefined ? { variant: values.variant } : {}),
    onFile: ({ path, bytes, cached }) => {
      if (cached) reused += 1;
      else fetched += 1;
      process.stderr.write(
        `${cached ? 'cached    ' : 'downloaded'} ${path} (${formatBytes(bytes)})\n`,
      );
    },
  });
  process.stderr.write(`${fetched} files downloaded, ${reused} already cached\n`);
  process.stdout.write(`${snapshot}\n`);
  return 0;
}
