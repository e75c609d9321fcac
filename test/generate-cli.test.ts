import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { decodePng, encodePng } from '../src/io/png.js';
import { parseInfotext } from '../src/io/infotext.js';
import { DiffusionTask } from '../src/training/diffusion.js';
import { Trainer } from '../src/training/trainer.js';
import { options, TINY, withTempDir, runGesso, GESSO_BIN, writeRandomLora } from './helpers.js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';

function gesso(...args: string[]) {
  return runGesso(args, { GESSO_CACHE_DIR: cache });
}

let root = '';
let model = '';
let cache = '';

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'gesso-generate-'));
  model = join(root, 'tiny-model');
  cache = join(root, 'cache');
  const task = new DiffusionTask(TINY);
  const trainer = await Trainer.create(task, options(2));
  for (let i = 0; i < 2; i++) await trainer.runStep();
  await task.exportModel(model, trainer.weights('ema'), { defaults: { steps: 3, guidance: 2 } });
  await trainer.release();
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

interface ManifestLine {
  file: string;
  prompt: string;
  negative_prompt: string;
  seed: number;
  steps: number;
  guidance: number;
  scheduler: string;
  width: number;
  height: number;
  model: string;
}

function manifest(dir: string): ManifestLine[] {
  return readFileSync(join(dir, 'manifest.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as ManifestLine);
}

test('gesso generate: a batch into a folder, numbered by counter and seed, each with A1111 metadata and a manifest line', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    const r = gesso(
      'generate',
      '--model',
      model,
      'a red circle, above a blue square',
      '--negative-prompt',
      'green: ugly',
      '-n',
      '3',
      '--batch-size',
      '2',
      '--seed',
      '41',
      '--scheduler',
      'euler_a',
      '--guidance',
      '3.5',
      '--out',
      out,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(readdirSync(out).sort(), [
      '00000-41.png',
      '00001-42.png',
      '00002-43.png',
      'manifest.jsonl',
    ]);
    const lines = manifest(out);
    assert.equal(lines.length, 3);
    lines.forEach((line, i) => {
      const png = decodePng(readFileSync(join(out, line.file)));
      assert.deepEqual([png.width, png.height], [64, 64]);
      const text = png.text.parameters!;
      // A1111's layout, byte for byte: prompt, negative prompt, then the parameter line.
      assert.equal(
        text,
        'a red circle, above a blue square\n' +
          'Negative prompt: green: ugly\n' +
          `Steps: 3, Sampler: Euler a, CFG scale: 3.5, Seed: ${41 + i}, Size: 64x64, Model: tiny-model, RNG: CPU, Version: gesso`,
      );
      const info = parseInfotext(text);
      const params = Object.fromEntries(info.params);
      assert.equal(info.prompt, line.prompt);
      assert.equal(info.negativePrompt, line.negative_prompt);
      assert.equal(Number(params.Seed), line.seed);
      assert.equal(Number(params.Steps), line.steps);
      assert.equal(Number(params['CFG scale']), line.guidance);
      assert.equal(params.Size, `${line.width}x${line.height}`);
      assert.equal(params.Model, line.model);
      assert.equal(line.scheduler, 'euler_a');
    });

    // The counter continues from what the folder holds.
    const again = gesso('generate', '--model', model, 'a cat', '--seed', '7', '--out', out);
    assert.equal(again.status, 0, again.stderr);
    assert.ok(existsSync(join(out, '00003-7.png')));
    assert.equal(manifest(out).length, 4);

    // gesso info reads the metadata back.
    const info = gesso('info', join(out, '00001-42.png'), '--json');
    assert.equal(info.status, 0, info.stderr);
    const parsed = JSON.parse(info.stdout) as { prompt: string; settings: Record<string, string> };
    assert.equal(parsed.prompt, 'a red circle, above a blue square');
    assert.equal(parsed.settings.Seed, '42');
    assert.equal(parsed.settings.Sampler, 'Euler a');
  });
});

