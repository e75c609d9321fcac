import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';
import { toUint8 } from '../src/io/image.js';
import { decodePng, encodePng, readPngText } from '../src/io/png.js';
import { parseInfotext } from '../src/io/infotext.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { createServer, type GessoServer } from '../src/server/app.js';
import type { JobEvent } from '../src/server/jobs.js';
import { ModelManager } from '../src/server/models.js';
import { fixtures, golden, needsGolden, tinyModel, writeRandomLora } from './helpers.js';

let root = '';
let model = '';
let server: GessoServer;
let base = '';

async function start(extra: Partial<Parameters<typeof createServer>[0]> = {}) {
  const s = await createServer({
    model,
    out: join(root, 'out'),
    previewEvery: 2,
    runtime: { cacheDir: join(root, 'cache') },
    limits: { maxSteps: 200, maxSide: 256, maxImages: 4, maxPromptLength: 300 },
    ...extra,
  });
  const address = await s.app.listen({ host: '127.0.0.1', port: 0 });
  return { s, address };
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'gesso-server-'));
  model = await tinyModel(join(root, 'tiny'));
  ({ s: server, address: base } = await start());
});

after(async () => {
  await server.close();
  await rm(root, { recursive: true, force: true });
});

async function post(path: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** Image `i` of an A1111 route's answer (its base64 PNGs), decoded. */
function a1111Image(r: { body: Record<string, unknown> }, i = 0) {
  return decodePng(Buffer.from((r.body.images as string[])[i]!, 'base64'));
}

interface SseEvent {
  type: string;
  data: {
    state: string;
    progress: { step: number; total: number };
    preview?: string;
    images: { url: string }[];
  };
}

/** Reads a job's event stream to its end (or until `stop` returns true). */
async function readEvents(id: string, stop?: (e: SseEvent) => boolean): Promise<SseEvent[]> {
  const res = await fetch(`${base}/api/jobs/${id}/events`);
  assert.equal(res.headers.get('content-type'), 'text/event-stream');
  const events: SseEvent[] = [];
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const chunk of res.body!) {
    buffer += decoder.decode(chunk as Uint8Array, { stream: true });
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const type = /^event: (.+)$/m.exec(block)![1]!;
      const data = JSON.parse(/^data: (.+)$/m.exec(block)![1]!) as SseEvent['data'];
      events.push({ type, data });
      if (stop?.(events[events.length - 1]!)) return events;
    }
  }
  return events;
}

test('the official openai client gets images, as base64 and as URLs', async () => {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused' });
  const b64 = await client.images.generate({
    prompt: 'a red circle',
    n: 2,
    size: '64x64' as '256x256',
    response_format: 'b64_json',
    model: 'dall-e-2',
  });
  assert.equal(b64.data?.length, 2);
  const png = decodePng(Buffer.from(b64.data![0]!.b64_json!, 'base64'));
  assert.deepEqual([png.width, png.height], [64, 64]);
  assert.match(png.text.parameters!, /^a red circle\nSteps: 3, Sampler: .*Size: 64x64/);
  assert.ok(Math.abs(b64.created - Date.now() / 1000) < 120);

  const urls = await client.images.generate({ prompt: 'a blue square', response_format: 'url' });
  const res = await fetch(urls.data![0]!.url!);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'image/png');
  assert.match(
    readPngText(new Uint8Array(await res.arrayBuffer())).parameters!,
    /^a blue square\n/,
  );

  await assert.rejects(
    client.images.generate({ prompt: 'x', size: '60x64' as '256x256' }),
    (e: { status?: number; message?: string }) =>
      e.status === 400 && /size '60x64' is not a multiple of 8/.test(e.message ?? ''),
  );
});

