import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { Conv2d } from '../nn/conv.js';
import { Module, ModuleList, type ParameterSource } from '../nn/module.js';

/**
 * diffusers' `AutoencoderTiny`: the tiny autoencoder (TAESD / TAESDXL by Ollin Boer Bohan), a
 * distilled stand-in for the SD VAE that decodes in a fraction of its time, for previews and
 * `--fast-decode`. Its latents are the pipeline's (scaled) latents: `scaling_factor` is 1.
 *
 * Both halves are one `nn.Sequential` (`encoder.layers.N`, `decoder.layers.N`) whose numbering
 * counts the parameter-free members (activations, upsampling) too, so the keys match the files.
 */

type Json = Record<string, unknown>;

export interface AutoencoderTinyConfig {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly latentChannels: number;
  readonly encoderBlockOutChannels: readonly number[];
  readonly decoderBlockOutChannels: readonly number[];
  readonly numEncoderBlocks: readonly number[];
  readonly numDecoderBlocks: readonly number[];
  readonly upsamplingScalingFactor: number;
  readonly actFn: string;
  readonly scalingFactor: number;
  readonly shiftFactor: number;
}

export function autoencoderTinyConfig(c: Json): AutoencoderTinyConfig {
  const list = (key: string, fallback: number[]): number[] => {
    const v = c[key];
    return Array.isArray(v) && v.every((x) => typeof x === 'number') ? (v as number[]) : fallback;
  };
  const num = (key: string, fallback: number) =>
    typeof c[key] === 'number' ? (c[key] as number) : fallback;
  if (c.upsample_fn !== undefined && c.upsample_fn !== 'nearest')
    throw new UserError(
      'unsupported-model',
      `gesso supports AutoencoderTiny with upsample_fn 'nearest' only (got ${JSON.stringify(c.upsample_fn)})`,
    );
  const config: AutoencoderTinyConfig = {
    inChannels: num('in_channels', 3),
    outChannels: num('out_channels', 3),
    latentChannels: num('latent_channels', 4),
    encoderBlockOutChannels: list('encoder_block_out_channels', [64, 64, 64, 64]),
    decoderBlockOutChannels: list('decoder_block_out_channels', [64, 64, 64, 64]),
    numEncoderBlocks: list('num_encoder_blocks', [1, 3, 3, 3]),
    numDecoderBlocks: list('num_decoder_blocks', [3, 3, 3, 1]),
    upsamplingScalingFactor: num('upsampling_scaling_factor', 2),
    actFn: typeof c.act_fn === 'string' ? c.act_fn : 'relu',
    scalingFactor: num('scaling_factor', 1),
    shiftFactor: num('shift_factor', 0),
  };
  if (
    config.encoderBlockOutChannels.length !== config.numEncoderBlocks.length ||
    config.decoderBlockOutChannels.length !== config.numDecoderBlocks.length
  )
    throw new UserError(
      'bad-config',
      'AutoencoderTiny config: block_out_channels and num_*_blocks differ in length',
    );
  return config;
}

/** conv → act → conv → act → conv, plus a 1×1 skip when the width changes, then ReLU. */
class TinyBlock extends Module {
  readonly conv: Conv2d[];
  readonly skip: Conv2d | undefined;
  private readonly act: (x: Value) => Value;

  constructor(inChannels: number, outChannels: number, act: string) {
    super();
    const list = this.addModule('conv', new ModuleList());
    this.conv = [
      new Conv2d(inChannels, outChannels, 3, { padding: 1 }),
      new Conv2d(outChannels, outChannels, 3, { padding: 1 }),
      new Conv2d(outChannels, outChannels, 3, { padding: 1 }),
    ];
    // nn.Sequential(conv, act, conv, act, conv): the convolutions sit at 0, 2 and 4.
    this.conv.forEach((c, i) => list.append(String(2 * i), c));
    this.skip =
      inChannels !== outChannels
        ? this.addModule('skip', new Conv2d(inChannels, outChannels, 1, { bias: false }))
        : undefined;
    this.act = activation(act);
  }

  forward(p: ParameterSource, x: Value): Value {
    const [a, b, c] = this.conv as [Conv2d, Conv2d, Conv2d];
    const y = c.forward(p, this.act(b.forward(p, this.act(a.forward(p, x)))));
    return op.relu(op.add(y, this.skip === undefined ? x : this.skip.forward(p, x)));
  }
}