test('gesso generate --from reproduces an image exactly from its metadata', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    const first = gesso(
      'generate',
      '--model',
      model,
      'two green triangles',
      '--size',
      '64x64',
      '--seed',
      '123',
      '--scheduler',
      'dpmpp_2m_karras',
      '--out',
      out,
    );
    assert.equal(first.status, 0, first.stderr);
    const again = gesso(
      'generate',
      '--from',
      join(out, '00000-123.png'),
      '--model',
      model,
      '--out',
      out,
    );
    assert.equal(again.status, 0, again.stderr);
    const a = decodePng(readFileSync(join(out, '00000-123.png')));
    const b = decodePng(readFileSync(join(out, '00001-123.png')));
    assert.deepEqual(b.data, a.data);
    assert.equal(b.text.parameters, a.text.parameters);

    // The model's own scheduler (no --scheduler) round-trips through its A1111 name too.
    const plain = gesso('generate', '--model', model, 'a square', '--seed', '5', '--out', out);
    assert.equal(plain.status, 0, plain.stderr);
    const copy = gesso(
      'generate',
      '--from',
      join(out, '00002-5.png'),
      '--model',
      model,
      '--out',
      out,
    );
    assert.equal(copy.status, 0, copy.stderr);
    assert.deepEqual(
      decodePng(readFileSync(join(out, '00003-5.png'))).data,
      decodePng(readFileSync(join(out, '00002-5.png'))).data,
    );
  });
});

test("gesso generate --from reads A1111 1.9's schedule type beside the sampler", async () => {
  await withTempDir(async (dir) => {
    const a1111 = (sampler: string, type: string) => {
      const path = join(dir, `${sampler}-${type}.png`);
      writeFileSync(
        path,
        encodePng(
          { width: 1, height: 1, channels: 3, data: new Uint8Array(3) },
          {
            parameters: `a red circle\nSteps: 3, Sampler: ${sampler}, Schedule type: ${type}, CFG scale: 2, Seed: 5, Size: 64x64, Model: tiny`,
          },
        ),
      );
      return path;
    };
    const draw = (name: string, ...args: string[]) => {
      const r = gesso('generate', '--model', model, ...args, '--out', join(dir, name));
      assert.equal(r.status, 0, r.stderr);
      return decodePng(readFileSync(join(dir, name))).data;
    };
    const direct = (scheduler: string) =>
      draw(
        `${scheduler}.png`,
        '--rng',
        'nv',
        'a red circle',
        '--scheduler',
        scheduler,
        '--steps',
        '3',
        '--guidance',
        '2',
        '--seed',
        '5',
        '--size',
        '64x64',
      );
    const karras = direct('DPM++ 2M Karras');
    const uniform = direct('DPM++ 2M');
    assert.notDeepEqual(karras, uniform);
    // gesso's own plain DPM++ 2M says Uniform, which A1111 1.9 would otherwise read as Karras.
    const own = readFileSync(join(dir, 'DPM++ 2M.png'));
    assert.match(
      decodePng(own).text.parameters!,
      /Sampler: DPM\+\+ 2M, Schedule type: Uniform, CFG/,
    );
    assert.doesNotMatch(
      decodePng(readFileSync(join(dir, 'DPM++ 2M Karras.png'))).text.parameters!,
      /Schedule type/,
    );
    assert.deepEqual(draw('own.png', '--from', join(dir, 'DPM++ 2M.png')), uniform);
    // No RNG key: A1111's default GPU source, drawn as on NVIDIA cards, and said so.
    const noted = gesso(
      'generate',
      '--model',
      model,
      '--from',
      a1111('DPM++ 2M', 'Karras'),
      '--out',
      join(dir, 'k.png'),
    );
    assert.equal(noted.status, 0, noted.stderr);
    assert.match(
      noted.stderr,
      /names no RNG, so A1111 drew its noise on the GPU; gesso draws it as NVIDIA cards do/,
    );
    assert.deepEqual(decodePng(readFileSync(join(dir, 'k.png'))).data, karras);
    // Automatic: the sampler's own spacing in A1111, Karras for DPM++ 2M.
    assert.deepEqual(draw('a.png', '--from', a1111('DPM++ 2M', 'Automatic')), karras);
    assert.deepEqual(draw('u.png', '--from', a1111('DPM++ 2M', 'Uniform')), uniform);
    const exponential = a1111('DPM++ 2M', 'Exponential');
    const refused = gesso(
      'generate',
      '--model',
      model,
      '--from',
      exponential,
      '--out',
      join(dir, 'e.png'),
    );
    assert.equal(refused.status, 2);
    assert.match(
      refused.stderr,
      /was drawn with 'Sampler: DPM\+\+ 2M, Schedule type: Exponential': .*; or choose one with --scheduler/,
    );
    // --scheduler decides instead; gesso info shows the metadata whatever it names.
    assert.deepEqual(draw('e2.png', '--from', exponential, '--scheduler', 'DPM++ 2M'), uniform);
    assert.notDeepEqual(
      draw('c.png', '--from', exponential, '--scheduler', 'DPM++ 2M', '--rng', 'cpu'),
      uniform,
    );
    // What gesso does not do is named, not dropped in silence; A1111's VAE is a file, not TAESD.
    const hires = join(dir, 'hires.png');
    writeFileSync(
      hires,
      encodePng(
        { width: 1, height: 1, channels: 3, data: new Uint8Array(3) },
        {
          parameters:
            'a red circle\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2, Seed: 5, Size: 64x64, Model: tiny, VAE: vae-ft-mse-840000-ema-pruned, RNG: NV, Hires upscale: 2, Hires steps: 10, Version: v1.9.4',
        },
      ),
    );
    const hiresNote = gesso(
      'generate',
      '--model',
      model,
      '--from',
      hires,
      '--out',
      join(dir, 'h.png'),
    );
    assert.equal(hiresNote.status, 0, hiresNote.stderr);
    assert.match(
      hiresNote.stderr,
      /also says VAE: vae-ft-mse-840000-ema-pruned, Hires upscale: 2, Hires steps: 10, which gesso does not apply/,
    );
    assert.deepEqual(decodePng(readFileSync(join(dir, 'h.png'))).data, karras);
    const info = gesso('info', exponential);
    assert.equal(info.status, 0, info.stderr);
    assert.match(info.stdout, /Schedule type +Exponential/);
  });
});

