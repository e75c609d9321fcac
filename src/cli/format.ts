/** Plain-text tables and sizes for terminal output. */

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

export function formatCount(n: number): string {
  return n.toLocaleString('en-US');
}

/** Left-aligned columns separated by two spaces; `right` lists columns to right-align. */
export function table(
  header: readonly string[],
  rows: readonly (readonly string[])[],
  right: readonly number[] = [],
): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (right.includes(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

/** A duration as 1h05m or 3m07s. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = Math.floor(seconds % 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s).padStart(2, '0')}s`;
}

/**
 * A progress line on stderr, redrawn in place on a terminal and silent otherwise (logs and pipes
 * get the final result lines only).
 */
export class ProgressLine {
  private readonly tty = process.stderr.isTTY === true;
  private shown = false;

  update(text: string): void {
    if (!this.tty) return;
    process.stderr.write(`\r${text}\u001b[K`);
    this.shown = true;
  }

  /** Clears the line so ordinary output can follow. */
  clear(): void {
    if (this.shown) process.stderr.write('\r\u001b[K');
    this.shown = false;
  }
}

/** `label  [#####.....] 12/20  3.4 it/s  0m02s left` */
export function progressBar(label: string, done: number, total: number, seconds: number): string {
  const width = 20;
  const filled = Math.round((done / total) * width);
  const rate = seconds > 0 ? done / seconds : 0;
  const left = rate > 0 ? (total - done) / rate : Number.NaN;
  return `${label}  [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${total}  ${rate.toFixed(2)} it/s  ${formatDuration(left)} left`;
}
