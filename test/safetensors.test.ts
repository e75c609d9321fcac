import assert from 'node:assert/strict';
import { open, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { isUserError } from '../src/errors.js';
import {
  parseHeader,
  SafetensorsError,
  SafetensorsFile,
  writeSafetensors,
} from '../src/io/safetensors.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { golden, needsGolden, withTempDir } from './helpers.js';
import { MALFORMED, rawFile, writeMalformed } from './malformed.js';

test('write then read: every dtype, metadata, alignment, exact bytes', async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'all.safetensors');
    const g = new TorchGenerator(1);
    const tensors = {
      f32: g.randn([3, 5]),
      f16: g.randn([7]).to('float16'),
      bf16: g.randn([2, 3]).to('bfloat16'),
      f64: new Tensor('float64', [2], Float64Array.of(Math.PI, -1e300)),
      i64: Tensor.int64([3], [-(2n ** 62n), 0n, 2n ** 62n]),
      i32: new Tensor('int32', [2], Int32Array.of(-7, 2 ** 31 - 1)),
      u8: new Tensor('uint8', [3], Uint8Array.of(0, 128, 255)),
      flag: new Tensor('bool', [2], Uint8Array.of(1, 0)),
      empty: new Tensor('float32', [0, 4]),
    };
    await writeSafetensors(path, tensors, { format: 'pt', note: 'ünïcode' });
    await SafetensorsFile.with(path, async (file) => {
      assert.deepEqual(file.metadata, { format: 'pt', note: 'ünïcode' });
      assert.equal(file.dataOffset % 8, 0, 'header padded to 8 bytes');
      assert.deepEqual(new Set(file.names), new Set(Object.keys(tensors)));
      for (const [name, t] of Object.entries(tensors)) {
        const info = file.info(name);
        assert.equal(
          (info.byteOffset - file.dataOffset) % t.data.BYTES_PER_ELEMENT,
          0,
          `${name} aligned`,
        );
        const back = await file.read(name);
        assert.equal(back.dtype, t.dtype);
        assert.deepEqual(back.shape, t.shape);
        assert.deepEqual(Buffer.from(back.bytes()), Buffer.from(t.bytes()), name);
      }
    });
    // The header is the format's own: an 8-byte length, then JSON.
    const bytes = await readFile(path);
    const n = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Record<
      string,
      { dtype: string }
    >;
    assert.equal(header.bf16!.dtype, 'BF16');
    assert.equal(header.flag!.dtype, 'BOOL');
  });
});

test('reads the golden weight files (diffusers-written) lazily', needsGolden(), async () => {
  const path = golden('sd1-tiny', 'sd-tiny', 'unet', 'diffusion_pytorch_model.safetensors');
  await SafetensorsFile.with(path, async (file) => {
    const info = file.info('conv_in.weight');
    assert.equal(info.dtype, 'F32');
    assert.deepEqual(info.shape, [32, 4, 3, 3]);
    const w = await file.read('conv_in.weight');
    assert.equal(w.size, 32 * 4 * 9);
    const fp16 = golden('sd1-tiny', 'sd-tiny', 'unet', 'diffusion_pytorch_model.fp16.safetensors');
    const half = await SafetensorsFile.with(fp16, (f) => f.read('conv_in.weight'));
    assert.equal(half.dtype, 'float16');
    // The fp16 file holds the float32 weights rounded to nearest: converting ours gives the same bits.
    assert.deepEqual(Buffer.from(w.to('float16').bytes()), Buffer.from(half.bytes()));
  });
});

test('writes atomically: a failing write leaves the old file and no temporary', async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'w.safetensors');
    await writeSafetensors(path, { a: Tensor.float32([1], [1]) });
    const before = await readFile(path);
    await assert.rejects(
      writeSafetensors(path, {
        a: Tensor.float32([1], [2]),
        b: { dtype: 'F32', shape: [2], bytes: () => Promise.reject(new Error('disk on fire')) },
      }),
      /disk on fire/,
    );
    assert.deepEqual(await readFile(path), before);
    assert.deepEqual(await readdir(dir), ['w.safetensors']);
    await assert.rejects(
      writeSafetensors(path, { a: { dtype: 'F32', shape: [2], bytes: () => new Uint8Array(7) } }),
      /produced 7 bytes/,
    );
    assert.deepEqual(await readdir(dir), ['w.safetensors']);
  });
});

test('every kind of malformed file gets its own error', async () => {
  await withTempDir(async (dir) => {
    for (const m of await writeMalformed(dir)) {
      await assert.rejects(SafetensorsFile.open(m.path), (error: unknown) => {
        assert.ok(error instanceof SafetensorsError, `${m.name}: a SafetensorsError`);
        assert.equal(error.code, m.code, m.name);
        assert.match(error.message, m.message, m.name);
        assert.ok(error.message.startsWith(m.path), `${m.name}: the message names the file`);
        return true;
      });
    }
  });
  assert.ok(MALFORMED.length >= 14);
});