test('gesso generate --rng nv: the noise of PyTorch on NVIDIA cards, recorded as A1111 records it and read back', async () => {
  await withTempDir(async (dir) => {
    const draw = (name: string, ...args: string[]) => {
      const r = gesso('generate', '--model', model, ...args, '--out', join(dir, name));
      assert.equal(r.status, 0, r.stderr);
      return decodePng(readFileSync(join(dir, name)));
    };
    const cpu = draw('cpu.png', 'a blue square', '--seed', '11');
    const nv = draw('nv.png', 'a blue square', '--seed', '11', '--rng', 'nv');
    assert.notDeepEqual(nv.data, cpu.data);
    assert.match(cpu.text.parameters!, /, RNG: CPU, Version: gesso$/);
    assert.match(nv.text.parameters!, /, RNG: NV, Version: gesso$/);
    assert.deepEqual(draw('again.png', '--from', join(dir, 'nv.png')).data, nv.data);
    // ENSD: written as A1111 writes it, read back; it changes what Euler a draws after the start.
    const args = ['a blue square', '--seed', '11', '--scheduler', 'euler_a'];
    const plain = draw('plain.png', ...args);
    const ensd = draw('ensd.png', ...args, '--ensd', '31337');
    assert.notDeepEqual(ensd.data, plain.data);
    assert.match(ensd.text.parameters!, /, ENSD: 31337, RNG: CPU, /);
    assert.deepEqual(draw('ensd-again.png', '--from', join(dir, 'ensd.png')).data, ensd.data);
    const bad = gesso(
      'generate',
      '--model',
      model,
      'x',
      '--rng',
      'amd',
      '--out',
      join(dir, 'x.png'),
    );
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--rng must be cpu or nv \(got 'amd'\)/);
  });
});

test('gesso generate "": an empty prompt draws unconditionally, as in A1111, and --from reads it back', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    for (const guidance of ['1', '7']) {
      const r = gesso(
        'generate',
        '--model',
        model,
        '',
        '--seed',
        '7',
        '--guidance',
        guidance,
        '--out',
        out,
      );
      assert.equal(r.status, 0, r.stderr);
    }
    const [plain, guided] = ['00000-7.png', '00001-7.png'].map((f) =>
      decodePng(readFileSync(join(out, f))),
    );
    // A1111 writes no prompt line: the parameters start with the settings.
    assert.match(plain!.text.parameters!, /^Steps: /);
    assert.equal(parseInfotext(plain!.text.parameters!).prompt, '');
    // With nothing asked, the conditional and unconditional predictions agree: guidance changes nothing.
    let largest = 0;
    plain!.data.forEach((v, i) => (largest = Math.max(largest, Math.abs(v - guided!.data[i]!))));
    assert.ok(largest <= 1, `guidance 1 and 7 differ by ${largest} levels`);

    const again = gesso(
      'generate',
      '--from',
      join(out, '00000-7.png'),
      '--model',
      model,
      '--out',
      out,
    );
    assert.equal(again.status, 0, again.stderr);
    assert.deepEqual(decodePng(readFileSync(join(out, '00002-7.png'))).data, plain!.data);
  });
});

