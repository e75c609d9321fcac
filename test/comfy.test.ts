import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { WebSocket } from 'ws';
import { readParameters } from '../src/generation/outputs.js';
import { toUint8 } from '../src/io/image.js';
import { decodePng, encodePng, readPngText } from '../src/io/png.js';
import { Tensor } from '../src/tensor/tensor.js';
import {
  StableDiffusionPipeline,
  type GenerateOptions,
} from '../src/pipelines/stable-diffusion.js';
import { createServer, type GessoServer } from '../src/server/app.js';
import { golden, needsGolden, tinyModel, writeRandomLora } from './helpers.js';

/**
 * ComfyUI's API on `gesso serve`, driven as ComfyUI's own websockets_api_example.py drives
 * ComfyUI: a socket with a client id, the workflow posted to /prompt, messages until `executing`
 * names no node, then /history and /view.
 */

let root = '';
let model = '';
let loraDir = '';
let server: GessoServer;
let base = '';

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'gesso-comfy-'));
  model = await tinyModel(join(root, 'tiny'));
  loraDir = join(root, 'loras');
  await mkdir(join(loraDir, 'styles'), { recursive: true });
  await writeRandomLora(model, join(loraDir, 'styles', 'both.safetensors'), [
    'unet',
    'text_encoder',
  ]);
  server = await createServer({
    model,
    out: join(root, 'out'),
    previewEvery: 1,
    loraDir,
    runtime: { cacheDir: join(root, 'cache') },
    limits: { maxSteps: 200, maxSide: 256, maxImages: 4, maxPromptLength: 300 },
  });
  base = await server.app.listen({ host: '127.0.0.1', port: 0 });
});

after(async () => {
  await server.close();
  await rm(root, { recursive: true, force: true });
});

type Graph = Record<string, { class_type: string; inputs: Record<string, unknown> }>;

/** The graph of websockets_api_example.py, on the test's model. */
function workflow(sampler: Record<string, unknown> = {}, extra: Partial<Graph> = {}): Graph {
  return {
    '3': {
      class_type: 'KSampler',
      inputs: {
        cfg: 2,
        denoise: 1,
        latent_image: ['5', 0],
        model: ['4', 0],
        negative: ['7', 0],
        positive: ['6', 0],
        sampler_name: 'euler',
        scheduler: 'normal',
        seed: 8566257,
        steps: 3,
        ...sampler,
      },
    },
    '4': { class_type: 'CheckpointLoaderSimple', inputs: { ckpt_name: model } },
    '5': { class_type: 'EmptyLatentImage', inputs: { batch_size: 1, height: 64, width: 64 } },
    '6': { class_type: 'CLIPTextEncode', inputs: { clip: ['4', 1], text: 'a red circle' } },
    '7': { class_type: 'CLIPTextEncode', inputs: { clip: ['4', 1], text: 'a blue square' } },
    '8': { class_type: 'VAEDecode', inputs: { samples: ['3', 0], vae: ['4', 2] } },
    '9': { class_type: 'SaveImage', inputs: { filename_prefix: 'ComfyUI', images: ['8', 0] } },
    ...(extra as Graph),
  };
}