test('AUTOMATIC1111 img2img with a mask repaints only the white of the mask; clip skip from override_settings', async () => {
  const size = 64;
  const image = { width: size, height: size, channels: 3 as const };
  const pixels = new Uint8Array(size * size * 3).map((_, i) => (i * 37) % 251);
  const left = (i: number) => Math.floor(i / 3) % size < 32;
  const whiteLeft = new Uint8Array(size * size * 3).map((_, i) => (left(i) ? 255 : 0));
  const b64 = (data: Uint8Array) => Buffer.from(encodePng({ ...image, data })).toString('base64');
  for (const invert of [0, 1]) {
    const r = await post('/sdapi/v1/img2img', {
      prompt: 'a red circle',
      init_images: [b64(pixels)],
      mask: b64(whiteLeft),
      inpainting_mask_invert: invert,
      denoising_strength: 1,
      steps: 3,
      seed: 5,
      width: size,
      height: size,
      override_settings: { CLIP_stop_at_last_layers: 1 },
    });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const out = a1111Image(r);
    // Kept: the black of the mask (the right half; the left half when inverted).
    const keptHalf = (i: number) => left(i) === (invert === 1);
    let kept = 0;
    let repainted = 0;
    out.data.forEach((v, i) => {
      if (keptHalf(i)) kept += v === pixels[i] ? 1 : 0;
      else repainted += v !== pixels[i] ? 1 : 0;
    });
    assert.equal(kept, pixels.length / 2, `inpainting_mask_invert ${invert}: a kept value changed`);
    assert.ok(
      repainted > pixels.length / 4,
      `inpainting_mask_invert ${invert}: ${repainted} repainted`,
    );
    const info = JSON.parse(r.body.info as string) as { clip_skip: number; infotexts: string[] };
    assert.equal(info.clip_skip, 1); // the last layer: this text encoder has only one
  }
});

test('AUTOMATIC1111 variation seeds: the seed kept, variation seeds counted, strength 1 is the variation seed', async () => {
  const common = { prompt: 'a red circle', steps: 3, width: 64, height: 64, sampler_name: 'Euler' };
  const varied = await post('/sdapi/v1/txt2img', {
    ...common,
    seed: 20,
    subseed: 40,
    subseed_strength: 1,
    batch_size: 2,
  });
  assert.equal(varied.status, 200, JSON.stringify(varied.body));
  const info = JSON.parse(varied.body.info as string) as Record<string, unknown>;
  assert.deepEqual(info.all_seeds, [20, 20]);
  assert.deepEqual(info.all_subseeds, [40, 41]);
  assert.equal(info.subseed_strength, 1);
  assert.match(
    (info.infotexts as string[])[1]!,
    /Variation seed: 41, Variation seed strength: 1\.0/,
  );
  // A deterministic sampler draws nothing after the starting noise: strength 1 is seed 41.
  const plain = await post('/sdapi/v1/txt2img', { ...common, seed: 41 });
  const pixels = (r: { body: Record<string, unknown> }, i: number) => a1111Image(r, i).data;
  assert.deepEqual(pixels(varied, 1), pixels(plain, 0));
});

test('AUTOMATIC1111 schedule types (its scheduler field): Karras, Uniform and Automatic as A1111 1.9 reads them', async () => {
  const common = { prompt: 'a red circle', steps: 3, width: 64, height: 64, seed: 8 };
  const pixels = (r: { body: Record<string, unknown> }) => a1111Image(r).data;
  const sampled = async (body: Record<string, unknown>) => {
    const r = await post('/sdapi/v1/txt2img', { ...common, ...body });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const info = JSON.parse(r.body.info as string) as { sampler_name: string };
    return { sampler: info.sampler_name, pixels: pixels(r) };
  };
  const karras = await sampled({ sampler_name: 'DPM++ 2M Karras' });
  const plain = await sampled({ sampler_name: 'DPM++ 2M' });
  assert.notDeepEqual(karras.pixels, plain.pixels);
  for (const [body, expected] of [
    [{ sampler_name: 'DPM++ 2M', scheduler: 'Karras' }, karras],
    // A1111 1.9 samples DPM++ 2M with Karras sigmas unless told otherwise.
    [{ sampler_name: 'DPM++ 2M', scheduler: 'Automatic' }, karras],
    [{ sampler_name: 'DPM++ 2M Karras', scheduler: 'uniform' }, plain],
    [{ sampler_name: 'DPM++ 2M', scheduler: '' }, plain],
  ] as const) {
    const got = await sampled(body);
    assert.equal(got.sampler, expected.sampler, JSON.stringify(body));
    assert.deepEqual(got.pixels, expected.pixels, JSON.stringify(body));
  }
  assert.equal(
    (await sampled({ sampler_name: 'Euler', scheduler: 'Karras' })).sampler,
    'Euler Karras',
  );

  for (const [body, message] of [
    [{ sampler_name: 'Euler a', scheduler: 'Karras' }, /Karras sigmas for .*not for Euler a/],
    [{ sampler_name: 'DPM++ 2M SDE', scheduler: 'Automatic' }, /with exponential sigmas/],
    [{ sampler_name: 'Euler', scheduler: 'Exponential' }, /unknown schedule type 'Exponential'/],
    [{ scheduler: 'Karras' }, /scheduler 'Karras' needs the sampler_name/],
  ] as const) {
    const r = await post('/sdapi/v1/txt2img', { ...common, ...body });
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.match(r.body.detail as string, message);
  }
  const types = (await (await fetch(`${base}/sdapi/v1/schedulers`)).json()) as { label: string }[];
  assert.deepEqual(
    types.map((t) => t.label),
    ['Automatic', 'Uniform', 'Karras'],
  );
  // send_images false: A1111 answers an empty list (the images are still made and kept).
  const unsent = await post('/sdapi/v1/txt2img', { ...common, send_images: false });
  assert.equal(unsent.status, 200);
  assert.deepEqual(unsent.body.images, []);
});

