import { cpus, totalmem } from 'node:os';
import { defaultComputeThreads, processorIdentity } from '../src/runtime/cpu.js';
import { onnxRuntimeVersion } from '../src/runtime/session.js';

/** A measured quantity: every run's value, with median and spread. */
export interface Measurement {
  readonly name: string;
  readonly unit: string;
  readonly runs: readonly number[];
  readonly median: number;
  readonly min: number;
  readonly max: number;
  /** A derived figure (throughput and the like), computed from the median. */
  readonly note?: string;
}

/**
 * Where a suite puts its measurements. The bench prints and saves each one as it is taken, so a
 * long run that is stopped part way keeps what it measured; a plain array serves in tests.
 */
export type Recorder = Pick<Measurement[], 'push'>;

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Runs `body` `runs` times after `warmup` unmeasured runs; returns seconds per run. */
export async function timeRuns(runs: number, body: () => unknown, warmup = 1): Promise<number[]> {
  for (let i = 0; i < warmup; i++) await body();
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const start = process.hrtime.bigint();
    await body();
    out.push(Number(process.hrtime.bigint() - start) / 1e9);
  }
  return out;
}

export function measurement(
  name: string,
  unit: string,
  runs: readonly number[],
  note?: (median: number) => string,
): Measurement {
  const m = median(runs);
  return {
    name,
    unit,
    runs,
    median: m,
    min: Math.min(...runs),
    max: Math.max(...runs),
    ...(note ? { note: note(m) } : {}),
  };
}

export function machine() {
  const processor = processorIdentity();
  return {
    cpu: processor.name,
    cpuId: processor.id,
    cpuFeatures: processor.features,
    cores: cpus().length,
    computeThreads: defaultComputeThreads(),
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    onnxruntime: onnxRuntimeVersion,
    platform: `${process.platform}-${process.arch}`,
  };
}

/** `digits` significant digits, never in exponent form (1032 s, not 1.03e+3 s). */
function significant(value: number, digits: number): string {
  return String(Number(value.toPrecision(digits)));
}

/** One measurement on one line, as it is taken (the table at the end aligns them). */
export function formatLine(r: Measurement): string {
  const spread =
    r.runs.length > 1
      ? ` (${significant(r.min, 3)}–${significant(r.max, 3)}, ${r.runs.length} runs)`
      : '';
  return `${r.name}: ${significant(r.median, 4)} ${r.unit}${spread}${r.note !== undefined ? `; ${r.note}` : ''}`;
}

export function formatTable(results: readonly Measurement[]): string {
  const rows = results.map((r) => [
    r.name,
    `${significant(r.median, 4)} ${r.unit}`,
    `${significant(r.min, 3)}–${significant(r.max, 3)}`,
    String(r.runs.length),
    r.note ?? '',
  ]);
  const header = ['measurement', 'median', 'range', 'runs', ''];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [header, ...rows]
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
