import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { Conv2d } from '../nn/conv.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm } from '../nn/norm.js';

export interface ResnetConfig {
  readonly inChannels: number;
  readonly outChannels?: number;
  /** Width of the time embedding; undefined for blocks without one (the VAE's). */
  readonly tembChannels: number | undefined;
  readonly groups: number;
  readonly groupsOut?: number;
  readonly eps: number;
  readonly act: string;
  /** 'default' adds the time embedding; 'scale_shift' modulates after norm2. */
  readonly timeEmbeddingNorm?: 'default' | 'scale_shift';
  readonly outputScaleFactor?: number;
  readonly skipTimeAct?: boolean;
  readonly useInShortcut?: boolean;
  readonly convShortcutBias?: boolean;
}

/** diffusers' `ResnetBlock2D`: norm1 → act → conv1 (+ time) → norm2 → act → conv2, plus shortcut. */
export class ResnetBlock2D extends Module {
  readonly outChannels: number;
  private readonly config: ResnetConfig;
  private readonly norm1: GroupNorm;
  private readonly conv1: Conv2d;
  private readonly timeEmbProj: Linear | undefined;
  private readonly norm2: GroupNorm;
  private readonly conv2: Conv2d;
  private readonly shortcut: Conv2d | undefined;
  private readonly act: (x: Value) => Value;

  constructor(config: ResnetConfig) {
    super();
    this.config = config;
    const out = config.outChannels ?? config.inChannels;
    this.outChannels = out;
    const norm = config.timeEmbeddingNorm ?? 'default';
    this.norm1 = this.addModule(
      'norm1',
      new GroupNorm(config.groups, config.inChannels, config.eps),
    );
    this.conv1 = this.addModule('conv1', new Conv2d(config.inChannels, out, 3, { padding: 1 }));
    this.timeEmbProj =
      config.tembChannels === undefined
        ? undefined
        : this.addModule(
            'time_emb_proj',
            new Linear(config.tembChannels, norm === 'scale_shift' ? 2 * out : out),
          );
    this.norm2 = this.addModule(
      'norm2',
      new GroupNorm(config.groupsOut ?? config.groups, out, config.eps),
    );
    this.conv2 = this.addModule('conv2', new Conv2d(out, out, 3, { padding: 1 }));
    const useShortcut = config.useInShortcut ?? config.inChannels !== out;
    this.shortcut = useShortcut
      ? this.addModule(
          'conv_shortcut',
          new Conv2d(config.inChannels, out, 1, { bias: config.convShortcutBias ?? true }),
        )
      : undefined;
    this.act = activation(config.act);
  }

  forward(p: ParameterSource, input: Value, temb?: Value): Value {
    return this.scoped(p, () => {
      let h = this.conv1.forward(p, this.act(this.norm1.forward(p, input)));
      let scaleShift: [Value, Value] | undefined;
      if (this.timeEmbProj !== undefined && temb !== undefined) {
        const t = this.config.skipTimeAct === true ? temb : this.act(temb);
        const projected = op.unsqueeze(this.timeEmbProj.forward(p, t), [2, 3]);
        if ((this.config.timeEmbeddingNorm ?? 'default') === 'default') h = op.add(h, projected);
        else
          scaleShift = op.split(projected, [this.outChannels, this.outChannels], 1) as [
            Value,
            Value,
          ];
      }
      h = this.norm2.forward(p, h);
      if (scaleShift !== undefined) h = op.add(op.mul(h, op.add(scaleShift[0], 1)), scaleShift[1]);
      h = this.conv2.forward(p, this.act(h));
      const skip = this.shortcut === undefined ? input : this.shortcut.forward(p, input);
      const sum = op.add(skip, h);
      const factor = this.config.outputScaleFactor ?? 1;
      return factor === 1 ? sum : op.div(sum, factor);
    });
  }
}
