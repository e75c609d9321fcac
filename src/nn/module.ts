import type { Graph, Value } from '../graph/ir.js';
import { shapeSize } from '../tensor/tensor.js';
import type { Int8Source } from './quantize.js';

/**
 * Where a module's parameters come from while its graph is built: initializers pointing into a
 * weight file for inference, graph inputs for training. Keys are full state-dict paths.
 */
export interface ParameterSource {
  readonly graph: Graph;
  /** The compute dtype the source delivers every parameter in (casting if the file differs). */
  parameter(key: string, shape: readonly number[]): Value;
  /** int8 weights for quantized graphs (nn/quantize.ts); absent: float only. */
  readonly int8?: Int8Source;
}

/** How a parameter starts before training (PyTorch's defaults for each layer kind). */
export type Init =
  | { readonly kind: 'uniform'; readonly bound: number }
  | { readonly kind: 'normal'; readonly std: number }
  | { readonly kind: 'constant'; readonly value: number };

/** A source of random numbers for initialization (TorchGenerator fits). */
export interface InitRandom {
  rand(shape: readonly number[]): { data: Float32Array };
  randn(shape: readonly number[]): { data: Float32Array };
}

/**
 * A node of a model tree, mirroring a PyTorch `nn.Module`: parameters and children registered by
 * name, so every parameter's full path is exactly its state-dict key in diffusers/transformers
 * checkpoints. Subclasses add a `forward(params, ...inputs)` that emits graph ops.
 */
export abstract class Module {
  private parentModule: Module | undefined;
  private nameInParent = '';
  private readonly parameterShapes = new Map<string, readonly number[]>();
  private readonly parameterInits = new Map<string, Init>();
  private readonly childModules = new Map<string, Module>();

  /** The dotted path from the root (empty for the root). */
  get path(): string {
    if (this.parentModule === undefined) return '';
    const parent = this.parentModule.path;
    return parent === '' ? this.nameInParent : `${parent}.${this.nameInParent}`;
  }

  protected addParameter(
    name: string,
    shape: readonly number[],
    init: Init = { kind: 'constant', value: 0 },
  ): void {
    if (this.parameterShapes.has(name) || this.childModules.has(name)) {
      throw new Error(`${this.constructor.name} already has a member named '${name}'`);
    }
    this.parameterShapes.set(name, Object.freeze([...shape]));
    this.parameterInits.set(name, init);
  }

  protected addModule<M extends Module>(name: string, module: M): M {
    if (this.parameterShapes.has(name) || this.childModules.has(name)) {
      throw new Error(`${this.constructor.name} already has a member named '${name}'`);
    }
    if (module.parentModule !== undefined)
      throw new Error(`module '${module.path}' already has a parent`);
    module.parentModule = this;
    module.nameInParent = name;
    this.childModules.set(name, module);
    return module;
  }

  /** Registers children under indices `0`, `1`, ... as `nn.ModuleList` does. */
  protected addModuleList<M extends Module>(name: string, modules: readonly M[]): M[] {
    const list = this.addModule(name, new ModuleList());
    modules.forEach((m, i) => list.append(String(i), m));
    return [...modules];
  }

  hasParameter(name: string): boolean {
    return this.parameterShapes.has(name);
  }

  /** Every parameter below this module: full key -> shape. */
  namedParameters(): Map<string, readonly number[]> {
    const out = new Map<string, readonly number[]>();
    this.collect(this.path, out);
    return out;
  }

  private collect(prefix: string, out: Map<string, readonly number[]>): void {
    for (const [name, shape] of this.parameterShapes)
      out.set(prefix === '' ? name : `${prefix}.${name}`, shape);
    for (const [name, child] of this.childModules)
      child.collect(prefix === '' ? name : `${prefix}.${name}`, out);
  }

  /** Freshly initialized parameters for training from scratch: full key → values. */
  initialParameters(random: InitRandom): Map<string, Float32Array> {
    const out = new Map<string, Float32Array>();
    this.initialize(this.path, random, out);
    return out;
  }

  private initialize(prefix: string, random: InitRandom, out: Map<string, Float32Array>): void {
    for (const [name, shape] of this.parameterShapes) {
      const init = this.parameterInits.get(name)!;
      let values: Float32Array;
      if (init.kind === 'constant') values = new Float32Array(shapeSize(shape)).fill(init.value);
      else if (init.kind === 'uniform')
        values = random.rand(shape).data.map((u) => (2 * u - 1) * init.bound);
      else values = random.randn(shape).data.map((z) => z * init.std);
      out.set(prefix === '' ? name : `${prefix}.${name}`, values);
    }
    for (const [name, child] of this.childModules)
      child.initialize(prefix === '' ? name : `${prefix}.${name}`, random, out);
  }

  parameterCount(): number {
    let n = 0;
    for (const shape of this.namedParameters().values()) n += shapeSize(shape);
    return n;
  }

  /** This module's parameter `name` as a graph value. */
  protected param(params: ParameterSource, name: string): Value {
    const shape = this.parameterShapes.get(name);
    if (shape === undefined) throw new Error(`${this.constructor.name} has no parameter '${name}'`);
    const path = this.path;
    return params.parameter(path === '' ? name : `${path}.${name}`, shape);
  }

  /** Builds `emit` with graph nodes named after this module's path. */
  protected scoped<T>(params: ParameterSource, emit: () => T): T {
    return params.graph.scope(this.path, emit);
  }
}

/** A container whose children are named by position, like `nn.ModuleList`. */
export class ModuleList extends Module {
  append(name: string, module: Module): void {
    this.addModule(name, module);
  }
}
