import { stat } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { SafetensorsFile } from '../io/safetensors.js';
import { describeModelFolder, type ModelFolderSummary } from '../loaders/describe.js';
import { shapeSize } from '../tensor/tensor.js';
import { formatBytes, formatCount, table } from './format.js';

export const INSPECT_USAGE = `usage: gesso inspect PATH [--json]

Lists a .safetensors file's tensors (name, dtype, shape, bytes) and metadata,
or a model folder's components and weight files.`;

interface FileReport {
  path: string;
  bytes: number;
  metadata: Record<string, string>;
  tensors: { name: string; dtype: string; shape: number[]; bytes: number }[];
}

async function inspectFile(path: string): Promise<FileReport> {
  return SafetensorsFile.with(path, async (file) => ({
    path,
    bytes: file.size,
    metadata: { ...file.metadata },
    tensors: [...file.tensors.values()]
      .sort((a, b) => (a.name < b.name ? -1 : 1))
      .map((t) => ({ name: t.name, dtype: t.dtype, shape: [...t.shape], bytes: t.byteLength })),
  }));
}

function printFile(report: FileReport): string {
  const parameters = report.tensors.reduce((n, t) => n + shapeSize(t.shape), 0);
  const dtypes = [...new Set(report.tensors.map((t) => t.dtype))].join(', ');
  const lines = [
    `${report.path}: ${report.tensors.length} tensors, ${formatCount(parameters)} parameters, ${formatBytes(report.bytes)}${dtypes ? ` (${dtypes})` : ''}`,
  ];
  const meta = Object.entries(report.metadata);
  if (meta.length > 0) {
    lines.push('metadata:');
    for (const [k, v] of meta)
      lines.push(`  ${k}: ${v.length > 200 ? `${v.slice(0, 197)}...` : v}`);
  }
  if (report.tensors.length > 0) {
    lines.push(
      table(
        ['name', 'dtype', 'shape', 'bytes'],
        report.tensors.map((t) => [
          t.name,
          t.dtype,
          `[${t.shape.join(', ')}]`,
          formatCount(t.bytes),
        ]),
        [3],
      ),
    );
  }
  return lines.join('\n');
}

function printFolder(summary: ModelFolderSummary): string {
  const title = summary.pipelineClass
    ? `${summary.path}: ${summary.pipelineClass}${summary.diffusersVersion ? ` (diffusers ${summary.diffusersVersion})` : ''}`
    : `${summary.path}: model component`;
  const rows: string[][] = [];
  for (const c of summary.components) {
    const files = c.weightFiles.length > 0 ? c.weightFiles : [undefined];
    files.forEach((f, i) => {
      rows.push([
        i === 0 ? c.name : '',
        i === 0 ? (c.className ?? '?') : '',
        f === undefined ? c.configFiles.join(', ') : f.file,
        f === undefined ? '' : f.format + (f.dtypes ? ` ${Object.keys(f.dtypes).join('/')}` : ''),
        f?.parameters === undefined ? '' : formatCount(f.parameters),
        f === undefined ? '' : formatBytes(f.bytes),
      ]);
    });
  }
  return `${title}\n${table(['component', 'class', 'file', 'format', 'parameters', 'size'], rows, [4, 5])}`;
}

export async function inspectCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    options: {
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    allowPositionals: true,
  });
  if (values.help) {
    process.stdout.write(`${INSPECT_USAGE}\n`);
    return 0;
  }
  if (positionals.length !== 1)
    throw new UserError('usage', `gesso inspect takes one PATH\n${INSPECT_USAGE}`);
  const path = positionals[0]!;
  const info = await stat(path).catch(() => undefined);
  if (info === undefined) throw new UserError('file-not-found', `${path} does not exist`);
  if (info.isDirectory()) {
    const summary = await describeModelFolder(path);
    process.stdout.write(
      `${values.json ? JSON.stringify(summary, null, 2) : printFolder(summary)}\n`,
    );
  } else {
    const report = await inspectFile(path);
    process.stdout.write(`${values.json ? JSON.stringify(report, null, 2) : printFile(report)}\n`);
  }
  return 0;
}
