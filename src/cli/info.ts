import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { readUserFile } from '../io/atomic.js';
import { readParameters, settingsFromInfotext } from '../generation/outputs.js';

export const INFO_USAGE = `usage: gesso info IMAGE.png [--json]

Shows the generation parameters stored in a PNG by gesso or AUTOMATIC1111 (its 'parameters'
text chunk): the prompt, the negative prompt and every setting.`;

export async function infoCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    options: { json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } },
    allowPositionals: true,
  });
  if (values.help === true) {
    process.stdout.write(`${INFO_USAGE}\n`);
    return 0;
  }
  if (positionals.length !== 1) throw new UserError('usage', INFO_USAGE);
  const path = positionals[0]!;
  const parameters = readParameters(await readUserFile(path), path);
  const settings = settingsFromInfotext(parameters, path);
  if (values.json) {
    process.stdout.write(
      `${JSON.stringify(
        {
          parameters,
          prompt: settings.prompt,
          negative_prompt: settings.negativePrompt,
          settings: Object.fromEntries(settings.params),
        },
        null,
        2,
      )}\n`,
    );
    return 0;
  }
  const width = Math.max(15, ...settings.params.map(([k]) => k.length));
  const lines = [
    `${'Prompt'.padEnd(width)}  ${settings.prompt}`,
    ...(settings.negativePrompt !== ''
      ? [`${'Negative prompt'.padEnd(width)}  ${settings.negativePrompt}`]
      : []),
    ...settings.params.map(([k, v]) => `${k.padEnd(width)}  ${v}`),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
  return 0;
}