test('AUTOMATIC1111 png-info: the parameters chunk, other text chunks, and the pairs parsed', async () => {
  const made = await post('/sdapi/v1/txt2img', {
    prompt: 'a red circle, on gray',
    negative_prompt: 'blurry',
    steps: 2,
    width: 64,
    height: 48,
    seed: 5,
    sampler_name: 'Euler',
  });
  assert.equal(made.status, 200, JSON.stringify(made.body));
  const image = (made.body.images as string[])[0]!;
  const info = decodePng(Buffer.from(image, 'base64')).text.parameters!;
  const r = await post('/sdapi/v1/png-info', { image: `data:image/png;base64,${image}` });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.info, info);
  assert.deepEqual(r.body.items, {});
  const parameters = r.body.parameters as Record<string, string>;
  assert.equal(parameters.Prompt, 'a red circle, on gray');
  assert.equal(parameters['Negative prompt'], 'blurry');
  assert.equal(parameters.Steps, '2');
  assert.equal(parameters.Sampler, 'Euler');
  assert.equal(parameters.Seed, '5');
  assert.deepEqual([parameters['Size-1'], parameters['Size-2']], ['64', '48']);
  assert.equal(parameters.Size, undefined);

  const plain = encodePng(
    { width: 1, height: 1, channels: 3, data: new Uint8Array(3) },
    { Software: 'paint' },
  ).toString('base64');
  const bare = await post('/sdapi/v1/png-info', { image: plain });
  assert.equal(bare.status, 200);
  assert.deepEqual(bare.body, { info: '', items: { Software: 'paint' }, parameters: {} });
  const notPng = await post('/sdapi/v1/png-info', { image: 'bm90IGFuIGltYWdl' });
  assert.equal(notPng.status, 400);
  assert.match(notPng.body.detail as string, /image is not a valid PNG file/);
});

test('AUTOMATIC1111 options: CLIP_stop_at_last_layers set on the server applies to later requests', async () => {
  const options = async () =>
    (await (await fetch(`${base}/sdapi/v1/options`)).json()) as Record<string, unknown>;
  assert.equal((await options()).CLIP_stop_at_last_layers, 1);
  const request = { prompt: 'a red circle', steps: 2, width: 64, height: 64, seed: 2 };
  try {
    assert.equal((await post('/sdapi/v1/options', { CLIP_stop_at_last_layers: 2 })).status, 200);
    assert.equal((await options()).CLIP_stop_at_last_layers, 2);
    // This text encoder has one layer, so skipping one is refused: the setting reached the request.
    const skipped = await post('/sdapi/v1/txt2img', request);
    assert.equal(skipped.status, 400);
    assert.match(skipped.body.detail as string, /clip skip 1 reaches past this text encoder/);
    // A request's own override_settings wins over the server's.
    const own = await post('/sdapi/v1/txt2img', {
      ...request,
      override_settings: { CLIP_stop_at_last_layers: 1 },
    });
    assert.equal(own.status, 200, JSON.stringify(own.body));
    const bad = await post('/sdapi/v1/options', { CLIP_stop_at_last_layers: 0 });
    assert.equal(bad.status, 400);
    assert.match(bad.body.detail as string, /CLIP_stop_at_last_layers must be a whole number/);
    assert.equal((await options()).CLIP_stop_at_last_layers, 2);
  } finally {
    await post('/sdapi/v1/options', { CLIP_stop_at_last_layers: 1 });
  }
  assert.equal((await post('/sdapi/v1/txt2img', request)).status, 200);
});