test('gesso generate --init-image --mask repaints the white of the mask and keeps the rest exactly', async () => {
  await withTempDir(async (dir) => {
    const size = 64;
    const init = { width: size, height: size, channels: 3 as const };
    const pixels = new Uint8Array(size * size * 3).map((_, i) => (i * 37) % 251);
    writeFileSync(join(dir, 'init.png'), encodePng({ ...init, data: pixels }));
    // White on the left half: repaint there.
    const mask = new Uint8Array(size * size * 3).map((_, i) =>
      Math.floor(i / 3) % size < 32 ? 255 : 0,
    );
    writeFileSync(join(dir, 'mask.png'), encodePng({ ...init, data: mask }));
    const out = join(dir, 'out.png');
    const r = gesso(
      'generate',
      '--model',
      model,
      'a red circle',
      '--init-image',
      join(dir, 'init.png'),
      '--mask',
      join(dir, 'mask.png'),
      '--seed',
      '3',
      '--out',
      out,
    );
    assert.equal(r.status, 0, r.stderr);
    const image = decodePng(readFileSync(out)).data;
    let kept = 0;
    let repainted = 0;
    for (let i = 0; i < image.length; i++) {
      if (Math.floor(i / 3) % size < 32) repainted += image[i] !== pixels[i] ? 1 : 0;
      else kept += image[i] === pixels[i] ? 1 : 0;
    }
    assert.equal(kept, (size * size * 3) / 2, 'a value outside the mask changed');
    assert.ok(repainted > (size * size * 3) / 4, `only ${repainted} values repainted`);
  });
});

test('gesso generate --subseed: variation seeds as A1111 counts them, written to the metadata and read back by --from', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    const common = ['generate', '--model', model, 'a red circle', '--scheduler', 'euler'];
    const varied = gesso(
      ...common,
      '--seed',
      '7',
      '--subseed',
      '30',
      '--subseed-strength',
      '0.4',
      '-n',
      '2',
      '--out',
      out,
    );
    assert.equal(varied.status, 0, varied.stderr);
    const lines = manifest(out) as (ManifestLine & {
      subseed?: number;
      subseed_strength?: number;
    })[];
    assert.deepEqual(
      lines.map((l) => [l.seed, l.subseed, l.subseed_strength]),
      [
        [7, 30, 0.4],
        [7, 31, 0.4],
      ],
    );
    const first = decodePng(readFileSync(join(out, lines[0]!.file)));
    const params = Object.fromEntries(parseInfotext(first.text.parameters!).params);
    assert.equal(params['Variation seed'], '30');
    assert.equal(params['Variation seed strength'], '0.4');
    const second = decodePng(readFileSync(join(out, lines[1]!.file)));
    assert.notDeepEqual(second.data, first.data);
    // Reproduced from its metadata alone.
    const again = gesso(
      'generate',
      '--from',
      join(out, lines[1]!.file),
      '--model',
      model,
      '--out',
      join(dir, 'again.png'),
    );
    assert.equal(again.status, 0, again.stderr);
    assert.deepEqual(decodePng(readFileSync(join(dir, 'again.png'))).data, second.data);
    // Strength 1 under a sampler that draws nothing more is the variation seed's own image.
    const full = gesso(
      ...common,
      '--seed',
      '7',
      '--subseed',
      '31',
      '--subseed-strength',
      '1',
      '--out',
      join(dir, 'full.png'),
    );
    const own = gesso(...common, '--seed', '31', '--out', join(dir, 'own.png'));
    assert.equal(full.status, 0, full.stderr);
    assert.equal(own.status, 0, own.stderr);
    assert.deepEqual(
      decodePng(readFileSync(join(dir, 'full.png'))).data,
      decodePng(readFileSync(join(dir, 'own.png'))).data,
    );
  });
});

