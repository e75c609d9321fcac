import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { UserError } from '../errors.js';
import { onnxSchema } from '../graph/onnx.js';
import { Session, type RuntimeOptions } from '../runtime/session.js';

/**
 * A component that is already an ONNX model (`model.onnx`, as in diffusers' ONNX layout):
 * opened as it is, with the names and shapes of its inputs and outputs read from the file.
 */

export interface OnnxValueInfo {
  readonly name: string;
  /** Static sizes as numbers, symbolic ones as their names. */
  readonly shape: readonly (number | string)[];
}

export interface OnnxFile {
  readonly session: Session;
  readonly inputs: readonly OnnxValueInfo[];
  readonly outputs: readonly OnnxValueInfo[];
}

interface ValueInfoProto {
  name: string;
  type?: {
    tensor_type?: {
      shape?: { dim?: { dim_value?: number | { toNumber(): number }; dim_param?: string }[] };
    };
  };
}

function describe(values: readonly ValueInfoProto[]): OnnxValueInfo[] {
  return values.map((v) => ({
    name: v.name,
    shape: (v.type?.tensor_type?.shape?.dim ?? []).map((d) =>
      d.dim_param !== undefined && d.dim_param !== ''
        ? d.dim_param
        : typeof d.dim_value === 'object'
          ? d.dim_value.toNumber()
          : (d.dim_value ?? 0),
    ),
  }));
}

export function hasOnnxModel(dir: string): boolean {
  return existsSync(join(dir, 'model.onnx'));
}

export async function openOnnxFile(dir: string, runtime: RuntimeOptions = {}): Promise<OnnxFile> {
  const path = join(dir, 'model.onnx');
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (error) {
    throw new UserError('missing-file', `cannot read ${path}: ${(error as Error).message}`);
  }
  let graph: { input: ValueInfoProto[]; output: ValueInfoProto[]; initializer: { name: string }[] };
  try {
    const model = onnxSchema().lookupType('onnx.ModelProto').decode(bytes) as unknown as {
      graph: typeof graph;
    };
    graph = model.graph;
  } catch (error) {
    throw new UserError('bad-model', `${path} is not an ONNX model: ${(error as Error).message}`);
  }
  const initializers = new Set(graph.initializer.map((i) => i.name));
  const session = await Session.create(
    { key: undefined, emit: () => ({ bytes, externalDataFolder: dir }) },
    runtime,
  );
  return {
    session,
    // Older exports list initializers among the inputs too.
    inputs: describe(graph.input.filter((i) => !initializers.has(i.name))),
    outputs: describe(graph.output),
  };
}
