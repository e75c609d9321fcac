import { createHash } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { UserError } from '../errors.js';
import { Graph, type Value } from '../graph/ir.js';
import { emitOnnx } from '../graph/onnx.js';
import { loadComponent, readConfig, type ComponentSource } from '../loaders/component.js';
import { mergeLoras, type LoraComponent, type LoraFile } from '../loaders/lora.js';
import { hasOnnxModel, openOnnxFile, type OnnxFile } from '../loaders/onnx-file.js';
import { AutoencoderKL, autoencoderKLConfig } from '../models/autoencoder-kl.js';
import { AutoencoderTiny, autoencoderTinyConfig } from '../models/autoencoder-tiny.js';
import { ClipTextModel, clipTextConfig } from '../models/clip-text.js';
import { PatchAutoencoder, patchAutoencoderConfig } from '../models/patch-autoencoder.js';
import { UNet2DConditionModel, unetConfig, type UNetConfig } from '../models/unet-2d-condition.js';
import * as op from '../graph/ops.js';
import type { Module, ParameterSource } from '../nn/module.js';
import { WeightSet, type BoundWeights, type Int8Plan } from '../nn/weights.js';
import { cacheEntry, Session, type RuntimeOptions } from '../runtime/session.js';
import { availableMemoryBytes, int8WeightLimit } from '../runtime/cpu.js';
import { map } from '../tensor/ops.js';
import { TorchGenerator } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * The model components of a pipeline: a module tree bound to its weight files, compiled on first
 * use into ONNX Runtime sessions (one per graph variant), cached on disk by the runtime.
 */

/** Bump when graphs built from the same model change shape, so old cache entries are not reused. */
const GRAPH_VERSION = 'sd-1';

export interface ComponentOptions extends RuntimeOptions {
  /** Weight-file variant (`fp16` for `diffusion_pytorch_model.fp16.safetensors`). */
  readonly variant?: string;
  /** Use ONNX Runtime's fused attention (default true). */
  readonly fusedAttention?: boolean;
  /** LoRAs to merge into the UNet and text-encoder weights (read once by the pipeline). */
  readonly mergedLoras?: readonly LoraFile[];
  /**
   * Run the UNet's linear layers and convolutions in int8 (nn/quantize.ts), calibrated on the
   * first call. Faster on CPUs with VNNI or AMX; the images differ slightly (see BENCHMARKS.md).
   */
  readonly quantize?: 'int8';
  /**
   * Read half-precision weight files through a float32 copy in the cache folder (WeightSet.widened).
   * Default: for models too big for the optimized-graph cache, whose float32 copy would otherwise
   * be made in memory beside the fp16 weights at every load.
   */
  readonly widenHalfWeights?: boolean;
}

type Build = (graph: Graph, params: ParameterSource) => void;

/** The share of the memory past which a model is too big to hold a second copy of at load. */
const LARGE_MODEL_SHARE = 0.25;

/**
 * Whether a model's sessions also cache ONNX Runtime's optimized graph (a float32 copy of the
 * weights on disk, written once). For a big model, ORT optimizing the graph again takes tens of
 * seconds on every load (SD 1.5's UNet: 38 s, against 5 s from the cache; BENCHMARKS.md). But
 * writing the cache holds further copies of the weights for a while (SDXL's UNet, 10 GB: a 19.4
 * GiB peak against 12.0), so only models up to a quarter of the memory get it. Calibration graphs
 * (used once) and models with LoRAs merged (a new copy for every LoRA and scale) do not either.
 */
export function cachesOptimizedGraph(
  weightBytes: number,
  memoryBytes: number = availableMemoryBytes(),
): boolean {
  return weightBytes >= 256 * 2 ** 20 && weightBytes <= LARGE_MODEL_SHARE * memoryBytes;
}

/** Whether half-precision weights are widened into a cached float32 file (see ComponentOptions). */
export function widensHalfWeights(
  weightBytes: number,
  memoryBytes: number = availableMemoryBytes(),
): boolean {
  return weightBytes > LARGE_MODEL_SHARE * memoryBytes;
}

