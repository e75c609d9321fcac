import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { writeSafetensors } from '../src/io/safetensors.js';
import { Tensor } from '../src/tensor/tensor.js';
import { golden, needsGolden, withTempDir, runGesso } from './helpers.js';
import { writeMalformed } from './malformed.js';

function gesso(...args: string[]) {
  return runGesso(args);
}

test('gesso inspect lists a file’s tensors and metadata', async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'm.safetensors');
    await writeSafetensors(
      path,
      { 'a.weight': Tensor.float32([3, 4]), 'a.bias': Tensor.float32([3]).to('float16') },
      { format: 'pt' },
    );
    const r = gesso('inspect', path);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /2 tensors, 15 parameters/);
    assert.match(r.stdout, /format: pt/);
    assert.match(r.stdout, /a\.bias\s+F16\s+\[3\]\s+6\n/);
    assert.match(r.stdout, /a\.weight\s+F32\s+\[3, 4\]\s+48/);
    const json = JSON.parse(gesso('inspect', path, '--json').stdout) as {
      tensors: { name: string; shape: number[] }[];
    };
    assert.deepEqual(
      json.tensors.map((t) => [t.name, t.shape]),
      [
        ['a.bias', [3]],
        ['a.weight', [3, 4]],
      ],
    );
  });
});

test('gesso inspect describes a diffusers folder', needsGolden(), () => {
  const r = gesso('inspect', golden('sd1-tiny', 'sd-tiny'), '--json');
  assert.equal(r.status, 0, r.stderr);
  const summary = JSON.parse(r.stdout) as {
    pipelineClass: string;
    components: {
      name: string;
      className: string;
      weightFiles: { file: string; variant?: string; parameters?: number }[];
    }[];
  };
  assert.equal(summary.pipelineClass, 'StableDiffusionPipeline');
  assert.deepEqual(summary.components.map((c) => c.name).sort(), [
    'scheduler',
    'text_encoder',
    'tokenizer',
    'unet',
    'vae',
  ]);
  const unet = summary.components.find((c) => c.name === 'unet')!;
  assert.equal(unet.className, 'UNet2DConditionModel');
  assert.deepEqual(
    unet.weightFiles.map((f) => f.variant ?? null),
    ['fp16', null],
  );
  assert.equal(unet.weightFiles[0]!.parameters, unet.weightFiles[1]!.parameters);
  assert.match(
    gesso('inspect', golden('sd1-tiny', 'sd-tiny')).stdout,
    /unet\s+UNet2DConditionModel\s+diffusion_pytorch_model\.fp16\.safetensors/,
  );
});

test('malformed files: exit status 2 and the specific error, never a stack trace', async () => {
  await withTempDir(async (dir) => {
    for (const m of await writeMalformed(dir)) {
      const r = gesso('inspect', m.path);
      assert.equal(r.status, 2, `${m.name}: ${r.stderr}`);
      assert.match(r.stderr, m.message, m.name);
      assert.ok(
        r.stderr.startsWith(`gesso inspect: ${m.path}: not a valid safetensors file:`),
        m.name,
      );
      assert.doesNotMatch(r.stderr, /\n\s+at /, `${m.name}: no stack trace`);
      assert.equal(r.stdout, '');
    }
  });
});

test('usage errors exit 2 with a message', () => {
  for (const args of [
    ['inspect'],
    ['inspect', '/no/such/file'],
    ['inspect', 'a', 'b'],
    ['inspect', '--bogus', 'x'],
    ['frobnicate'],
  ]) {
    const r = gesso(...args);
    assert.equal(r.status, 2, args.join(' '));
    assert.ok(r.stderr.length > 0);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  }
  assert.equal(gesso('--version').status, 0);
  assert.match(gesso('--help').stdout, /inspect PATH/);
});
