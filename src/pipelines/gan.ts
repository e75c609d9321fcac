import { join } from 'node:path';
import { UserError } from '../errors.js';
import { Graph } from '../graph/ir.js';
import { emitOnnx } from '../graph/onnx.js';
import { findWeightFiles, readConfig } from '../loaders/component.js';
import { ganConfig, GanGenerator, poolSentence } from '../models/gan.js';
import { WeightSet } from '../nn/weights.js';
import { Session } from '../runtime/session.js';
import { fromModelPixels } from '../io/image.js';
import { concat } from '../tensor/ops.js';
import { randomSeed, seededGenerator } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import { loadTokenizer, type Tokenizer } from '../tokenizers/index.js';
import { TextEncoder, Vae, type ComponentOptions } from './components.js';
import type { GenerateOptions, GenerateResult } from './stable-diffusion.js';

/**
 * One-step text-to-image with a gesso GAN folder (`model_index.json` of class GessoGanPipeline:
 * tokenizer, text encoder, generator, and for a latent GAN the autoencoder whose latents the
 * generator draws, decoded as a diffusion pipeline decodes them). Accepts the same options as the
 * diffusion pipeline and ignores what has no meaning for a GAN (steps, guidance, scheduler).
 */
export class GanPipeline {
  readonly path: string;
  readonly tokenizer: Tokenizer;
  readonly textEncoder: TextEncoder;
  readonly generator: GanGenerator;
  /** A latent GAN's autoencoder; undefined when the generator draws pixels. */
  readonly vae: Vae | undefined;
  /** One step, no guidance: what a GAN does whatever it is asked. */
  readonly defaults = { steps: 1, guidance: 0 } as const;
  private readonly session: Session;

  private constructor(
    path: string,
    tokenizer: Tokenizer,
    textEncoder: TextEncoder,
    generator: GanGenerator,
    vae: Vae | undefined,
    session: Session,
  ) {
    this.path = path;
    this.tokenizer = tokenizer;
    this.textEncoder = textEncoder;
    this.generator = generator;
    this.vae = vae;
    this.session = session;
  }

  /** The side of the images it draws: the generator's, or its latents' decoded. */
  get defaultSize(): number {
    return this.generator.config.imageSize * (this.vae?.scaleFactor ?? 1);
  }

  static async fromPretrained(path: string, options: ComponentOptions = {}): Promise<GanPipeline> {
    const dir = join(path, 'generator');
    const generator = new GanGenerator(ganConfig(await readConfig(dir)));
    const weights = (
      await WeightSet.fromFiles(await findWeightFiles(dir, 'model', options.variant))
    ).bind(generator);
    const [tokenizer, textEncoder, vae] = await Promise.all([
      loadTokenizer(join(path, 'tokenizer')),
      TextEncoder.load(join(path, 'text_encoder'), options),
      generator.config.latentChannels > 0 ? Vae.load(join(path, 'vae'), options) : undefined,
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
    return new GanPipeline(path, tokenizer, textEncoder, generator, vae, session);
  }

  async generate(options: GenerateOptions): Promise<GenerateResult> {
    options.signal?.throwIfAborted();
    if (options.image !== undefined)
      throw new UserError(
        'bad-request',
        'a GAN draws from noise in one step; image-to-image needs a diffusion model',
      );
    if (options.variation !== undefined || options.seedResizeFrom !== undefined)
      throw new UserError(
        'bad-request',
        "variation seeds and resized seeds shape a diffusion model's starting latents; a GAN has none",
      );
    const prompts = typeof options.prompt === 'string' ? [options.prompt] : [...options.prompt];
    if (prompts.length === 0) throw new UserError('bad-request', 'no prompt given');
    const size = this.defaultSize;
    if ((options.width ?? size) !== size || (options.height ?? size) !== size) {
      throw new UserError('bad-size', `this GAN draws ${size}×${size} images only`);
    }
    const count = options.count ?? 1;
    const all = prompts.flatMap((p) => new Array<string>(count).fill(p));
    const seed = options.seed ?? randomSeed();
    const seeds = typeof seed === 'number' ? new Array<number>(all.length).fill(seed) : [...seed];
    if (seeds.length !== all.length)
      throw new UserError('bad-request', `${seeds.length} seeds for ${all.length} images`);
    const zDim = this.generator.config.zDim;
    const z =
      typeof seed === 'number'
        ? seededGenerator(seed, options.rng).randn([all.length, zDim])
        : concat(seeds.map((s) => seededGenerator(s, options.rng).randn([1, zDim])));
    const ids = Tensor.int64(
      [all.length, this.tokenizer.maxLength],
      all.flatMap((p) => this.tokenizer.encode(p)),
    );
    const encoding = await this.textEncoder.encode(ids);
    const sentence = poolSentence(
      this.generator.config.sentencePooling,
      encoding,
      ids,
      this.textEncoder.config.eosTokenId,
    );
    options.signal?.throwIfAborted();
    const { image } = await this.session.run({ z, sentence, words: encoding.hidden });
    const drawn = image as Tensor<'float32'>;
    const pixels = this.vae !== undefined ? await this.vae.decodeScaled(drawn) : drawn;
    const images = fromModelPixels(pixels);
    await options.onProgress?.({ step: 1, steps: 1, timestep: 0, latents: drawn });
    return { images, latents: drawn, seeds };
  }

  async release(): Promise<void> {
    await Promise.all([this.session.release(), this.textEncoder.release(), this.vae?.release()]);
  }
}
