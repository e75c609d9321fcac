import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { DEFAULT_MODEL } from '../generation/models.js';
import { createServer, DEFAULT_LIMITS } from '../server/app.js';
import { parseNumber } from './args.js';

export const SERVE_USAGE = `usage: gesso serve [options]

Runs gesso as a service: the web page at /, gesso's jobs API (/api/jobs, with server-sent events),
AUTOMATIC1111's API (/sdapi/v1/txt2img, img2img, progress, interrupt, sd-models, samplers,
schedulers, loras, png-info, options), OpenAI's Images API (/v1/images/generations) and
ComfyUI's API (/prompt, /ws, /history, /view, /queue, /interrupt, /upload/image, /object_info).

  --host HOST             address to listen on (default 127.0.0.1: this machine only)
  --port N                port (default 7860, as AUTOMATIC1111)
  --model NAME|DIR        the model to load (default ${DEFAULT_MODEL})
  --out DIR               where images, manifest.jsonl and job records go (default outputs)
  --api-key KEY           require 'Authorization: Bearer KEY' on the API (repeatable;
                          also GESSO_API_KEYS, comma-separated)
  --cors ORIGIN           allow this origin in browsers (repeatable; * for any)
  --max-size N            largest width or height (default ${DEFAULT_LIMITS.maxSide})
  --max-steps N           most steps (default ${DEFAULT_LIMITS.maxSteps})
  --max-images N          most images a request (default ${DEFAULT_LIMITS.maxImages})
  --max-prompt-length N   longest prompt in characters (default ${DEFAULT_LIMITS.maxPromptLength})
  --preview-every N       a preview image every N steps (default 5; 0: none)
  --lora-dir DIR          where prompts' <lora:NAME:WEIGHT> tags find NAME.safetensors (as
                          A1111's --lora-dir; subfolders too), and ComfyUI's LoraLoader its files
  --tiny-vae MODEL        decode previews with this tiny autoencoder (TAESD folder or Hub id,
                          such as madebyollin/taesd); default: the model's own VAE
  --threads N             compute threads
  --quiet                 no request log (the log is JSON lines on stdout)`;

export async function serveCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '7860' },
      model: { type: 'string', default: DEFAULT_MODEL },
      out: { type: 'string', default: 'outputs' },
      'api-key': { type: 'string', multiple: true },
      cors: { type: 'string', multiple: true },
      'max-size': { type: 'string' },
      'max-steps': { type: 'string' },
      'max-images': { type: 'string' },
      'max-prompt-length': { type: 'string' },
      'preview-every': { type: 'string' },
      threads: { type: 'string' },
      'tiny-vae': { type: 'string' },
      'lora-dir': { type: 'string' },
      quiet: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${SERVE_USAGE}\n`);
    return 0;
  }
  const port = parseNumber('port', values.port, { integer: true, min: 0, max: 65535 })!;
  const keys = [
    ...(values['api-key'] ?? []),
    ...(process.env.GESSO_API_KEYS ?? '').split(',').map((k) => k.trim()),
  ].filter((k) => k !== '');
  const threads = parseNumber('threads', values.threads, { integer: true, min: 1 });
  const limit = (flag: string, min: number) =>
    parseNumber(flag, values[flag as 'max-size'], { integer: true, min });
  const maxSide = limit('max-size', 8);
  const maxSteps = limit('max-steps', 1);
  const maxImages = limit('max-images', 1);
  const maxPromptLength = limit('max-prompt-length', 1);
  const server = await createServer({
    model: values.model,
    out: values.out,
    apiKeys: keys,
    ...(values.cors !== undefined ? { corsOrigins: values.cors } : {}),
    limits: {
      ...(maxSide !== undefined ? { maxSide } : {}),
      ...(maxSteps !== undefined ? { maxSteps } : {}),
      ...(maxImages !== undefined ? { maxImages } : {}),
      ...(maxPromptLength !== undefined ? { maxPromptLength } : {}),
    },
    previewEvery:
      parseNumber('preview-every', values['preview-every'], { integer: true, min: 0 }) ?? 5,
    ...(threads !== undefined ? { runtime: { threads } } : {}),
    ...(values['tiny-vae'] !== undefined ? { tinyVae: values['tiny-vae'] } : {}),
    ...(values['lora-dir'] !== undefined ? { loraDir: values['lora-dir'] } : {}),
    logger: !values.quiet,
  });
  // Load the model before taking requests, so a bad name fails now with a clear message.
  await server.models.pipeline();
  await server.models.loras?.files();
  let address: string;
  try {
    address = await server.app.listen({ host: values.host, port });
  } catch (error) {
    await server.close();
    throw new UserError(
      'bad-address',
      `cannot listen on ${values.host}:${port}: ${(error as Error).message}`,
    );
  }
  process.stderr.write(`gesso serving ${server.models.name} at ${address} (Ctrl-C to stop)\n`);
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      process.stderr.write('stopping: finishing the running job cleanly...\n');
      void server.close().then(resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  return 0;
}
