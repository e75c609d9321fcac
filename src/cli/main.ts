#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { isUserError } from '../errors.js';

const USAGE = `usage: gesso <command> [options]

commands:
  bench             measure speed and memory (full-size models with random weights)
  convert SRC DEST  convert a model: fp16/fp32 weights, diffusers folder ↔ single file
  download ORG/NAME fetch a model from the Hugging Face Hub into the shared Hub cache
  eval              measure a model's prompt fidelity, diversity, realism and speed
  generate PROMPT   draw images (gesso generate --help for the options)
  info IMAGE.png    show the generation parameters stored in an image
  inspect PATH      list a .safetensors file's tensors, or a model folder's components
  models            list bundled, cached and configured models
  serve             run the HTTP server and web page (A1111 and OpenAI compatible)
  train             train a text-to-image model from scratch (gesso train --help)

Run 'gesso <command> --help' for a command's options.`;

type Command = (args: readonly string[]) => Promise<number>;

// Commands load on demand, so a quick command never pays for ONNX Runtime's start-up.
const COMMANDS: Readonly<Record<string, Command>> = {
  bench: async (args) => (await import('./bench.js')).benchCommand(args),
  convert: async (args) => (await import('./convert.js')).convertCommand(args),
  download: async (args) => (await import('./download.js')).downloadCommand(args),
  eval: async (args) => (await import('./eval.js')).evalCommand(args),
  generate: async (args) => (await import('./generate.js')).generateCommand(args),
  info: async (args) => (await import('./info.js')).infoCommand(args),
  inspect: async (args) => (await import('./inspect.js')).inspectCommand(args),
  models: async (args) => (await import('./list-models.js')).modelsCommand(args),
  serve: async (args) => (await import('./serve.js')).serveCommand(args),
  train: async (args) => (await import('./train.js')).trainCommand(args),
};

function version(): string {
  const pkg = JSON.parse(
    readFileSync(new URL('../../../package.json', import.meta.url), 'utf8'),
  ) as { version: string };
  return pkg.version;
}

export async function main(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return name === undefined ? 2 : 0;
  }
  if (name === '--version' || name === '-v') {
    process.stdout.write(`gesso ${version()}\n`);
    return 0;
  }
  const command = COMMANDS[name];
  if (command === undefined) {
    process.stderr.write(`gesso: unknown command '${name}'\n${USAGE}\n`);
    return 2;
  }
  try {
    return await command(rest);
  } catch (error) {
    if (isUserError(error)) {
      process.stderr.write(`gesso ${name}: ${error.message}\n`);
      return 2;
    }
    // Argument errors from util.parseArgs are the user's too.
    if (
      error instanceof TypeError &&
      'code' in error &&
      String(error.code).startsWith('ERR_PARSE_ARGS')
    ) {
      process.stderr.write(`gesso ${name}: ${error.message}\n`);
      return 2;
    }
    throw error;
  }
}

process.exitCode = await main(process.argv.slice(2));