/** A module bound to weights, with a session per graph variant. */
class Compiled<M extends Module> {
  readonly module: M;
  private readonly weights: BoundWeights;
  private readonly identity: string;
  readonly options: ComponentOptions;
  private readonly sessions = new Map<string, Promise<Session>>();

  constructor(module: M, weights: BoundWeights, identity: string, options: ComponentOptions) {
    this.module = module;
    this.weights = weights;
    this.identity = identity;
    this.options = options;
  }

  /** Bytes its weights take in memory while a session is loaded. */
  get weightBytes(): number {
    return this.weights.weights.computeBytes;
  }

  /** The session for graph `variant`, built by `build` the first time. */
  session(variant: string, build: Build, int8?: Int8Plan): Promise<Session> {
    let session = this.sessions.get(variant);
    if (session === undefined) {
      const key = JSON.stringify({
        graph: GRAPH_VERSION,
        identity: this.identity,
        weights: this.weights.weights.fingerprint,
        variant,
        fused: this.options.fusedAttention ?? true,
      });
      session = Session.create(
        {
          key,
          emit: () => {
            const graph = new Graph(variant);
            build(graph, this.weights.parameters(graph, 'float32', int8));
            return emitOnnx(graph, { docString: `gesso ${variant}` });
          },
        },
        {
          ...this.options,
          cacheOptimized:
            this.options.cacheOptimized ??
            (cachesOptimizedGraph(this.weightBytes) &&
              int8?.observe === undefined &&
              (this.options.mergedLoras ?? []).length === 0),
        },
      );
      session.catch(() => this.sessions.delete(variant));
      this.sessions.set(variant, session);
    }
    return session;
  }

  async releaseVariant(variant: string): Promise<void> {
    const session = this.sessions.get(variant);
    this.sessions.delete(variant);
    await (await session?.catch(() => undefined))?.release();
  }

  async release(): Promise<void> {
    const sessions = [...this.sessions.values()];
    this.sessions.clear();
    for (const s of sessions) await (await s.catch(() => undefined))?.release();
  }
}

async function bindComponent<M extends Module>(
  source: string | ComponentSource,
  base: string,
  make: (config: Record<string, unknown>) => M,
  options: ComponentOptions,
  ignore?: (key: string) => boolean,
): Promise<Compiled<M>> {
  const {
    role,
    name,
    config,
    weights: stored,
  } = typeof source === 'string' ? await loadComponent(source, base, options.variant) : source;
  const module = make(config);
  const bindOptions = ignore === undefined ? {} : { ignoreUnexpected: ignore };
  // Checked before anything is copied: a wrong folder is an error now, not after a 10 GB write.
  stored.bind(module, bindOptions);
  let weights = stored;
  if (
    options.cacheDir !== false &&
    (options.widenHalfWeights ?? widensHalfWeights(stored.computeBytes))
  ) {
    weights = await stored.widened(
      cacheEntry(options.cacheDir, 'weights', stored.fingerprint, '.safetensors'),
    );
  }
  if (options.mergedLoras !== undefined && /^(unet|text_encoder(_2)?)$/.test(role))
    weights = await mergeLoras(weights, role as LoraComponent, options.mergedLoras);
  const bound = weights.bind(module, bindOptions);
  return new Compiled(module, bound, JSON.stringify({ dir: name, config }), options);
}

export interface TextEncoding {
  /** Per-token states for cross-attention: [B, 77, hidden]. */
  readonly hidden: Tensor<'float32'>;
  /** The pooled state at the end-of-text token: [B, hidden]. */
  readonly pooled: Tensor<'float32'>;
}

/** A component folder that holds an ONNX model and no weights gesso builds a graph from. */
function isOnnxFolder(dir: string): boolean {
  return (
    hasOnnxModel(dir) &&
    !readdirSync(dir).some((f) => f.endsWith('.safetensors') || f.endsWith('.bin'))
  );
}

function needsGraph(what: string): never {
  throw new UserError(
    'unsupported-model',
    `${what} is not available for a component given as model.onnx; use the diffusers layout of this model`,
  );
}

export class TextEncoder {
  private readonly compiled: Compiled<ClipTextModel> | undefined;
  private readonly onnx: OnnxFile | undefined;

