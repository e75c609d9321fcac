/**
 * Exact conversions between float32 and the two 16-bit float formats, on raw bits.
 * float32 -> 16-bit rounds to nearest, ties to even, as IEEE 754 and PyTorch's `.half()` /
 * `.bfloat16()` do; subnormals, infinities and NaN are kept (NaN stays NaN, made quiet).
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function float32Bits(x: number): number {
  f32[0] = x;
  return u32[0]!;
}

export function float32FromBits(bits: number): number {
  u32[0] = bits >>> 0;
  return f32[0]!;
}

/** float32 (any JS number is first rounded to float32) -> IEEE binary16 bits. */
export function float32ToFloat16Bits(x: number): number {
  const bits = float32Bits(x);
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) {
    return mantissa === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mantissa >>> 13);
  }
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent >= 1) {
    let half = (halfExponent << 10) | (mantissa >>> 13);
    const rest = mantissa & 0x1fff;
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    if (rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1)) half += 1;
    return sign | half;
  }
  // The result is subnormal (or zero): value = significand * 2^(exponent - 150), in units of 2^-24.
  if (exponent === 0) return sign;
  const shift = 126 - exponent;
  if (shift > 24) return sign;
  const significand = mantissa | 0x800000;
  let q = significand >>> shift;
  const rest = significand & ((1 << shift) - 1);
  const halfway = 1 << (shift - 1);
  if (rest > halfway || (rest === halfway && (q & 1) === 1)) q += 1;
  return sign | q;
}

function float16BitsToFloat32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exponent = (h >>> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent !== 0) return (sign | ((exponent - 15 + 127) << 23) | (mantissa << 13)) >>> 0;
  if (mantissa === 0) return sign >>> 0;
  // Subnormal half: normalise into a float32 normal.
  let m = mantissa;
  let e = -14;
  while ((m & 0x400) === 0) {
    m <<= 1;
    e -= 1;
  }
  return (sign | ((e + 127) << 23) | ((m & 0x3ff) << 13)) >>> 0;
}

let float16Table: Float32Array | undefined;

/** All 65536 float16 values as float32, built once: conversion of large tensors is a lookup. */
function float16ToFloat32Table(): Float32Array {
  if (float16Table === undefined) {
    const table = new Float32Array(65536);
    const bits = new Uint32Array(table.buffer);
    for (let h = 0; h < 65536; h++) bits[h] = float16BitsToFloat32Bits(h);
    float16Table = table;
  }
  return float16Table;
}

export function float16BitsToFloat32(h: number): number {
  return float16ToFloat32Table()[h & 0xffff]!;
}

/** float32 -> bfloat16 bits (the top half of the float32, rounded to nearest even). */
export function float32ToBfloat16Bits(x: number): number {
  const bits = float32Bits(x);
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) {
    return ((bits >>> 16) | 0x40) & 0xffff;
  }
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bfloat16BitsToFloat32(b: number): number {
  return float32FromBits((b & 0xffff) << 16);
}

export function float32ArrayToFloat16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = float32ToFloat16Bits(src[i]!);
  return out;
}

/** Copies bits, not numbers, so NaN payloads survive (JS numbers would quiet them). */
export function float16ArrayToFloat32(src: Uint16Array): Float32Array {
  const table = new Uint32Array(float16ToFloat32Table().buffer);
  const out = new Float32Array(src.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) bits[i] = table[src[i]!]!;
  return out;
}

export function float32ArrayToBfloat16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) {
    const b = bits[i]!;
    out[i] =
      (b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff) !== 0
        ? (b >>> 16) | 0x40
        : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

export function bfloat16ArrayToFloat32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) bits[i] = src[i]! << 16;
  return out;
}
