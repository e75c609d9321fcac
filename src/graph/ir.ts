import type { DType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * gesso's graph IR: a straight-line list of ONNX ops over SSA values with dtypes and shapes.
 * Dims are numbers or symbolic names (`'batch'`). Ops are built by the helpers in `ops.ts`, which
 * infer output shapes; the IR is written to ONNX by `onnx.ts` and differentiated by `autodiff.ts`.
 */

export type Dim = number | string;
export type Shape = readonly Dim[];

export type Attr =
  | { readonly kind: 'int'; readonly value: number }
  | { readonly kind: 'float'; readonly value: number }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'ints'; readonly value: readonly number[] }
  | { readonly kind: 'floats'; readonly value: readonly number[] }
  | { readonly kind: 'strings'; readonly value: readonly string[] }
  | { readonly kind: 'tensor'; readonly value: Tensor };

export const attr = {
  int: (value: number): Attr => ({ kind: 'int', value }),
  float: (value: number): Attr => ({ kind: 'float', value }),
  string: (value: string): Attr => ({ kind: 'string', value }),
  ints: (value: readonly number[]): Attr => ({ kind: 'ints', value }),
  floats: (value: readonly number[]): Attr => ({ kind: 'floats', value }),
  strings: (value: readonly string[]): Attr => ({ kind: 'strings', value }),
  tensor: (value: Tensor): Attr => ({ kind: 'tensor', value }),
};

export type Attrs = Readonly<Record<string, Attr>>;

export class Value {
  readonly graph: Graph;
  readonly id: number;
  readonly dtype: DType;
  readonly shape: Shape;
  /** The node computing this value; undefined for graph inputs and initializers. */
  readonly producer: Node | undefined;
  name: string;

  constructor(graph: Graph, id: number, name: string, dtype: DType, shape: Shape, producer?: Node) {
    this.graph = graph;
    this.id = id;
    this.name = name;
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.producer = producer;
  }

  get rank(): number {
    return this.shape.length;
  }

  /** The dims, when every one is a number. */
  staticShape(): number[] | undefined {
    return this.shape.every((d): d is number => typeof d === 'number')
      ? [...this.shape]
      : undefined;
  }

  toString(): string {
    return `${this.name}: ${this.dtype}[${this.shape.join(', ')}]`;
  }
}

export interface Node {
  readonly op: string;
  readonly domain: string;
  readonly name: string;
  /** null marks an omitted optional input. */
  readonly inputs: readonly (Value | null)[];
  readonly outputs: readonly Value[];
  readonly attrs: Attrs;
}

/** Initializer bytes that stay in another file (a .safetensors data section) and are not copied. */
export interface ExternalData {
  /** Absolute path of the file. */
  readonly path: string;
  readonly offset: number;
  readonly length: number;
}

export interface OutputType {
  readonly dtype: DType;
  readonly shape: Shape;
}

export class Graph {
  readonly name: string;
  readonly nodes: Node[] = [];
  readonly inputs: Value[] = [];
  readonly outputs: Value[] = [];
  readonly initializers = new Map<Value, Tensor | ExternalData>();
  /** Opset versions of non-default domains the graph uses. */
  readonly domains = new Map<string, number>();
  private readonly names = new Set<string>();
  private scopePath = '';
  /** Next suffix per base name, so unique names cost O(1). */
  private readonly suffixes = new Map<string, number>();
  private readonly scalars = new Map<string, Value>();
  private nextId = 0;

  constructor(name = 'gesso') {
    this.name = name;
  }

  /**
   * Names the nodes created inside `build` after `path` (a module path such as
   * `down_blocks.0.resnets.1`), so profiles and error messages point at model code.
   */
  scope<T>(path: string, build: () => T): T {
    const outer = this.scopePath;
    this.scopePath = path;
    try {
      return build();
    } finally {
      this.scopePath = outer;
    }
  }

  /** A name not yet used in this graph, under the current scope. */
  uniqueName(base: string): string {
    const scoped = this.scopePath !== '' ? `${this.scopePath}/${base}` : base;
    let name = scoped;
    let i = this.suffixes.get(scoped) ?? 1;
    while (this.names.has(name)) name = `${scoped}_${i++}`;
    this.suffixes.set(scoped, i);
    this.names.add(name);
    return name;
  }