type Layer =
  | { kind: 'conv'; conv: Conv2d }
  | { kind: 'block'; block: TinyBlock }
  | { kind: 'act' }
  | { kind: 'upsample' };

/** An `nn.Sequential` of convolutions, tiny blocks, activations and upsampling. */
class Sequential extends Module {
  private readonly steps: Layer[] = [];
  private readonly list: ModuleList;
  private readonly act: (x: Value) => Value;
  private readonly factor: number;

  constructor(act: string, factor: number) {
    super();
    this.list = this.addModule('layers', new ModuleList());
    this.act = activation(act);
    this.factor = factor;
  }

  push(layer: Layer): void {
    const index = String(this.steps.length);
    if (layer.kind === 'conv') this.list.append(index, layer.conv);
    if (layer.kind === 'block') this.list.append(index, layer.block);
    this.steps.push(layer);
  }

  forward(p: ParameterSource, x: Value): Value {
    for (const layer of this.steps) {
      if (layer.kind === 'conv') x = layer.conv.forward(p, x);
      else if (layer.kind === 'block') x = layer.block.forward(p, x);
      else if (layer.kind === 'act') x = this.act(x);
      else x = op.upsampleNearest(x, [this.factor, this.factor]);
    }
    return x;
  }
}

export class AutoencoderTiny extends Module {
  readonly config: AutoencoderTinyConfig;
  readonly encoder: Sequential;
  readonly decoder: Sequential;

  constructor(config: AutoencoderTinyConfig) {
    super();
    this.config = config;
    const c = config;
    this.encoder = this.addModule('encoder', new Sequential(c.actFn, c.upsamplingScalingFactor));
    c.numEncoderBlocks.forEach((blocks, i) => {
      const width = c.encoderBlockOutChannels[i]!;
      this.encoder.push({
        kind: 'conv',
        conv:
          i === 0
            ? new Conv2d(c.inChannels, width, 3, { padding: 1 })
            : new Conv2d(width, width, 3, { padding: 1, stride: 2, bias: false }),
      });
      for (let j = 0; j < blocks; j++)
        this.encoder.push({ kind: 'block', block: new TinyBlock(width, width, c.actFn) });
    });
    this.encoder.push({
      kind: 'conv',
      conv: new Conv2d(c.encoderBlockOutChannels.at(-1)!, c.latentChannels, 3, { padding: 1 }),
    });

    this.decoder = this.addModule('decoder', new Sequential(c.actFn, c.upsamplingScalingFactor));
    this.decoder.push({
      kind: 'conv',
      conv: new Conv2d(c.latentChannels, c.decoderBlockOutChannels[0]!, 3, { padding: 1 }),
    });
    this.decoder.push({ kind: 'act' });
    c.numDecoderBlocks.forEach((blocks, i) => {
      const last = i === c.numDecoderBlocks.length - 1;
      const width = c.decoderBlockOutChannels[i]!;
      for (let j = 0; j < blocks; j++)
        this.decoder.push({ kind: 'block', block: new TinyBlock(width, width, c.actFn) });
      if (!last) this.decoder.push({ kind: 'upsample' });
      this.decoder.push({
        kind: 'conv',
        conv: new Conv2d(width, last ? c.outChannels : width, 3, { padding: 1, bias: last }),
      });
    });
  }

  /** Pixels per latent. */
  get scaleFactor(): number {
    return this.config.upsamplingScalingFactor ** (this.config.numDecoderBlocks.length - 1);
  }

  /** Image in [−1, 1] → latents (the pipeline's scaled latents). */
  encode(p: ParameterSource, image: Value): Value {
    return this.scoped(p, () => this.encoder.forward(p, op.div(op.add(image, 1), 2)));
  }

  /** Latents → image in about [−1, 1]; the latents are soft-clamped to ±3 first, as TAESD does. */
  decode(p: ParameterSource, latents: Value): Value {
    return this.scoped(p, () => {
      const clamped = op.mul(op.tanh(op.div(latents, 3)), 3);
      return op.sub(op.mul(this.decoder.forward(p, clamped), 2), 1);
    });
  }
}
