import { shapeSize, Tensor } from './tensor.js';

/**
 * PyTorch's CPU random generator, bit for bit: `torch.Generator().manual_seed(s)` followed by
 * `torch.randn(shape, generator=g)` / `torch.rand(...)` give the same float32 values here, draw
 * after draw, so a seed means the same starting noise as diffusers and ComfyUI on CPU.
 *
 * The engine is MT19937 seeded with the low 32 bits of the seed. `randn` takes one of two paths,
 * as ATen does:
 * - fewer than 16 elements: Box–Muller in float64 on 53-bit uniforms, one value at a time, keeping
 *   the unused second value of each pair for the next call;
 * - 16 or more (contiguous float32): all uniforms (24-bit) are drawn first, then each block of 16
 *   is turned into normals pairwise (j, j + 8); a ragged tail redraws 16 fresh uniforms for the
 *   last 16 slots. The transform is the AVX2 kernel of x86 builds (Cephes-style float32 log and
 *   sincos, compiled with fused multiply-adds), emulated exactly below.
 */
export class TorchGenerator {
  private readonly state = new Uint32Array(624);
  private index = 624;
  private nextDoubleNormal: number | undefined;
  private seedValue = 0n;

  constructor(seed: number | bigint = 67280421310721n) {
    this.manualSeed(seed);
  }

  /** Accepts any int64 (negative seeds wrap as in PyTorch) or a uint64 as bigint. */
  manualSeed(seed: number | bigint): this {
    const big = typeof seed === 'bigint' ? seed : BigInt(Math.trunc(seed));
    this.seedValue = BigInt.asUintN(64, big);
    const state = this.state;
    state[0] = Number(this.seedValue & 0xffffffffn);
    for (let j = 1; j < 624; j++) {
      const prev = state[j - 1]!;
      state[j] = Math.imul(1812433253, prev ^ (prev >>> 30)) + j;
    }
    this.index = 624;
    this.nextDoubleNormal = undefined;
    return this;
  }

  initialSeed(): bigint {
    return this.seedValue;
  }

  /** The full generator state, for checkpoints that resume bit for bit. */
  getState(): { mt: Uint32Array; index: number; nextDoubleNormal: number | null; seed: string } {
    return {
      mt: this.state.slice(),
      index: this.index,
      nextDoubleNormal: this.nextDoubleNormal ?? null,
      seed: this.seedValue.toString(),
    };
  }

  setState(s: {
    mt: ArrayLike<number>;
    index: number;
    nextDoubleNormal: number | null;
    seed: string;
  }): void {
    if (s.mt.length !== 624 || !Number.isInteger(s.index) || s.index < 0 || s.index > 624) {
      throw new RangeError('invalid generator state');
    }
    this.state.set(s.mt);
    this.index = s.index;
    this.nextDoubleNormal = s.nextDoubleNormal ?? undefined;
    this.seedValue = BigInt(s.seed);
  }