  private constructor(compiled: Compiled<ClipTextModel> | undefined, onnx?: OnnxFile) {
    this.compiled = compiled;
    this.onnx = onnx;
  }

  static async load(
    source: string | ComponentSource,
    options: ComponentOptions,
  ): Promise<TextEncoder> {
    if (typeof source === 'string' && isOnnxFolder(source))
      return new TextEncoder(undefined, await openOnnxFile(source, options));
    const compiled = await bindComponent(
      source,
      'model',
      (c) => new ClipTextModel(clipTextConfig(c)),
      options,
      ClipTextModel.isIgnorableKey,
    );
    return new TextEncoder(compiled);
  }

  get config() {
    return (this.compiled ?? needsGraph('the text encoder config')).module.config;
  }

  /**
   * Encodes token ids [B, 77]. `clipSkip` k > 0 takes the output k layers before the last,
   * through the final layer norm, as diffusers' `clip_skip` does.
   */
  async encode(ids: Tensor<'int64'>, clipSkip = 0): Promise<TextEncoding> {
    if (this.onnx !== undefined) {
      if (clipSkip > 0) needsGraph('clip skip');
      // diffusers' ONNX export takes int32 ids and returns the last layer and the pooled state.
      const ids32 = new Tensor(
        'int32',
        ids.shape,
        Int32Array.from(ids.data as BigInt64Array, Number),
      );
      const [hidden, pooled] = this.onnx.outputs.map((o) => o.name) as [string, string];
      const r = await this.onnx.session.run({ [this.onnx.inputs[0]!.name]: ids32 });
      return { hidden: r[hidden] as Tensor<'float32'>, pooled: r[pooled] as Tensor<'float32'> };
    }
    const model = this.compiled!.module;
    const length = ids.shape[1]!;
    const session = await this.compiled!.session(
      `text_encoder:len${length}:skip${clipSkip}`,
      (g, p) => {
        const out = model.forward(p, g.input('input_ids', 'int64', ['batch', length]));
        const states = out.hiddenStates;
        if (clipSkip >= states.length - 1) throw tooDeep(clipSkip, states.length - 1);
        const hidden =
          clipSkip > 0 ? out.finalNorm(states[states.length - 1 - clipSkip]!) : out.lastHiddenState;
        g.output(hidden, 'hidden');
        g.output(out.pooled, 'pooled');
      },
    );
    const r = await session.run({ input_ids: ids });
    return { hidden: r.hidden as Tensor<'float32'>, pooled: r.pooled as Tensor<'float32'> };
  }

  /**
   * SDXL's reading of a text encoder: the hidden states `clipSkip + 2` from the end (the
   * penultimate layer by default, without the final layer norm), and the projected pooled state
   * (`text_embeds`) where the encoder has a projection, else the pooled state.
   */
  async encodeSdxl(
    ids: Tensor<'int64'>,
    clipSkip = 0,
  ): Promise<{ hidden: Tensor<'float32'>; pooled: Tensor<'float32'> }> {
    const compiled = this.compiled ?? needsGraph("SDXL's penultimate hidden states");
    const model = compiled.module;
    const length = ids.shape[1]!;
    const session = await compiled.session(
      `text_encoder_sdxl:len${length}:skip${clipSkip}`,
      (g, p) => {
        const out = model.forward(p, g.input('input_ids', 'int64', ['batch', length]));
        const states = out.hiddenStates;
        const index = states.length - 2 - clipSkip;
        if (index < 0) throw tooDeep(clipSkip, states.length - 1);
        g.output(states[index]!, 'hidden');
        g.output(out.textEmbeds ?? out.pooled, 'pooled');
      },
    );
    const r = await session.run({ input_ids: ids });
    return { hidden: r.hidden as Tensor<'float32'>, pooled: r.pooled as Tensor<'float32'> };
  }

  /**
   * Bytes its weights take in memory while loaded (what unloading frees); 0 for an ONNX file,
   * whose session stays open.
   */
  get weightBytes(): number {
    return this.compiled?.weightBytes ?? 0;
  }

  /** Frees the ONNX Runtime sessions; the next use builds them again (ONNX files stay open). */
  async unload(): Promise<void> {
    await this.compiled?.release();
  }

