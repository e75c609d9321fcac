import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { SafetensorsFile } from '../src/io/safetensors.js';
import {
  bfloat16ArrayToFloat32,
  bfloat16BitsToFloat32,
  float16ArrayToFloat32,
  float16BitsToFloat32,
  float32ArrayToBfloat16,
  float32ArrayToFloat16,
  float32Bits,
  float32FromBits,
  float32ToBfloat16Bits,
  float32ToFloat16Bits,
} from '../src/tensor/half.js';
import { fixtures } from './helpers.js';

async function fixture(): Promise<Record<string, Uint8Array>> {
  return SafetensorsFile.with(join(fixtures, 'half.safetensors'), async (f) => {
    const out: Record<string, Uint8Array> = {};
    for (const name of f.names) out[name] = await f.readBytes(name);
    return out;
  });
}

const u16 = (b: Uint8Array) => new Uint16Array(b.slice().buffer);
const u32 = (b: Uint8Array) => new Uint32Array(b.slice().buffer);

test('float32 -> float16 matches NumPy on 7500 values (random, subnormal range, near the max)', async () => {
  const f = await fixture();
  const bits = u32(f.f32_bits!);
  const expected = u16(f.f16_bits!);
  const values = new Float32Array(bits.buffer);
  const batch = float32ArrayToFloat16(values);
  for (let i = 0; i < bits.length; i++) {
    const x = values[i]!;
    const e = expected[i]!;
    const isNaN16 = (e & 0x7c00) === 0x7c00 && (e & 0x3ff) !== 0;
    const got = float32ToFloat16Bits(x);
    assert.equal(batch[i], got, `batch and scalar agree at ${i}`);
    if (isNaN16) {
      assert.ok(
        (got & 0x7c00) === 0x7c00 && (got & 0x3ff) !== 0,
        `NaN stays NaN (input bits ${bits[i]!.toString(16)})`,
      );
      assert.equal(got & 0x8000, e & 0x8000, 'NaN sign');
    } else {
      assert.equal(got, e, `input bits 0x${bits[i]!.toString(16)} (${x})`);
    }
  }
});

test('float32 -> bfloat16 matches PyTorch, NaN kept', async () => {
  const f = await fixture();
  const bits = u32(f.f32_bits!);
  const expected = u16(f.bf16_bits!);
  const batch = float32ArrayToBfloat16(new Float32Array(bits.buffer));
  for (let i = 0; i < bits.length; i++) {
    const e = expected[i]!;
    const got = float32ToBfloat16Bits(float32FromBits(bits[i]!));
    assert.equal(batch[i], got);
    if ((e & 0x7f80) === 0x7f80 && (e & 0x7f) !== 0)
      assert.ok((got & 0x7f80) === 0x7f80 && (got & 0x7f) !== 0);
    else assert.equal(got, e, `input bits 0x${bits[i]!.toString(16)}`);
  }
});

test('float16 -> float32 is exact for every value (NumPy sample) and round-trips all 65536', async () => {
  const f = await fixture();
  const expected = u32(f.f16_all_as_f32_bits!);
  const sample = Uint16Array.from(expected, (_, i) => i * 7);
  const widenedBits = new Uint32Array(float16ArrayToFloat32(sample).buffer);
  for (let i = 0; i < expected.length; i++) {
    const h = sample[i]!;
    // Bit-exact, NaN payloads included, through the array path.
    assert.equal(widenedBits[i], expected[i], `half 0x${h.toString(16)}`);
    const scalar = float16BitsToFloat32(h);
    if (Number.isNaN(scalar)) assert.ok((expected[i]! & 0x7f800000) === 0x7f800000);
    else assert.equal(float32Bits(scalar), expected[i]);
  }
  const all = new Uint16Array(65536).map((_, i) => i);
  const widened = float16ArrayToFloat32(all);
  const back = float32ArrayToFloat16(widened);
  for (let h = 0; h < 65536; h++) {
    const isNaN16 = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
    if (isNaN16) assert.ok(Number.isNaN(widened[h]));
    else assert.equal(back[h], h, `0x${h.toString(16)} round trip`);
  }
});

test('hand-checked float16 cases', () => {
  assert.equal(float32ToFloat16Bits(1), 0x3c00);
  assert.equal(float32ToFloat16Bits(-2), 0xc000);
  assert.equal(float32ToFloat16Bits(65504), 0x7bff); // largest finite
  assert.equal(float32ToFloat16Bits(65519.99), 0x7bff); // below the rounding boundary
  assert.equal(float32ToFloat16Bits(65520), 0x7c00); // rounds to infinity
  assert.equal(float32ToFloat16Bits(2 ** -24), 0x0001); // smallest subnormal
  assert.equal(float32ToFloat16Bits(2 ** -25), 0x0000); // halfway to it: ties to even (zero)
  assert.equal(float32ToFloat16Bits(3 * 2 ** -25), 0x0002); // 1.5 units: ties to even (2)
  assert.equal(float32ToFloat16Bits(1 + 2 ** -11), 0x3c00); // tie: stays on even 1.0
  assert.equal(float32ToFloat16Bits(1 + 3 * 2 ** -11), 0x3c02); // tie: up to even
  assert.equal(float32ToFloat16Bits(-0), 0x8000);
  assert.equal(float32ToFloat16Bits(-Infinity), 0xfc00);
  assert.equal(float16BitsToFloat32(0x0001), 2 ** -24);
  assert.equal(float16BitsToFloat32(0x03ff), 1023 * 2 ** -24);
  assert.equal(float16BitsToFloat32(0x7c00), Infinity);
  assert.ok(Number.isNaN(float16BitsToFloat32(0x7e00)));
});

test('hand-checked bfloat16 cases', () => {
  assert.equal(float32ToBfloat16Bits(1), 0x3f80);
  assert.equal(float32ToBfloat16Bits(float32FromBits(0x3f808000)), 0x3f80); // tie to even
  assert.equal(float32ToBfloat16Bits(float32FromBits(0x3f818000)), 0x3f82); // tie to even, up
  assert.equal(float32ToBfloat16Bits(float32FromBits(0x7f7fffff)), 0x7f80); // overflow to inf
  assert.equal(bfloat16BitsToFloat32(0xc040), -3);
  assert.deepEqual(Array.from(bfloat16ArrayToFloat32(Uint16Array.of(0x3f80, 0x0001))), [
    1,
    float32FromBits(0x00010000),
  ]);
  assert.ok(Number.isNaN(bfloat16BitsToFloat32(float32ToBfloat16Bits(NaN))));
});