test('AUTOMATIC1111 randn_source: CPU by default, NV or GPU (as on NVIDIA cards) on request or as a server setting', async () => {
  const options = async () =>
    (await (await fetch(`${base}/sdapi/v1/options`)).json()) as Record<string, unknown>;
  assert.equal((await options()).randn_source, 'CPU');
  const request = { prompt: 'a red circle', steps: 2, width: 64, height: 64, seed: 4 };
  const cpu = a1111Image(await post('/sdapi/v1/txt2img', request));
  const nv = a1111Image(
    await post('/sdapi/v1/txt2img', { ...request, override_settings: { randn_source: 'NV' } }),
  );
  const gpu = a1111Image(
    await post('/sdapi/v1/txt2img', { ...request, override_settings: { randn_source: 'GPU' } }),
  );
  assert.notDeepEqual(nv.data, cpu.data);
  assert.deepEqual(gpu.data, nv.data);
  const ensd = a1111Image(
    await post('/sdapi/v1/txt2img', {
      ...request,
      sampler_name: 'Euler a',
      override_settings: { eta_noise_seed_delta: 31337 },
    }),
  );
  assert.match(ensd.text.parameters!, /, ENSD: 31337, /);
  assert.notDeepEqual(
    ensd.data,
    a1111Image(await post('/sdapi/v1/txt2img', { ...request, sampler_name: 'Euler a' })).data,
  );
  const badDelta = await post('/sdapi/v1/txt2img', {
    ...request,
    override_settings: { eta_noise_seed_delta: -1 },
  });
  assert.equal(badDelta.status, 400);
  assert.match(badDelta.body.detail as string, /eta_noise_seed_delta must be a whole number/);
  assert.match(cpu.text.parameters!, /, RNG: CPU, /);
  assert.match(nv.text.parameters!, /, RNG: NV, /);
  // The jobs API names it too.
  const job = await post('/api/jobs', { prompt: 'a red circle', steps: 2, seed: 4, rng: 'nv' });
  assert.equal(job.status, 202);
  const id = job.body.id as string;
  while (!['done', 'failed'].includes(server.queue.get(id)!.state))
    await new Promise((f) => setTimeout(f, 50));
  assert.equal(server.queue.get(id)!.settings[0]!.rng, 'nv');
  try {
    assert.equal((await post('/sdapi/v1/options', { randn_source: 'NV' })).status, 200);
    assert.equal((await options()).randn_source, 'NV');
    assert.deepEqual(a1111Image(await post('/sdapi/v1/txt2img', request)).data, nv.data);
    const bad = await post('/sdapi/v1/options', { randn_source: 'AMD' });
    assert.equal(bad.status, 400);
    assert.match(bad.body.detail as string, /randn_source must be GPU, CPU or NV \(got "AMD"\)/);
  } finally {
    await post('/sdapi/v1/options', { randn_source: 'CPU' });
  }
});

test('AUTOMATIC1111 txt2img without a prompt draws unconditionally, as A1111 does', async () => {
  const common = { steps: 2, width: 64, height: 64, seed: 3, sampler_name: 'Euler' };
  const absent = await post('/sdapi/v1/txt2img', common);
  assert.equal(absent.status, 200, JSON.stringify(absent.body));
  const empty = await post('/sdapi/v1/txt2img', { ...common, prompt: '' });
  assert.equal(empty.status, 200, JSON.stringify(empty.body));
  assert.deepEqual(a1111Image(absent).data, a1111Image(empty).data);
  assert.match(a1111Image(absent).text.parameters!, /^Steps: 2, Sampler: Euler, /);
  // Only A1111's routes take it: the OpenAI route still asks for a prompt.
  const openai = await post('/v1/images/generations', { prompt: ' ' });
  assert.equal(openai.status, 400);
});