  release(): Promise<void> {
    return this.compiled?.release() ?? this.onnx!.session.release();
  }
}

export interface UNetCall {
  readonly sample: Tensor<'float32'>;
  /** One per batch element. */
  readonly timestep: Tensor<'float32'>;
  readonly encoderHiddenStates: Tensor<'float32'>;
  readonly timestepCond?: Tensor<'float32'>;
  /** SDXL's added conditioning: the pooled text embedding [B, D] and six time ids [B, 6]. */
  readonly textEmbeds?: Tensor<'float32'>;
  readonly timeIds?: Tensor<'float32'>;
}

/** The UNet layers int8 leaves in float: its first and last convolutions and the embeddings. */
function keepFloat(layer: string): boolean {
  return /^(conv_in|conv_out|time_embedding|add_embedding)(\.|$)/.test(layer);
}

export class UNet {
  private readonly compiled: Compiled<UNet2DConditionModel> | undefined;
  private scales: Map<string, number> | undefined;
  private readonly onnx: { file: OnnxFile; config: UNetConfig } | undefined;

  private constructor(
    compiled: Compiled<UNet2DConditionModel> | undefined,
    onnx?: { file: OnnxFile; config: UNetConfig },
  ) {
    this.compiled = compiled;
    this.onnx = onnx;
  }

  static async load(source: string | ComponentSource, options: ComponentOptions): Promise<UNet> {
    if (typeof source === 'string' && isOnnxFolder(source)) {
      const file = await openOnnxFile(source, options);
      // No config.json in this layout: the channels and native size come from the input shape.
      const sample = file.inputs.find((i) => i.name === 'sample')?.shape ?? [];
      const channels = typeof sample[1] === 'number' ? sample[1] : 4;
      const side = typeof sample[2] === 'number' ? sample[2] : 64;
      return new UNet(undefined, {
        file,
        config: unetConfig({ in_channels: channels, out_channels: channels, sample_size: side }),
      });
    }
    const compiled = await bindComponent(
      source,
      'diffusion_pytorch_model',
      (c) =>
        new UNet2DConditionModel(unetConfig(c), { fusedAttention: options.fusedAttention ?? true }),
      options,
    );
    return new UNet(compiled);
  }

  get config(): UNetConfig {
    return this.onnx?.config ?? this.compiled!.module.config;
  }

  async predict(call: UNetCall): Promise<Tensor<'float32'>> {
    if (this.onnx !== undefined) {
      const r = await this.onnx.file.session.run({
        sample: call.sample,
        timestep: call.timestep,
        encoder_hidden_states: call.encoderHiddenStates,
      });
      return r[this.onnx.file.outputs[0]!.name] as Tensor<'float32'>;
    }
    const compiled = this.compiled!;
    const model = compiled.module;
    const c = model.config;
    const context = call.encoderHiddenStates.shape;
    const build = (g: Graph, p: ParameterSource) => {
      const inputs = {
        sample: g.input('sample', 'float32', ['batch', c.inChannels, 'height', 'width']),
        timestep: g.input('timestep', 'float32', ['batch']),
        encoderHiddenStates: g.input('encoder_hidden_states', 'float32', [
          'batch',
          context[1]!,
          context[2]!,
        ]),
        ...(c.timeCondProjDim !== null
          ? { timestepCond: g.input('timestep_cond', 'float32', ['batch', c.timeCondProjDim]) }
          : {}),
        ...(c.additionEmbedType === 'text_time'
          ? {
              textEmbeds: g.input('text_embeds', 'float32', [
                'batch',
                c.projectionClassEmbeddingsInputDim! - 6 * c.additionTimeEmbedDim!,
              ]),
              timeIds: g.input('time_ids', 'float32', ['batch', 6]),
            }
          : {}),
      };
      g.output(model.forward(p, inputs), 'out_sample');
    };
    const variant = `unet:ctx${context[1]}x${context[2]}`;
    let session: Session;
    if (compiled.options.quantize === 'int8') {
      this.scales ??= await this.calibrate(call, variant, build);
      const scales = this.scales;
      const tag = createHash('sha256')
        .update(JSON.stringify([...scales]))
        .digest('hex')
        .slice(0, 16);
      const weightLimit = int8WeightLimit();
      session = await compiled.session(`${variant}:int8:w${weightLimit}:${tag}`, build, {
        scales,
        keepFloat,
        weightLimit,
      });
    } else session = await compiled.session(variant, build);
    const feeds: Record<string, Tensor> = {
      sample: call.sample,
      timestep: call.timestep,
      encoder_hidden_states: call.encoderHiddenStates,
    };
    if (c.timeCondProjDim !== null) {
      if (call.timestepCond === undefined)
        throw new Error('this UNet needs timestep_cond (an LCM guidance embedding)');
      feeds.timestep_cond = call.timestepCond;
    }
    if (c.additionEmbedType === 'text_time') {
      if (call.textEmbeds === undefined || call.timeIds === undefined)
        throw new Error('this UNet needs text_embeds and time_ids (SDXL added conditioning)');
      feeds.text_embeds = call.textEmbeds;
      feeds.time_ids = call.timeIds;
    }
    return (await session.run(feeds)).out_sample as Tensor<'float32'>;
  }