test('gesso generate: <lora:NAME:WEIGHT> in the prompt merges NAME.safetensors from --lora-dir, as --lora does, and is recorded and read back', async () => {
  await withTempDir(async (dir) => {
    const loraDir = join(dir, 'loras');
    mkdirSync(join(loraDir, 'styles'), { recursive: true });
    const both = join(loraDir, 'styles', 'both.safetensors');
    await writeRandomLora(model, both, ['unet', 'text_encoder']);
    await writeRandomLora(model, join(dir, 'unet-only.safetensors'), ['unet']);
    await writeRandomLora(model, join(dir, 'te-only.safetensors'), ['text_encoder']);
    const out = join(dir, 'out');
    const draw = (name: string, prompt: string, ...extra: string[]) => {
      const r = gesso(
        'generate',
        '--model',
        model,
        prompt,
        '--seed',
        '7',
        '--out',
        join(out, name),
        ...extra,
      );
      assert.equal(r.status, 0, r.stderr);
      return decodePng(readFileSync(join(out, name)));
    };
    const plain = draw('plain.png', 'a red circle');
    // The tag leaves the prompt (put first, nothing else of the prompt changes).
    const tagged = draw('tagged.png', '<lora:both:0.5>a red circle', '--lora-dir', loraDir);
    const flag = draw('flag.png', 'a red circle', '--lora', `${both}:0.5`);
    assert.deepEqual(tagged.data, flag.data);
    assert.notDeepEqual(tagged.data, plain.data);
    // Text-encoder and UNet weights apart, positional and named: te 0 is the UNet's layer alone.
    const unetPart = draw('unet.png', 'a red circle', '--lora', join(dir, 'unet-only.safetensors'));
    const tePart = draw('te.png', 'a red circle', '--lora', join(dir, 'te-only.safetensors'));
    assert.notDeepEqual(unetPart.data, tePart.data);
    assert.deepEqual(
      draw('u1.png', '<lora:both:0:1>a red circle', '--lora-dir', loraDir).data,
      unetPart.data,
    );
    assert.deepEqual(
      draw('u2.png', '<lora:both:unet=1:te=0>a red circle', '--lora-dir', loraDir).data,
      unetPart.data,
    );
    assert.deepEqual(
      draw('t1.png', '<lyco:both:1:0>a red circle', '--lora-dir', loraDir).data,
      tePart.data,
    );

    // A1111's infotext: the prompt as typed, and the file's hash over its tensor bytes.
    const bytes = readFileSync(both);
    const dataStart = 8 + Number(bytes.readBigUInt64LE(0));
    const hash = createHash('sha256').update(bytes.subarray(dataStart)).digest('hex').slice(0, 12);
    const info = parseInfotext(tagged.text.parameters!);
    assert.equal(info.prompt, '<lora:both:0.5>a red circle');
    assert.deepEqual(
      info.params.find(([k]) => k === 'Lora hashes'),
      ['Lora hashes', `both: ${hash}`],
    );
    assert.match(tagged.text.parameters!, /Lora hashes: "both: [0-9a-f]{12}"/);
    const redraw = (name: string) =>
      gesso(
        'generate',
        '--from',
        join(out, 'tagged.png'),
        '--model',
        model,
        '--lora-dir',
        loraDir,
        '--out',
        join(out, name),
      );
    const again = redraw('again.png');
    assert.equal(again.status, 0, again.stderr);
    assert.deepEqual(decodePng(readFileSync(join(out, 'again.png'))).data, tagged.data);

    // A file changed since: drawn with what is there now, and said so.
    await writeRandomLora(model, both, ['unet']);
    const changed = redraw('changed.png');
    assert.equal(changed.status, 0, changed.stderr);
    assert.match(
      changed.stderr,
      new RegExp(
        `was made with LoRAs both: ${hash}; .* has both: [0-9a-f]{12}, so the image may differ`,
      ),
    );
    const redrawn = decodePng(readFileSync(join(out, 'changed.png'))).data;
    assert.notDeepEqual(redrawn, tagged.data);
    assert.deepEqual(
      redrawn,
      draw('now.png', '<lora:both:0.5>a red circle', '--lora-dir', loraDir).data,
    );
    await writeRandomLora(model, both, ['unet', 'text_encoder']);

    // Prompts with and without LoRAs in one run: each drawn with its own.
    const list = join(dir, 'prompts.txt');
    writeFileSync(
      list,
      '{"prompt": "<lora:both:0.5>a red circle", "seed": 7}\n{"prompt": "a red circle", "seed": 7}\n',
    );
    const mixed = gesso(
      'generate',
      '--model',
      model,
      '--prompts',
      list,
      '--lora-dir',
      loraDir,
      '--seed',
      '7',
      '--batch-size',
      '2',
      '--out',
      join(out, 'mixed'),
    );
    assert.equal(mixed.status, 0, mixed.stderr);
    assert.deepEqual(decodePng(readFileSync(join(out, 'mixed', '00000-7.png'))).data, tagged.data);
    assert.deepEqual(decodePng(readFileSync(join(out, 'mixed', '00001-7.png'))).data, plain.data);

    const mistakes: [string[], RegExp][] = [
      [['<lora:both:1>x'], /no LoRA folder was given; pass --lora-dir DIR .*both\.safetensors/],
      [
        ['<lora:nope:1>x', '--lora-dir', loraDir],
        /<lora:nope:1>: no LoRA named 'nope' in .*it has: both/,
      ],
      [
        ['<lora:both:lots>x', '--lora-dir', loraDir],
        /<lora:both:lots>: the weight 'lots' is not a number/,
      ],
      [['<lora:both:1:1:8>x', '--lora-dir', loraDir], /not a dyn rank/],
      [['<hypernet:x:1> a cat', '--lora-dir', loraDir], /loads no 'hypernet' networks/],
      [['x', '--lora-dir', join(dir, 'missing')], /the LoRA folder .*missing cannot be read/],
    ];
    for (const [args, message] of mistakes) {
      const r = gesso('generate', '--model', model, ...args, '--out', join(dir, 'wrong'));
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message, args.join(' '));
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    }
  });
});

