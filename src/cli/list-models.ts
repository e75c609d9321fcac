import { parseArgs } from 'node:util';
import { configuredModelsFile, listModels } from '../generation/models.js';
import { formatBytes, table } from './format.js';

export const MODELS_USAGE = `usage: gesso models [--json]

Lists the models gesso can run: bundled with gesso, in the Hugging Face Hub cache
($HF_HUB_CACHE), and named in ${configuredModelsFile()} ({"name": "folder or org/name"}),
with each one's family, size on disk and weight formats.`;

export async function modelsCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: { json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help === true) {
    process.stdout.write(`${MODELS_USAGE}\n`);
    return 0;
  }
  const rows = listModels();
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