  /**
   * Each convolution's output scale for int8: its largest |output| over calibration inputs (unit
   * normal latents at timesteps across the schedule, with this call's conditioning), with a 20%
   * margin, over 127.
   */
  private async calibrate(
    call: UNetCall,
    variant: string,
    build: (g: Graph, p: ParameterSource) => void,
  ): Promise<Map<string, number>> {
    const layers: string[] = [];
    const session = await this.compiled!.session(`${variant}:calibrate`, build, {
      scales: new Map(),
      keepFloat,
      weightLimit: 127, // unused: calibration quantizes nothing
      observe: (layer, y) => {
        layers.push(layer);
        y.graph.output(op.reduceMax(op.abs(y), [0, 1, 2, 3], false), `calibrate:${layer}`);
      },
    });
    const names = session.outputNames.filter((n) => n.startsWith('calibrate:'));
    const largest = new Map<string, number>();
    const random = new TorchGenerator(0);
    const batch = call.sample.shape[0]!;
    for (const t of [999, 800, 600, 400, 200, 50]) {
      const feeds: Record<string, Tensor> = {
        sample: random.randn(call.sample.shape),
        timestep: Tensor.float32([batch], new Array<number>(batch).fill(t)),
        encoder_hidden_states: call.encoderHiddenStates,
        ...(call.timestepCond !== undefined ? { timestep_cond: call.timestepCond } : {}),
        ...(call.textEmbeds !== undefined && call.timeIds !== undefined
          ? { text_embeds: call.textEmbeds, time_ids: call.timeIds }
          : {}),
      };
      const r = await session.run(feeds);
      for (const name of names) {
        const layer = name.slice('calibrate:'.length);
        largest.set(
          layer,
          Math.max(largest.get(layer) ?? 0, (r[name] as Tensor<'float32'>).data[0]!),
        );
      }
    }
    await this.compiled!.releaseVariant(`${variant}:calibrate`);
    return new Map([...largest].map(([layer, max]) => [layer, (Math.max(max, 1e-6) * 1.2) / 127]));
  }

  /**
   * Bytes its weights take in memory while loaded (what unloading frees); 0 for an ONNX file,
   * whose session stays open.
   */
  get weightBytes(): number {
    return this.compiled?.weightBytes ?? 0;
  }

  /** Frees the ONNX Runtime sessions; the next use builds them again (ONNX files stay open). */
  async unload(): Promise<void> {
    await this.compiled?.release();
  }

  release(): Promise<void> {
    return this.compiled?.release() ?? this.onnx!.file.session.release();
  }
}

type Codec = AutoencoderKL | AutoencoderTiny | PatchAutoencoder;

/**
 * Blends the first `extent` rows (or columns) of tile `b` with the last of tile `a`, in place,
 * linearly from all-a to all-b (diffusers' `blend_v` / `blend_h`).
 */
