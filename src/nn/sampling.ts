import type { Value } from '../graph/ir.js';
import { averagePool, pad, resizeNearestLike, upsampleNearest } from '../graph/ops.js';
import { Conv2d } from './conv.js';
import { Module, type ParameterSource } from './module.js';

/**
 * diffusers' `Upsample2D`: nearest-neighbour ×2 (or onto the spatial size of `like`, as diffusers'
 * `upsample_size` does for odd sizes), then an optional 3×3 `conv`.
 */
export class Upsample2D extends Module {
  private readonly conv: Conv2d | undefined;

  constructor(channels: number, options: { useConv?: boolean; outChannels?: number } = {}) {
    super();
    const useConv = options.useConv ?? true;
    this.conv = useConv
      ? this.addModule(
          'conv',
          new Conv2d(channels, options.outChannels ?? channels, 3, { padding: 1 }),
        )
      : undefined;
  }

  forward(params: ParameterSource, x: Value, like?: Value): Value {
    return this.scoped(params, () => {
      const up = like === undefined ? upsampleNearest(x, [2, 2]) : resizeNearestLike(x, like);
      return this.conv === undefined ? up : this.conv.forward(params, up);
    });
  }
}

/**
 * diffusers' `Downsample2D`: a stride-2 3×3 `conv` (with `padding` 1 as in the UNet, or 0 with
 * one extra row and column of zeros at the bottom and right, as in the VAE), or 2×2 average
 * pooling when `useConv` is false.
 */
export class Downsample2D extends Module {
  private readonly conv: Conv2d | undefined;
  private readonly padding: number;

  constructor(
    channels: number,
    options: { useConv?: boolean; outChannels?: number; padding?: number } = {},
  ) {
    super();
    this.padding = options.padding ?? 1;
    const useConv = options.useConv ?? true;
    this.conv = useConv
      ? this.addModule(
          'conv',
          new Conv2d(channels, options.outChannels ?? channels, 3, {
            stride: 2,
            padding: this.padding,
          }),
        )
      : undefined;
  }

  forward(params: ParameterSource, x: Value): Value {
    return this.scoped(params, () => {
      if (this.conv === undefined) return averagePool(x, { kernel: [2, 2], strides: [2, 2] });
      const input = this.padding === 0 ? pad(x, [0, 0, 0, 0, 0, 0, 1, 1]) : x;
      return this.conv.forward(params, input);
    });
  }
}