  /** One 32-bit draw (`random()` in ATen). */
  nextUint32(): number {
    if (this.index >= 624) this.twist();
    let y = this.state[this.index++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  private twist(): void {
    const s = this.state;
    for (let k = 0; k < 624; k++) {
      const y = (s[k]! & 0x80000000) | (s[(k + 1) % 624]! & 0x7fffffff);
      s[k] = s[(k + 397) % 624]! ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
    }
    this.index = 0;
  }

  /** Uniform in [0, 1) with 24 random bits, as `uniform_real_distribution<float>`. */
  private uniformFloat(): number {
    return (this.nextUint32() & 0xffffff) * 2 ** -24;
  }

  /** Uniform in [0, 1) with 53 random bits from two draws (high word first), as for double. */
  private uniformDouble(): number {
    const hi = this.nextUint32();
    const lo = this.nextUint32();
    return ((hi & 0x1fffff) * 2 ** 32 + lo) * 2 ** -53;
  }

  private normalDouble(): number {
    if (this.nextDoubleNormal !== undefined) {
      const cached = this.nextDoubleNormal;
      this.nextDoubleNormal = undefined;
      return cached;
    }
    const u1 = this.uniformDouble();
    const u2 = this.uniformDouble();
    const radius = Math.sqrt(-2 * Math.log(1 - u2));
    const theta = 2 * Math.PI * u1;
    this.nextDoubleNormal = radius * Math.sin(theta);
    return radius * Math.cos(theta);
  }

  /** `torch.rand(shape, generator=g)` for float32. */
  rand(shape: readonly number[]): Tensor<'float32'> {
    const out = new Float32Array(shapeSize(shape));
    for (let i = 0; i < out.length; i++) out[i] = this.uniformFloat();
    return new Tensor('float32', shape, out);
  }

  /** `torch.randn(shape, generator=g)` for float32. */
  randn(shape: readonly number[]): Tensor<'float32'> {
    const n = shapeSize(shape);
    const out = new Float32Array(n);
    if (n < 16) {
      for (let i = 0; i < n; i++) out[i] = this.normalDouble();
    } else {
      for (let i = 0; i < n; i++) out[i] = this.uniformFloat();
      for (let i = 0; i + 16 <= n; i += 16) normalFill16(out, i);
      if (n % 16 !== 0) {
        for (let i = n - 16; i < n; i++) out[i] = this.uniformFloat();
        normalFill16(out, n - 16);
      }
    }
    return new Tensor('float32', shape, out);
  }
}

const fround = Math.fround;

/** float32 fused multiply-add: a * b + c rounded once. Inputs are float32 values. */
export function fmaf(a: number, b: number, c: number): number {
  const product = a * b; // exact: 24 + 24 significant bits fit in a double
  const sum = product + c;
  // TwoSum: sum + error is exactly product + c.
  const bp = sum - c;
  const error = product - bp + (c - (sum - bp));
  const rounded = fround(sum);
  if (error === 0 || rounded === sum) return rounded;
  // Rounding `sum` to float32 could only differ from rounding the exact value when `sum` sits
  // exactly halfway between two floats; then the sign of the error decides.
  const toward = sum > rounded ? Infinity : -Infinity;
  const neighbour = nextFloat32(rounded, toward);
  if (neighbour - sum !== sum - rounded) return rounded;
  return error > 0 === sum > rounded ? neighbour : rounded;
}

const scratch = new Float32Array(1);
const scratchBits = new Int32Array(scratch.buffer);

function nextFloat32(x: number, direction: number): number {
  if (x === 0) return direction > 0 ? 2 ** -149 : -(2 ** -149);
  scratch[0] = x;
  scratchBits[0]! += x > 0 === direction > 0 ? 1 : -1;
  return scratch[0]!;
}

function floatBits(x: number): number {
  scratch[0] = x;
  return scratchBits[0]!;
}

function floatFromBits(bits: number): number {
  scratchBits[0] = bits;
  return scratch[0]!;
}

// Cephes coefficients, as float32.
const LOG_POLY = [
  7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1,
  -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
].map(fround);
const LOG_Q1 = fround(-2.1219444e-4);
const LOG_Q2 = fround(0.693359375);
const SQRT_HALF = fround(Math.SQRT1_2);
const FOUR_OVER_PI = fround(1.27323954473516);
const DP1 = fround(-0.78515625);
const DP2 = fround(-2.4187564849853515625e-4);
const DP3 = fround(-3.774894977445941e-8);
const SIN_POLY = [-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1].map(fround);
const COS_POLY = [2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2].map(fround);
const TWO_PI = fround(2 * Math.PI);

/** Natural log of a positive normal float32, as the vectorised Cephes kernel computes it. */
function logf(value: number): number {
  const bits = floatBits(value);
  let e = fround(((bits >>> 23) & 0xff) - 0x7f + 1);
  let x = floatFromBits((bits & ~0x7f800000) | 0x3f000000); // mantissa scaled into [0.5, 1)
  let extra = 0;
  if (x < SQRT_HALF) {
    extra = x;
    e = fround(e - 1);
  }
  x = fround(fround(x - 1) + extra);
  const z = fround(x * x);
  let y = LOG_POLY[0]!;
  for (let i = 1; i < LOG_POLY.length; i++) y = fmaf(y, x, LOG_POLY[i]!);
  y = fround(y * x);
  y = fmaf(y, z, fround(e * LOG_Q1));
  y = fmaf(-z, 0.5, y);
  return fmaf(e, LOG_Q2, fround(x + y));
}

/** Sine and cosine of a non-negative float32 (Cephes range reduction by pi/4). */
function sincosf(theta: number): [number, number] {
  let x = Math.abs(theta);
  let j = Math.trunc(fround(x * FOUR_OVER_PI));
  j = (j + 1) & ~1;
  const y = fround(j);
  const swapSinSign = (j & 4) !== 0;
  const sinUsesSinPoly = (j & 2) === 0;
  const cosNegative = (~(j - 2) & 4) !== 0;
  x = fmaf(y, DP1, x);
  x = fmaf(y, DP2, x);
  x = fmaf(y, DP3, x);
  const z = fround(x * x);

  let c = fmaf(COS_POLY[0]!, z, COS_POLY[1]!);
  c = fmaf(c, z, COS_POLY[2]!);
  c = fround(c * z);
  c = fmaf(c, z, -fround(z * 0.5));
  c = fround(c + 1);

  let s = fmaf(SIN_POLY[0]!, z, SIN_POLY[1]!);
  s = fmaf(s, z, SIN_POLY[2]!);
  s = fround(s * z);
  s = fmaf(s, x, x);

  let sin = sinUsesSinPoly ? s : c;
  let cos = sinUsesSinPoly ? c : s;
  if (theta < 0 !== swapSinSign) sin = -sin;
  if (cosNegative) cos = -cos;
  return [sin, cos];
}

/** Box–Muller over 16 uniforms in place: pairs (j, j + 8) for j < 8. */
function normalFill16(data: Float32Array, offset: number): void {
  for (let j = offset; j < offset + 8; j++) {
    const u1 = fround(1 - data[j]!);
    const u2 = data[j + 8]!;
    const radius = fround(Math.sqrt(fround(-2 * logf(u1))));
    const [sin, cos] = sincosf(fround(TWO_PI * u2));
    data[j] = fround(radius * cos);
    data[j + 8] = fround(radius * sin);
  }
}

/** A seed drawn at random, below 2^32 as A1111 and diffusers' users draw them. */
export function randomSeed(): number {
  return Math.floor(Math.random() * 2 ** 32);
}

/** What draws starting and step noise: `randn(shape)` gives the next float32 normals. */
export interface NormalGenerator {
  randn(shape: readonly number[]): Tensor<'float32'>;
}

/**
 * Where noise comes from, as A1111's "Random number generator source" names it: `cpu` is
 * PyTorch's CPU generator (diffusers and ComfyUI on CPU, A1111's CPU), `nv` the generator of
 * PyTorch on NVIDIA GPUs (A1111's NV, and its default GPU on NVIDIA cards).
 */
export type RngSource = 'cpu' | 'nv';

export function seededGenerator(seed: number | bigint, source: RngSource = 'cpu'): NormalGenerator {
  return source === 'nv' ? new PhiloxGenerator(seed) : new TorchGenerator(seed);
}

const PHILOX_M0 = 0xd2511f53;
const PHILOX_M1 = 0xcd9e8d57;
const PHILOX_W0 = 0x9e3779b9;
const PHILOX_W1 = 0xbb67ae85;
// float32 constants the transform is written with, applied in float64 (as numpy promotes them).
const INV_2_32 = fround(2.3283064e-10);
const INV_2_32_2PI = fround(2.3283064e-10 * 6.2831855);

/** The high 32 bits of the 64-bit product of two uint32s. */
function mulHi(a: number, b: number): number {
  const aLo = a & 0xffff;
  const aHi = a >>> 16;
  const bLo = b & 0xffff;
  const bHi = b >>> 16;
  const loLo = aLo * bLo;
  const hiLo = aHi * bLo;
  const loHi = aLo * bHi;
  const cross = (loLo >>> 16) + (hiLo & 0xffff) + loHi;
  return (aHi * bHi + (hiLo >>> 16) + Math.floor(cross / 65536)) >>> 0;
}

/**
 * CUDA's `torch.randn` as A1111 re-derived it for its NV source (modules/rng_philox.py): element
 * i of the n-th draw is Philox 4×32-10 of the counter (n, 0, i, 0) under the key (seed's low and
 * high 32 bits), its first two words turned into one normal by Box–Muller (the sine half).
 */
export class PhiloxGenerator implements NormalGenerator {
  private readonly key0: number;
  private readonly key1: number;
  private offset = 0;

  constructor(seed: number | bigint) {
    const big = BigInt.asUintN(64, typeof seed === 'bigint' ? seed : BigInt(Math.trunc(seed)));
    this.key0 = Number(big & 0xffffffffn);
    this.key1 = Number(big >> 32n);
  }

  randn(shape: readonly number[]): Tensor<'float32'> {
    const out = new Tensor('float32', shape);
    const data = out.data;
    const offset = this.offset++;
    for (let i = 0; i < data.length; i++) {
      let c0 = offset;
      let c1 = 0;
      let c2 = i;
      let c3 = 0;
      let k0 = this.key0;
      let k1 = this.key1;
      for (let round = 0; round < 10; round++) {
        const lo1 = Math.imul(c0, PHILOX_M0) >>> 0;
        const hi1 = mulHi(c0, PHILOX_M0);
        const lo2 = Math.imul(c2, PHILOX_M1) >>> 0;
        const hi2 = mulHi(c2, PHILOX_M1);
        c0 = (hi2 ^ c1 ^ k0) >>> 0;
        c1 = lo2;
        c2 = (hi1 ^ c3 ^ k1) >>> 0;
        c3 = lo1;
        k0 = (k0 + PHILOX_W0) >>> 0;
        k1 = (k1 + PHILOX_W1) >>> 0;
      }
      const u = c0 * INV_2_32 + INV_2_32 / 2;
      const v = c1 * INV_2_32_2PI + INV_2_32_2PI / 2;
      data[i] = fround(Math.sqrt(-2 * Math.log(u)) * Math.sin(v));
    }
    return out;
  }
}
