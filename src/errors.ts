/**
 * An error caused by what the user gave us (a file, a flag, a request), as opposed to a bug.
 * Surfaces print `message` alone, with no stack trace; the CLI exits with status 2.
 * `code` is a stable machine-readable name for tests and API responses.
 */
export class UserError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UserError';
    this.code = code;
  }
}

export function isUserError(error: unknown): error is UserError {
  return error instanceof UserError;
}