function blendTiles(
  a: Tensor<'float32'>,
  b: Tensor<'float32'>,
  extent: number,
  direction: 'vertical' | 'horizontal',
): void {
  const [n, c, ah, aw] = a.shape as [number, number, number, number];
  const [, , bh, bw] = b.shape as [number, number, number, number];
  const vertical = direction === 'vertical';
  const e = Math.min(vertical ? ah : aw, vertical ? bh : bw, extent);
  for (let p = 0; p < n * c; p++)
    for (let k = 0; k < e; k++) {
      const t = k / e;
      if (vertical) {
        for (let x = 0; x < bw; x++) {
          const i = (p * bh + k) * bw + x;
          b.data[i] = a.data[(p * ah + ah - e + k) * aw + x]! * (1 - t) + b.data[i]! * t;
        }
      } else {
        for (let y = 0; y < bh; y++) {
          const i = (p * bh + y) * bw + k;
          b.data[i] = a.data[(p * ah + y) * aw + aw - e + k]! * (1 - t) + b.data[i]! * t;
        }
      }
    }
}

/** The image codec of a pipeline: a KL autoencoder, or gesso's parameter-free patch codec. */
/** diffusers' ONNX pipeline fixes the VAE's latent scaling (0.18215) and its 4 channels. */
const ONNX_VAE = { scalingFactor: 0.18215, latentChannels: 4 };

/** A KL autoencoder, or the tiny autoencoder (TAESD) when the config names AutoencoderTiny. */
async function bindAutoencoder(
  source: string | ComponentSource,
  options: ComponentOptions,
): Promise<Compiled<Codec>> {
  const compiled = await bindComponent<AutoencoderKL | AutoencoderTiny>(
    source,
    'diffusion_pytorch_model',
    (c) =>
      c._class_name === 'AutoencoderTiny'
        ? new AutoencoderTiny(autoencoderTinyConfig(c))
        : new AutoencoderKL(autoencoderKLConfig(c), {
            fusedAttention: options.fusedAttention ?? true,
          }),
    options,
  );
  return compiled as Compiled<Codec>;
}

export class Vae {
  private readonly compiled: Compiled<Codec> | undefined;
  private readonly onnx:
    { decoder: OnnxFile; encoder: OnnxFile | undefined; scaleFactor: number } | undefined;

  private constructor(
    compiled: Compiled<Codec> | undefined,
    onnx?: { decoder: OnnxFile; encoder: OnnxFile | undefined; scaleFactor: number },
  ) {
    this.compiled = compiled;
    this.onnx = onnx;
  }

  /** The ONNX layout's `vae_decoder/` and (optional) `vae_encoder/` folders. */
  static async loadOnnx(
    decoderDir: string,
    encoderDir: string | undefined,
    options: ComponentOptions,
  ): Promise<Vae> {
    const [decoder, encoder] = await Promise.all([
      openOnnxFile(decoderDir, options),
      encoderDir !== undefined ? openOnnxFile(encoderDir, options) : undefined,
    ]);
    // Pixels per latent: read by decoding an 8×8 latent once (the layout carries no config).
    const probe = await decoder.session.run({
      [decoder.inputs[0]!.name]: new Tensor('float32', [1, ONNX_VAE.latentChannels, 8, 8]),
    });
    const scaleFactor = probe[decoder.outputs[0]!.name]!.shape[2]! / 8;
    return new Vae(undefined, { decoder, encoder, scaleFactor });
  }

  static async load(source: string | ComponentSource, options: ComponentOptions): Promise<Vae> {
    if (typeof source !== 'string') return new Vae(await bindAutoencoder(source, options));
    const dir = source;
    const config = await readConfig(dir);
    if (config._class_name === 'GessoPatchAutoencoder') {
      const module = new PatchAutoencoder(patchAutoencoderConfig(config));
      return new Vae(
        new Compiled<Codec>(
          module,
          WeightSet.fromTensors({}, dir).bind(module),
          JSON.stringify({ dir, config }),
          options,
        ),
      );
    }
    return new Vae(await bindAutoencoder(dir, options));
  }

  private get codec(): Codec {
    return this.compiled!.module;
  }

  get scalingFactor(): number {
    return this.onnx !== undefined ? ONNX_VAE.scalingFactor : this.codec.config.scalingFactor;
  }