  private claimName(name: string): string {
    if (this.names.has(name))
      throw new Error(`graph '${this.name}' already has a value named '${name}'`);
    this.names.add(name);
    return name;
  }

  input(name: string, dtype: DType, shape: Shape): Value {
    const value = new Value(this, this.nextId++, this.claimName(name), dtype, shape);
    this.inputs.push(value);
    return value;
  }

  /** Marks `value` as a graph output named `name` (default: its own name). */
  output(value: Value, name?: string): Value {
    this.checkOwn(value);
    const isSource = value.producer === undefined;
    const alreadyOutput = this.outputs.includes(value);
    if (name === undefined || name === value.name) {
      if (isSource || alreadyOutput)
        throw new Error(`'${value.name}' cannot be an output as it is`);
      this.outputs.push(value);
      return value;
    }
    if (!isSource && !alreadyOutput && !this.names.has(name)) {
      this.names.delete(value.name);
      value.name = this.claimName(name);
      this.outputs.push(value);
      return value;
    }
    const [copy] = this.addNode(
      'Identity',
      [value],
      {},
      [{ dtype: value.dtype, shape: value.shape }],
      '',
      name,
    );
    this.outputs.push(copy!);
    return copy!;
  }

  /** A named weight whose bytes are a host tensor (inline) or a range of another file. */
  initializer(name: string, dtype: DType, shape: Shape, data: Tensor | ExternalData): Value {
    return this.addInitializer(this.claimName(name), dtype, shape, data);
  }

  private addInitializer(
    name: string,
    dtype: DType,
    shape: Shape,
    data: Tensor | ExternalData,
  ): Value {
    if (
      data instanceof Tensor &&
      (data.dtype !== dtype || data.size !== shape.reduce<number>((n, d) => n * Number(d), 1))
    ) {
      throw new Error(`initializer '${name}' data does not match ${dtype}[${shape.join(', ')}]`);
    }
    const value = new Value(this, this.nextId++, name, dtype, shape);
    this.initializers.set(value, data);
    return value;
  }

  /** A small constant embedded in the graph. */
  constant(tensor: Tensor, name?: string): Value {
    const unique = name === undefined ? this.uniqueName('const') : this.claimName(name);
    return this.addInitializer(unique, tensor.dtype, tensor.shape, tensor);
  }

  /** A rank-0 constant, shared by every use of the same dtype and value. */
  scalar(value: number, dtype: DType = 'float32'): Value {
    const key = `${dtype}:${Object.is(value, -0) ? '-0' : String(value)}`;
    let v = this.scalars.get(key);
    if (v === undefined) {
      const t = new Tensor('float64', [], Float64Array.of(value)).to(dtype);
      v = this.addInitializer(this.uniqueName(`scalar_${dtype}`), dtype, [], t);
      this.scalars.set(key, v);
    }
    return v;
  }

  /** Appends a node; returns its outputs, whose types the caller inferred. */
  addNode(
    op: string,
    inputs: readonly (Value | null)[],
    attrs: Attrs,
    outputTypes: readonly OutputType[],
    domain = '',
    outputName?: string,
  ): Value[] {
    for (const input of inputs) if (input !== null) this.checkOwn(input);
    const outputs: Value[] = [];
    const node: Node = {
      op,
      domain,
      name: this.uniqueName(op),
      inputs: [...inputs],
      outputs,
      attrs,
    };
    outputTypes.forEach((t, i) => {
      const name =
        outputName !== undefined && i === 0
          ? this.claimName(outputName)
          : this.uniqueName(`${op}_out${i}`);
      outputs.push(new Value(this, this.nextId++, name, t.dtype, t.shape, node));
    });
    this.nodes.push(node);
    return outputs;
  }

  useDomain(domain: string, version: number): void {
    this.domains.set(domain, version);
  }

  private checkOwn(value: Value): void {
    if (value.graph !== this) throw new Error(`value '${value.name}' belongs to another graph`);
  }
}