test('AUTOMATIC1111 txt2img: its response shape, base64 images and info as a JSON string', async () => {
  const r = await post('/sdapi/v1/txt2img', {
    prompt: 'two green triangles',
    negative_prompt: 'blurry',
    steps: 4,
    cfg_scale: 3,
    width: 64,
    height: 64,
    seed: 1234,
    batch_size: 2,
    n_iter: 1,
    sampler_name: 'Euler a',
    restore_faces: false, // an A1111 field gesso ignores
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const images = r.body.images as string[];
  assert.equal(images.length, 2);
  assert.equal(typeof r.body.info, 'string');
  const info = JSON.parse(r.body.info as string) as Record<string, unknown>;
  assert.deepEqual(info.all_seeds, [1234, 1235]);
  assert.equal(info.seed, 1234);
  assert.equal(info.sampler_name, 'Euler a');
  assert.equal(info.steps, 4);
  assert.equal(info.cfg_scale, 3);
  assert.equal((r.body.parameters as Record<string, unknown>).prompt, 'two green triangles');
  const infotexts = info.infotexts as string[];
  images.forEach((b64, i) => {
    const text = decodePng(Buffer.from(b64, 'base64')).text.parameters!;
    assert.equal(text, infotexts[i]);
    const params = Object.fromEntries(parseInfotext(text).params);
    assert.equal(params.Seed, String(1234 + i));
    assert.equal(params.Sampler, 'Euler a');
  });

  const models = (await (await fetch(`${base}/sdapi/v1/sd-models`)).json()) as { title: string }[];
  assert.ok(Array.isArray(models));
  const samplers = (await (await fetch(`${base}/sdapi/v1/samplers`)).json()) as { name: string }[];
  assert.ok(samplers.some((s) => s.name === 'DPM++ 2M Karras'));
  const opts = (await (await fetch(`${base}/sdapi/v1/options`)).json()) as Record<string, string>;
  assert.equal(opts.sd_model_checkpoint, model);
  // The lists clients read first: gesso's are empty (an upscaler "None" only), not missing.
  const list = async (path: string) => (await fetch(`${base}/sdapi/v1/${path}`)).json();
  assert.deepEqual(
    ((await list('upscalers')) as { name: string }[]).map((u) => u.name),
    ['None'],
  );
  for (const path of ['sd-vae', 'prompt-styles', 'hypernetworks', 'latent-upscale-modes', 'loras'])
    assert.deepEqual(await list(path), [], path);
  assert.deepEqual(await list('embeddings'), { loaded: {}, skipped: {} });
});

test('the event stream reports every step, previews, and the finished image URLs', async () => {
  // A job's step never runs ahead of the events announced for it, even while a preview is made:
  // a stream opening in between would otherwise show a step and then be sent it again.
  const announced = new Map<string, number>();
  const ahead: string[] = [];
  const record = (event: JobEvent) => {
    if (event.type === 'progress') announced.set(event.job.id, event.job.step);
  };
  server.queue.on('event', record);
  const submitted = await post('/api/jobs', { prompt: 'a yellow diamond', steps: 6, seed: 5 });
  assert.equal(submitted.status, 202);
  const id = submitted.body.id as string;
  const watching = (async () => {
    for (let job = server.queue.get(id)!; !['done', 'failed', 'cancelled'].includes(job.state);) {
      if (job.state === 'running' && job.step > (announced.get(id) ?? 0))
        ahead.push(`step ${job.step} before its event`);
      await new Promise((f) => setImmediate(f));
    }
  })();
  const events = await readEvents(id);
  await watching;
  server.queue.off('event', record);
  assert.deepEqual(ahead, []);
  // The stream opens with the job as it stands (steps may have run before the client connected:
  // the server is not blocked by them), then reports every step after that one.
  const opened = events[0]!.data.progress.step;
  const steps = events.filter((e) => e.type === 'progress').map((e) => e.data.progress.step);
  assert.deepEqual(
    steps,
    Array.from({ length: 6 - opened }, (_, i) => opened + 1 + i),
  );
  assert.ok(events.some((e) => e.data.preview?.startsWith('data:image/png;base64,')));
  const done = events[events.length - 1]!;
  assert.equal(done.type, 'done');
  assert.equal(done.data.images.length, 1);
  const image = await fetch(done.data.images[0]!.url);
  assert.equal(image.status, 200);
  const job = (await (await fetch(`${base}/api/jobs/${submitted.body.id as string}`)).json()) as {
    state: string;
  };
  assert.equal(job.state, 'done');
});

test('cancel stops a running job within a step; interrupt does the same for A1111 clients', async () => {
  const submitted = await post('/api/jobs', { prompt: 'a long job', steps: 200 });
  const id = submitted.body.id as string;
  let cancelled: Promise<{ status: number; body: Record<string, unknown> }> | undefined;
  const events = await readEvents(id, (e) => {
    if (e.type === 'progress' && e.data.progress.step === 3 && cancelled === undefined)
      cancelled = post(`/api/jobs/${id}/cancel`, {});
    return false;
  });
  const last = events[events.length - 1]!;
  assert.equal(last.type, 'cancelled');
  const accepted = await cancelled!;
  assert.equal(accepted.status, 200);
  // Steps run while the request travels (the server is not blocked by them); once it arrives,
  // at most the step in flight finishes.
  const cancelledAt = accepted.body.step as number;
  assert.ok(cancelledAt >= 3 && cancelledAt < 200, `cancel arrived at step ${cancelledAt}`);
  const lastStep = Math.max(
    ...events.filter((e) => e.type === 'progress').map((e) => e.data.progress.step),
  );
  assert.ok(lastStep <= cancelledAt + 1, `ran to step ${lastStep} after cancel at ${cancelledAt}`);

  const second = await post('/api/jobs', { prompt: 'another long job', steps: 200 });
  await readEvents(second.body.id as string, (e) => e.type === 'progress');
  const progress = (await (await fetch(`${base}/sdapi/v1/progress`)).json()) as {
    progress: number;
    state: { job: string };
  };
  assert.equal(progress.state.job, second.body.id);
  assert.ok(progress.progress > 0 && progress.progress < 1);
  assert.equal((await post('/sdapi/v1/interrupt', {})).status, 200);
  const end = await readEvents(second.body.id as string);
  assert.equal(end[end.length - 1]!.type, 'cancelled');
});

test('bad requests get 4xx with a message that names the problem', async () => {
  const cases: [string, unknown, number, RegExp][] = [
    ['/api/jobs', { prompt: 'x', steps: 0 }, 400, /steps must be >= 1/],
    ['/api/jobs', { prompt: 'x', steps: 500 }, 400, /steps must be <= 200/],
    ['/api/jobs', { prompt: 'x', width: 100 }, 400, /width must be multiple of 8/],
    ['/api/jobs', { prompt: 'x', width: 4096 }, 400, /width must be <= 256/],
    [
      '/api/jobs',
      { prompt: 'x'.repeat(301) },
      400,
      /301 characters; this server takes at most 300/,
    ],
    ['/api/jobs', { prompt: '  ' }, 400, /prompt is empty/],
    ['/api/jobs', { steps: 3 }, 400, /must have required property 'prompt'/],
    ['/api/jobs', { prompt: 'x', sampler: 'warp' }, 400, /unknown sampler 'warp'/],
    [
      '/api/jobs',
      { prompt: 'x', sampler: 'WarpScheduler' },
      400,
      /unknown sampler 'WarpScheduler'/,
    ],
    ['/api/jobs', { prompt: 'x', colour: 'red' }, 400, /must NOT have additional properties/],
    ['/api/jobs', '{"prompt": ', 400, /JSON/],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', batch_size: 3, n_iter: 3 },
      400,
      /batch_size × n_iter is 9/,
    ],
    ['/sdapi/v1/img2img', { prompt: 'x' }, 400, /img2img needs init_images/],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'a cat <lora:foo:0.8>' },
      400,
      /the prompt names a LoRA, <lora:foo:0.8>, and no LoRA folder was given; pass --lora-dir/,
    ],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', negative_prompt: 'ugly <lora:foo:1>' },
      400,
      /the negative prompt names an extra network, <lora:foo:1>, and gesso loads networks only from the prompt/,
    ],
    [
      '/api/jobs',
      { prompt: 'a cat <hypernet:foo:1>' },
      400,
      /names an extra network, <hypernet:foo:1>, and gesso loads no 'hypernet' networks/,
    ],
    [
      '/v1/images/generations',
      { prompt: 'a cat <lora:foo>' },
      400,
      /the prompt names a LoRA, <lora:foo>, and no LoRA folder was given/,
    ],
    [
      '/sdapi/v1/txt2img',
      '{"prompt": "x", "seed": 18446744073709551615}',
      400,
      /seed must be <= 9007199254740991/,
    ],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', subseed: 2 ** 53, subseed_strength: 0.5 },
      400,
      /subseed must be <= 9007199254740991/,
    ],
    ['/sdapi/v1/txt2img', { prompt: 'x', enable_hr: true }, 400, /enable_hr is not supported/],
    ['/sdapi/v1/txt2img', { prompt: 'x', mask: 'bm90' }, 400, /a mask goes with img2img/],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', override_settings: { CLIP_stop_at_last_layers: 0 } },
      400,
      /CLIP_stop_at_last_layers must be a whole number from 1 to 12/,
    ],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', override_settings: { CLIP_stop_at_last_layers: 2 } },
      400,
      /"clip skip 1 reaches past this text encoder's 1 layer; skip at most 0"/,
    ],
    [
      '/sdapi/v1/txt2img',
      { prompt: 'x', override_settings: { sd_model_checkpoint: 'another' } },
      400,
      /switch models with POST \/sdapi\/v1\/options first/,
    ],
    [
      '/sdapi/v1/img2img',
      { prompt: 'x', init_images: ['bm90IGFuIGltYWdl'] },
      400,
      /not an image gesso can read/,
    ],
    [
      '/v1/images/generations',
      { prompt: 'x', model: 'no-such-model' },
      404,
      /model 'no-such-model' does not exist/,
    ],
    ['/v1/images/generations', { prompt: 'x', n: 9 }, 400, /n must be <= 4/],
    [
      '/v1/images/generations',
      { prompt: 'x', output_format: 'jpeg' },
      400,
      /output_format 'jpeg' is not supported: gesso answers PNG/,
    ],
    [
      '/v1/images/generations',
      { prompt: 'x', background: 'transparent' },
      400,
      /background 'transparent' is not supported/,
    ],
  ];
  for (const [path, body, status, message] of cases) {
    const r = await post(path, body);
    assert.equal(r.status, status, `${path} ${JSON.stringify(body)}: ${JSON.stringify(r.body)}`);
    assert.match(JSON.stringify(r.body), message, `${path} ${JSON.stringify(body)}`);
  }
  const missing = await fetch(`${base}/api/jobs/nope`);
  assert.equal(missing.status, 404);
  const image = await fetch(`${base}/api/images/..%2Fsecret`);
  assert.equal(image.status, 404);
});

