import { join } from 'node:path';
import { UserError } from '../errors.js';
import { Graph } from '../graph/ir.js';
import { emitOnnx } from '../graph/onnx.js';
import { findWeightFiles, readConfig } from '../loaders/component.js';
import { ganConfig, GanGenerator } from '../models/gan.js';
import { WeightSet } from '../nn/weights.js';
import { Session } from '../runtime/session.js';
import { concat } from '../tensor/ops.js';
import { TorchGenerator } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import { loadTokenizer, type Tokenizer } from '../tokenizers/index.js';
import { TextEncoder, type ComponentOptions } from './components.js';
import type { GenerateOptions, GenerateResult } from './stable-diffusion.js';

/**
 * One-step text-to-image with a gesso GAN folder (`model_index.json` of class GessoGanPipeline:
 * tokenizer, text encoder, generator). Accepts the same options as the diffusion pipeline and
 * ignores what has no meaning for a GAN (steps, guidance, scheduler).
 */
export class GanPipeline {
  readonly path: string;
  readonly tokenizer: Tokenizer;
  readonly textEncoder: TextEncoder;
  readonly generator: GanGenerator;
  /** One step, no guidance: what a GAN does whatever it is asked. */
  readonly defaults = { steps: 1, guidance: 0 } as const;
  private readonly session: Session;

  private constructor(
    path: string,
    tokenizer: Tokenizer,
    textEncoder: TextEncoder,
    generator: GanGenerator,
    session: Session,
  ) {
    this.path = path;
    this.tokenizer = tokenizer;
    this.textEncoder = textEncoder;
    this.generator = generator;
    this.session = session;
  }

  static async fromPretrained(path: string, options: ComponentOptions = {}): Promise<GanPipeline> {
    const dir = join(path, 'generator');
    const generator = new GanGenerator(ganConfig(await readConfig(dir)));
    const weights = (
      await WeightSet.fromFiles(await findWeightFiles(dir, 'model', options.variant))
    ).bind(generator);
    const [tokenizer, textEncoder] = await Promise.all([
      loadTokenizer(join(path, 'tokenizer')),
      TextEncoder.load(join(path, 'text_encoder'), options),
    ]);
    const c = generator.config;
    const length = tokenizer.maxLength;
    const session = await Session.create(
      {
        key: JSON.stringify({ gan: weights.weights.fingerprint, config: c, length }),
        emit: () => {
          const g = new Graph('gan_generator');
          const p = weights.parameters(g);
          const image = generator.forward(
            p,
            g.input('z', 'float32', ['batch', c.zDim]),
            g.input('sentence', 'float32', ['batch', c.textDim]),
            g.input('words', 'float32', ['batch', length, c.textDim]),
          );
          g.output(image, 'image');
          return emitOnnx(g);
        },
      },
      options,
    );
    return new GanPipeline(path, tokenizer, textEncoder, generator, session);
  }

  async generate(options: GenerateOptions): Promise<GenerateResult> {
    options.signal?.throwIfAborted();
    if (options.image !== undefined)
      throw new UserError(
        'bad-request',
        'a GAN draws from noise in one step; image-to-image needs a diffusion model',
      );
    const prompts = typeof options.prompt === 'string' ? [options.prompt] : [...options.prompt];
    if (prompts.length === 0) throw new UserError('bad-request', 'no prompt given');
    const size = this.generator.config.imageSize;
    if ((options.width ?? size) !== size || (options.height ?? size) !== size) {
      throw new UserError('bad-size', `this GAN draws ${size}×${size} images only`);
    }
    const count = options.count ?? 1;
    const all = prompts.flatMap((p) => new Array<string>(count).fill(p));
    const seed = options.seed ?? Math.floor(Math.random() * 2 ** 32);
    const seeds = typeof seed === 'number' ? new Array<number>(all.length).fill(seed) : [...seed];
    if (seeds.length !== all.length)
      throw new UserError('bad-request', `${seeds.length} seeds for ${all.length} images`);
    const zDim = this.generator.config.zDim;
    const z =
      typeof seed === 'number'
        ? new TorchGenerator(seed).randn([all.length, zDim])
        : concat(seeds.map((s) => new TorchGenerator(s).randn([1, zDim])));
    const ids = Tensor.int64(
      [all.length, this.tokenizer.maxLength],
      all.flatMap((p) => this.tokenizer.encode(p)),
    );
    const { hidden, pooled } = await this.textEncoder.encode(ids);
    options.signal?.throwIfAborted();
    const { image } = await this.session.run({ z, sentence: pooled, words: hidden });
    const pixels = image as Tensor<'float32'>;
    const [b, c, h, w] = pixels.shape as [number, number, number, number];
    const images = new Tensor('float32', [b, h, w, c]);
    for (let n = 0; n < b; n++) {
      for (let k = 0; k < c; k++) {
        for (let i = 0; i < h * w; i++)
          images.data[(n * h * w + i) * c + k] = Math.min(
            Math.max(pixels.data[(n * c + k) * h * w + i]! / 2 + 0.5, 0),
            1,
          );
      }
    }
    await options.onProgress?.({ step: 1, steps: 1, timestep: 0, latents: pixels });
    return { images, latents: pixels, seeds };
  }

  async release(): Promise<void> {
    await Promise.all([this.session.release(), this.textEncoder.release()]);
  }
}