test('gesso generate --prompts: plain lines and JSON lines with their own options', async () => {
  await withTempDir(async (dir) => {
    const file = join(dir, 'prompts.txt');
    writeFileSync(
      file,
      'a red circle\n\n{"prompt": "a blue square", "seed": 1000, "count": 2, "steps": 2, "cfg_scale": 5}\n{"prompt": "a green diamond", "seed": -1}\n',
    );
    const out = join(dir, 'out');
    const r = gesso('generate', '--model', model, '--prompts', file, '--seed', '9', '--out', out);
    assert.equal(r.status, 0, r.stderr);
    const lines = manifest(out);
    assert.deepEqual(
      lines.map((l) => [l.file, l.prompt, l.seed, l.steps, l.guidance]),
      [
        ['00000-9.png', 'a red circle', 9, 3, 2],
        ['00001-1000.png', 'a blue square', 1000, 2, 5],
        ['00002-1001.png', 'a blue square', 1001, 2, 5],
        // -1 is no seed of its own: the next of --seed's run.
        ['00003-10.png', 'a green diamond', 10, 3, 2],
      ],
    );
  });
});

test('gesso generate: a random seed is reported and recorded', async () => {
  await withTempDir(async (dir) => {
    const r = gesso('generate', '--model', model, 'a circle', '--out', join(dir, 'o'));
    assert.equal(r.status, 0, r.stderr);
    const seed = /seed (\d+) \(random\)/.exec(r.stderr)?.[1];
    assert.ok(seed !== undefined, r.stderr);
    assert.equal(manifest(join(dir, 'o'))[0]!.seed, Number(seed));

    // A1111's -1 asks for a random seed too, even over the seed of a --from image.
    const first = join(dir, 'o', manifest(join(dir, 'o'))[0]!.file);
    for (const args of [
      ['a circle', '--seed', '-1'],
      ['a circle', '--seed=-1'],
      ['--from', first, '--seed', '-1'],
    ]) {
      const again = gesso('generate', '--model', model, ...args, '--out', join(dir, 'o'));
      assert.equal(again.status, 0, again.stderr);
      const drawn = /seed (\d+) \(random\)/.exec(again.stderr)?.[1];
      assert.ok(drawn !== undefined, `${args.join(' ')}: ${again.stderr}`);
      assert.equal(manifest(join(dir, 'o')).at(-1)!.seed, Number(drawn));
    }
    assert.equal(new Set(manifest(join(dir, 'o')).map((l) => l.seed)).size, 4);
    const below = gesso('generate', '--model', model, 'a circle', '--seed', '-2', '--out', dir);
    assert.equal(below.status, 2);
    assert.match(below.stderr, /--seed must be at least -1 \(got -2\)/);
    // Beyond what a JavaScript number holds exactly: the message repeats the seed as typed.
    const above = gesso('generate', '--model', model, 'a circle', '--seed', '18446744073709551615');
    assert.equal(above.status, 2);
    assert.match(
      above.stderr,
      /--seed must be at most 9007199254740991 \(got 18446744073709551615\)/,
    );
  });
});