test('a missing file is a user error, not a crash', async () => {
  await assert.rejects(
    SafetensorsFile.open('/nonexistent/x.safetensors'),
    (e: unknown) => isUserError(e) && e.code === 'file-not-found',
  );
});

test('never crashes or hangs on damaged input (seeded fuzzing)', async () => {
  const g = new TorchGenerator(2024);
  const rand = () => g.rand([1]).data[0]!;
  const base = rawFile(
    {
      __metadata__: { format: 'pt' },
      'w.0': { dtype: 'F16', shape: [2, 3], data_offsets: [0, 12] },
      'w.1': { dtype: 'I64', shape: [1], data_offsets: [12, 20] },
      'w.2': { dtype: 'BF16', shape: [], data_offsets: [20, 22] },
    },
    22,
  );
  const headerLength = Number(Buffer.from(base).readBigUInt64LE(0));
  let rejected = 0;
  let accepted = 0;
  for (let i = 0; i < 4000; i++) {
    const bytes = Uint8Array.from(base);
    const kind = i % 4;
    if (kind === 0) {
      // Flip random header bytes.
      for (let k = 0; k < 1 + Math.floor(rand() * 4); k++)
        bytes[8 + Math.floor(rand() * headerLength)] = Math.floor(rand() * 256);
    } else if (kind === 1) {
      // Replace digits in the header with random numbers, some huge, some negative.
      const text = Buffer.from(bytes.subarray(8, 8 + headerLength)).toString('latin1');
      const mutated = text.replace(/\d+/g, (d) =>
        rand() < 0.3 ? String(Math.floor((rand() - 0.2) * 10 ** (1 + rand() * 20))) : d,
      );
      const file = rawFile(mutated, bytes.subarray(8 + headerLength));
      bytes.set(file.subarray(0, Math.min(file.length, bytes.length)));
    }
    const length = kind === 2 ? Math.floor(rand() * bytes.length) : bytes.length;
    const data = bytes.subarray(0, length);
    try {
      if (data.length < 8) throw new SafetensorsError('truncated', 'x', 'short');
      const n = Number(Buffer.from(data).readBigUInt64LE(0));
      if (8 + n > data.length) throw new SafetensorsError('header-past-end', 'x', 'past end');
      parseHeader(data.subarray(8, 8 + n), data.length, 'x');
      accepted++;
    } catch (error) {
      assert.ok(error instanceof SafetensorsError, `iteration ${i}: ${String(error)}`);
      rejected++;
    }
  }
  assert.ok(
    rejected > 1000 && accepted > 100,
    `both outcomes exercised (${rejected} rejected, ${accepted} accepted)`,
  );
});

test('a 10 GB file opens and its far end reads, without loading the file', async (t) => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'big.safetensors');
    const big = 10_000_000_000;
    const header = Buffer.from(
      JSON.stringify({
        big: { dtype: 'U8', shape: [big], data_offsets: [0, big] },
        tail: { dtype: 'F32', shape: [2], data_offsets: [big, big + 8] },
      }),
    );
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(header.length));
    const fh = await open(path, 'w');
    try {
      await fh.write(prefix, 0, 8, 0);
      await fh.write(header, 0, header.length, 8);
      const tail = Buffer.from(Float32Array.of(1.25, -7).buffer);
      // A sparse file: only the header and the last 8 bytes are stored on disk.
      await fh.write(tail, 0, 8, 8 + header.length + big);
    } catch (error) {
      t.skip(
        `the temporary file system cannot hold a sparse 10 GB file: ${(error as Error).message}`,
      );
      return;
    } finally {
      await fh.close();
    }
    assert.equal((await stat(path)).size, 8 + header.length + big + 8);
    const rssBefore = process.memoryUsage().rss;
    await SafetensorsFile.with(path, async (file) => {
      assert.equal(file.info('big').byteLength, big);
      assert.equal(file.info('tail').byteOffset, 8 + header.length + big);
      assert.deepEqual((await file.read('tail')).toArray(), [1.25, -7]);
    });
    assert.ok(
      process.memoryUsage().rss - rssBefore < 200_000_000,
      'memory stays far below the file size',
    );
  });
});

test('zero-length tensors may share an offset with their neighbour', async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'z.safetensors');
    await writeFile(
      path,
      rawFile(
        {
          a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] },
          z: { dtype: 'F32', shape: [0, 3], data_offsets: [4, 4] },
          b: { dtype: 'F32', shape: [1], data_offsets: [4, 8] },
        },
        8,
      ),
    );
    await SafetensorsFile.with(path, async (f) =>
      assert.deepEqual((await f.read('z')).shape, [0, 3]),
    );
  });
});
