import { realpathSync } from 'node:fs';
import { dirname, relative, resolve, sep } from 'node:path';
import protobuf from 'protobufjs';
import { Tensor } from '../tensor/tensor.js';
import type { Attr, Dim, ExternalData, Graph, Value } from './ir.js';
import { ONNX_PROTO } from './onnx-schema.js';
import { isUnknownDim, onnxDataType } from './ops.js';

/** The default-domain opset gesso emits. */
export const OPSET = 21;
/** The ONNX IR version that goes with OPSET. */
export const IR_VERSION = 10;

let schema: protobuf.Root | undefined;

export function onnxSchema(): protobuf.Root {
  schema ??= protobuf.parse(ONNX_PROTO, { keepCase: true }).root;
  return schema;
}

export interface EmittedModel {
  /** The serialized ModelProto. */
  readonly bytes: Uint8Array;
  /**
   * The folder that external-data locations are relative to (the deepest folder holding every
   * weight file the graph points into), or undefined when every weight is inline.
   */
  readonly externalDataFolder: string | undefined;
}

export interface EmitOptions {
  readonly producerVersion?: string;
  readonly docString?: string;
  readonly metadata?: Readonly<Record<string, string>>;
}

const ATTRIBUTE_TYPE = {
  float: 1,
  int: 2,
  string: 3,
  tensor: 4,
  floats: 6,
  ints: 7,
  strings: 8,
} as const;

function attributeProto(name: string, a: Attr): Record<string, unknown> {
  const base = { name, type: ATTRIBUTE_TYPE[a.kind] };
  switch (a.kind) {
    case 'float':
      return { ...base, f: a.value };
    case 'int':
      return { ...base, i: a.value };
    case 'string':
      return { ...base, s: Buffer.from(a.value, 'utf8') };
    case 'floats':
      return { ...base, floats: a.value };
    case 'ints':
      return { ...base, ints: a.value };
    case 'strings':
      return { ...base, strings: a.value.map((s) => Buffer.from(s, 'utf8')) };
    case 'tensor':
      return { ...base, t: inlineTensorProto('', a.value) };
  }
}

function inlineTensorProto(name: string, t: Tensor): Record<string, unknown> {
  return { name, dims: t.shape, data_type: onnxDataType(t.dtype), raw_data: t.bytes() };
}

function dimProto(d: Dim): Record<string, unknown> {
  if (typeof d === 'number') return { dim_value: d };
  return isUnknownDim(d) ? {} : { dim_param: d };
}

function valueInfo(v: Value): Record<string, unknown> {
  return {
    name: v.name,
    type: {
      tensor_type: { elem_type: onnxDataType(v.dtype), shape: { dim: v.shape.map(dimProto) } },
    },
  };
}

/** The deepest folder that contains every path. */
function commonFolder(paths: readonly string[]): string {
  let folder = dirname(resolve(paths[0]!));
  for (const p of paths) {
    const abs = resolve(p);
    while (!abs.startsWith(folder.endsWith(sep) ? folder : folder + sep)) {
      const parent = dirname(folder);
      if (parent === folder) break;
      folder = parent;
    }
  }
  return folder;
}

/**
 * Serializes the graph as an ONNX ModelProto. Initializers backed by files become external data
 * (location, offset, length) relative to `externalDataFolder`, so no weight bytes are copied.
 */
export function emitOnnx(graph: Graph, options: EmitOptions = {}): EmittedModel {
  const external: [Value, ExternalData][] = [];
  const initializers: Record<string, unknown>[] = [];
  for (const [value, data] of graph.initializers) {
    if (data instanceof Tensor) initializers.push(inlineTensorProto(value.name, data));
    else external.push([value, data]);
  }
  // ONNX Runtime resolves symlinks and refuses data outside the model's folder, so locations are
  // taken from the real files (the Hugging Face cache links snapshot files to blobs elsewhere).
  const real = new Map<string, string>();
  const realPath = (path: string) => {
    let r = real.get(path);
    if (r === undefined) {
      try {
        r = realpathSync(path);
      } catch {
        r = resolve(path); // not on disk (yet): ONNX Runtime will say so when it reads
      }
      real.set(path, r);
    }
    return r;
  };
  const externalDataFolder =
    external.length > 0 ? commonFolder(external.map(([, d]) => realPath(d.path))) : undefined;
  for (const [value, data] of external) {
    const location = relative(externalDataFolder!, realPath(data.path)).split(sep).join('/');
    initializers.push({
      name: value.name,
      dims: value.shape,
      data_type: onnxDataType(value.dtype),
      data_location: 1,
      external_data: [
        { key: 'location', value: location },
        { key: 'offset', value: String(data.offset) },
        { key: 'length', value: String(data.length) },
      ],
    });
  }

  const nodes = graph.nodes.map((n) => ({
    name: n.name,
    op_type: n.op,
    domain: n.domain,
    input: n.inputs.map((v) => (v === null ? '' : v.name)),
    output: n.outputs.map((v) => v.name),
    attribute: Object.entries(n.attrs).map(([k, a]) => attributeProto(k, a)),
  }));

  const opsetImport = [{ domain: '', version: OPSET }];
  for (const [domain, version] of graph.domains) opsetImport.push({ domain, version });

  const ModelProto = onnxSchema().lookupType('onnx.ModelProto');
  const model = ModelProto.fromObject({
    ir_version: IR_VERSION,
    opset_import: opsetImport,
    producer_name: 'gesso',
    producer_version: options.producerVersion ?? '',
    doc_string: options.docString ?? '',
    graph: {
      name: graph.name,
      node: nodes,
      initializer: initializers,
      input: graph.inputs.map(valueInfo),
      output: graph.outputs.map(valueInfo),
    },
    metadata_props: Object.entries(options.metadata ?? {}).map(([key, value]) => ({ key, value })),
  });
  return { bytes: ModelProto.encode(model).finish(), externalDataFolder };
}
