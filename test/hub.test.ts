import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { decodePng } from '../src/io/png.js';
import { parseRepoSpec, pipelineFiles } from '../src/hub/index.js';
import { golden, goldenDir, GOLDEN_MISSING, repoRoot, withTempDir } from './helpers.js';
import { TestHub } from './hub-server.js';

const BIN = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
const skip = { skip: goldenDir === undefined ? GOLDEN_MISSING : false };

/** Runs gesso without blocking this process, so the loopback Hub can answer. */
function gesso(env: Record<string, string>, ...args: string[]) {
  return new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (status) => resolve({ status, stdout, stderr }));
  });
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

let hub: TestHub;
let endpoint = '';
let commit = '';

before(async () => {
  hub = new TestHub();
  if (goldenDir !== undefined) {
    commit = hub.addRepo('gesso-test/sd-tiny', golden('sd1-tiny', 'sd-tiny'), {
      // What real pipeline repos also hold, which a pipeline does not need.
      'unet/diffusion_pytorch_model.bin': 'a pickle nobody should download',
      'safety_checker/config.json': '{}',
      'safety_checker/model.safetensors': 'not needed',
      'v1-5-pruned.ckpt': 'a single-file checkpoint',
      'README.md': '# sd-tiny',
    });
  }
  endpoint = await hub.start();
});

after(async () => {
  await hub.stop();
});

test('Hub ids and the files a pipeline needs', () => {
  assert.deepEqual(parseRepoSpec('org/name'), { repo: 'org/name', revision: 'main' });
  assert.deepEqual(parseRepoSpec('org/name@v1.0'), { repo: 'org/name', revision: 'v1.0' });
  assert.equal(parseRepoSpec('just-a-name'), undefined);
  assert.equal(parseRepoSpec('a/b/c'), undefined);
  const files = [
    'model_index.json',
    'README.md',
    'v1-5.ckpt',
    'unet/config.json',
    'unet/diffusion_pytorch_model.safetensors',
    'unet/diffusion_pytorch_model.fp16.safetensors',
    'unet/diffusion_pytorch_model.bin',
    'text_encoder/config.json',
    'text_encoder/model.bin',
    'vae/config.json',
    'vae/diffusion_pytorch_model.safetensors.index.json',
    'vae/diffusion_pytorch_model-00001-of-00002.safetensors',
    'vae/diffusion_pytorch_model-00002-of-00002.safetensors',
    'safety_checker/model.safetensors',
  ];
  assert.deepEqual(pipelineFiles(files).sort(), [
    'model_index.json',
    'text_encoder/config.json',
    'text_encoder/model.bin',
    'unet/config.json',
    'unet/diffusion_pytorch_model.safetensors',
    'vae/config.json',
    'vae/diffusion_pytorch_model-00001-of-00002.safetensors',
    'vae/diffusion_pytorch_model-00002-of-00002.safetensors',
    'vae/diffusion_pytorch_model.safetensors.index.json',
  ]);
  assert.ok(pipelineFiles(files, 'fp16').includes('unet/diffusion_pytorch_model.fp16.safetensors'));
  assert.ok(!pipelineFiles(files, 'fp16').includes('unet/diffusion_pytorch_model.safetensors'));
  // No fp16 file for the VAE: the plain weights serve.
  assert.ok(
    pipelineFiles(files, 'fp16').includes('vae/diffusion_pytorch_model.safetensors.index.json'),
  );
  // A single-component repo (as madebyollin/taesd): its config and one set of weights.
  const component = [
    'config.json',
    'README.md',
    'diffusion_pytorch_model.safetensors',
    'diffusion_pytorch_model.bin',
    'taesd_decoder.pth',
    'images/example.png',
  ];
  assert.deepEqual(pipelineFiles(component).sort(), [
    'config.json',
    'diffusion_pytorch_model.safetensors',
  ]);
});

