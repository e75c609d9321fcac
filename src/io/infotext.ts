/**
 * AUTOMATIC1111's "infotext": the generation parameters stored in a PNG's `parameters` text chunk
 * and shown by its PNG Info tab. The prompt, a `Negative prompt:` line when there is one, then
 * `Key: value` pairs on the last line, values with `,`, `:` or newlines quoted as JSON strings.
 */

export interface Infotext {
  readonly prompt: string;
  readonly negativePrompt: string;
  /** Key/value pairs in file order. */
  readonly params: readonly (readonly [string, string])[];
}

function quote(value: string): string {
  return /[,:\n]/.test(value) ? JSON.stringify(value) : value;
}

/** Python's str(float): integers keep a trailing `.0`. */
export function pythonFloat(x: number): string {
  if (Number.isInteger(x)) return `${x}.0`;
  return String(x);
}

export function formatInfotext(info: Infotext): string {
  const lines = [info.prompt];
  if (info.negativePrompt !== '') lines.push(`Negative prompt: ${info.negativePrompt}`);
  lines.push(info.params.map(([k, v]) => (k === v ? k : `${k}: ${quote(v)}`)).join(', '));
  return lines.join('\n').trim();
}

const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

/** Parses infotext as A1111's `parse_generation_parameters` does (the last line holds the pairs). */
export function parseInfotext(text: string): Infotext {
  const lines = text.trim().split('\n');
  let last = lines[lines.length - 1] ?? '';
  const matches = [...last.matchAll(PARAM)];
  if (matches.length < 3) last = '';
  else lines.pop();
  const prompt: string[] = [];
  const negative: string[] = [];
  let inNegative = false;
  for (const line of lines) {
    if (line.trim().startsWith('Negative prompt:')) {
      inNegative = true;
      negative.push(line.trim().slice('Negative prompt:'.length).trim());
    } else if (inNegative) negative.push(line);
    else prompt.push(line);
  }
  const params: [string, string][] = [];
  if (last !== '') {
    for (const m of last.matchAll(PARAM)) {
      const key = m[1]!.trim();
      let value = m[2]!.trim();
      if (value.startsWith('"') && value.endsWith('"')) {
        try {
          value = JSON.parse(value) as string;
        } catch {
          // keep as written
        }
      }
      params.push([key, value]);
    }
  }
  return { prompt: prompt.join('\n'), negativePrompt: negative.join('\n'), params };
}