test('gesso generate: user mistakes exit 2 with one line that says what to do, and write nothing', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    const bogusPng = join(dir, 'bogus.png');
    writeFileSync(bogusPng, 'not a png at all');
    const plainPng = join(dir, 'plain.png');
    writeFileSync(
      plainPng,
      encodePng({ width: 1, height: 1, channels: 3, data: new Uint8Array(3) }),
    );
    const badJson = join(dir, 'bad.jsonl');
    writeFileSync(badJson, '{"prompt": "x", "stepz": 3}\n');
    const cases: [string[], RegExp][] = [
      [['--model', join(dir, 'nope'), 'x'], /no model folder, bundled model or Hub id/],
      [['--model', model, 'x', '--size', '60x64'], /not a multiple of 8.*try 64x64/],
      [['--model', model, 'x', '--size', 'big'], /--size must be WIDTHxHEIGHT/],
      [['--model', model, 'x', '--size', '65536x65536'], /needs about .* choose a smaller --size/],
      [
        ['--model', model, 'x', '--scheduler', 'warp-drive'],
        /^gesso generate: unknown scheduler 'warp-drive'; use one of: ddim,/,
      ],
      [['--model', model, 'x', '--steps', '0'], /--steps must be at least 1/],
      [['--model', model, 'x', '--init-image', bogusPng], /bogus\.png/],
      [['--model', model, '--from', plainPng], /no 'parameters' text chunk/],
      [['--model', model, '--prompts', badJson], /bad\.jsonl:1: unknown key 'stepz'/],
      [
        ['--model', model, 'x', '-n', '2', '--out', join(dir, 'one.png')],
        /names one file but this run makes 2 images/,
      ],
      [['--model', model], /no prompt given/],
      [
        ['--model', 'shapes-gan', 'x', '--lora', join(dir, 'style.safetensors')],
        /shapes-gan is a GAN; LoRAs merge into Stable Diffusion models/,
      ],
    ];
    for (const [args, message] of cases) {
      const r = gesso('generate', ...args, ...(args.includes('--out') ? [] : ['--out', out]));
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message, args.join(' '));
      assert.doesNotMatch(r.stderr, /\n\s+at /, `${args.join(' ')}: no stack trace`);
      assert.ok(!existsSync(join(out, 'manifest.jsonl')), `${args.join(' ')} wrote output`);
    }
    assert.ok(!existsSync(join(dir, 'one.png')));
  });
});

test('gesso generate: Ctrl-C stops cleanly and keeps the finished images', async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, 'out');
    const child = spawn(
      process.execPath,
      [
        GESSO_BIN,
        'generate',
        '--model',
        model,
        'a red circle',
        '-n',
        '200',
        '--seed',
        '1',
        '--steps',
        '20',
        '--out',
        out,
      ],
      { env: { ...process.env, GESSO_CACHE_DIR: cache } },
    );
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const status = await new Promise<number | null>((resolve) => {
      child.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
        // Interrupt once two images are done.
        if (stdout.split('\n').length > 2 && !child.killed) child.kill('SIGINT');
      });
      child.on('exit', (code) => resolve(code));
    });
    assert.equal(status, 130, stderr);
    assert.match(stderr, /stopped: \d+ of 200 images written/);
    const written = Number(/stopped: (\d+)/.exec(stderr)![1]);
    assert.ok(written >= 2 && written < 200);
    const pngs = readdirSync(out).filter((f) => f.endsWith('.png'));
    assert.equal(pngs.length, written);
    assert.equal(manifest(out).length, written);
    for (const f of pngs) decodePng(readFileSync(join(out, f))); // every file whole
    assert.equal(readdirSync(out).filter((f) => f.includes('.tmp')).length, 0);
  });
});
