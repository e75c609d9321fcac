import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BACKGROUND_NAMES, COLOUR_NAMES, sampleBatch, SHAPES, type Scene } from '../data/shapes.js';
import { Graph, type Value } from '../graph/ir.js';
import { emitOnnx } from '../graph/onnx.js';
import * as op from '../graph/ops.js';
import { writeSafetensors } from '../io/safetensors.js';
import { activation } from '../nn/activations.js';
import { Conv2d } from '../nn/conv.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm } from '../nn/norm.js';
import { WeightSet } from '../nn/weights.js';
import { Session, type RuntimeOptions } from '../runtime/session.js';
import type { TorchGenerator } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import type { DataRandom, TrainingTask } from '../training/trainer.js';

/**
 * The small network in whose feature space realism (a Fréchet distance) and diversity are measured
 * on the shapes world: a few strided convolutions trained by gesso to recognise the world's
 * attributes (background, which colours and shapes are present, how many objects). Its 64-d
 * globally pooled features play the role Inception-v3's pool3 plays for FID on photographs.
 */

export const FEATURE_DIM = 64;
/** backgrounds (3) + colours present (8) + shapes present (4) + object count 1–4 (4). */
const LABELS = BACKGROUND_NAMES.length + COLOUR_NAMES.length + SHAPES.length + 4;

export class ShapesFeatureNet extends Module {
  private readonly convs: Conv2d[];
  private readonly norms: GroupNorm[];
  private readonly head: Linear;

  constructor() {
    super();
    const widths = [3, 16, 32, 64, FEATURE_DIM];
    this.convs = this.addModuleList(
      'convs',
      widths
        .slice(1)
        .map((w, i) => new Conv2d(widths[i]!, w, 3, { padding: 1, stride: i === 0 ? 1 : 2 })),
    );
    this.norms = this.addModuleList(
      'norms',
      widths.slice(1).map((w) => new GroupNorm(8, w)),
    );
    this.head = this.addModule('head', new Linear(FEATURE_DIM, LABELS));
  }

  /** Images NCHW in [−1, 1] → features [B, 64]. */
  features(p: ParameterSource, images: Value): Value {
    let h = images;
    const silu = activation('silu');
    this.convs.forEach((conv, i) => {
      h = silu(this.norms[i]!.forward(p, conv.forward(p, h)));
    });
    return op.reduceMean(h, [2, 3], false);
  }

  logits(p: ParameterSource, images: Value): Value {
    return this.head.forward(p, this.features(p, images));
  }
}

function labels(scene: Scene): number[] {
  const y = new Array<number>(LABELS).fill(0);
  y[BACKGROUND_NAMES.indexOf(scene.background)] = 1;
  for (const o of scene.objects) {
    y[BACKGROUND_NAMES.length + COLOUR_NAMES.indexOf(o.colour)] = 1;
    y[BACKGROUND_NAMES.length + COLOUR_NAMES.length + SHAPES.indexOf(o.shape)] = 1;
  }
  y[
    BACKGROUND_NAMES.length +
      COLOUR_NAMES.length +
      SHAPES.length +
      Math.min(scene.objects.length, 4) -
      1
  ] = 1;
  return y;
}

/** NHWC uint8 → NCHW float in [−1, 1]. */
export function toModelInput(images: Tensor<'uint8'>): Tensor<'float32'> {
  const [b, h, w, c] = images.shape as [number, number, number, number];
  const out = new Tensor('float32', [b, c, h, w]);
  const src = images.data as Uint8Array;
  for (let n = 0; n < b; n++) {
    for (let i = 0; i < h * w; i++)
      for (let k = 0; k < c; k++)
        out.data[(n * c + k) * h * w + i] = src[(n * h * w + i) * c + k]! / 127.5 - 1;
  }
  return out;
}

/** Trains the feature network with a multi-label logistic loss on shapes-world scenes (all pairs). */
export class FeatureTask implements TrainingTask {
  readonly net = new ShapesFeatureNet();
  readonly shapes = this.net.namedParameters();
  readonly batchSize: number;

  constructor(batchSize = 64) {
    this.batchSize = batchSize;
  }

  get cacheKey(): string {
    return JSON.stringify({ features: FEATURE_DIM, labels: LABELS, batch: this.batchSize });
  }

  initialParameters(random: TorchGenerator): Map<string, Float32Array> {
    return this.net.initialParameters(random);
  }

  buildLoss(p: ParameterSource, g: Graph): Value {
    const images = g.input('images', 'float32', [this.batchSize, 3, 64, 64]);
    const targets = g.input('labels', 'float32', [this.batchSize, LABELS]);
    const z = this.net.logits(p, images);
    // log(1 + e^z) − y·z, written stably as max(z, 0) − y·z + log(1 + e^−|z|).
    const loss = op.add(
      op.sub(op.relu(z), op.mul(targets, z)),
      op.log(op.add(op.exp(op.neg(op.abs(z))), 1)),
    );
    return op.reduceMean(loss, [0, 1], false);
  }

  batch(_step: number, random: DataRandom): Record<string, Tensor> {
    const { images, scenes } = sampleBatch(random.uniform, this.batchSize, {
      excludeHeldOut: false,
    });
    return {
      images: toModelInput(images),
      labels: Tensor.float32([this.batchSize, LABELS], scenes.flatMap(labels)),
    };
  }

  async export(dir: string, weights: Readonly<Record<string, Tensor>>): Promise<void> {
    await mkdir(dir, { recursive: true });
    await writeFile(
      join(dir, 'config.json'),
      `${JSON.stringify({ _class_name: 'ShapesFeatureNet', feature_dim: FEATURE_DIM, labels: LABELS }, null, 2)}\n`,
    );
    await writeSafetensors(join(dir, 'model.safetensors'), weights);
  }
}

/** The trained feature network, ready to embed images. */
export class FeatureExtractor {
  private constructor(private readonly session: Session) {}

  static async load(dir: string, runtime: RuntimeOptions = {}): Promise<FeatureExtractor> {
    const net = new ShapesFeatureNet();
    const weights = (await WeightSet.fromFiles(join(dir, 'model.safetensors'))).bind(net);
    const session = await Session.create(
      {
        key: `shapes-features:${weights.weights.fingerprint}`,
        emit: () => {
          const graph = new Graph('features');
          const images = graph.input('images', 'float32', ['batch', 3, 64, 64]);
          graph.output(net.features(weights.parameters(graph), images), 'features');
          return emitOnnx(graph);
        },
      },
      runtime,
    );
    return new FeatureExtractor(session);
  }

  /** Features [N, 64] (float64 rows) of NHWC uint8 images. */
  async embed(images: Tensor<'uint8'>, batch = 64): Promise<Float64Array[]> {
    const out: Float64Array[] = [];
    const n = images.shape[0]!;
    const per = 64 * 64 * 3;
    for (let i = 0; i < n; i += batch) {
      const count = Math.min(batch, n - i);
      const slice = new Tensor(
        'uint8',
        [count, 64, 64, 3],
        (images.data as Uint8Array).slice(i * per, (i + count) * per),
      );
      const f = (await this.session.run({ images: toModelInput(slice) })).features!
        .data as Float32Array;
      for (let k = 0; k < count; k++)
        out.push(Float64Array.from(f.subarray(k * FEATURE_DIM, (k + 1) * FEATURE_DIM)));
    }
    return out;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