/** POSTs as the example's urllib does: JSON bytes under urllib's default form content type. */
async function post(path: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function get(path: string) {
  const res = await fetch(`${base}${path}`);
  return (await res.json()) as Record<string, unknown>;
}

interface Message {
  type: string;
  data: Record<string, unknown>;
}

/** A client socket that collects JSON messages and binary frames. */
async function connect(clientId: string) {
  const socket = new WebSocket(`${base.replace('http', 'ws')}/ws?clientId=${clientId}`);
  const messages: Message[] = [];
  const frames: Buffer[] = [];
  const waiters: (() => void)[] = [];
  socket.on('message', (data, binary) => {
    if (binary) frames.push(data as Buffer);
    else messages.push(JSON.parse(String(data)) as Message);
    for (const wake of waiters.splice(0)) wake();
  });
  await new Promise((resolve, reject) => {
    socket.once('open', resolve);
    socket.once('error', reject);
  });
  /** Waits until a message matches, as the example loops on ws.recv(). */
  const until = async (match: (m: Message) => boolean): Promise<Message> => {
    for (;;) {
      const found = messages.find(match);
      if (found !== undefined) return found;
      await new Promise<void>((resolve) => waiters.push(resolve));
    }
  };
  return { socket, messages, frames, until };
}

/** Runs a workflow to its end over a socket; returns its messages and history entry. */
async function run(graph: Graph, extra: Record<string, unknown> = {}) {
  const clientId = `client-${Math.random().toString(16).slice(2)}`;
  const client = await connect(clientId);
  try {
    const queued = await post('/prompt', { prompt: graph, client_id: clientId, ...extra });
    assert.equal(queued.status, 200, JSON.stringify(queued.body));
    const id = queued.body.prompt_id as string;
    await client.until(
      (m) => m.type === 'executing' && m.data.node === null && m.data.prompt_id === id,
    );
    const history = (await get(`/history/${id}`))[id] as Record<string, unknown>;
    return { id, queued: queued.body, client, history };
  } finally {
    client.socket.close();
  }
}

/** The PNGs a finished prompt's history lists for node 9, fetched through /view. */
async function viewed(history: Record<string, unknown>) {
  assert.equal(
    (history.status as { status_str: string }).status_str,
    'success',
    JSON.stringify(history.status),
  );
  const outputs = history.outputs as Record<string, { images: Record<string, string>[] }>;
  return Promise.all(
    outputs['9']!.images.map(async (image) => {
      const query = new URLSearchParams(image).toString();
      const res = await fetch(`${base}/view?${query}`);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-type'), 'image/png');
      return Buffer.from(await res.arrayBuffer());
    }),
  );
}

/** The library's images for the same settings. */
async function library(options: GenerateOptions, loras: { scale: number; te: number }[] = []) {
  const pipe = await StableDiffusionPipeline.fromPretrained(model, {
    cacheDir: join(root, 'cache'),
    ...(loras.length > 0
      ? {
          loras: loras.map((l) => ({
            path: join(loraDir, 'styles', 'both.safetensors'),
            scale: l.scale,
            textEncoderScale: l.te,
          })),
        }
      : {}),
  });
  try {
    return toUint8((await pipe.generate(options)).images);
  } finally {
    await pipe.release();
  }
}

const PLAIN: GenerateOptions = {
  prompt: 'a red circle',
  negativePrompt: 'a blue square',
  steps: 3,
  guidance: 2,
  width: 64,
  height: 64,
};

test('ComfyUI: the example client’s flow, and its images are the library’s for the same settings', async () => {
  const graph = workflow(
    {},
    {
      '5': { class_type: 'EmptyLatentImage', inputs: { batch_size: 2, height: 64, width: 64 } },
    },
  );
  const workflowInfo = { nodes: [{ id: 3, type: 'KSampler' }], links: [] };
  const { id, queued, client, history } = await run(graph, {
    extra_data: { extra_pnginfo: { workflow: workflowInfo } },
  });
  assert.deepEqual(queued.node_errors, {});
  assert.equal(typeof queued.number, 'number');

  const types = client.messages.filter((m) => m.data.prompt_id === id).map((m) => m.type);
  assert.equal(client.messages[0]!.type, 'status');
  assert.ok(
    (client.messages[0]!.data as { sid?: string }).sid?.startsWith('client-'),
    'the first message names the client',
  );
  assert.deepEqual(
    types.filter((t) => t !== 'progress'),
    [
      'execution_start',
      'execution_cached',
      'executing',
      'executing',
      'executed',
      'execution_success',
      'executing',
    ],
  );
  const progress = client.messages.filter((m) => m.type === 'progress');
  assert.deepEqual(
    progress.map((m) => [m.data.value, m.data.max, m.data.node]),
    [
      [1, 3, '3'],
      [2, 3, '3'],
      [3, 3, '3'],
    ],
  );
  // Previews: ComfyUI's binary event 1 (PREVIEW_IMAGE) with image type 2 (PNG).
  assert.ok(client.frames.length >= 1);
  assert.equal(client.frames[0]!.readUInt32BE(0), 1);
  assert.equal(client.frames[0]!.readUInt32BE(4), 2);
  assert.equal(decodePng(client.frames[0]!.subarray(8)).width, 64);
  const executed = client.messages.find((m) => m.type === 'executed')!;
  assert.equal(executed.data.node, '9');

  const status = history.status as { status_str: string; completed: boolean };
  assert.equal(status.status_str, 'success');
  assert.equal(status.completed, true);
  assert.deepEqual((history.prompt as unknown[]).slice(1, 3), [id, graph]);
  const files = await viewed(history);
  assert.equal(files.length, 2);
  assert.deepEqual(
    (executed.data.output as { images: unknown[] }).images,
    (history.outputs as Record<string, { images: unknown[] }>)['9']!.images,
  );

  // ComfyUI's SaveImage metadata: the prompt, then each extra_pnginfo entry, as JSON.
  const text = readPngText(files[0]!, 'image');
  assert.deepEqual(JSON.parse(text.prompt!), graph);
  assert.deepEqual(JSON.parse(text.workflow!), workflowInfo);
  assert.equal(text.parameters, undefined);
  // gesso info and --from say what such an image is.
  assert.throws(() => readParameters(files[0]!, 'drawn.png'), /drawn.png is a ComfyUI image/);

  // One generator seeded once draws the batch's noise (ComfyUI's prepare_noise, diffusers with
  // one generator); `normal` is the linspace spacing.
  const expected = await library({
    ...PLAIN,
    count: 2,
    seed: 8566257,
    scheduler: 'euler',
    schedulerConfig: { timestep_spacing: 'linspace' },
  });
  const size = 64 * 64 * 3;
  for (let i = 0; i < 2; i++)
    assert.deepEqual(
      decodePng(files[i]!).data,
      (expected.data as Uint8Array).subarray(i * size, (i + 1) * size),
      `image ${i}`,
    );
  // The first image is the seed's own; the second is the same draw continued, not seed + 1's.
  const single = await library({
    ...PLAIN,
    seed: 8566258,
    scheduler: 'euler',
    schedulerConfig: { timestep_spacing: 'linspace' },
  });
  assert.notDeepEqual(decodePng(files[1]!).data, single.data);
});

test('ComfyUI: Karras sigmas, the last CLIP layer and LoRA loaders map to the same library settings', async () => {
  const graph = (lastLayer: number) =>
    workflow(
      { sampler_name: 'dpmpp_2m', scheduler: 'karras', seed: 5, model: ['10', 0] },
      {
        '6': { class_type: 'CLIPTextEncode', inputs: { clip: ['11', 0], text: 'a red circle' } },
        '7': { class_type: 'CLIPTextEncode', inputs: { clip: ['11', 0], text: 'a blue square' } },
        '10': {
          class_type: 'LoraLoader',
          inputs: {
            model: ['4', 0],
            clip: ['4', 1],
            lora_name: 'styles/both.safetensors',
            strength_model: 0.5,
            strength_clip: 0.25,
          },
        },
        '11': {
          class_type: 'CLIPSetLastLayer',
          inputs: { clip: ['10', 1], stop_at_clip_layer: lastLayer },
        },
      },
    );
  const { history } = await run(graph(-1));
  const [file] = await viewed(history);
  const expected = await library({ ...PLAIN, seed: 5, scheduler: 'dpmpp_2m_karras' }, [
    { scale: 0.5, te: 0.25 },
  ]);
  assert.deepEqual(decodePng(file!).data, expected.data);
  // A LoRA's strength changes the picture: the loader is applied, not ignored.
  const plain = await library({ ...PLAIN, seed: 5, scheduler: 'dpmpp_2m_karras' });
  assert.notDeepEqual(decodePng(file!).data, plain.data);
  // Layer -2 is A1111's clip skip 2, which this one-layer text encoder cannot do: the run fails
  // with the library's message, as a ComfyUI execution error.
  const skipped = await run(graph(-2));
  const status = skipped.history.status as {
    status_str: string;
    messages: [string, Message['data']][];
  };
  assert.equal(status.status_str, 'error');
  const failure = status.messages.find((m) => m[0] === 'execution_error')![1];
  assert.match(String(failure.exception_message), /clip skip 1 reaches past/);
  assert.equal(failure.node_type, 'KSampler');
  assert.ok(skipped.client.messages.some((m) => m.type === 'execution_error'));
});

test('ComfyUI: refusals in ComfyUI’s error shape, at submit time', async () => {
  const refused = async (body: Record<string, unknown>) => {
    const r = await post('/prompt', body);
    assert.equal(r.status, 400, JSON.stringify(r.body));
    return r.body as {
      error: { type: string; message: string; details: string };
      node_errors: Record<
        string,
        {
          errors: { type: string; details: string }[];
          class_type: string;
          dependent_outputs: string[];
        }
      >;
    };
  };
  assert.equal((await refused({})).error.type, 'no_prompt');
  const missing = await refused({
    prompt: workflow({}, { '12': { class_type: 'UpscaleModelLoader', inputs: {} } }),
  });
  assert.equal(missing.error.type, 'missing_node_type');
  assert.match(missing.error.message, /UpscaleModelLoader/);
  assert.equal(missing.error.details, "Node ID '#12'");

  const noOutputs = workflow();
  delete noOutputs['9'];
  assert.equal((await refused({ prompt: noOutputs })).error.type, 'prompt_no_outputs');

  const notInList = await refused({ prompt: workflow({ sampler_name: 'dpmpp_sde' }) });
  assert.equal(notInList.error.type, 'prompt_outputs_failed_validation');
  assert.equal(notInList.node_errors['3']!.class_type, 'KSampler');
  assert.equal(notInList.node_errors['3']!.errors[0]!.type, 'value_not_in_list');
  assert.match(notInList.node_errors['3']!.errors[0]!.details, /sampler_name: 'dpmpp_sde' not in/);

  const checks: [Record<string, unknown>, Partial<Graph>, string, string, RegExp][] = [
    [{ steps: undefined }, {}, '3', 'required_input_missing', /steps/],
    [{ steps: 0 }, {}, '3', 'value_smaller_than_min', /steps/],
    [{ cfg: 'high' }, {}, '3', 'invalid_input_type', /cfg/],
    [{ positive: ['5', 0] }, {}, '3', 'return_type_mismatch', /LATENT.*CONDITIONING/],
    [{ positive: ['99', 0] }, {}, '3', 'bad_linked_input', /99/],
    [{ denoise: 0.5 }, {}, '3', 'custom_validation_failed', /denoise 1/],
    [{ sampler_name: 'ddim', scheduler: 'karras' }, {}, '3', 'custom_validation_failed', /Karras/],
    [
      {},
      {
        '6': {
          class_type: 'CLIPTextEncode',
          inputs: { clip: ['4', 1], text: 'a red embedding:style circle' },
        },
      },
      '6',
      'custom_validation_failed',
      /textual-inversion embeddings \(embedding:style\)/,
    ],
    [
      {},
      { '5': { class_type: 'EmptyLatentImage', inputs: { batch_size: 1, height: 60, width: 64 } } },
      '5',
      'custom_validation_failed',
      /multiple of 8/,
    ],
    [
      {},
      { '5': { class_type: 'EmptyLatentImage', inputs: { batch_size: 5, height: 64, width: 64 } } },
      '5',
      'custom_validation_failed',
      /at most 4 images/,
    ],
    [
      { model: ['10', 0] },
      {
        '10': {
          class_type: 'LoraLoaderModelOnly',
          inputs: { model: ['10', 0], lora_name: 'styles/both.safetensors', strength_model: 1 },
        },
      },
      '10',
      'custom_validation_failed',
      /loops back/,
    ],
  ];
  for (const [sampler, extra, node, type, details] of checks) {
    const body = await refused({ prompt: workflow(sampler, extra) });
    const error = body.node_errors[node]?.errors[0];
    assert.equal(error?.type, type, JSON.stringify(body));
    assert.match(error.details, details);
  }
  // Two outputs behind one bad node: both are kept from running, and say so.
  const shared = await refused({
    prompt: workflow(
      { steps: -1 },
      { '10': { class_type: 'PreviewImage', inputs: { images: ['8', 0] } } },
    ),
  });
  assert.deepEqual(shared.node_errors['3']!.dependent_outputs.sort(), ['10', '9']);
  assert.equal(
    (await refused({ prompt: workflow(), prompt_id: 'not-a-uuid' })).error.type,
    'invalid_prompt_id',
  );
  // Nothing refused was queued.
  assert.deepEqual(await get('/queue'), { queue_running: [], queue_pending: [] });
});

test('ComfyUI: /api aliases, queue, interrupt, history, object_info and the rest of the listing routes', async () => {
  const info = (await get('/api/object_info/KSampler')).KSampler as {
    input: { required: Record<string, unknown[]> };
    output: string[];
  };
  assert.deepEqual(info.output, ['LATENT']);
  assert.ok((info.input.required.sampler_name![0] as string[]).includes('dpmpp_2m'));
  assert.deepEqual(info.input.required.scheduler![0], ['normal', 'karras']);
  assert.deepEqual(await get('/object_info/NoSuchNode'), {});
  const all = await get('/object_info');
  assert.ok('CheckpointLoaderSimple' in all && 'SaveImage' in all && 'LoraLoader' in all);
  const ckpt = (all.CheckpointLoaderSimple as { input: { required: { ckpt_name: string[][] } } })
    .input.required.ckpt_name[0]!;
  assert.ok(ckpt.includes(model));
  assert.deepEqual(await (await fetch(`${base}/models/loras`)).json(), [
    join('styles', 'both.safetensors'),
  ]);
  assert.deepEqual(await get('/prompt'), { exec_info: { queue_remaining: 0 } });

  // A long prompt, interrupted while it runs; a second one, deleted while it waits.
  const clientId = 'interrupter';
  const client = await connect(clientId);
  try {
    // 200 steps at 256×256: seconds, where each request takes milliseconds.
    const long = await post('/api/prompt', {
      prompt: workflow(
        { steps: 200 },
        {
          '5': {
            class_type: 'EmptyLatentImage',
            inputs: { batch_size: 1, height: 256, width: 256 },
          },
        },
      ),
      client_id: clientId,
    });
    const waiting = await post('/prompt', { prompt: workflow({ seed: 1 }), client_id: clientId });
    const [longId, waitingId] = [long.body.prompt_id as string, waiting.body.prompt_id as string];
    await client.until((m) => m.type === 'progress' && m.data.prompt_id === longId);
    const queue = (await get('/queue')) as {
      queue_running: unknown[][];
      queue_pending: unknown[][];
    };
    assert.deepEqual(
      [queue.queue_running.map((e) => e[1]), queue.queue_pending.map((e) => e[1])],
      [[longId], [waitingId]],
    );
    await post('/queue', { delete: [waitingId] });
    await post('/interrupt', {});
    await client.until((m) => m.type === 'execution_interrupted' && m.data.prompt_id === longId);
    await client.until((m) => m.type === 'executing' && m.data.node === null);
    const history = (await get(`/history/${longId}`))[longId] as {
      status: { status_str: string; completed: boolean; messages: [string, unknown][] };
      outputs: Record<string, unknown>;
    };
    assert.equal(history.status.status_str, 'error');
    assert.equal(history.status.completed, false);
    assert.deepEqual(history.outputs, {});
    assert.deepEqual(
      history.status.messages.map((m) => m[0]),
      ['execution_start', 'execution_cached', 'execution_interrupted'],
    );
    assert.equal(server.queue.get(waitingId)!.state, 'cancelled');
    assert.deepEqual(await get(`/history/${waitingId}`), {});
  } finally {
    client.socket.close();
  }
  // The newest entries, as ComfyUI's get_history counts them.
  const newest = await get('/history?max_items=1');
  assert.equal(Object.keys(newest).length, 1);
  await post('/history', { clear: true });
  assert.deepEqual(await get('/history'), {});

  // /view keeps to the output folder.
  for (const query of ['filename=../tiny/model_index.json', 'filename=00000-1.png&subfolder=x'])
    assert.equal((await fetch(`${base}/view?${query}`)).status, 404);
});

test('ComfyUI routes and socket need the key when the server has keys', async () => {
  const locked = await createServer({
    model,
    out: join(root, 'out-locked'),
    apiKeys: ['sesame'],
    runtime: { cacheDir: join(root, 'cache') },
  });
  const address = await locked.app.listen({ host: '127.0.0.1', port: 0 });
  try {
    assert.equal((await fetch(`${address}/object_info`)).status, 401);
    assert.equal(
      (await fetch(`${address}/object_info`, { headers: { authorization: 'Bearer sesame' } }))
        .status,
      200,
    );
    const refused = new WebSocket(`${address.replace('http', 'ws')}/ws`);
    const outcome = await new Promise((resolve) => {
      refused.once('open', () => resolve('open'));
      refused.once('unexpected-response', (_request, response) => resolve(response.statusCode));
      refused.once('error', () => resolve('error'));
    });
    assert.equal(outcome, 401);
    const allowed = new WebSocket(`${address.replace('http', 'ws')}/ws?key=sesame`);
    const first = await new Promise<Message>((resolve) =>
      allowed.once('message', (data) => resolve(JSON.parse(String(data)) as Message)),
    );
    assert.equal(first.type, 'status');
    allowed.close();
  } finally {
    await locked.close();
  }
});

test(
  'ComfyUI: texts are read as ComfyUI reads them ((text:w) against the empty text’s states)',
  needsGolden(),
  async () => {
    const sd = golden('sd1-tiny', 'sd-tiny');
    const comfy = await createServer({
      model: sd,
      out: join(root, 'out-sd'),
      runtime: { cacheDir: join(root, 'cache') },
    });
    const address = await comfy.app.listen({ host: '127.0.0.1', port: 0 });
    const pipe = await StableDiffusionPipeline.fromPretrained(sd, {
      cacheDir: join(root, 'cache'),
    });
    try {
      const graph = workflow(
        {},
        {
          '4': { class_type: 'CheckpointLoaderSimple', inputs: { ckpt_name: sd } },
          '6': {
            class_type: 'CLIPTextEncode',
            inputs: { clip: ['4', 1], text: 'a (red:1.5) circle, \\(big\\)' },
          },
        },
      );
      const queued = await fetch(`${address}/prompt`, {
        method: 'POST',
        body: JSON.stringify({ prompt: graph }),
      });
      const answer = (await queued.json()) as { prompt_id: string };
      assert.equal(queued.status, 200, JSON.stringify(answer));
      const id = answer.prompt_id;
      let history: Record<string, unknown> = {};
      for (let tries = 0; Object.keys(history).length === 0; tries++) {
        assert.ok(tries < 1200, 'the prompt did not finish within a minute');
        await new Promise((resolve) => setTimeout(resolve, 50));
        history = (await (await fetch(`${address}/history/${id}`)).json()) as Record<
          string,
          unknown
        >;
      }
      const entry = history[id] as { outputs: Record<string, { images: { filename: string }[] }> };
      const file = entry.outputs['9']!.images[0]!.filename;
      const drawn = decodePng(
        Buffer.from(await (await fetch(`${address}/view?filename=${file}`)).arrayBuffer()),
      );
      const options: GenerateOptions = {
        prompt: 'a (red:1.5) circle, \\(big\\)',
        negativePrompt: 'a blue square',
        seed: 8566257,
        steps: 3,
        guidance: 2,
        width: 64,
        height: 64,
        scheduler: 'euler',
        schedulerConfig: { timestep_spacing: 'linspace' },
      };
      const expected = toUint8((await pipe.generate({ ...options, promptSyntax: 'comfy' })).images);
      assert.deepEqual(drawn.data, expected.data);
      const a1111 = toUint8((await pipe.generate({ ...options, promptSyntax: 'a1111' })).images);
      assert.notDeepEqual(drawn.data, a1111.data);
    } finally {
      await pipe.release();
      await comfy.close();
    }
  },
);

test('ComfyUI image-to-image: an uploaded image through LoadImage and VAEEncode, redrawn at a denoise', async () => {
  // 64×68 with alpha: LoadImage drops the alpha, VAEEncode crops 2 rows off the top and bottom.
  const [width, height] = [64, 68];
  const rgba = new Uint8Array(width * height * 4);
  for (let i = 0; i < width * height; i++)
    rgba.set([(i * 7) % 256, (i * 13) % 256, (i * 29) % 256, i % 2 === 0 ? 255 : 40], i * 4);
  const png = encodePng({ width, height, channels: 4, data: rgba });
  const upload = async (name: string, bytes: Uint8Array, fields: Record<string, string> = {}) => {
    const form = new FormData();
    form.append('image', new Blob([bytes]), name);
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    const res = await fetch(`${base}/upload/image`, { method: 'POST', body: form });
    return { status: res.status, body: (await res.json()) as Record<string, string> };
  };
  assert.deepEqual((await upload('start.png', png)).body, {
    name: 'start.png',
    subfolder: '',
    type: 'input',
  });
  // The same bytes again keep the name; other bytes under a taken name get a number.
  assert.equal((await upload('start.png', png)).body.name, 'start.png');
  const other = encodePng({ width: 8, height: 8, channels: 3, data: new Uint8Array(192) });
  assert.equal((await upload('start.png', other)).body.name, 'start (1).png');
  assert.equal((await upload('start.png', other, { overwrite: 'true' })).body.name, 'start.png');
  await upload('start.png', png, { overwrite: 'true' });
  const refused = await upload('notes.png', new TextEncoder().encode('not an image'));
  assert.equal(refused.status, 400);
  assert.match(refused.body.error!, /not an image/);
  assert.equal((await upload('x.png', png, { subfolder: '../..' })).status, 400);
  const inputView = await fetch(`${base}/view?filename=start.png&type=input`);
  assert.deepEqual(Buffer.from(await inputView.arrayBuffer()), Buffer.from(png));
  const listed = (await get('/object_info/LoadImage')).LoadImage as {
    input: { required: { image: string[][] } };
  };
  assert.deepEqual(listed.input.required.image[0], ['start (1).png', 'start.png']);

  const graph = workflow(
    { denoise: 0.6, latent_image: ['11', 0], seed: 21 },
    {
      '10': { class_type: 'LoadImage', inputs: { image: 'start.png', upload: 'image' } },
      '11': { class_type: 'VAEEncode', inputs: { pixels: ['10', 0], vae: ['4', 2] } },
    },
  );
  const { client, history } = await run(graph);
  // Three steps, as the KSampler asked, at the end of a five-step schedule (3 / 0.6).
  assert.deepEqual(
    client.messages.filter((m) => m.type === 'progress').map((m) => [m.data.value, m.data.max]),
    [
      [1, 3],
      [2, 3],
      [3, 3],
    ],
  );
  const [file] = await viewed(history);
  const drawn = decodePng(file!);
  assert.deepEqual([drawn.width, drawn.height], [64, 64]);
  const rgb = new Uint8Array(64 * 64 * 3);
  for (let y = 0; y < 64; y++)
    for (let x = 0; x < 64; x++)
      for (let c = 0; c < 3; c++) rgb[(y * 64 + x) * 3 + c] = rgba[((y + 2) * width + x) * 4 + c]!;
  const expected = await library({
    ...PLAIN,
    seed: 21,
    steps: 5,
    image: new Tensor('uint8', [1, 64, 64, 3], rgb),
    strength: 0.7,
    scheduler: 'euler',
    schedulerConfig: { timestep_spacing: 'linspace' },
  });
  assert.deepEqual(drawn.data, expected.data);

  // KSamplerAdvanced from step 2 of 5 runs the same three steps of the same schedule.
  const advanced = await run({
    ...graph,
    '3': {
      class_type: 'KSamplerAdvanced',
      inputs: {
        ...graph['3']!.inputs,
        add_noise: 'enable',
        noise_seed: 21,
        steps: 5,
        start_at_step: 2,
        end_at_step: 10000,
        return_with_leftover_noise: 'disable',
      },
    },
  });
  assert.deepEqual(decodePng((await viewed(advanced.history))[0]!).data, expected.data);
  for (const [change, input] of [
    [{ add_noise: 'disable' }, 'add_noise'],
    [{ end_at_step: 4 }, 'end_at_step'],
    [{ start_at_step: 5 }, 'start_at_step'],
    [{ start_at_step: 1, latent_image: ['5', 0] }, 'start_at_step'],
  ] as const) {
    const sent = (advanced.history.prompt as [number, string, Graph])[2];
    const r = await post('/prompt', {
      prompt: { ...sent, '3': { ...sent['3']!, inputs: { ...sent['3']!.inputs, ...change } } },
    });
    assert.equal(r.status, 400, JSON.stringify(change));
    const errors = r.body.node_errors as Record<string, { errors: { details: string }[] }>;
    assert.match(errors['3']!.errors[0]!.details, new RegExp(`^${input} - `));
  }

  // A file the input folder lacks is not in LoadImage's list.
  const missing = await post('/prompt', {
    prompt: workflow(
      { latent_image: ['11', 0] },
      {
        '10': { class_type: 'LoadImage', inputs: { image: 'nowhere.png' } },
        '11': { class_type: 'VAEEncode', inputs: { pixels: ['10', 0], vae: ['4', 2] } },
      },
    ),
  });
  assert.equal(missing.status, 400);
  const errors = missing.body.node_errors as Record<string, { errors: { type: string }[] }>;
  assert.equal(errors['10']!.errors[0]!.type, 'value_not_in_list');
});

test('ComfyUI inpainting: LoadImage’s transparency as the mask, through SetLatentNoiseMask or VAEEncodeForInpaint', async () => {
  // 64×64, opaque but for a transparent 10×10 square at (20, 30).
  const size = 64;
  const rgba = new Uint8Array(size * size * 4);
  const mask = new Uint8Array(size * size);
  for (let i = 0; i < size * size; i++) {
    const [x, y] = [i % size, Math.floor(i / size)];
    const hole = x >= 20 && x < 30 && y >= 30 && y < 40;
    rgba.set([(i * 5) % 256, (i * 11) % 256, (i * 17) % 256, hole ? 0 : 255], i * 4);
    mask[i] = hole ? 255 : 0;
  }
  const form = new FormData();
  form.append(
    'image',
    new Blob([encodePng({ width: size, height: size, channels: 4, data: rgba })]),
    'holed.png',
  );
  assert.equal((await fetch(`${base}/upload/image`, { method: 'POST', body: form })).status, 200);
  const rgb = new Uint8Array(size * size * 3);
  for (let i = 0; i < size * size; i++) rgb.set(rgba.subarray(i * 4, i * 4 + 3), i * 3);

  const load = { '10': { class_type: 'LoadImage', inputs: { image: 'holed.png' } } };
  const noiseMask = await run(
    workflow(
      { latent_image: ['12', 0], seed: 4 },
      {
        ...load,
        '11': { class_type: 'VAEEncode', inputs: { pixels: ['10', 0], vae: ['4', 2] } },
        '12': { class_type: 'SetLatentNoiseMask', inputs: { samples: ['11', 0], mask: ['10', 1] } },
      },
    ),
  );
  // The library inpainting this image with this mask, from the prompts' seed and sampler.
  const inpainted = (image: Uint8Array, repaint: Uint8Array) =>
    library({
      ...PLAIN,
      seed: 4,
      image: new Tensor('uint8', [1, size, size, 3], image),
      mask: new Tensor('uint8', [1, size, size, 1], repaint),
      strength: 1,
      scheduler: 'euler',
      schedulerConfig: { timestep_spacing: 'linspace' },
    });
  const expected = await inpainted(rgb, mask);
  const drawn = decodePng((await viewed(noiseMask.history))[0]!);
  assert.deepEqual(drawn.data, expected.data);
  // Outside the hole the image is the uploaded one.
  assert.deepEqual(drawn.data.subarray(0, 3), rgb.subarray(0, 3));

  // VAEEncodeForInpaint: the hole greyed before encoding, the mask grown by 6 pixels. A pixel's
  // window reaches ⌈5/2⌉ = 3 before it and 2 after (conv2d with padding 3), so the mask grows 2
  // pixels up and left, 3 down and right: the 10×10 hole becomes 15×15 from (18, 28).
  const forInpaint = await run(
    workflow(
      { latent_image: ['11', 0], seed: 4 },
      {
        ...load,
        '11': {
          class_type: 'VAEEncodeForInpaint',
          inputs: { pixels: ['10', 0], vae: ['4', 2], mask: ['10', 1], grow_mask_by: 6 },
        },
      },
    ),
  );
  const grown = new Uint8Array(size * size);
  const greyed = rgb.slice();
  for (let i = 0; i < size * size; i++) {
    const [x, y] = [i % size, Math.floor(i / size)];
    if (x >= 18 && x < 33 && y >= 28 && y < 43) grown[i] = 255;
    if (mask[i] === 255) greyed.fill(128, i * 3, i * 3 + 3);
  }
  const expectedGrown = await inpainted(greyed, grown);
  assert.deepEqual(decodePng((await viewed(forInpaint.history))[0]!).data, expectedGrown.data);

  // A mask from an opaque image covers nothing: refused by name.
  const opaque = new FormData();
  opaque.append(
    'image',
    new Blob([encodePng({ width: 64, height: 64, channels: 3, data: rgb })]),
    'opaque.png',
  );
  await fetch(`${base}/upload/image`, { method: 'POST', body: opaque });
  const r = await post('/prompt', {
    prompt: workflow(
      { latent_image: ['12', 0] },
      {
        '10': { class_type: 'LoadImage', inputs: { image: 'opaque.png' } },
        '11': { class_type: 'VAEEncode', inputs: { pixels: ['10', 0], vae: ['4', 2] } },
        '12': { class_type: 'SetLatentNoiseMask', inputs: { samples: ['11', 0], mask: ['10', 1] } },
      },
    ),
  });
  assert.equal(r.status, 400);
  const errors = r.body.node_errors as Record<string, { errors: { details: string }[] }>;
  assert.match(errors['12']!.errors[0]!.details, /opaque.png has no transparency/);
});