test('LoRAs named in prompts: merged from --lora-dir per job, listed, recorded; unknown names refused', async () => {
  const loraDir = join(root, 'loras');
  await mkdir(loraDir, { recursive: true });
  await writeRandomLora(model, join(loraDir, 'style.safetensors'), ['unet', 'text_encoder']);
  const { s, address } = await start({ loraDir, out: join(root, 'lora-out') });
  try {
    const listed = (await (await fetch(`${address}/sdapi/v1/loras`)).json()) as {
      name: string;
      path: string;
    }[];
    assert.deepEqual(
      listed.map((l) => [l.name, l.path]),
      [['style', join(loraDir, 'style.safetensors')]],
    );
    const draw = async (prompt: string) => {
      const res = await fetch(`${address}/sdapi/v1/txt2img`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt, seed: 3, steps: 3, cfg_scale: 2, width: 64, height: 64 }),
      });
      const body = (await res.json()) as { images: string[]; info: string; detail?: string };
      assert.equal(res.status, 200, body.detail);
      const png = decodePng(Buffer.from(body.images[0]!, 'base64'));
      return { data: png.data, parameters: png.text.parameters! };
    };
    const styled = await draw('<lora:style:0.8>a red circle');
    const plain = await draw('a red circle');
    const again = await draw('<lora:style:0.8>a red circle');
    const weaker = await draw('<lora:style:0.4>a red circle');
    assert.notDeepEqual(styled.data, plain.data);
    assert.deepEqual(again.data, styled.data);
    assert.notDeepEqual(weaker.data, styled.data);
    assert.match(styled.parameters, /^<lora:style:0.8>a red circle\n/);
    assert.match(styled.parameters, /, Lora hashes: "style: [0-9a-f]{12}", /);
    assert.doesNotMatch(plain.parameters, /Lora hashes/);

    // The same merge as the library's: the pipeline loaded with the file at that scale.
    const pipe = await StableDiffusionPipeline.fromPretrained(model, {
      cacheDir: join(root, 'cache'),
      loras: [{ path: join(loraDir, 'style.safetensors'), scale: 0.8 }],
    });
    try {
      const direct = await pipe.generate({
        prompt: 'a red circle',
        seed: 3,
        steps: 3,
        guidance: 2,
        width: 64,
        height: 64,
      });
      assert.deepEqual(toUint8(direct.images).data, styled.data);
    } finally {
      await pipe.release();
    }

    const missing = await fetch(`${address}/sdapi/v1/txt2img`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a cat <lora:nope:1>' }),
    });
    assert.equal(missing.status, 400);
    assert.match(
      ((await missing.json()) as { detail: string }).detail,
      /<lora:nope:1>: no LoRA named 'nope' in .*loras \(it has: style\)/,
    );
  } finally {
    await s.close();
  }
});

