import { readFileSync } from 'node:fs';
import { availableParallelism, cpus, totalmem } from 'node:os';

/** A `key : value` line's value in a /proc/cpuinfo text (the first processor's, for the whole file). */
function cpuinfoField(text: string, key: string): string | undefined {
  return new RegExp(`^${key}\\s*: (.*)$`, 'm').exec(text)?.[1];
}

/** What /proc/cpuinfo says, read once; empty where there is none (macOS, Windows). */
let cpuinfo: string | undefined;
function readCpuinfo(): string {
  if (cpuinfo === undefined) {
    try {
      cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
    } catch {
      cpuinfo = '';
    }
  }
  return cpuinfo;
}

/**
 * Compute threads for ONNX Runtime when the user names none: one per physical core this process
 * may run on. ORT's own default ran every op on one thread on a 2-core Zen 5 cloud VM, at half
 * speed, so gesso counts the distinct (package, core) pairs the kernel lists instead; like ORT's
 * intent, that leaves hyper-threaded siblings out.
 */
export function defaultComputeThreads(): number {
  const allowed = availableParallelism();
  const cores = new Set<string>();
  for (const block of readCpuinfo().split(/\n\s*\n/)) {
    const core = cpuinfoField(block, 'core id');
    if (core !== undefined) cores.add(`${cpuinfoField(block, 'physical id') ?? '0'}:${core}`);
  }
  return Math.max(1, Math.min(allowed, cores.size > 0 ? cores.size : allowed));
}

/** The instruction-set features that decide matrix speed, as /proc/cpuinfo names them. */
export const MATRIX_FEATURES: readonly string[] = [
  'avx2',
  'fma',
  'avx512f',
  'avx512_vnni',
  'avx_vnni',
  'avx512_bf16',
  'amx_bf16',
  'amx_int8',
];

/**
 * Which processor this is, beyond its marketing name: cloud hosts report "AMD EPYC" for several
 * generations with different vector units, and ORT's optimized graphs (NCHWc blocking) and speed
 * depend on those units.
 */
export function processorIdentity(): { name: string; id: string; features: string[] } {
  const name = cpus()[0]?.model ?? 'unknown';
  const info = readCpuinfo();
  if (info === '') return { name, id: 'unknown', features: [] };
  const field = (key: string) => cpuinfoField(info, key) ?? '?';
  const flags = new Set(field('flags').split(' '));
  return {
    name,
    id: `family ${field('cpu family')} model ${field('model')}`,
    features: MATRIX_FEATURES.filter((f) => flags.has(f)),
  };
}

/** The memory this process may use: the machine's, or less where a container limits it. */
export function availableMemoryBytes(): number {
  const limit = process.constrainedMemory();
  return limit > 0 ? Math.min(limit, totalmem()) : totalmem();
}

/**
 * The largest int8 weight magnitude to quantize to for ONNX Runtime's integer kernels here. x64
 * processors without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which adds
 * pairs of products in 16 bits: 2·255·127 saturates, 2·255·63 fits. So weights get 7 bits there
 * (ORT's quantizer calls this reduce_range), and on x64 where the flags cannot be read; 8 bits
 * with VNNI and on other architectures. ORT's own remedy, `session.x64quantprecision`, is not
 * used: it moves every weight beyond ±64 to uint8 × uint8 kernels on any x64 with AVX2, VNNI and
 * AMX processors included, where the int8 products were exact and fast already.
 */
export function int8WeightLimit(
  features: readonly string[] = processorIdentity().features,
  arch: string = process.arch,
): number {
  if (arch !== 'x64') return 127;
  return features.includes('avx512_vnni') || features.includes('avx_vnni') ? 127 : 63;
}