test(
  'gesso download: the Hub cache layout Python uses, only the needed files, then generation offline',
  skip,
  async () => {
    await withTempDir(async (dir) => {
      const env = {
        HF_ENDPOINT: endpoint,
        HF_HUB_CACHE: join(dir, 'hub'),
        GESSO_CACHE_DIR: join(dir, 'gesso'),
      };
      const r = await gesso(env, 'download', 'gesso-test/sd-tiny', '--variant', 'fp16');
      assert.equal(r.status, 0, r.stderr);
      const repo = join(dir, 'hub', 'models--gesso-test--sd-tiny');
      const snapshot = join(repo, 'snapshots', commit);
      assert.equal(r.stdout.trim(), snapshot);
      assert.equal(readFileSync(join(repo, 'refs', 'main'), 'utf8'), commit);
      const files = readdirSync(snapshot, { recursive: true, withFileTypes: true })
        .filter((e) => !e.isDirectory())
        .map((e) => join(e.parentPath, e.name).slice(snapshot.length + 1))
        .sort();
      assert.deepEqual(files, [
        'model_index.json',
        'scheduler/scheduler_config.json',
        'text_encoder/config.json',
        'text_encoder/model.fp16.safetensors',
        'tokenizer/merges.txt',
        'tokenizer/special_tokens_map.json',
        'tokenizer/tokenizer_config.json',
        'tokenizer/vocab.json',
        'unet/config.json',
        'unet/diffusion_pytorch_model.fp16.safetensors',
        'vae/config.json',
        'vae/diffusion_pytorch_model.fp16.safetensors',
      ]);
      // Each snapshot entry is a relative symlink to a blob named by its hash.
      const unet = join(snapshot, 'unet', 'diffusion_pytorch_model.fp16.safetensors');
      assert.ok(lstatSync(unet).isSymbolicLink());
      const target = readlinkSync(unet);
      // Relative to the file's own folder, as huggingface_hub links them.
      assert.ok(target.startsWith('../../../blobs/'), target);
      assert.equal(target.slice('../../../blobs/'.length), sha256(unet));
      assert.match(
        readlinkSync(join(snapshot, 'model_index.json')),
        /^\.\.\/\.\.\/blobs\/[0-9a-f]{40}$/,
      );
      assert.equal(
        sha256(unet),
        sha256(golden('sd1-tiny', 'sd-tiny', 'unet', 'diffusion_pytorch_model.fp16.safetensors')),
      );
      const config = join(snapshot, 'unet', 'config.json');
      const data = readFileSync(config);
      const sha1 = createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex');
      assert.equal(readlinkSync(config), `../../../blobs/${sha1}`);
      assert.ok(!existsSync(join(snapshot, 'safety_checker')));

      // Offline, with the Hub gone: the cache serves the model to generate.
      const offline = { ...env, HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://127.0.0.1:9' };
      const out = join(dir, 'out');
      const g = await gesso(
        offline,
        'generate',
        '--model',
        'gesso-test/sd-tiny',
        '--variant',
        'fp16',
        'a cat',
        '--steps',
        '2',
        '--seed',
        '3',
        '--out',
        out,
      );
      assert.equal(g.status, 0, g.stderr);
      const png = decodePng(readFileSync(join(out, '00000-3.png')));
      assert.match(png.text.parameters!, /Model: gesso-test\/sd-tiny/);
      // Not cached and offline: a clear error.
      const missing = await gesso(offline, 'download', 'gesso-test/other');
      assert.equal(missing.status, 2);
      assert.match(missing.stderr, /not in the Hub cache .* HF_HUB_OFFLINE is set/);
    });
  },
);

test(
  'gesso download resumes a cut-off file with a Range request and checks hashes',
  skip,
  async () => {
    await withTempDir(async (dir) => {
      const env = { HF_ENDPOINT: endpoint, HF_HUB_CACHE: join(dir, 'hub') };
      const path = 'unet/diffusion_pytorch_model.safetensors';
      hub.cutOnce.set(path, 1_000_000);
      const first = await gesso(env, 'download', 'gesso-test/sd-tiny');
      assert.equal(first.status, 2, first.stderr);
      assert.doesNotMatch(first.stderr, /\n\s+at /);
      const blobs = join(dir, 'hub', 'models--gesso-test--sd-tiny', 'blobs');
      const expected = sha256(
        golden('sd1-tiny', 'sd-tiny', 'unet', 'diffusion_pytorch_model.safetensors'),
      );
      const partial = statSync(join(blobs, `${expected}.incomplete`)).size;
      assert.ok(partial > 0 && partial <= 1_000_000, `${partial} bytes kept`);
      hub.requests.length = 0;
      const second = await gesso(env, 'download', 'gesso-test/sd-tiny');
      assert.equal(second.status, 0, second.stderr);
      const ranged = hub.requests.filter(
        (r) => r.path.endsWith(path) && r.range === `bytes=${partial}-5742159`,
      );
      assert.equal(
        ranged.length,
        1,
        JSON.stringify(hub.requests.filter((r) => r.path.endsWith(path))),
      );
      assert.equal(sha256(join(blobs, expected)), expected);
      assert.ok(!existsSync(join(blobs, `${expected}.incomplete`)));
      // Already there: nothing is downloaded again.
      hub.requests.length = 0;
      const third = await gesso(env, 'download', 'gesso-test/sd-tiny');
      assert.equal(third.status, 0, third.stderr);
      assert.match(third.stderr, /0 files downloaded/);
      assert.equal(hub.requests.filter((r) => r.path.includes('/resolve/')).length, 0);
    });
    await withTempDir(async (dir) => {
      const env = { HF_ENDPOINT: endpoint, HF_HUB_CACHE: join(dir, 'hub') };
      hub.corrupt.add('vae/diffusion_pytorch_model.safetensors');
      try {
        const r = await gesso(env, 'download', 'gesso-test/sd-tiny');
        assert.equal(r.status, 2);
        assert.match(
          r.stderr,
          /vae\/diffusion_pytorch_model\.safetensors: the downloaded bytes do not match the hash/,
        );
        const blobs = readdirSync(join(dir, 'hub', 'models--gesso-test--sd-tiny', 'blobs'));
        const vae = sha256(
          golden('sd1-tiny', 'sd-tiny', 'vae', 'diffusion_pytorch_model.safetensors'),
        );
        assert.ok(!blobs.some((b) => b.startsWith(vae)), 'a corrupt blob stayed in the cache');
      } finally {
        hub.corrupt.clear();
      }
    });
  },
);

test('Hub errors: token required, unknown repo, not a pipeline repo', skip, async () => {
  await withTempDir(async (dir) => {
    const env = {
      HF_ENDPOINT: endpoint,
      HF_HUB_CACHE: join(dir, 'hub'),
      HF_HOME: join(dir, 'home'),
    };
    hub.token = 'hf_secret';
    try {
      const denied = await gesso(env, 'download', 'gesso-test/sd-tiny');
      assert.equal(denied.status, 2);
      assert.match(denied.stderr, /refused access .* set HF_TOKEN/);
      const allowed = await gesso(
        { ...env, HF_TOKEN: 'hf_secret' },
        'download',
        'gesso-test/sd-tiny',
      );
      assert.equal(allowed.status, 0, allowed.stderr);
    } finally {
      hub.token = undefined;
    }
    const unknown = await gesso(env, 'generate', '--model', 'gesso-test/nothing-here', 'x');
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /gesso-test\/nothing-here@main is not on the Hub/);
    const list = await gesso(env, 'models', '--json');
    assert.equal(list.status, 0, list.stderr);
    const rows = JSON.parse(list.stdout) as { name: string; source: string; family: string }[];
    const cached = rows.find((r) => r.source === 'hub cache');
    assert.deepEqual(
      [cached?.name, cached?.family],
      ['gesso-test/sd-tiny', 'Stable Diffusion (1.x/2.x layout)'],
    );
  });
});