test('API keys: required when configured, accepted as a bearer token', async () => {
  const { s, address } = await start({ apiKeys: ['k1'], out: join(root, 'keyed') });
  try {
    const denied = await fetch(`${address}/api/jobs`);
    assert.equal(denied.status, 401);
    assert.match(await denied.text(), /Authorization: Bearer/);
    const allowed = await fetch(`${address}/api/jobs`, { headers: { authorization: 'Bearer k1' } });
    assert.equal(allowed.status, 200);
    assert.equal((await fetch(`${address}/health`)).status, 200);
  } finally {
    await s.close();
  }
});

test('a restart keeps finished results; shutdown fails the running job cleanly', async () => {
  const out = join(root, 'restart');
  const first = await start({ out });
  const r = await fetch(`${first.address}/api/jobs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'kept', seed: 8 }),
  });
  const job = (await r.json()) as { id: string };
  while (first.s.queue.get(job.id)!.state !== 'done') await new Promise((f) => setTimeout(f, 50));
  const running = first.s.queue.submit({
    prompt: 'interrupted',
    negative_prompt: '',
    count: 1,
    batch_size: 1,
    steps: 200,
  });
  while (first.s.queue.get(running.id)!.step < 2) await new Promise((f) => setTimeout(f, 20));
  await first.s.close();
  const record = JSON.parse(await readFile(join(out, 'jobs', `${running.id}.json`), 'utf8')) as {
    state: string;
    error: string;
  };
  assert.equal(record.state, 'failed');
  assert.match(record.error, /shut down/);

  const second = await start({ out });
  try {
    const kept = (await (await fetch(`${second.address}/api/jobs/${job.id}`)).json()) as {
      state: string;
      images: { url: string }[];
    };
    assert.equal(kept.state, 'done');
    const image = await fetch(kept.images[0]!.url);
    assert.equal(image.status, 200);
    assert.match(
      readPngText(new Uint8Array(await image.arrayBuffer())).parameters!,
      /^kept\n.*Seed: 8/s,
    );
  } finally {
    await second.s.close();
  }
});

test(
  'the server’s tiny autoencoder for previews: attached where it fits, skipped where not',
  needsGolden(),
  async () => {
    const tiny = join(fixtures, 'taesd-tiny');
    // The single-file SD 1.x model decodes 8 px per latent, as TAESD does.
    const fits = new ModelManager(
      golden('single-file', 'sd15-structure-tiny.safetensors'),
      { cacheDir: false },
      tiny,
    );
    const pipe = await fits.pipeline();
    assert.ok(pipe instanceof StableDiffusionPipeline && pipe.tinyVae !== undefined);
    assert.equal(fits.displayName, 'sd15-structure-tiny');
    await fits.release();
    // sd1-tiny's VAE decodes 2 px per latent: previews keep using it.
    const other = new ModelManager(golden('sd1-tiny', 'sd-tiny'), { cacheDir: false }, tiny);
    const second = await other.pipeline();
    assert.ok(second instanceof StableDiffusionPipeline && second.tinyVae === undefined);
    await other.release();
  },
);
