import { cp, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DataSource } from '../data/source.js';
import { UserError } from '../errors.js';
import { gradients } from '../graph/autodiff.js';
import type { Graph, Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { GanDiscriminator, GanGenerator, poolSentence, type GanConfig } from '../models/gan.js';
import type { ParameterSource } from '../nn/module.js';
import { TextEncoder } from '../pipelines/components.js';
import type { RuntimeOptions } from '../runtime/session.js';
import { TorchGenerator } from '../tensor/rng.js';
import { patchify } from '../models/patch-autoencoder.js';
import { Tensor } from '../tensor/tensor.js';
import { loadTokenizer, type Tokenizer } from '../tokenizers/index.js';
import type { LatentSpace } from './diffusion.js';
import { flatParameters, parameterLayout, type AdamWConfig } from './step.js';
import {
  checkpointMetadata,
  DataRandom,
  emaDecayAt,
  restoreCheckpointMetadata,
  StepRunner,
  type Schedule,
} from './trainer.js';

/**
 * The GAN route: DF-GAN's recipe at 64×64 on the shapes world, in pixels or in the latents of a
 * trained autoencoder (GanTrainerOptions.latents). Each iteration runs a generator
 * step (the discriminator frozen inside it) and a discriminator step with the hinge loss over
 * real, generated and mismatched pairs (a real image with a caption rolled in from another
 * sample counts as fake) plus the matching-aware gradient penalty MA-GP = k·mean(‖∇_{x,s} D(x, s)‖ᵖ)
 * on real matching pairs, which needs second derivatives and gets them from the same autodiff.
 * The text encoder is a trained diffusion model's, frozen: the routes share it by design.
 */

export interface GanRecipe {
  readonly batchSize: number;
  readonly generator: GanConfig;
  readonly generatorLearningRate: number;
  readonly discriminatorLearningRate: number;
  /** MA-GP weight k and power p (DF-GAN: 2 and 6). */
  readonly gpWeight: number;
  readonly gpPower: number;
  /** A model folder whose tokenizer/ and text_encoder/ the GAN uses, frozen. */
  readonly textEncoderFrom: string;
}

const ADAM: AdamWConfig = {
  beta1: 0,
  beta2: 0.9,
  eps: 1e-8,
  weightDecay: 0,
  maxGradNorm: 0,
  ema: true,
};

export interface GanTrainerOptions {
  readonly seed: number;
  readonly schedule: Schedule;
  readonly runtime?: RuntimeOptions;
  /** A trained autoencoder whose scaled latents the GAN draws and judges; none: RGB pixels. */
  readonly latents?: LatentSpace;
}

export interface GanStepResult {
  readonly step: number;
  readonly generatorLoss: number;
  readonly discriminatorLoss: number;
}

export class GanTrainer {
  readonly recipe: GanRecipe;
  step = 0;
  readonly dataRandom: DataRandom;
  readonly noise: TorchGenerator;
  readonly generator: GanGenerator;
  readonly discriminator: GanDiscriminator;
  private readonly g: StepRunner;
  private readonly d: StepRunner;
  private readonly tokenizer: Tokenizer;
  private readonly textEncoder: TextEncoder;
  private readonly data: DataSource;
  private readonly schedule: Schedule;
  private readonly latents: LatentSpace | undefined;

  private constructor(fields: {
    recipe: GanRecipe;
    seed: number;
    generator: GanGenerator;
    discriminator: GanDiscriminator;
    g: StepRunner;
    d: StepRunner;
    tokenizer: Tokenizer;
    textEncoder: TextEncoder;
    data: DataSource;
    schedule: Schedule;
    latents: LatentSpace | undefined;
  }) {
    this.recipe = fields.recipe;
    this.generator = fields.generator;
    this.discriminator = fields.discriminator;
    this.g = fields.g;
    this.d = fields.d;
    this.tokenizer = fields.tokenizer;
    this.textEncoder = fields.textEncoder;
    this.data = fields.data;
    this.schedule = fields.schedule;
    this.latents = fields.latents;
    this.dataRandom = new DataRandom(fields.seed);
    this.noise = new TorchGenerator(fields.seed + 1);
  }

  static async create(
    recipe: GanRecipe,
    data: DataSource,
    options: GanTrainerOptions,
  ): Promise<GanTrainer> {
    const runtime = options.runtime ?? {};
    const tokenizer = await loadTokenizer(join(recipe.textEncoderFrom, 'tokenizer'));
    const textEncoder = await TextEncoder.load(
      join(recipe.textEncoderFrom, 'text_encoder'),
      runtime,
    );
    const generator = new GanGenerator(recipe.generator);
    const discriminator = new GanDiscriminator(recipe.generator);
    const b = recipe.batchSize;
    const { textDim, zDim, imageSize } = recipe.generator;
    const latents = options.latents;
    const sampleShape = [b, latents?.channels ?? 3, imageSize, imageSize];
    if (
      latents !== undefined &&
      (latents.side !== imageSize || latents.channels !== recipe.generator.latentChannels)
    )
      throw new UserError(
        'bad-config',
        `the GAN is configured for ${recipe.generator.latentChannels} latent channels at ${imageSize}×${imageSize}, but ${latents.dir} has ${latents.channels} at ${latents.side}×${latents.side}`,
      );
    const length = tokenizer.maxLength;
    const dShapes = discriminator.namedParameters();
    const dLayout = parameterLayout(dShapes);
    const init = new TorchGenerator(options.seed);
    const cacheKey = JSON.stringify({ gan: recipe.generator, b, length });

    const g = await StepRunner.create(
      generator.namedParameters(),
      (p: ParameterSource, graph: Graph): Value => {
        const z = graph.input('z', 'float32', [b, zDim]);
        const words = graph.input('words', 'float32', [b, length, textDim]);
        const sentence = graph.input('sentence', 'float32', [b, textDim]);
        const frozen = flatParameters(
          graph,
          graph.input('d_params', 'float32', [dLayout.size]),
          dLayout,
        ).source;
        const fake = generator.forward(p, z, sentence, words);
        graph.output(fake, 'fake');
        const logit = discriminator.logit(frozen, discriminator.features(frozen, fake), sentence);
        return op.neg(op.reduceMean(logit, [0], false));
      },
      generator.initialParameters(init),
      { adam: ADAM, runtime, cacheKey: `${cacheKey}:g` },
    );
    const d = await StepRunner.create(
      dShapes,
      (p: ParameterSource, graph: Graph): Value => {
        const real = graph.input('real', 'float32', sampleShape);
        const fake = graph.input('fake', 'float32', sampleShape);
        const sentence = graph.input('sentence', 'float32', [b, textDim]);
        const mismatched = graph.input('mismatched', 'float32', [b, textDim]);
        const judge = (image: Value, s: Value) =>
          discriminator.logit(p, discriminator.features(p, image), s);
        const realLogit = judge(real, sentence);
        const hinge = (v: Value) => op.reduceMean(op.relu(v), [0], false);
        const loss = op.add(
          hinge(op.sub(1, realLogit)),
          op.mul(
            op.add(
              hinge(op.add(judge(fake, sentence), 1)),
              hinge(op.add(judge(real, mismatched), 1)),
            ),
            0.5,
          ),
        );
        // MA-GP on matching real pairs: the gradient with respect to both image and sentence.
        const grads = gradients(op.reduceSum(realLogit, [0], false), [real, sentence]);
        const gx = grads.get(real)!;
        const gs = grads.get(sentence)!;
        const norm = op.sqrt(
          op.add(
            op.reduceSum(op.mul(gx, gx), [1, 2, 3], false),
            op.reduceSum(op.mul(gs, gs), [1], false),
          ),
        );
        const penalty = op.mul(
          op.reduceMean(op.pow(norm, recipe.gpPower), [0], false),
          recipe.gpWeight,
        );
        graph.output(penalty, 'penalty');
        return op.add(loss, penalty);
      },
      discriminator.initialParameters(init),
      { adam: ADAM, runtime, cacheKey: `${cacheKey}:d:${recipe.gpWeight}:${recipe.gpPower}` },
    );
    return new GanTrainer({
      recipe,
      seed: options.seed,
      generator,
      discriminator,
      g,
      d,
      tokenizer,
      textEncoder,
      data,
      schedule: options.schedule,
      latents,
    });
  }

  static async resume(
    path: string,
    recipe: GanRecipe,
    data: DataSource,
    options: GanTrainerOptions,
  ): Promise<GanTrainer> {
    const trainer = await GanTrainer.create(recipe, data, options);
    await SafetensorsFile.with(path, async (file) => {
      trainer.step = restoreCheckpointMetadata(
        path,
        file.metadata,
        trainer.layoutKey,
        trainer.dataRandom,
        trainer.noise,
      );
      await trainer.g.restore(file, 'generator/');
      await trainer.d.restore(file, 'discriminator/');
    });
    return trainer;
  }

  private get layoutKey(): string {
    return JSON.stringify([[...this.g.layout.shapes], [...this.d.layout.shapes]]);
  }

  async runStep(): Promise<GanStepResult> {
    const b = this.recipe.batchSize;
    const { images, captions } = this.data.sample(this.dataRandom.uniform, b);
    const ids = Tensor.int64(
      [b, this.tokenizer.maxLength],
      captions.flatMap((c) => this.tokenizer.encode(c)),
    );
    const encoding = await this.textEncoder.encode(ids);
    const words = encoding.hidden;
    const sentence = poolSentence(
      this.recipe.generator.sentencePooling,
      encoding,
      ids,
      this.textEncoder.config.eosTokenId,
    );
    const z = this.noise.randn([b, this.recipe.generator.zDim]);
    const emaDecay = emaDecayAt(this.schedule, this.step);

    const gResult = await this.g.run(
      {
        z,
        words,
        sentence,
        d_params: new Tensor('float32', [this.d.layout.size], this.d.state.params),
      },
      this.step,
      this.recipe.generatorLearningRate,
      emaDecay,
    );
    const real =
      this.latents !== undefined ? await this.latents.encode(images) : patchify(images, 1);
    // Mismatched pairs: each image with the caption of the next sample (DF-GAN rolls the batch).
    const width = this.recipe.generator.textDim;
    const mismatched = new Tensor('float32', [b, width]);
    for (let n = 0; n < b; n++)
      mismatched.data.set(
        sentence.data.subarray(((n + 1) % b) * width, (((n + 1) % b) + 1) * width),
        n * width,
      );
    const dResult = await this.d.run(
      { real, fake: gResult.outputs.fake!, sentence, mismatched },
      this.step,
      this.recipe.discriminatorLearningRate,
      emaDecay,
    );
    this.step += 1;
    return { step: this.step, generatorLoss: gResult.loss, discriminatorLoss: dResult.loss };
  }

  async save(path: string, extraMetadata: Record<string, string> = {}): Promise<void> {
    await writeSafetensors(
      path,
      { ...this.g.checkpointTensors('generator/'), ...this.d.checkpointTensors('discriminator/') },
      {
        ...extraMetadata,
        ...checkpointMetadata(this.step, this.layoutKey, this.dataRandom, this.noise),
      },
    );
  }

  /** A model folder GanPipeline loads: the frozen tokenizer and text encoder, and the generator (EMA). */
  async exportModel(dir: string, options: { fp16?: boolean; note?: string } = {}): Promise<void> {
    await mkdir(join(dir, 'generator'), { recursive: true });
    for (const part of ['tokenizer', 'text_encoder']) {
      await cp(join(this.recipe.textEncoderFrom, part), join(dir, part), { recursive: true });
    }
    const c = this.recipe.generator;
    const json = (v: unknown) => `${JSON.stringify(v, null, 2)}\n`;
    await writeFile(
      join(dir, 'model_index.json'),
      json({
        _class_name: 'GessoGanPipeline',
        _gesso: { route: 'gan', note: options.note ?? '' },
        tokenizer: ['gesso', 'GessoWordTokenizer'],
        text_encoder: ['gesso', 'GessoTextModel'],
        generator: ['gesso', 'GessoGanGenerator'],
        ...(this.latents !== undefined ? { vae: ['diffusers', 'AutoencoderKL'] } : {}),
      }),
    );
    await this.latents?.copyTo(join(dir, 'vae'), options.fp16 === true);
    await writeFile(
      join(dir, 'generator', 'config.json'),
      json({
        _class_name: 'GessoGanGenerator',
        z_dim: c.zDim,
        text_dim: c.textDim,
        nf: c.nf,
        image_size: c.imageSize,
        patch_size: c.patchSize,
        attention_resolutions: c.attentionResolutions,
        ...(c.latentChannels > 0 ? { latent_channels: c.latentChannels } : {}),
        ...(c.blocksPerResolution !== 1 ? { blocks_per_resolution: c.blocksPerResolution } : {}),
        ...(c.sentencePooling !== 'eos' ? { sentence_pooling: c.sentencePooling } : {}),
      }),
    );
    const weights = this.g.weights('ema');
    const stored: Record<string, Tensor> = {};
    for (const [k, t] of Object.entries(weights))
      stored[k] = options.fp16 === true ? t.to('float16') : t;
    await writeSafetensors(join(dir, 'generator', 'model.safetensors'), stored);
  }

  async release(): Promise<void> {
    await Promise.all([this.g.release(), this.d.release(), this.textEncoder.release()]);
  }
}