  get shiftFactor(): number {
    return this.onnx === undefined && this.codec instanceof AutoencoderKL
      ? this.codec.config.shiftFactor
      : 0;
  }

  get latentChannels(): number {
    if (this.onnx !== undefined) return ONNX_VAE.latentChannels;
    return this.codec instanceof PatchAutoencoder
      ? this.codec.latentChannels
      : this.codec.config.latentChannels;
  }

  /** Pixels per latent. */
  get scaleFactor(): number {
    if (this.onnx !== undefined) return this.onnx.scaleFactor;
    const codec = this.codec;
    if (codec instanceof AutoencoderKL) return 2 ** (codec.config.blockOutChannels.length - 1);
    return codec instanceof AutoencoderTiny ? codec.scaleFactor : codec.config.patchSize;
  }

  /**
   * Latent tiles for tiled decoding: tiles of the VAE's training size overlapping by a quarter,
   * blended linearly, as diffusers' `AutoencoderKL.tiled_decode`. Undefined for codecs that
   * decode any size at once.
   */
  get tile(): number | undefined {
    const codec = this.onnx === undefined ? this.codec : undefined;
    return codec instanceof AutoencoderKL
      ? Math.floor(codec.config.sampleSize / this.scaleFactor)
      : undefined;
  }

  /** Pixels as `encode` takes them → the encoder's mean, scaled and shifted as latents are sampled. */
  async encodeMeanScaled(image: Tensor<'float32'>): Promise<Tensor<'float32'>> {
    const { mean } = await this.encode(image);
    const { scalingFactor, shiftFactor } = this;
    return map(mean, (v) => (v - shiftFactor) * scalingFactor);
  }

  /** Latents as a pipeline samples them (scaled and shifted) → pixels, as `decode`. */
  decodeScaled(
    latents: Tensor<'float32'>,
    tiled: boolean | 'auto' = 'auto',
  ): Promise<Tensor<'float32'>> {
    const { scalingFactor, shiftFactor } = this;
    return this.decode(
      map(latents, (v) => v / scalingFactor + shiftFactor),
      tiled,
    );
  }

  /**
   * Unscaled latents → pixels in about [−1, 1], NCHW. `tiled` decodes overlapping tiles one at a
   * time, so memory stays that of one tile whatever the image size; `auto` (the default) tiles
   * when the latents are more than twice the tile size on a side.
   */
  async decode(
    latents: Tensor<'float32'>,
    tiled: boolean | 'auto' = 'auto',
  ): Promise<Tensor<'float32'>> {
    const tile = this.tile;
    const [, , h, w] = latents.shape as [number, number, number, number];
    const wanted = tiled === 'auto' ? tile !== undefined && Math.max(h, w) > 2 * tile : tiled;
    if (wanted && tile !== undefined && Math.max(h, w) > tile)
      return this.decodeTiled(latents, tile);
    return this.decodeWhole(latents);
  }

  private async decodeTiled(latents: Tensor<'float32'>, tile: number): Promise<Tensor<'float32'>> {
    const [b, c, h, w] = latents.shape as [number, number, number, number];
    const scale = this.scaleFactor;
    const stride = Math.floor(tile * 0.75);
    const sampleTile = tile * scale;
    const blend = Math.floor(sampleTile * 0.25);
    const limit = sampleTile - blend;
    const rows: Tensor<'float32'>[][] = [];
    for (let i = 0; i < h; i += stride) {
      const row: Tensor<'float32'>[] = [];
      for (let j = 0; j < w; j += stride) {
        const th = Math.min(tile, h - i);
        const tw = Math.min(tile, w - j);
        const crop = new Tensor('float32', [b, c, th, tw]);
        for (let n = 0; n < b * c; n++)
          for (let y = 0; y < th; y++)
            crop.data.set(
              latents.data.subarray((n * h + i + y) * w + j, (n * h + i + y) * w + j + tw),
              (n * th + y) * tw,
            );
        row.push(await this.decodeWhole(crop));
      }
      rows.push(row);
    }
    const out = new Tensor('float32', [b, 3, h * scale, w * scale]);
    const [oh, ow] = [h * scale, w * scale];
    rows.forEach((row, ri) =>
      row.forEach((t, ci) => {
        // In place and in this order, as diffusers: a tile is blended with the one above (already
        // blended itself) and then with the one to its left.
        if (ri > 0) blendTiles(rows[ri - 1]![ci]!, t, blend, 'vertical');
        if (ci > 0) blendTiles(row[ci - 1]!, t, blend, 'horizontal');
        const [, ch, th, tw] = t.shape as [number, number, number, number];
        const y0 = ri * stride * scale;
        const x0 = ci * stride * scale;
        for (let n = 0; n < b * ch; n++)
          for (let y = 0; y < Math.min(th, limit, oh - y0); y++)
            out.data.set(
              t.data.subarray((n * th + y) * tw, (n * th + y) * tw + Math.min(tw, limit, ow - x0)),
              (n * oh + y0 + y) * ow + x0,
            );
      }),
    );
    return out;
  }

