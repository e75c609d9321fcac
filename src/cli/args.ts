import { UserError } from '../errors.js';

/** Flag values checked the same way by every command. */

export function parseNumber(
  flag: string,
  value: string | undefined,
  options: { integer?: boolean; min?: number; max?: number } = {},
): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  const kind = options.integer === true ? 'an integer' : 'a number';
  if (
    value.trim() === '' ||
    !Number.isFinite(n) ||
    (options.integer === true && !Number.isInteger(n))
  ) {
    throw new UserError('usage', `--${flag} must be ${kind} (got '${value}')`);
  }
  if (options.min !== undefined && n < options.min)
    throw new UserError('usage', `--${flag} must be at least ${options.min} (got ${value})`);
  if (options.max !== undefined && n > options.max)
    throw new UserError('usage', `--${flag} must be at most ${options.max} (got ${value})`);
  return n;
}