  private async decodeWhole(latents: Tensor<'float32'>): Promise<Tensor<'float32'>> {
    if (this.onnx !== undefined) {
      const d = this.onnx.decoder;
      const r = await d.session.run({ [d.inputs[0]!.name]: latents });
      return r[d.outputs[0]!.name] as Tensor<'float32'>;
    }
    const codec = this.codec;
    const session = await this.compiled!.session('vae_decoder', (g, p) => {
      const z: Value = g.input('latent_sample', 'float32', [
        'batch',
        this.latentChannels,
        'height',
        'width',
      ]);
      g.output(codec instanceof PatchAutoencoder ? codec.decode(z) : codec.decode(p, z), 'sample');
    });
    return (await session.run({ latent_sample: latents })).sample as Tensor<'float32'>;
  }

  /** Pixels in [−1, 1], NCHW → mean and standard deviation of the (unscaled) latent distribution. */
  async encode(
    image: Tensor<'float32'>,
  ): Promise<{ mean: Tensor<'float32'>; std: Tensor<'float32'> }> {
    if (this.onnx !== undefined) {
      // The exported encoder returns a draw from the latent distribution made inside the graph
      // (not from gesso's generator): image-to-image is not seed-reproducible in this layout.
      const e = this.onnx.encoder ?? needsGraph('image-to-image without vae_encoder/');
      const r = await e.session.run({ [e.inputs[0]!.name]: image });
      const sample = r[e.outputs[0]!.name] as Tensor<'float32'>;
      return { mean: sample, std: new Tensor('float32', sample.shape) };
    }
    const codec = this.codec;
    const session = await this.compiled!.session('vae_encoder', (g, p) => {
      const x = g.input('sample', 'float32', ['batch', 3, 'height', 'width']);
      if (codec instanceof AutoencoderKL) {
        const d = codec.encode(p, x);
        g.output(d.mean, 'mean');
        g.output(d.std, 'std');
      } else {
        // Deterministic encoders: the latents are the mean, with no spread.
        const mean = codec instanceof PatchAutoencoder ? codec.encode(x) : codec.encode(p, x);
        g.output(mean, 'mean');
        g.output(op.mul(mean, 0), 'std');
      }
    });
    const r = await session.run({ sample: image });
    return { mean: r.mean as Tensor<'float32'>, std: r.std as Tensor<'float32'> };
  }

  /**
   * Bytes its weights take in memory while loaded (what unloading frees); 0 for an ONNX file,
   * whose session stays open.
   */
  get weightBytes(): number {
    return this.compiled?.weightBytes ?? 0;
  }

  /** Frees the ONNX Runtime sessions; the next use builds them again (ONNX files stay open). */
  async unload(): Promise<void> {
    await this.compiled?.release();
  }

  async release(): Promise<void> {
    if (this.compiled !== undefined) return this.compiled.release();
    await this.onnx!.decoder.session.release();
    await this.onnx!.encoder?.session.release();
  }
}

function tooDeep(clipSkip: number, layers: number): UserError {
  return new UserError(
    'bad-clip-skip',
    `clip skip ${clipSkip} reaches past this text encoder's ${layers} layer${layers === 1 ? '' : 's'}; skip at most ${layers - 1}`,
  );
}
